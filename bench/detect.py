"""Detection stage: our actor path against the bare model, same tiles and batch size.

CPU (always): the bare model's forward (torchvision RetinaNet, ResNet-18 FPN, 512 px tiles,
in this process, all cores) against our actor path: a Ray actor running exactly what the
pipeline's detector actor runs per batch (uint8 batch from the object store -> device ->
normalise -> model -> boxes as Arrow), fed through Ray's object store. Both warmed up first;
actor start-up is not counted (bench/end_to_end.py counts it). -> actor_over_model

Forward vs postprocess (CPU, and GPU when visible): torchvision's RetinaNet decodes and NMSes
per image and per pyramid level in Python; timed separately from the network's forward (backbone
+ heads), with score_threshold 0 so every level's top 1000 candidates reach NMS (the worst case).
-> <device>_postprocess_fraction, and our batched postprocessing (pipeline/model/postprocess.py)
over torchvision's on the same head outputs -> <device>_postprocess_speedup

GPU (when CUDA is visible): tiles/s of RetinaNet ResNet-50 FPN at 800 x 800 px, fp32 and bf16
autocast, batch sizes 1..32, through our detector (uint8 in, pinned, non-blocking copies).
-> gpu_r50_800_<precision>_bs<N>_tiles_per_s

Run: .venv/bin/python bench/detect.py [--tiles 48] [--batch 4] [--gpu-only]
On the lent GPU machine (no Ray, rasterio or pydantic there): bench/gpu_check.sh
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from pipeline.config import DetectSettings, ModelSettings
from pipeline.model.build import build_model
from pipeline.model.detector import RetinaNetDetector

TILE = 512


def bare_model_tiles_per_s(settings: ModelSettings, tiles: np.ndarray, batch: int) -> float:
    model = build_model(settings, TILE)
    with torch.inference_mode():
        model([torch.zeros(3, TILE, TILE)])
        started = time.perf_counter()
        for start in range(0, len(tiles), batch):
            x = torch.from_numpy(tiles[start : start + batch]).float() / 255
            model(list(x))
    return len(tiles) / (time.perf_counter() - started)


def actor_tiles_per_s(settings: ModelSettings, tiles: np.ndarray, batch: int) -> float:
    """The pipeline's own detector actor class (pipeline.jobs.stages.DetectorActor), as a Ray
    actor with every core, fed batches in the read stage's format through the object store."""
    import ray

    from pipeline.config import parse_job
    from pipeline.jobs.stages import DetectorActor

    spec = parse_job(
        {
            "inputs": ["unused.tif"],
            "model": settings.model_dump(),
            "tiling": {"tile_size": TILE},
            "detect": {"batch_size": batch, "torch_threads": os.cpu_count() or 1},
            "output": {"path": "unused"},
        }
    )
    actor_class = ray.remote(num_cpus=1)(DetectorActor)

    def batch_of(start: int) -> dict[str, np.ndarray]:
        images = tiles[start : start + batch]
        count = len(images)
        return {
            "image": images,
            "valid_bits": np.packbits(np.ones((count, TILE, TILE), np.uint8), axis=-1),
            "scene_id": np.full(count, "bench", dtype=object),
            "tile_index": np.arange(count, dtype=np.int32),
            "col_off": np.zeros(count, np.int32),
            "row_off": np.zeros(count, np.int32),
            "error": np.full(count, "", dtype=object),
        }

    actor = actor_class.remote(spec.model_dump_json(by_alias=True))
    ray.get(actor.__call__.remote(batch_of(0)))  # warm-up: model built, first pass done
    refs = [ray.put(batch_of(start)) for start in range(0, len(tiles), batch)]
    started = time.perf_counter()
    ray.get([actor.__call__.remote(ref) for ref in refs])
    rate = len(tiles) / (time.perf_counter() - started)
    ray.kill(actor)
    return rate


