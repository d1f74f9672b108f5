"""The demo as a new user meets it: the package built as a wheel and installed apart from the
repository, `georetina demo` run in an empty folder, and nothing printed but our own lines.

The wheel is installed into a folder of its own (its dependencies are this venv's), and that
folder comes first on the path, so the package, its demo job, preset and model are the
wheel's: a file left out of the package data fails this test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Everything the demo prints by default begins so (pipeline/jobs/demo.py; run_job's header and
# its indented progress lines): a Ray, GDAL or PyTorch line begins with none of them.
OURS = re.compile(
    r"^(scene: |run \S+: |  \S|model: |note: |scenes: |tiles: |tiles_per_s: |detections: |"
    r"precision: |recall: |seam_objects_found: |output: |AP50: |evaluate it: |query it: )"
)


def _install_wheel(tmp_path: Path) -> Path:
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("georetina-*.whl")
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return site


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_demo_runs_from_an_installed_wheel_in_an_empty_folder(tmp_path):
    site = _install_wheel(tmp_path)
    here = tmp_path / "elsewhere"
    here.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("RAY_ADDRESS", None)
    where = subprocess.run(
        [sys.executable, "-c", "import pipeline; print(pipeline.__file__)"],
        cwd=here,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.strip().startswith(str(site)), where.stdout
    demo = subprocess.run(
        [sys.executable, "-m", "pipeline.cli.main", "demo", "--size", "1024"],
        cwd=here,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    printed = [line for line in (demo.stdout + demo.stderr).splitlines() if line.strip()]
    assert demo.returncode == 0, "\n".join(printed[-40:])
    assert sorted(p.name for p in here.iterdir()) == ["demo-output"]
    assert list((here / "demo-output" / "out" / "detections").rglob("*.parquet"))
    foreign = [line for line in printed if not OURS.match(line)]
    assert not foreign, "lines that are not georetina's:\n" + "\n".join(foreign)
