"""End-to-end throughput over the bare model's, on the same tiles, in one run.

A synthetic COG (default 8192 x 8192, 3-band uint8, UTM) goes through the real job on an
embedded Ray (RetinaNet ResNet-18 FPN, CPU, one single-threaded detector actor per core). In
the same run, the bare model runs forward over the same tiles (already in memory) with the
same batch size, in the same layout: one single-threaded process per core. The job's time
counts everything from `run_job` to the last file written: pre-flight, actor start-up
(about 10 s here: importing torch and torchvision), reads, inference, merge and write.
Prints one `name: value` line per figure:

    tiles_per_s, model_only_tiles_per_s, e2e_over_model

Run: .venv/bin/python bench/end_to_end.py [--size 8192] [--tile 512] [--batch 4]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    threads = os.cpu_count() or 1

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="georetina-bench-"))
    scene = workdir / f"scene_{args.size}.tif"
    if not scene.exists():
        objects = plan_objects(args.size, args.tile, 64, count=args.size // 16)
        write_scene(scene, args.size, objects)
    spec = parse_job(
        {
            "inputs": [str(scene)],
            "model": {"backbone": "resnet18_fpn", "classes": ["object"]},
            "tiling": {"tile_size": args.tile, "overlap": 64},
            # One single-threaded actor per core (see jobs.run.READ_TASK_CPUS).
            "detect": {
                "batch_size": args.batch,
                "num_actors": threads,
                "torch_threads": 1,
                "num_cpus_per_actor": (threads - 0.5) / threads,
            },
            "output": {"path": str(workdir / "out")},
        }
    )

    plan = plan_tiles(args.size, args.size, args.tile, 64)
    tiles_path = str(workdir / f"tiles_{args.size}_{args.tile}.npy")
    with open_raster(str(scene)) as dataset:
        tiles = np.stack([read_tile(dataset, t.window, [1, 2, 3], (0.0, 255.0))[0] for t in plan])
    np.save(tiles_path, tiles)
    del tiles
    for name, value in ALLOCATOR_ENV.items():  # inherited by the spawned bare-model processes
        os.environ[name] = value
    model_rate = model_only_tiles_per_s(spec, tiles_path, len(plan), threads)

    import ray

    from pipeline.jobs.ray_session import start_embedded_ray
    from pipeline.jobs.run import run_job

    start_embedded_ray(num_cpus=threads)
    started = time.perf_counter()
    report = run_job(spec, force=True, progress=lambda line: None)
    elapsed = time.perf_counter() - started
    assert report.count("done") == 1, report.scenes
    e2e_rate = report.tiles / elapsed
    ray.shutdown()

    print(f"raster: {args.size}x{args.size}")
    print(f"tiles: {report.tiles}")
    print(f"batch_size: {args.batch}")
    print(f"tiles_per_s: {e2e_rate:.3f}")
    print(f"model_only_tiles_per_s: {model_rate:.3f}")
    print(f"e2e_over_model: {e2e_rate / model_rate:.3f}")


if __name__ == "__main__":
    main()
