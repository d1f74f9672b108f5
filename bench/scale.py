"""Archive scale: the driver's cost per tile, scaling over simulated GPUs, memory at 20k scenes.

Every part runs in its own process (a fresh Ray, a fresh peak RSS); one run prints every
figure as ``name: value``:

- ``driver_cpu_us_per_tile_sparse`` / ``_dense``: CPU time of the driver process (Ray's
  core-worker threads included) over one ``run_job`` of >= 20,000 tiles of 64 px with the
  ``threshold`` detector, Ray's start and one warm-up run excluded; under one detection a
  tile, then over 100 a tile. ``scene_worker_cpu_us_per_tile_*``: the scene workers' CPU
  over the same runs (the per-tile bookkeeping, spread over workers on any node).
- ``object_store_bytes_per_tile_over_pixels``: the bytes of the objects the stages make for
  a scene (read chunks, detector tables) per tile, over the tile's pixels.
- ``scale_efficiency_8x``: steady throughput with 8 simulated GPU actors over 1, divided by 8,
  on a 3-node ``ray.cluster_utils.Cluster``. A simulated actor (:class:`SimulatedGPU`, only
  here) sleeps a fixed time per batch and returns one fixed box a tile, so the actors cost no
  CPU and what limits the curve is the rest of the flow: plan, read, route, merge, write.
- ``archive_driver_peak_rss_mb_1k`` / ``_20k`` and their ratio: the driver's peak RSS over a
  list file of 1,000 and 20,000 one-tile scenes (symlinks to one small COG, distinct URIs);
  ``first_tile_s_20k``: from calling ``run_job`` to the first tile reaching a detector.

Run: .venv/bin/python bench/scale.py [--quick]   (about 25 min on 2 cores; --quick: 3 min)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import Affine

from pipeline.jobs.stages import DetectorActor, detections_to_arrow

TILE = 64
OVERLAP = 8
STRIDE = TILE - OVERLAP
# Small tiles are cheap to read and detect, so blocks carry many: Ray Data's cost is per block.
TILES_PER_BLOCK = 256


# -- rasters ---------------------------------------------------------------------------------


def write_raster(path: Path, pixels: np.ndarray) -> None:
    """A tiled, deflated 3-band GeoTIFF in UTM 33N at 0.5 m (the same band thrice)."""
    height, width = pixels.shape
    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32633",
        "transform": Affine(0.5, 0, 500_000.0, 0, -0.5, 5_000_000.0),
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
    }
    with rasterio.open(path, "w", **profile) as dataset:
        dataset.write(np.stack([pixels] * 3))


def squares(size: int, pitch: int, side: int) -> np.ndarray:
    """Bright ``side`` px squares every ``pitch`` px on a dark background."""
    pixels = np.full((size, size), 40, np.uint8)
    for y in range(pitch // 2, size - side, pitch):
        for x in range(pitch // 2, size - side, pitch):
            pixels[y : y + side, x : x + side] = 250
    return pixels


def linked_scenes(source: Path, folder: Path, count: int) -> list[str]:
    """``count`` distinct URIs (symlinks) of one raster: distinct scenes, one file to cache."""
    folder.mkdir(parents=True, exist_ok=True)
    uris = []
    for index in range(count):
        link = folder / f"scene_{index:06d}.tif"
        if not link.exists():
            link.symlink_to(source)
        uris.append(str(link))
    return uris


def write_list(path: Path, uris: list[str]) -> Path:
    path.write_text("\n".join(uris) + "\n")
    return path


# -- the simulated GPU -----------------------------------------------------------------------


class Clock:
    """A Ray actor the simulated detectors tell when each batch ends (wall clock, one node)."""

    def __init__(self) -> None:
        self.batches: list[tuple[float, float, int]] = []

    def batch(self, started: float, ended: float, tiles: int) -> None:
        self.batches.append((started, ended, tiles))

    def take(self) -> list[tuple[float, float, int]]:
        batches, self.batches = self.batches, []
        return batches


class SimulatedGPU(DetectorActor):
    """Detector stage stand-in: sleeps ``DELAY_S`` a batch, returns one fixed box a tile.

    A ``DetectorActor`` (same constructor and ``run_chunk``) without a model; ``DELAY_S``
    and ``CLOCK`` are set on a subclass made by :func:`simulated_gpu` (cloudpickle ships it
    with them by value).
    """

    DELAY_S = 0.0
    CLOCK = None

    def __init__(self, spec_json: str) -> None:
        from pipeline.config import JobSpec
        from pipeline.model.detector import TileDetections

        self.batch_size = JobSpec.model_validate_json(spec_json).detect.batch_size
        self.found = TileDetections(
            np.array([[10.0, 10.0, 20.0, 20.0]], np.float32),
            np.array([0.9], np.float32),
            np.array([0], np.int16),
        )

    def _detect(self, batch: dict[str, np.ndarray]) -> object:
        started = time.time()
        count = len(batch["scene_id"])
        time.sleep(self.DELAY_S)
        table = detections_to_arrow(batch, [self.found] * count, np.ones(count, bool))
        if self.CLOCK is not None:
            self.CLOCK.batch.remote(started, time.time(), count)
        return table


def simulated_gpu(delay_s: float, clock: object) -> type:
    return type("SimulatedGPU", (SimulatedGPU,), {"DELAY_S": delay_s, "CLOCK": clock})


# -- parts (each in its own process) ---------------------------------------------------------


def job(
    inputs: list, out: Path, tiles_per_read_task: int = TILES_PER_BLOCK, **detect: object
) -> object:
    from pipeline.config import parse_job

    settings = {"batch_size": TILES_PER_BLOCK, "num_actors": 1, "torch_threads": 1}
    return parse_job(
        {
            "inputs": inputs,
            "model": {"kind": "threshold", "threshold_level": 200, "threshold_min_pixels": 4},
            "tiling": {
                "tile_size": TILE,
                "overlap": OVERLAP,
                "tiles_per_read_task": tiles_per_read_task,
            },
            "detect": {**settings, **detect},
            "output": {"path": str(out)},
        }
    )


# The name of the benchmark's own sampling threads: their CPU is not the driver's.
SAMPLER = "bench sampler"


class ThreadCpu:
    """CPU seconds of this process's threads by name, sampled from /proc (threads that end
    keep their last sample): which part of the driver spends its CPU, and how much of it
    went to the benchmark's own samplers (named :data:`SAMPLER`)."""

    def __init__(self) -> None:
        self.start = self._now()
        self.last: dict[str, tuple[str, float]] = {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name=SAMPLER, daemon=True)
        self.thread.start()

    @staticmethod
    def _now() -> dict[str, tuple[str, float]]:
        names = {str(t.native_id): t.name for t in threading.enumerate()}
        tick = os.sysconf("SC_CLK_TCK")
        found = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                stat = Path(f"/proc/self/task/{tid}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            found[tid] = (names.get(tid, comm), (int(fields[11]) + int(fields[12])) / tick)
        return found

    def _run(self) -> None:
        while not self.stopped.wait(0.2):
            self.last.update(self._now())

    def stop(self) -> dict[str, float]:
        self.stopped.set()
        self.thread.join()
        self.last.update(self._now())
        by_name: dict[str, float] = {}
        for tid, (name, cpu) in self.last.items():
            by_name[name] = by_name.get(name, 0.0) + cpu - self.start.get(tid, (name, 0.0))[1]
        return by_name


class RoleCpu:
    """CPU seconds of this process's descendants (Ray's workers) whose title names ``role``
    (``ray::SceneWorker``), sampled from /proc until :meth:`stop`: a dead process keeps its
    last sample."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.last: dict[int, float] = {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name=SAMPLER, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        for pid in _descendants(os.getpid()):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            if title.startswith(f"ray::{self.role}"):
                fields = stat[stat.rindex(")") + 2 :].split()
                self.last[pid] = (int(fields[11]) + int(fields[12])) / tick

    def _run(self) -> None:
        while not self.stopped.wait(0.2):
            self._sample()

    def stop(self) -> float:
        self.stopped.set()
        self.thread.join()
        self._sample()
        return sum(self.last.values())


def _descendants(pid: int) -> list[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    found, frontier = [], [pid]
    while frontier:
        frontier = [p for p, parent in parents.items() if parent in frontier]
        found.extend(frontier)
    return found


def part_driver(work: Path, quick: bool) -> dict[str, float]:
    """Driver CPU per tile at two densities (and the scene workers'), and the object store's
    bytes per tile."""
    from pipeline.jobs.ray_session import start_embedded_ray
    from pipeline.jobs.run import run_job

    start_embedded_ray()
    size = 1024 if quick else 2048
    tiles_per_scene = ((size - TILE + STRIDE - 1) // STRIDE + 1) ** 2
    scenes = max(1, -(-(2_000 if quick else 20_000) // tiles_per_scene))
    figures: dict[str, float] = {}
    warm = work / "warm.tif"
    write_raster(warm, squares(256, 150, 8))
    run_job(job([str(warm)], work / "out-warm"), force=True, progress=lambda line: None)
    idle_share = driver_idle_share(work, warm)
    figures["driver_cpu_share_waiting"] = round(idle_share, 4)
    for density, pitch, side in (("sparse", 150, 8), ("dense", 5, 3)):
        source = work / f"{density}.tif"
        write_raster(source, squares(size, pitch, side))
        uris = linked_scenes(source, work / density, scenes)
        spec = job(uris, work / f"out-{density}")
        cpu_before, threads, workers = time.process_time(), ThreadCpu(), RoleCpu("SceneWorker")
        report = run_job(spec, force=True, progress=lambda line: None)
        worker_s = workers.stop()
        by_thread = threads.stop()
        # The samplers walk /proc five times a second (0.6 CPU-s over the dense run): the
        # benchmark's cost, not the driver's.
        cpu_s = time.process_time() - cpu_before - by_thread.pop(SAMPLER, 0.0)
        assert report.count("done") == scenes, report.failures_by_reason
        figures[f"tiles_{density}"] = report.tiles
        figures[f"detections_per_tile_{density}"] = round(report.detections / report.tiles, 2)
        figures[f"tiles_per_s_{density}"] = round(report.tiles_per_s, 1)
        figures[f"driver_cpu_us_per_tile_{density}"] = round(cpu_s / report.tiles * 1e6, 1)
        # Where it goes: the main thread (discovery, handing out scenes, the report); the
        # rest is Ray's own threads in the driver.
        main_us = by_thread.get("MainThread", 0.0) / report.tiles * 1e6
        figures[f"driver_main_thread_us_per_tile_{density}"] = round(main_us, 1)
        # The per-tile bookkeeping the driver no longer does: the scene workers' (all of
        # them, on any node), for a cluster's sizing.
        figures[f"scene_worker_cpu_us_per_tile_{density}"] = round(worker_s / report.tiles * 1e6, 1)
        # What a tile adds beyond the CPU a waiting driver spends anyway.
        marginal_s = cpu_s - idle_share * (report.wall_s - report.ray_start_s)
        figures[f"driver_cpu_us_per_tile_marginal_{density}"] = round(
            max(0.0, marginal_s) / report.tiles * 1e6, 1
        )
        figures[f"object_store_bytes_per_tile_over_pixels_{density}"] = object_store_ratio(
            job(uris[:1], work / f"out-bytes-{density}")
        )
    # The issue's figure: the tiles' own traffic (sparse: the rows are a few bytes a tile).
    figures["object_store_bytes_per_tile_over_pixels"] = figures.pop(
        "object_store_bytes_per_tile_over_pixels_sparse"
    )
    return figures


def driver_idle_share(work: Path, raster: Path) -> float:
    """The driver's CPU share while its run only waits: one small scene's tiles (25) in
    batches of one to a simulated GPU that takes 1 s each (a run of ~25 s, a tile a second)."""
    spec = job([str(raster)], work / "out-idle", batch_size=1)
    cpu_before = time.process_time()
    report = run_job_quietly(spec, simulated_gpu(1.0, None))
    return (time.process_time() - cpu_before) / report.wall_s


def run_job_quietly(spec: object, detector: type) -> object:
    from pipeline.jobs.run import run_job

    return run_job(spec, force=True, progress=lambda line: None, detector_actor=detector)


def object_store_ratio(spec: object) -> float:
    """Bytes a tile puts through the object store, over its pixel bytes: the objects the run's
    own stages make for one scene (each read task's chunk, on its way to a detector; each
    detector's table, on its way to the merge task), measured as they come out."""
    import ray

    from pipeline.io.discovery import discover_scenes
    from pipeline.jobs.run import scene_row
    from pipeline.jobs.stages import SceneReads, plan_scene, read_chunk, tile_alignment

    row = scene_row(discover_scenes(spec.inputs)[0])
    plan = plan_scene(row, spec.tiling, tile_alignment(spec))
    how = SceneReads.of(row["scene_id"], row["uri"], plan.info, spec.tiling)
    detector = DetectorActor(spec.model_dump_json(by_alias=True))
    step, total = spec.tiling.tiles_per_read_task, 0
    for first in range(0, plan.tiles, step):
        cols, rows = plan.cols[first : first + step], plan.rows[first : first + step]
        chunk = ray.get(read_chunk.remote(how, first, cols, rows))
        total += sum(values.nbytes for values in chunk.values()) + detector(chunk).nbytes
    return round(total / (plan.tiles * 3 * TILE * TILE), 3)


def _cpu_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [float(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def steady_rate(batches: list[tuple[float, float, int]]) -> tuple[float, float]:
    """(tiles/s, actor busy seconds per second) between the 10th and 90th percentile ends."""
    ends = np.array(sorted(end for _, end, _ in batches))
    lo, hi = np.quantile(ends, [0.1, 0.9])
    inside = [(s, e, n) for s, e, n in batches if lo < e <= hi]
    tiles = sum(n for _, _, n in inside)
    busy = sum(e - s for s, e, _ in inside)
    return tiles / (hi - lo), busy / (hi - lo)


def part_scale(work: Path, quick: bool) -> dict[str, float | str]:
    """Throughput over 1..8 simulated GPU actors on a 3-node local cluster."""
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.jobs.ray_session import RAY_SYSTEM_CONFIG
    from pipeline.jobs.run import run_job

    # 64 tiles/s an actor: 8 ask for 512 tiles/s, which the flow's reads, merges and writes
    # supply on 2 cores (they top out near 750 tiles/s of 64 px here); 16 ask for more.
    delay_s, batch, per_actor_s = 1.0, 64, (8 if quick else 25)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "object_store_memory": 1 << 30,
            "_system_config": dict(RAY_SYSTEM_CONFIG),
        },
    )
    for _ in range(2):  # the simulated GPUs are on the workers: tiles cross nodes
        cluster.add_node(num_cpus=2, num_gpus=8, object_store_memory=1 << 30)
    ray.init(address=cluster.address, logging_level="WARNING")
    clock = ray.remote(Clock).options(num_cpus=0).remote()
    detector = simulated_gpu(delay_s, clock)
    source = work / "scale.tif"
    write_raster(source, squares(1024, 150, 8))  # 361 tiles a scene
    figures: dict[str, float | str] = {}
    rates = {}
    for actors in (1, 2, 4, 8, 16):
        tiles_wanted = actors * per_actor_s * batch / delay_s
        uris = linked_scenes(source, work / "scale", int(tiles_wanted // 361) + 1)
        spec = job(
            uris,
            work / f"out-scale-{actors}",
            tiles_per_read_task=batch,  # one batch a call: the actors share scenes finely
            num_actors=actors,
            batch_size=batch,
            num_gpus_per_actor=1,
            num_cpus_per_actor=0.01,
            inflight_mb_per_actor=32,  # 40 chunks of 64 tiles of 64 px
        )
        cpu_before, busy_before = time.process_time(), _cpu_busy()
        started = time.perf_counter()
        report = run_job(spec, force=True, progress=lambda line: None, detector_actor=detector)
        wall = time.perf_counter() - started
        busy_after = _cpu_busy()
        assert report.count("done") == len(uris), report.failures_by_reason
        rate, actors_busy = steady_rate(ray.get(clock.take.remote()))
        rates[actors] = rate
        machine = (busy_after[0] - busy_before[0]) / (busy_after[1] - busy_before[1])
        driver = (time.process_time() - cpu_before) / wall
        figures[f"scale_tiles_per_s_{actors}"] = round(rate, 1)
        figures[f"scale_actor_busy_{actors}"] = round(actors_busy / actors, 3)
        figures[f"scale_machine_cpu_busy_{actors}"] = round(machine, 3)
        figures[f"scale_driver_cpu_share_{actors}"] = round(driver, 3)
        if "scale_first_saturated" not in figures and actors_busy / actors < 0.9:
            figures["scale_first_saturated"] = _saturated(actors, driver, machine)
    figures["scale_efficiency_8x"] = round(rates[8] / rates[1] / 8, 3)
    figures.setdefault("scale_first_saturated", "none up to 16 actors")
    ray.shutdown()
    cluster.shutdown()
    return figures


def _saturated(actors: int, driver_share: float, machine_busy: float) -> str:
    """Which stage kept the actors waiting, from where the CPU went."""
    if driver_share >= 0.9:
        return f"the driver (at {actors} actors: one core's worth of CPU)"
    if machine_busy >= 0.8:
        return f"reads and merges (at {actors} actors: every core of the machine busy)"
    return f"unclear (at {actors} actors: actors waited with CPU to spare)"


def part_archive(work: Path, scenes: int) -> dict[str, float]:
    """Peak driver RSS and time to the first tile over ``scenes`` one-tile scenes."""
    import ray

    from pipeline.jobs.ray_session import start_embedded_ray
    from pipeline.jobs.run import run_job

    source = work / "tiny.tif"
    if not source.exists():
        write_raster(source, squares(TILE, 150, 8))
    listed = write_list(
        work / f"archive_{scenes}.txt", linked_scenes(source, work / "tiny", scenes)
    )
    start_embedded_ray()
    clock = ray.remote(Clock).options(num_cpus=0).remote()
    # One tile a scene: a batch of 4 (the default) goes to a detector after 4 scenes, not 256.
    spec = job([{"list": str(listed)}], work / f"out-archive-{scenes}", batch_size=4)
    started, cpu_before = time.time(), time.process_time()
    report = run_job(
        spec, force=True, progress=lambda line: None, detector_actor=simulated_gpu(0.0, clock)
    )
    first = min(start for start, _, _ in ray.get(clock.take.remote()))
    assert report.count("done") == scenes, report.failures_by_reason
    label = _label(scenes)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        f"archive_driver_peak_rss_mb_{label}": round(peak_mb, 1),
        f"first_tile_s_{label}": round(first - started - report.ray_start_s, 2),
        f"archive_wall_s_{label}": round(report.wall_s, 1),
        f"archive_driver_cpu_ms_per_scene_{label}": round(
            (time.process_time() - cpu_before) / scenes * 1e3, 2
        ),
    }


# -- the run -------------------------------------------------------------------------------


def _label(scenes: int) -> str:
    return f"{scenes / 1000:g}k"


def run_part(args: list[str]) -> dict:
    """One part in a fresh process; its figures come back as one JSON line."""
    done = subprocess.run(
        [sys.executable, __file__, "--part", *args], capture_output=True, text=True, check=False
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"part {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--only", choices=["driver", "scale", "archive"], default=None)
    parser.add_argument("--part", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    if args.part:
        work, name = Path(args.part[1]), args.part[0]
        quick = "quick" in args.part
        if name == "driver":
            figures = part_driver(work, quick)
        elif name == "scale":
            figures = part_scale(work, quick)
        else:
            figures = part_archive(work, int(args.part[2]))
        print(json.dumps(figures))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="georetina-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    extra = ["quick"] if args.quick else []
    small, large = (100, 2_000) if args.quick else (1_000, 20_000)
    figures: dict = {}
    if args.only in (None, "driver"):
        figures |= run_part(["driver", str(work), *extra])
    if args.only in (None, "scale"):
        figures |= run_part(["scale", str(work), *extra])
    if args.only in (None, "archive"):
        figures |= run_part(["archive", str(work), str(small)])
        figures |= run_part(["archive", str(work), str(large)])
        lo, hi = (f"archive_driver_peak_rss_mb_{_label(n)}" for n in (small, large))
        figures[f"archive_rss_ratio_{_label(large)}_over_{_label(small)}"] = round(
            figures[hi] / figures[lo], 3
        )
    for name, value in figures.items():
        print(f"{name}: {value}")


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    main()