def forward_postprocess_split(
    settings: ModelSettings, tiles: np.ndarray, batch: int, device: str
) -> tuple[float, float, float]:
    """Seconds per tile in the network (transform, backbone, heads), in torchvision's
    postprocessing (anchors, per-image per-level decode, top-k, NMS) and in ours (batched)."""
    from pipeline.model.postprocess import batched_postprocess

    model = build_model(settings.model_copy(update={"score_threshold": 0.0}), TILE).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    forward_s = torchvision_s = batched_s = 0.0
    with torch.inference_mode():
        for start in range(0, len(tiles), batch):
            x = torch.from_numpy(tiles[start : start + batch]).to(device)
            images = list(x.float() / 255)
            sync()
            t0 = time.perf_counter()
            image_list, _ = model.transform(images)
            features = list(model.backbone(image_list.tensors).values())
            head = model.head(features)
            sync()
            t1 = time.perf_counter()
            anchors = model.anchor_generator(image_list, features)
            sizes = [f.size(2) * f.size(3) for f in features]
            per_level = [n * (head["cls_logits"].size(1) // sum(sizes)) for n in sizes]
            split_head = {k: list(v.split(per_level, dim=1)) for k, v in head.items()}
            split_anchors = [list(a.split(per_level)) for a in anchors]
            model.postprocess_detections(split_head, split_anchors, image_list.image_sizes)
            sync()
            t2 = time.perf_counter()
            anchors = model.anchor_generator(image_list, features)[0]
            batched_postprocess(
                model,
                head["cls_logits"],
                head["bbox_regression"],
                anchors,
                per_level,
                image_list.image_sizes[0],
            )
            sync()
            t3 = time.perf_counter()
            if start > 0:  # the first batch warms up
                forward_s += t1 - t0
                torchvision_s += t2 - t1
                batched_s += t3 - t2
    counted = len(tiles) - batch
    return forward_s / counted, torchvision_s / counted, batched_s / counted


def _print_split(prefix: str, forward: float, torchvision: float, batched: float) -> None:
    print(f"{prefix}_forward_ms_per_tile: {forward * 1e3:.2f}")
    print(f"{prefix}_postprocess_ms_per_tile: {torchvision * 1e3:.2f}")
    print(f"{prefix}_postprocess_batched_ms_per_tile: {batched * 1e3:.2f}")
    print(f"{prefix}_postprocess_fraction: {torchvision / (forward + torchvision):.3f}")
    print(f"{prefix}_postprocess_speedup: {torchvision / batched:.2f}")


def gpu_sweep() -> None:
    settings = ModelSettings(backbone="resnet50_fpn", classes=["object"])
    rng = np.random.default_rng(0)
    for precision in ("fp32", "bf16"):
        detector = RetinaNetDetector(settings, 800, device="cuda", precision=precision)
        for batch in (1, 2, 4, 8, 16, 32):
            tiles = rng.integers(0, 255, size=(batch, 3, 800, 800), dtype=np.uint8)
            for _ in range(3):
                detector(tiles)
            torch.cuda.synchronize()
            rounds = max(3, 64 // batch)
            started = time.perf_counter()
            for _ in range(rounds):
                detector(tiles)
            torch.cuda.synchronize()
            rate = rounds * batch / (time.perf_counter() - started)
            print(f"gpu_r50_800_{precision}_bs{batch}_tiles_per_s: {rate:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiles", type=int, default=48)
    parser.add_argument("--batch", type=int, default=DetectSettings().batch_size)
    parser.add_argument(
        "--gpu-only", action="store_true", help="the GPU figures alone (a machine without Ray)"
    )
    args = parser.parse_args()
    if torch.cuda.is_available():
        gpu_sweep()
        r50 = ModelSettings(backbone="resnet50_fpn", classes=["object"])
        gpu_tiles = np.random.default_rng(0).integers(0, 255, (64, 3, TILE, TILE), np.uint8)
        _print_split("cuda_r50", *forward_postprocess_split(r50, gpu_tiles, 16, "cuda"))
    if args.gpu_only:
        return
    import ray

    from pipeline.jobs.ray_session import start_embedded_ray

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    settings = ModelSettings(backbone="resnet18_fpn", classes=["object"])
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 255, size=(args.tiles, 3, TILE, TILE), dtype=np.uint8)
    start_embedded_ray(num_cpus=threads)
    # Alternate the two, best of two each: the machine is shared and noisy.
    model_rates, actor_rates = [], []
    for _ in range(2):
        model_rates.append(bare_model_tiles_per_s(settings, tiles, args.batch))
        actor_rates.append(actor_tiles_per_s(settings, tiles, args.batch))
    ray.shutdown()
    _print_split("cpu", *forward_postprocess_split(settings, tiles, args.batch, "cpu"))
    print(f"model_only_tiles_per_s: {max(model_rates):.3f}")
    print(f"actor_tiles_per_s: {max(actor_rates):.3f}")
    print(f"actor_over_model: {max(actor_rates) / max(model_rates):.3f}")


if __name__ == "__main__":
    main()
