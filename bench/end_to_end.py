"""End-to-end throughput against the bare model, and against a plain loop, in one run each.

Two cases, each printing ``name: value`` lines:

``--case model`` (default size 8192): a synthetic COG (3-band uint8, UTM) through the real
job on an embedded Ray (RetinaNet ResNet-18 FPN, CPU, one detector actor using every
core), against the bare model's forward over the same tiles (already in memory) with the same
batch size, one single-threaded process per core. The job's time counts
everything from `run_job` to the last file written: pre-flight, actor start-up (importing
torch and torchvision), reads, inference, merge and write.

    tiles_per_s, model_only_tiles_per_s, e2e_over_model

``--case plain`` (default size 4096, ResNet-50 FPN, 512 px tiles overlapping by 128): the same
job against the best loop a user could write by hand on the same machine: one process using
every core, rasterio windowed reads, the bare torchvision model at the same input scale,
inference_mode, one global NMS over the scene, over the job's own tiles. Both are timed from
a fresh start to their last result (the loop's process from launch, torch's import included;
the job once Ray has started).

    plain_tiles, plain_loop_tiles, plain_loop_s, job_s, e2e_over_plain_loop,
    plain_loop_detections, job_detections

Run: .venv/bin/python bench/end_to_end.py [--case model|plain|both] [--size N] [--tile N]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import JobSpec, parse_job
from pipeline.io.rasters import open_raster
from pipeline.io.reads import read_tile
from pipeline.io.synthetic import plan_objects, write_scene
from pipeline.jobs.ray_session import ALLOCATOR_ENV
from pipeline.model.build import build_model
from pipeline.ops.tiles import plan_tiles


def _bare_worker(tiles_path: str, share: slice, spec_json: str, barrier, results) -> None:
    """One process: the bare model, one thread, over its share of the tiles."""
    torch.set_num_threads(1)
    spec = JobSpec.model_validate_json(spec_json)
    tiles = np.load(tiles_path, mmap_mode="r")[share]
    model = build_model(spec.model, spec.tiling.tile_size)
    batch = spec.detect.batch_size
    with torch.inference_mode():
        model([torch.zeros(3, spec.tiling.tile_size, spec.tiling.tile_size)])  # warm-up
        barrier.wait()
        for start in range(0, len(tiles), batch):
            chunk = np.array(tiles[start : start + batch])  # a writable copy, as the actor gets
            x = torch.from_numpy(chunk).float() / 255
            model(list(x))
    results.put(time.perf_counter())


def model_only_tiles_per_s(spec, tiles_path: str, count: int, processes: int) -> float:
    """The bare model's forward over in-memory tiles, in the same layout as the pipeline's
    actors (one single-threaded process per core), with the allocator settings the actors get.
    No Ray, no reading, no merging: the ceiling for the pipeline."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes + 1)
    results = context.Queue()
    shares = np.array_split(np.arange(count), processes)
    workers = [
        context.Process(
            target=_bare_worker,
            args=(
                tiles_path,
                slice(int(s[0]), int(s[-1]) + 1),
                spec.model_dump_json(),
                barrier,
                results,
            ),
        )
        for s in shares
    ]
    for worker in workers:
        worker.start()
    barrier.wait()
    started = time.perf_counter()
    ended = max(results.get() for _ in workers)
    for worker in workers:
        worker.join()
    return count / (ended - started)


def plain_loop(scene: str, spec_json: str) -> tuple[int, int]:
    """The hand-written loop: (tiles, detections). One process, every core, no Ray."""
    import rasterio
    from rasterio.windows import Window
    from torchvision.ops import batched_nms

    from pipeline.model.build import largest_stride
    from pipeline.ops.tiles import plan_alignment, plan_offsets

    torch.set_num_threads(os.cpu_count() or 1)
    spec = JobSpec.model_validate_json(spec_json)
    tile, batch = spec.tiling.tile_size, spec.detect.batch_size
    model = build_model(spec.model, tile)  # torchvision's RetinaNet, no resizing
    align = plan_alignment(largest_stride(spec.model), tile, spec.tiling.overlap)
    boxes, scores, labels = [], [], []
    with rasterio.open(scene) as dataset, torch.inference_mode():
        # The job's own tiles (offsets on the model's coarsest grid): both sides run the
        # same tiles, so the ratio measures the flow, not a tiling choice.
        cols, rows = plan_offsets(dataset.width, dataset.height, tile, spec.tiling.overlap, align)
        for start in range(0, len(cols), batch):
            offsets = list(
                zip(cols[start : start + batch], rows[start : start + batch], strict=True)
            )
            images = [
                torch.from_numpy(dataset.read(window=Window(int(c), int(r), tile, tile)))
                for c, r in offsets
            ]
            found = model([x.float() / 255 for x in images])
            for (c, r), out in zip(offsets, found, strict=True):
                boxes.append(out["boxes"] + torch.tensor([c, r, c, r], dtype=torch.float32))
                scores.append(out["scores"])
                labels.append(out["labels"])
        every = torch.cat(boxes)
        keep = batched_nms(every, torch.cat(scores), torch.cat(labels), spec.merge.iou_threshold)
    return len(cols), len(keep)


