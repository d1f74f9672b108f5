"""Cross-tile merge cost: our sparse exact NMS against torchvision's batched_nms over all boxes.

Synthetic scenes of 10k, 100k and 1M boxes: objects of 8-40 px, each seen by one to three
overlapping tiles (jittered duplicates), three classes, distinct scores. One core.
Prints one `name: value` line per figure:

    merge_10k_s, merge_100k_s, merge_1m_s, torchvision_10k_s, torchvision_100k_s,
    speedup_over_torchvision_100k, merge_scaling_10x (time at 1M over time at 100k),
    exact (our kept boxes == torchvision's, same order, at 10k and 100k)

Run: .venv/bin/python bench/merge.py
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torchvision.ops import batched_nms

from pipeline.merge import MergeOptions, merge_boxes


def synthetic_boxes(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    objects = count // 2
    side = np.sqrt(objects * 2500.0)  # about one object per 50 x 50 px
    x0 = rng.uniform(0, side, objects)
    y0 = rng.uniform(0, side, objects)
    w = rng.uniform(8, 40, objects)
    h = rng.uniform(8, 40, objects)
    base = np.stack([x0, y0, x0 + w, y0 + h], axis=1)
    copies = rng.integers(0, objects, count - objects)
    jitter = rng.normal(0, 1.5, (len(copies), 4))
    boxes = np.concatenate([base, base[copies] + jitter])
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    # float32-exact coordinates, so torchvision (float32) and we (float64) see the same boxes
    boxes = boxes.astype(np.float32).astype(np.float64)
    scores = rng.permutation(count).astype(np.float32) / count
    class_ids = rng.integers(0, 3, count).astype(np.int16)
    return boxes, scores, class_ids


def time_ours(
    boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray
) -> tuple[float, np.ndarray]:
    started = time.perf_counter()
    kept = merge_boxes(boxes, scores, class_ids, np.zeros(len(boxes), bool), MergeOptions(0.5))
    return time.perf_counter() - started, kept


def time_torchvision(
    boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray
) -> tuple[float, np.ndarray]:
    tensors = (
        torch.from_numpy(boxes).float(),
        torch.from_numpy(scores),
        torch.from_numpy(class_ids.astype(np.int64)),
    )
    started = time.perf_counter()
    kept = batched_nms(*tensors, 0.5).numpy()
    return time.perf_counter() - started, kept


def main() -> None:
    torch.set_num_threads(1)
    times: dict[str, float] = {}
    exact = True
    for label, count in (("10k", 10_000), ("100k", 100_000), ("1m", 1_000_000)):
        boxes, scores, class_ids = synthetic_boxes(count)
        times[f"merge_{label}_s"], kept = time_ours(boxes, scores, class_ids)
        print(f"boxes_{label}: {count}, kept {len(kept)}")
        if count <= 100_000:  # torchvision's CPU NMS is quadratic in kept boxes: 1M is hours
            times[f"torchvision_{label}_s"], reference = time_torchvision(boxes, scores, class_ids)
            exact &= kept.tolist() == reference.tolist()
    for name, value in times.items():
        print(f"{name}: {value:.3f}")
    print(
        f"speedup_over_torchvision_100k: {times['torchvision_100k_s'] / times['merge_100k_s']:.2f}"
    )
    print(f"merge_scaling_10x: {times['merge_1m_s'] / times['merge_100k_s']:.2f}")
    print(f"exact: {str(exact).lower()}")


if __name__ == "__main__":
    main()
