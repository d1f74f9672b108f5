"""Synthetic georeferenced scenes with objects planted at known places (demo, tests, bench)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.transform import Affine

from pipeline.ops.tiles import axis_offsets

# Background stays below this level and objects above it, so the reference threshold
# detector (level 200) finds exactly the planted objects.
BACKGROUND_MAX = 150
OBJECT_MIN = 220


@dataclass(frozen=True)
class Planted:
    """An object's box in scene pixels (pixel edges), and whether a tile edge crosses it."""

    x0: int
    y0: int
    x1: int
    y1: int
    on_seam: bool


def _seams(size: int, tile_size: int, overlap: int) -> list[int]:
    """Pixel positions of tile edges inside the raster along one axis."""
    edges = set()
    for offset in axis_offsets(size, tile_size, overlap):
        edges.update({offset, offset + tile_size})
    return sorted(e for e in edges if 0 < e < size)


def plan_objects(
    size: int, tile_size: int, overlap: int, count: int, seed: int = 0, max_side: int = 40
) -> list[Planted]:
    """Non-touching boxes; about a third straddle a tile edge, a few a corner of four tiles."""
    rng = np.random.default_rng(seed)
    seams = _seams(size, tile_size, overlap)
    occupied = np.zeros((size, size), dtype=bool)
    planted: list[Planted] = []
    attempts = 0
    while len(planted) < count and attempts < count * 200:
        attempts += 1
        w, h = (int(v) for v in rng.integers(12, max_side + 1, size=2))
        kind = len(planted) % 6
        if kind in (0, 1) and seams:  # across a vertical or horizontal tile edge
            seam = int(rng.choice(seams))
            cx = seam if kind == 0 else int(rng.integers(w, size - w))
            cy = seam if kind == 1 else int(rng.integers(h, size - h))
        elif kind == 2 and seams:  # across a corner where four tiles meet
            cx, cy = int(rng.choice(seams)), int(rng.choice(seams))
        else:
            cx, cy = int(rng.integers(w, size - w)), int(rng.integers(h, size - h))
        x0, y0 = cx - w // 2, cy - h // 2
        x1, y1 = x0 + w, y0 + h
        if x0 < 2 or y0 < 2 or x1 > size - 2 or y1 > size - 2:
            continue
        if occupied[y0 - 3 : y1 + 3, x0 - 3 : x1 + 3].any():
            continue
        occupied[y0:y1, x0:x1] = True
        on_seam = any(x0 < s < x1 for s in seams) or any(y0 < s < y1 for s in seams)
        planted.append(Planted(x0, y0, x1, y1, on_seam))
    return planted


