"""Pure logic knows nothing of Ray: importing it must not import Ray."""

import subprocess
import sys

PURE = [
    "pipeline.tiling",
    "pipeline.merge",
    "pipeline.geoparquet",
    "pipeline.config",
    "pipeline.scenes",
    "pipeline.finalize",
    "pipeline.detect",
    "pipeline.model",
    "pipeline.ledger",
    "pipeline.rasters",
    "pipeline.query",
    "pipeline.iostats",
    "pipeline.quicklook",
    "pipeline.stac",
    "pipeline.report",
    "pipeline.redact",
    "pipeline.deadline",
]


def test_pure_modules_do_not_import_ray():
    code = (
        "import sys, importlib\n"
        f"for name in {PURE!r}: importlib.import_module(name)\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
