"""Load: hundreds of small scenes through the whole flow, on a Ray of its own (bench/soak.py).

Every scene must be `done` in the ledger, once, and the driver's peak memory at the end must
be within 10 % of its peak when half the scenes were through (no creep). Memory, not time:
it does not depend on how busy the machine is.
"""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]


def test_two_hundred_scenes_all_accounted_for_and_no_memory_creep(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--scenes", "200",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    figures = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert figures["ledger_scenes_done"] == figures["scenes_done"] == "200"
    assert figures["ledger_scenes_recorded"] == "200"
    assert float(figures["peak_rss_end_over_mid"]) <= 1.10