def timed_plain_loop(scene: str, spec: JobSpec) -> tuple[float, int, int]:
    """The loop in a fresh process, timed from launch: (seconds, tiles, detections)."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--plain-loop", scene, spec.model_dump_json()],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **ALLOCATOR_ENV},
    )
    elapsed = time.perf_counter() - started
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    return elapsed, counts["tiles"], counts["detections"]


def synthetic_scene(workdir: Path, size: int, tile: int) -> Path:
    scene = workdir / f"scene_{size}.tif"
    if not scene.exists():
        write_scene(scene, size, plan_objects(size, tile, 64, count=size // 16))
    return scene


def cpu_job(
    scene: Path, workdir: Path, backbone: str, tile: int, batch: int, overlap: int = 64
) -> JobSpec:
    """The job on this machine's cores: one actor using every core's threads, reserving one
    CPU less than the machine has, so the read and merge tasks can always be scheduled."""
    threads = os.cpu_count() or 1
    return parse_job(
        {
            "inputs": [str(scene)],
            "model": {"backbone": backbone, "classes": ["object"]},
            "tiling": {"tile_size": tile, "overlap": overlap},
            "detect": {
                "batch_size": batch,
                "num_actors": 1,
                "torch_threads": threads,
                "num_cpus_per_actor": max(1.0, threads - 1.0),
            },
            "output": {"path": str(workdir / f"out-{backbone}-{tile}")},
        }
    )


def timed_job(spec: JobSpec) -> tuple[float, object]:
    """``run_job`` on an embedded Ray started beforehand: (seconds, report)."""
    import ray

    from pipeline.jobs.ray_session import start_embedded_ray
    from pipeline.jobs.run import run_job

    start_embedded_ray(num_cpus=os.cpu_count() or 1)
    started = time.perf_counter()
    report = run_job(spec, force=True, progress=lambda line: None)
    elapsed = time.perf_counter() - started
    assert report.count("done") == 1, report.scenes
    ray.shutdown()
    return elapsed, report


def case_model(workdir: Path, size: int, tile: int, batch: int) -> None:
    scene = synthetic_scene(workdir, size, tile)
    spec = cpu_job(scene, workdir, "resnet18_fpn", tile, batch)
    plan = plan_tiles(size, size, tile, 64)
    tiles_path = str(workdir / f"tiles_{size}_{tile}.npy")
    with open_raster(str(scene)) as dataset:
        tiles = np.stack([read_tile(dataset, t.window, [1, 2, 3], (0.0, 255.0))[0] for t in plan])
    np.save(tiles_path, tiles)
    del tiles
    for name, value in ALLOCATOR_ENV.items():  # inherited by the spawned bare-model processes
        os.environ[name] = value
    model_rate = model_only_tiles_per_s(spec, tiles_path, len(plan), os.cpu_count() or 1)
    elapsed, report = timed_job(spec)
    e2e_rate = report.tiles / elapsed
    print(f"raster: {size}x{size}")
    print(f"tiles: {report.tiles}")
    print(f"batch_size: {batch}")
    print(f"tiles_per_s: {e2e_rate:.3f}")
    print(f"model_only_tiles_per_s: {model_rate:.3f}")
    print(f"e2e_over_model: {e2e_rate / model_rate:.3f}")


def case_plain(workdir: Path, size: int, tile: int, batch: int) -> None:
    scene = synthetic_scene(workdir, size, tile)
    # 512/128: the step (384) is a multiple of ResNet-50 FPN's largest stride (128), so the
    # aligned plan costs no extra tiles (400/64 steps by 256: 256 tiles where 144 would do).
    spec = cpu_job(scene, workdir, "resnet50_fpn", tile, batch, overlap=128)
    loop_s, loop_tiles, loop_found = timed_plain_loop(str(scene), spec)
    job_s, report = timed_job(spec)
    print(f"plain_raster: {size}x{size}")
    print(f"plain_tiles: {report.tiles}")
    print(f"plain_loop_tiles: {loop_tiles}")
    print(f"plain_loop_s: {loop_s:.1f}")
    print(f"job_s: {job_s:.1f}")
    print(f"plain_loop_detections: {loop_found}")
    print(f"job_detections: {report.detections}")
    print(f"e2e_over_plain_loop: {loop_s / job_s:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", choices=["model", "plain", "both"], default="both")
    parser.add_argument("--size", type=int, default=None, help="8192 (model), 4096 (plain)")
    parser.add_argument("--tile", type=int, default=None, help="512 (both cases)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--plain-loop", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_loop:
        tiles, found = plain_loop(*args.plain_loop)
        print(json.dumps({"tiles": tiles, "detections": found}))
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="georetina-bench-"))
    if args.case in ("model", "both"):
        case_model(workdir, args.size or 8192, args.tile or 512, args.batch)
    if args.case in ("plain", "both"):
        case_plain(workdir, args.size or 4096, args.tile or 512, args.batch)


if __name__ == "__main__":
    main()
