"""Tiled inference against whole-image inference on real aerial crops (issue 17).

The shipped demo model (``pipeline/demo_data``) runs over each crop twice, through the same
library functions a job uses (plan, windowed reads, detector, edge rule and band-by-band
merge), without Ray:

- **tiled**: the job's plan at each tile size and overlap below (offsets on the model's
  coarsest feature grid), every tile's boxes merged into the crop's;
- **whole** (the reference): one tile over the whole crop (its side rounded up to the
  model's largest stride), with no cap on candidates (top-k per level and detections per
  tile above the crop's anchor count).

Both run at ``score_threshold`` 0.1, below the two cut-offs compared at, so a box is never
lost to the comparison only because its score moved across a cut-off. Printed, over all
crops and tile sizes:

- ``tiled_matched_fraction``: whole-image boxes with score >= 0.3 that a tiled box with
  score >= 0.2 matches at IoU >= 0.5 (target >= 0.99);
- ``tiled_extra_fraction``: tiled boxes with score >= 0.3 with no whole-image box with score
  >= 0.2 at IoU >= 0.5 (target <= 0.02);
- ``tiled_duplicates``: tiled boxes with score >= 0.2, cut by an inner tile edge, lying mostly
  inside another tiled box of their class: an object reported twice (target 0).

Usage: ``python bench/tiled_vs_whole.py [--as-before] [RASTER ...]`` (default: the crops in
tests/data/neon); ``--as-before`` tiles as the job did before issue 17, for comparison.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from rasterio.windows import Window

from pipeline.config import ModelSettings
from pipeline.io.rasters import inspect_raster
from pipeline.io.reads import read_tiles
from pipeline.jobs.demo import load_demo_job
from pipeline.merge.scene import SceneContext, merge_in_memory
from pipeline.model.build import largest_stride
from pipeline.model.detector import RetinaNetDetector, detect_tiles
from pipeline.ops.boxes import CUT_COVERED_FRACTION, Candidates, MergeOptions, core_margin
from pipeline.ops.tiles import plan_alignment, plan_offsets, planned_overlap

ROOT = Path(__file__).resolve().parents[1]
CROPS = [ROOT / "tests/data/neon/OSBS_029.tif", ROOT / "tests/data/neon/SOAP_061.png"]
# (tile_size, overlap), each on the crops larger than its tile: the demo job's 512/64, and on
# a 400 px crop plans that end exactly at its edge (272/80, 208/80) or past it (256/...).
TILINGS = [(512, 64), (512, 128), (256, 64), (256, 128), (272, 80), (208, 80)]
RUN_THRESHOLD, COUNTERPART, REPORTED, IOU = 0.1, 0.2, 0.3, 0.5
NO_CAP = 10**6


def demo_settings() -> ModelSettings:
    return load_demo_job().model.model_copy(update={"score_threshold": RUN_THRESHOLD})


def detect_crop(
    path: Path, settings: ModelSettings, tile: int, overlap: int, as_before: bool = False
) -> Candidates:
    """The crop's merged detections (scene pixels) from ``tile``-px tiles, as a job makes them.

    ``as_before``: as the job tiled before issue 17 (last tile at ``size - tile``, padding
    black, batches padded to 32, no core rule; boxes are still clipped to the data), to show
    what the change does.
    """
    info = inspect_raster(path.stem, str(path), None, None, allow_pixel_coordinates=True)
    align = 1 if as_before else plan_alignment(largest_stride(settings), tile, overlap)
    cols, rows = plan_offsets(info.width, info.height, tile, overlap, align)
    windows = [Window(int(c), int(r), tile, tile) for c, r in zip(cols, rows, strict=True)]
    images, valid = read_tiles(
        str(path), windows, list(info.bands), info.scale_range, info.palette_table(), tile, 300
    )
    detector = RetinaNetDetector(settings, tile, device="cpu")
    if as_before:
        detector.model.transform.size_divisible = 32
        detector = _BlackPadding(detector)
    found = []
    for start in range(0, len(images), 4):  # the demo job's batch size
        part = slice(start, start + 4)
        runnable = np.ones(len(images[part]), bool)
        found += detect_tiles(detector, images[part], valid[part], runnable, 0.5)
    context = SceneContext(
        scene_id=path.stem,
        scene_uri=str(path),
        info=info,
        tile_size=tile,
        edge_tolerance=2.0,
        merge=MergeOptions(),
        class_names=tuple(settings.classes),
        model_id="",
        settings_hash="",
        run_id="",
        output_crs="OGC:CRS84",
        output_uri="",
        row_group_size=10_000,
        core_margin=0.0 if as_before else core_margin(planned_overlap(tile, overlap, align)),
    )
    return merge_in_memory(context, cols, rows, found)


class _BlackPadding:
    """A detector that is not told which pixels are invalid: it sees them black (uint8 0)."""

    def __init__(self, detector: RetinaNetDetector) -> None:
        self.detector, self.model_id = detector, detector.model_id

    def __call__(self, images: np.ndarray, valid: np.ndarray | None = None) -> list:
        return self.detector(images)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` with every box in ``b`` (pixel-edge ``x0, y0, x1, y1``)."""
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def compare(tiled: Candidates, whole: Candidates) -> dict[str, int]:
    """Counts behind the three figures (see the module's docstring)."""
    same_class = tiled.class_ids[:, None] == whole.class_ids[None, :]
    iou = (iou_matrix(tiled.boxes, whole.boxes) >= IOU) & same_class
    whole_reported = whole.scores >= REPORTED
    tiled_reported = tiled.scores >= REPORTED
    matched = iou[tiled.scores >= COUNTERPART].any(axis=0)
    extra = ~iou[:, whole.scores >= COUNTERPART].any(axis=1)
    return {
        "whole": int(whole_reported.sum()),
        "matched": int((matched & whole_reported).sum()),
        "tiled": int(tiled_reported.sum()),
        "extra": int((extra & tiled_reported).sum()),
        "duplicates": int(duplicates(tiled).sum()),
    }


