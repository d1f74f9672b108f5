"""End-to-end throughput over the bare model's, on the same tiles, in one run.

A synthetic COG (default 4096 x 4096, 3-band uint8, UTM) goes through the real job on an
embedded Ray (RetinaNet ResNet-18 FPN, CPU); then the bare model runs forward over the same
tiles with the same batch size and thread count. Prints one `name: value` line per figure:

    tiles_per_s, model_only_tiles_per_s, e2e_over_model

Run: .venv/bin/python bench/end_to_end.py [--size 4096] [--tile 512] [--batch 4]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import parse_job
from pipeline.model import build_model
from pipeline.rasters import open_raster
from pipeline.synthetic import plan_objects, write_scene
from pipeline.tiling import plan_tiles, read_tile


def model_only_tiles_per_s(spec, tiles: np.ndarray, threads: int) -> float:
    """The bare model's forward over in-memory tiles: the ceiling for the pipeline."""
    torch.set_num_threads(threads)
    model = build_model(spec.model, spec.tiling.tile_size)
    batch = spec.detect.batch_size
    with torch.inference_mode():
        model([torch.zeros(3, spec.tiling.tile_size, spec.tiling.tile_size)])  # warm-up
        started = time.perf_counter()
        for start in range(0, len(tiles), batch):
            x = torch.from_numpy(tiles[start : start + batch]).permute(0, 3, 1, 2).float() / 255
            model(list(x))
        return len(tiles) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=4096)
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
            # One single-threaded actor per core (see runner.READ_TASK_CPUS).
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
    with open_raster(str(scene)) as dataset:
        tiles = np.stack([read_tile(dataset, t, [1, 2, 3], (0.0, 255.0))[0] for t in plan])
    model_rate = model_only_tiles_per_s(spec, tiles, threads)
    del tiles

    import ray

    from pipeline.runner import run_job

    ray.init(num_cpus=threads, include_dashboard=False, log_to_driver=False)
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
