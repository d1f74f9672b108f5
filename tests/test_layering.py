"""The package's layers: each imports only the layers above it, and nothing below jobs/ Ray.

Layers, top to bottom: the root modules (errors, config, redact), ops/ (pure numpy), io/,
model/, merge/, jobs/ (the Ray flow), cli/.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
LAYERS = ["root", "ops", "io", "model", "merge", "jobs", "cli"]
BELOW_JOBS = LAYERS[: LAYERS.index("jobs")]


def layer_of(module: str) -> str:
    """``pipeline.io.rasters`` -> ``io``; ``pipeline.config`` -> ``root``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else "root"


def modules() -> list[str]:
    return sorted(
        ".".join(("pipeline", *path.relative_to(PACKAGE).with_suffix("").parts))
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py"
    )


def imported_pipeline_modules(module: str) -> set[str]:
    """Every ``pipeline.*`` module that ``module`` imports, at top level or inside functions."""
    path = PACKAGE.joinpath(*module.split(".")[1:]).with_suffix(".py")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pipeline.")}
    return found


@pytest.mark.parametrize("module", modules())
def test_a_module_imports_only_its_own_layer_and_those_above(module):
    own = LAYERS.index(layer_of(module))
    wrong = sorted(
        f"{name} ({layer_of(name)})"
        for name in imported_pipeline_modules(module)
        if LAYERS.index(layer_of(name)) > own
    )
    assert not wrong, f"{module} ({layer_of(module)}) imports layers below it: {wrong}"


def test_nothing_below_jobs_imports_ray():
    below = [m for m in modules() if layer_of(m) in BELOW_JOBS]
    code = (
        "import sys, importlib\n"
        f"for name in {below!r}: importlib.import_module(name)\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