def duplicates(tiled: Candidates) -> np.ndarray:
    """Tiled boxes (score >= 0.2) cut by an inner tile edge that lie mostly inside another
    tiled box of their class: an object reported twice, its cut half beside its whole box.
    (Two boxes of one object at IoU > 0.5 cannot both survive the merge's NMS.)"""
    boxes = tiled.boxes
    lo = np.maximum(boxes[:, None, :2], boxes[None, :, :2])
    hi = np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    np.fill_diagonal(inter, 0)
    area = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    inside = inter >= CUT_COVERED_FRACTION * np.maximum(area[:, None], 1e-12)
    inside &= tiled.class_ids[:, None] == tiled.class_ids[None, :]
    return tiled.is_cut & (tiled.scores >= COUNTERPART) & inside.any(axis=1)


def main(paths: list[Path], as_before: bool = False) -> None:
    settings = demo_settings()
    stride = largest_stride(settings)
    reference = settings.model_copy(
        update={"topk_candidates": NO_CAP, "detections_per_tile": NO_CAP}
    )
    totals = dict.fromkeys(("whole", "matched", "tiled", "extra", "duplicates"), 0)
    for path in paths:
        info = inspect_raster(path.stem, str(path), None, None, allow_pixel_coordinates=True)
        side = -(-max(info.width, info.height) // stride) * stride
        whole = detect_crop(path, reference, side, 0)
        for tile, overlap in TILINGS:
            if tile >= max(info.width, info.height):
                continue  # one tile: nothing to compare
            tiled = detect_crop(path, settings, tile, overlap, as_before)
            counts = compare(tiled, whole)
            print(
                f"# {path.name} {info.width}x{info.height} tile {tile} overlap {overlap}: {counts}"
            )
            for key, value in counts.items():
                totals[key] += value
    print(f"tiled_matched_fraction: {totals['matched'] / max(totals['whole'], 1):.4f}")
    print(f"tiled_extra_fraction: {totals['extra'] / max(totals['tiled'], 1):.4f}")
    print(f"tiled_duplicates: {totals['duplicates']}")
    print(f"whole_image_boxes: {totals['whole']}")


if __name__ == "__main__":
    before = "--as-before" in sys.argv
    paths = [Path(p) for p in sys.argv[1:] if p != "--as-before"]
    main(paths or CROPS, before)
