"""Helpers shared by the fault, security and bad-input tests: a small archive of planted
scenes, the rows of an output compared across runs, and the processes a test started."""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import fsspec
import pyarrow.parquet as pq

from pipeline.io.synthetic import plan_objects, write_scene

TILE, OVERLAP = 256, 48
SIZE = 600  # 3 x 3 tiles of 256 with 48 of overlap
GEORETINA = str(Path(sys.executable).parent / "georetina")

# Columns that must be identical between a clean run and a run that survived a fault.
COMPARED = [
    "scene_id",
    "detection_id",
    "class_id",
    "class_name",
    "score",
    "geometry",
    "pixel_xmin",
    "pixel_ymin",
    "pixel_xmax",
    "pixel_ymax",
    "scene_crs",
    "scene_uri",
    "model_id",
]


# RetinaNet untrained (seeded: deterministic) on the CPU, slow enough (~0.1 s a tile) that a
# kill lands while tiles are still to be detected; a narrow FPN keeps it at that.
SMALL_RETINANET = {
    "kind": "retinanet",
    "backbone": "resnet18_fpn",
    "fpn_channels": 32,
    "score_threshold": 0.001,
    "detections_per_tile": 10,
}


def write_archive(folder: Path, count: int, size: int = SIZE, seed: int = 40) -> dict[str, int]:
    """``count`` planted scenes ``scene_<i>.tif``; returns name -> number of objects."""
    folder.mkdir(parents=True, exist_ok=True)
    planted = {}
    for index in range(count):
        objects = plan_objects(size, TILE, OVERLAP, count=8, seed=seed + index, max_side=30)
        name = f"scene_{index:03d}.tif"
        write_scene(folder / name, size, objects, seed=seed + index, block=128, overviews=False)
        planted[name] = len(objects)
    return planted


def threshold_job(inputs: list, output: str, **sections: dict) -> dict:
    """A job on the deterministic threshold detector; ``sections`` update its settings."""
    job = {
        "inputs": [p if isinstance(p, dict) else str(p) for p in inputs],
        "model": {"kind": "threshold"},
        "tiling": {"tile_size": TILE, "overlap": OVERLAP, "tiles_per_read_task": 3},
        "detect": {"batch_size": 3},
        "output": {"path": str(output)},
    }
    for key, value in sections.items():
        job[key] = {**job.get(key, {}), **value}
    return job


def output_rows(output_root: str) -> dict[str, list[tuple]]:
    """Every detection of an output, per scene id, sorted: what two runs must agree on."""
    fs, root = fsspec.core.url_to_fs(output_root)
    fs.invalidate_cache()
    rows: dict[str, list[tuple]] = {}
    for path in sorted(fs.glob(f"{root}/detections/*.parquet")):
        table = pq.read_table(io.BytesIO(fs.cat_file(path)), columns=COMPARED)
        scene_rows = sorted(zip(*(table[c].to_pylist() for c in COMPARED), strict=True))
        scene_id = Path(path).stem
        assert scene_id not in rows
        rows[scene_id] = scene_rows
    return rows


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children first."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found.extend(children)
        frontier = children
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` (a process this test started) and everything below it, by pid."""
    tree = [pid, *descendants(pid)]
    for each in tree:
        try:
            os.kill(each, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 30
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in tree[1:]):
        time.sleep(0.2)


def clean_env(**overrides: str) -> dict[str, str]:
    """This process's environment for a ``georetina`` subprocess with its own embedded Ray."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(overrides)
    return env


class KillAfterFirstDone:
    """SIGKILLs every process ``find_pids()`` names, every 20 ms, from the moment a run's
    first scene is done (pass :meth:`progress` as the run's progress) until :meth:`stop`;
    ``limit`` kills at most, so a test that goes wrong fails instead of hanging."""

    def __init__(self, find_pids: Callable[[], list[int]], limit: int | None = None) -> None:
        self.find_pids, self.limit = find_pids, limit
        self.killed: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep_killing, daemon=True)

    def _keep_killing(self) -> None:
        while not self._stop.is_set() and (self.limit is None or len(self.killed) < self.limit):
            for pid in self.find_pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)

    def progress(self, line: str) -> None:
        if line.strip().startswith("done ") and self._thread.ident is None:
            if not self._stop.is_set():
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()
