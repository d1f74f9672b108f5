"""Cross-tile merge cost: our sparse exact NMS against torchvision's batched_nms over all boxes.

Synthetic scenes of 10k, 100k and 1M boxes: objects of 8-40 px, each seen by one to three
overlapping tiles (jittered duplicates), three classes, distinct scores. One core.
Prints one `name: value` line per figure:

    merge_10k_s, merge_100k_s, merge_1m_s, torchvision_10k_s, torchvision_100k_s,
    speedup_over_torchvision_100k, merge_scaling_10x (time at 1M over time at 100k),
    exact (our kept boxes == torchvision's, same order, at 10k and 100k),
    merge_1m_banded_s, banded_peak_held_fraction (most boxes held at once over all boxes),
    banded_exact (band by band, as the runner merges a scene, == all at once, at 1M)

Run: .venv/bin/python bench/merge.py
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torchvision.ops import batched_nms

from pipeline.merge.bands import BandMerger
from pipeline.ops.boxes import Candidates, MergeOptions, merge_boxes


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


def time_banded(
    boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, band: float = 448.0
) -> tuple[float, float, set]:
    """Band by band (tile rows of 512 px with 64 px overlap: a box belongs to the band its
    top edge falls in), as the runner streams a scene. Returns time, the most boxes held at
    once over all boxes, and the kept boxes."""
    band_of = np.maximum(boxes[:, 1] // band, 0).astype(np.int64)  # jitter: a few y0 < 0
    order = np.argsort(band_of, kind="stable")
    everything = Candidates(
        boxes[order], scores[order], class_ids[order], np.zeros(len(boxes), bool)
    )
    band_of = band_of[order]
    starts = np.searchsorted(band_of, np.arange(band_of.max() + 2))
    merger, held, kept = BandMerger(MergeOptions(0.5)), 0, set()
    started = time.perf_counter()
    for b in range(band_of.max() + 1):
        part = everything.select(np.arange(starts[b], starts[b + 1]))
        held = max(held, len(merger.pending) + len(part))
        next_top = (b + 1) * band if b < band_of.max() else None
        final = merger.add(part, next_top)
        kept.update(map(tuple, final.boxes.tolist()))
    return time.perf_counter() - started, held / len(boxes), kept


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
    seconds, held, banded = time_banded(boxes, scores, class_ids)
    times["merge_1m_banded_s"] = seconds
    banded_exact = banded == set(map(tuple, boxes[kept].tolist()))
    for name, value in times.items():
        print(f"{name}: {value:.3f}")
    print(
        f"speedup_over_torchvision_100k: {times['torchvision_100k_s'] / times['merge_100k_s']:.2f}"
    )
    print(f"merge_scaling_10x: {times['merge_1m_s'] / times['merge_100k_s']:.2f}")
    print(f"exact: {str(exact).lower()}")
    print(f"banded_peak_held_fraction: {held:.4f}")
    print(f"banded_exact: {str(banded_exact).lower()}")


if __name__ == "__main__":
    main()