def write_scene(
    path: str | Path,
    size: int,
    objects: list[Planted],
    *,
    crs: str = "EPSG:32633",
    origin: tuple[float, float] = (500_000.0, 4_650_000.0),
    pixel_size: float = 0.5,
    seed: int = 0,
    block: int = 256,
    overviews: bool = True,
    noise: bool = True,
) -> Affine:
    """Write a tiled, compressed 3-band uint8 GeoTIFF (COG layout) with the objects drawn.

    Written in horizontal strips of blocks, so memory stays small even for large scenes.
    ``noise=False`` draws a compressible gradient instead of noise (fast for huge rasters).
    """
    rng = np.random.default_rng(seed)
    transform = Affine(pixel_size, 0, origin[0], 0, -pixel_size, origin[1])
    profile = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": 3,
        "dtype": "uint8",
        "crs": crs,
        "transform": transform,
        "tiled": True,
        "blockxsize": block,
        "blockysize": block,
        "compress": "deflate",
        "interleave": "pixel",
        "photometric": "RGB",
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    boxes = np.array([(o.x0, o.y0, o.x1, o.y1) for o in objects], dtype=np.int64).reshape(-1, 4)
    with rasterio.open(path, "w", **profile) as dst:
        for top in range(0, size, block):
            rows = min(block, size - top)
            if noise:
                strip = rng.integers(40, BACKGROUND_MAX, size=(3, rows, size), dtype=np.uint8)
            else:  # a cheap, compressible gradient for very large bench rasters
                ramp = (np.arange(size) // 64 + top // 64) % (BACKGROUND_MAX - 40) + 40
                strip = np.broadcast_to(ramp.astype(np.uint8), (3, rows, size)).copy()
            for x0, y0, x1, y1 in boxes[(boxes[:, 1] < top + rows) & (boxes[:, 3] > top)]:
                r0, r1 = max(y0, top) - top, min(y1, top + rows) - top
                strip[:, r0:r1, x0:x1] = rng.integers(OBJECT_MIN, 256, size=3, dtype=np.uint8)[
                    :, None, None
                ]
            dst.write(strip, window=((top, top + rows), (0, size)))
        dst.update_tags(TIFFTAG_DATETIME="2026:06:01 10:30:00")
        if overviews:
            dst.build_overviews([2, 4, 8, 16], Resampling.average)
    return transform


def write_truth(path: str | Path, objects: list[Planted]) -> None:
    Path(path).write_text(json.dumps([o.__dict__ for o in objects]))


def read_truth(path: str | Path) -> list[Planted]:
    return [Planted(**item) for item in json.loads(Path(path).read_text())]


def match_planted(
    planted: list[Planted], boxes: np.ndarray, iou_threshold: float = 0.5
) -> tuple[int, int]:
    """Greedy one-to-one matching: returns (true positives, detections)."""
    if len(planted) == 0 or len(boxes) == 0:
        return 0, len(boxes)
    truth = np.array([(o.x0, o.y0, o.x1, o.y1) for o in planted], dtype=np.float64)
    ix0 = np.maximum(truth[:, None, 0], boxes[None, :, 0])
    iy0 = np.maximum(truth[:, None, 1], boxes[None, :, 1])
    ix1 = np.minimum(truth[:, None, 2], boxes[None, :, 2])
    iy1 = np.minimum(truth[:, None, 3], boxes[None, :, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area_t = (truth[:, 2] - truth[:, 0]) * (truth[:, 3] - truth[:, 1])
    area_b = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    iou = inter / (area_t[:, None] + area_b[None, :] - inter)
    matched_truth, matched_box, hits = set(), set(), 0
    for t, b in zip(*np.unravel_index(np.argsort(-iou, axis=None), iou.shape), strict=True):
        if iou[t, b] < iou_threshold:
            break
        if t in matched_truth or b in matched_box:
            continue
        matched_truth.add(t)
        matched_box.add(b)
        hits += 1
    return hits, len(boxes)


def write_labels(path: str | Path, objects: list[Planted], transform: Affine, crs: str) -> None:
    """The planted boxes as a GeoParquet of polygons in the scene's CRS (training labels)."""
    import geopandas
    from shapely.geometry import Polygon

    polygons = [
        Polygon(
            [
                transform * (x, y)
                for x, y in ((o.x0, o.y0), (o.x1, o.y0), (o.x1, o.y1), (o.x0, o.y1))
            ]
        )
        for o in objects
    ]
    frame = geopandas.GeoDataFrame({"label": ["object"] * len(objects)}, geometry=polygons, crs=crs)
    frame.to_parquet(path)


def write_training_set(
    folder: str | Path, scenes: int = 4, size: int = 1536, objects: int = 60, seed: int = 100
) -> list[tuple[Path, Path]]:
    """Synthetic scenes with their labels (GeoParquet), for ``georetina train``.

    Seeds start at 100 so the training scenes never repeat the demo scene (seed 0).
    Returns ``(raster, labels)`` pairs.
    """
    folder = Path(folder)
    pairs = []
    for i in range(scenes):
        raster, labels = folder / f"train_{i}.tif", folder / f"train_{i}.labels.parquet"
        planted = plan_objects(size, 512, 64, objects, seed=seed + i)
        transform = write_scene(raster, size, planted, seed=seed + i)
        write_labels(labels, planted, transform, "EPSG:32633")
        pairs.append((raster, labels))
    return pairs


if __name__ == "__main__":  # python -m pipeline.io.synthetic FOLDER: the demo model's training set
    import sys

    for raster, labels in write_training_set(sys.argv[1] if len(sys.argv) > 1 else "train"):
        print(f"{raster} {labels}")
