"""Pictures of detections: a scene's quicklook PNG and a run's map. No Ray here.

A quicklook is the scene read at a bounded size (GDAL serves it from the overviews when the
raster has them) with every box drawn in its class's colour and, where there is room, a label
``class score``. A run map is a small density image of where a run's detections fall.
"""

from __future__ import annotations

import io
import math
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFont

from pipeline.errors import QuicklookError
from pipeline.io.query import QueryFilter, open_detections, query_detections

# Distinct colours (Sasha Trubetskoy's list), by class id: a class keeps its colour across
# scenes of the same model.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
)

QUICKLOOK_COLUMNS = [
    "scene_id",
    "scene_uri",
    "class_id",
    "class_name",
    "score",
    "pixel_xmin",
    "pixel_ymin",
    "pixel_xmax",
    "pixel_ymax",
]

# A label is drawn only on a box at least this wide on the picture (px): smaller ones would be
# covered by their own label.
MIN_LABELLED_BOX = 12


def class_colour(class_id: int) -> tuple[int, int, int]:
    return PALETTE[int(class_id) % len(PALETTE)]


def picture_shape(width: int, height: int, max_size: int) -> tuple[int, int]:
    """``(width, height)`` of the picture: the scene scaled down so its long side fits."""
    scale = min(1.0, max_size / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


@dataclass(frozen=True)
class Boxes:
    """Boxes on the picture (px), with what a label needs."""

    xyxy: np.ndarray  # (n, 4) float
    class_ids: np.ndarray
    class_names: list[str]
    scores: np.ndarray


def scale_boxes(table: pa.Table, scene_size: tuple[int, int], shape: tuple[int, int]) -> Boxes:
    """Scene-pixel boxes of the detections table onto a picture of ``shape``."""
    sx, sy = shape[0] / scene_size[0], shape[1] / scene_size[1]
    pixel = np.stack([table.column(c).to_numpy() for c in QUICKLOOK_COLUMNS[5:]], axis=1).astype(
        np.float64
    )
    return Boxes(
        pixel * np.array([sx, sy, sx, sy]),
        table.column("class_id").to_numpy(),
        table.column("class_name").to_pylist(),
        table.column("score").to_numpy(),
    )


def _overlaps(box: tuple[int, int, int, int], taken: list[tuple[int, int, int, int]]) -> bool:
    return any(box[0] < t[2] and t[0] < box[2] and box[1] < t[3] and t[1] < box[3] for t in taken)


def draw_boxes(image: Image.Image, boxes: Boxes) -> Image.Image:
    """Outline every box in its class colour; label the confident ones where labels fit.

    Boxes are drawn from the lowest score up, so a confident box is never under a weak one;
    labels are placed from the highest score down and never over another label.
    """
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    order = np.argsort(boxes.scores, kind="stable")
    for i in order:
        x0, y0, x1, y1 = boxes.xyxy[i]
        width = 2 if min(x1 - x0, y1 - y0) >= 8 else 1
        draw.rectangle(
            [x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)],
            outline=class_colour(boxes.class_ids[i]),
            width=width,
        )
    taken: list[tuple[int, int, int, int]] = []
    for i in order[::-1]:
        x0, y0, x1, y1 = boxes.xyxy[i]
        if x1 - x0 < MIN_LABELLED_BOX:
            continue
        text = f"{boxes.class_names[i]} {boxes.scores[i]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        w, h = right - left + 2, bottom - top + 2
        # Above the box, or inside its top edge when the box touches the picture's top.
        lx, ly = int(x0), int(y0) - h if y0 - h >= 0 else int(y0)
        label = (lx, ly, lx + w, ly + h)
        if label[2] > image.width or _overlaps(label, taken):
            continue
        taken.append(label)
        colour = class_colour(boxes.class_ids[i])
        draw.rectangle(label, fill=colour)
        ink = (0, 0, 0) if sum(colour) > 380 else (255, 255, 255)
        draw.text((lx + 1 - left, ly + 1 - top), text, fill=ink, font=font)
    return image


def read_picture(uri: str, scene_id: str, max_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The scene as ``H×W×3`` uint8 at a bounded size, scaled as the detector saw it."""
    from rasterio.enums import Resampling

    from pipeline.io.rasters import inspect_raster, open_raster
    from pipeline.ops.tiles import to_uint8

    info = inspect_raster(scene_id, uri, None, None)
    width, height = picture_shape(info.width, info.height, max_size)
    with open_raster(uri) as dataset:
        # A smaller out_shape makes GDAL read from the best overview, not the full raster.
        bands = list(dict.fromkeys(info.bands))
        data = dataset.read(
            bands, out_shape=(len(bands), height, width), resampling=Resampling.average
        )
        valid = dataset.dataset_mask(out_shape=(height, width)) > 0
    data = data[[bands.index(b) for b in info.bands]]
    palette = info.palette_table()
    if palette is not None:
        rgb = palette[data[0]]
    else:
        rgb = to_uint8(np.moveaxis(data, 0, -1), info.scale_range)
    rgb = np.where(valid[..., None], rgb, 0).astype(np.uint8)
    return rgb, (info.width, info.height)


def default_destination(scene_output: str) -> str:
    """``OUTPUT/quicklook/<scene_id>.png`` for ``OUTPUT/detections/<scene_id>.parquet``;
    beside the file otherwise. Never inside ``detections/``: readers take every file there."""
    folder, name = posixpath.split(scene_output.rstrip("/"))
    stem = name.removesuffix(".parquet")
    if posixpath.basename(folder) == "detections":
        return posixpath.join(posixpath.dirname(folder), "quicklook", f"{stem}.png")
    return posixpath.join(folder, f"{stem}.png")


def _write_png(image: Image.Image, destination: str) -> None:
    import fsspec

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    with fsspec.open(destination, "wb", auto_mkdir=True) as handle:
        handle.write(buffer.getvalue())


def render_quicklook(
    scene_output: str,
    destination: str | None = None,
    *,
    raster: str | None = None,
    max_size: int = 1024,
    min_score: float | None = None,
) -> str:
    """Draw one scene's detections over its picture and write a PNG; returns where.

    ``raster`` overrides the scene's ``scene_uri`` (needed when the scene has no detections,
    or when the raster moved since the run).

    Raises:
        QuicklookError: when the raster is unknown; SceneError when it cannot be read.
    """
    found = open_detections(scene_output)
    if len(found.files) != 1:
        raise QuicklookError(f"{scene_output}: expected one scene file, found {len(found.files)}")
    table = query_detections(found, QueryFilter(min_score=min_score), columns=QUICKLOOK_COLUMNS)
    uri = raster or (table.column("scene_uri")[0].as_py() if table.num_rows else None)
    if not uri:
        raise QuicklookError(
            f"{scene_output}: no detections to take the scene's raster from; name it (--raster)"
        )
    scene_id = table.column("scene_id")[0].as_py() if table.num_rows else scene_output
    pixels, scene_size = read_picture(uri, scene_id, max_size)
    image = Image.fromarray(pixels, mode="RGB")
    draw_boxes(image, scale_boxes(table, scene_size, image.size))
    destination = destination or default_destination(scene_output)
    _write_png(image, destination)
    return destination


# --------------------------------------------------------------------------------------------
# Run map
# --------------------------------------------------------------------------------------------

MAP_WIDTH = 512
MAP_BACKGROUND = (250, 250, 250)
MAP_SCENE = (160, 160, 160)


def map_shape(extent: Sequence[float], geographic: bool, width: int = MAP_WIDTH) -> tuple[int, int]:
    """Picture size for ``extent``; degrees of longitude shrink by cos(latitude)."""
    xmin, ymin, xmax, ymax = extent
    span_x, span_y = max(xmax - xmin, 1e-12), max(ymax - ymin, 1e-12)
    if geographic:
        span_x *= math.cos(math.radians((ymin + ymax) / 2))
    height = round(width * span_y / span_x)
    return width, int(min(max(height, 64), 2 * width))


def density_image(counts: np.ndarray, scenes: list[tuple[int, int, int, int]]) -> Image.Image:
    """Cells with detections in red, darker where there are more (log scale); scene extents
    as grey outlines. ``counts`` is ``H×W`` with row 0 at the top."""
    height, width = counts.shape
    rgb = np.empty((height, width, 3), dtype=np.uint8)
    rgb[:] = MAP_BACKGROUND
    if counts.max() > 0:
        level = np.log1p(counts) / np.log1p(counts.max())
        hot = counts > 0
        # Light orange for one detection, through red to dark red for the densest cell.
        rgb[hot, 0] = (255 - 115 * level[hot]).astype(np.uint8)
        rgb[hot, 1] = (170 * (1 - level[hot])).astype(np.uint8)
        rgb[hot, 2] = (60 * (1 - level[hot])).astype(np.uint8)
    image = Image.fromarray(rgb, mode="RGB")
    draw = ImageDraw.Draw(image)
    for x0, y0, x1, y1 in scenes:
        draw.rectangle([x0, y0, x1, y1], outline=MAP_SCENE, width=1)
    return image


def render_run_map(scene_outputs: Sequence[str], destination: str) -> str | None:
    """Write a map of where the detections of these scene files fall; None when none do.

    Two passes, so memory holds one file's boxes at a time: the files' footers give the
    extent (GeoParquet ``bbox``), then each file's ``bbox`` column is binned into the picture.
    """
    datasets, extents = [], []
    for found in (open_detections(uri) for uri in scene_outputs):
        bbox = (found.geo or {}).get("columns", {}).get("geometry", {}).get("bbox")
        if bbox:  # an empty scene has none, nor one in pixel coordinates only
            datasets.append(found)
            extents.append(bbox)
    if not extents:
        return None
    bounds = np.array(extents, dtype=np.float64)
    extent = (
        bounds[:, 0].min(),
        bounds[:, 1].min(),
        bounds[:, 2].max(),
        bounds[:, 3].max(),
    )
    width, height = map_shape(extent, datasets[0].crs.is_geographic)
    xmin, ymin, xmax, ymax = extent
    sx, sy = width / max(xmax - xmin, 1e-12), height / max(ymax - ymin, 1e-12)
    counts = np.zeros((height, width), dtype=np.int64)
    total = 0
    for found in datasets:
        box = query_detections(found, columns=["bbox"]).column("bbox").combine_chunks()
        if len(box) == 0:
            continue
        cx = (box.field("xmin").to_numpy() + box.field("xmax").to_numpy()) / 2
        cy = (box.field("ymin").to_numpy() + box.field("ymax").to_numpy()) / 2
        cols = np.clip(((cx - xmin) * sx).astype(np.int64), 0, width - 1)
        rows = np.clip(((ymax - cy) * sy).astype(np.int64), 0, height - 1)  # north up
        np.add.at(counts, (rows, cols), 1)
        total += len(box)
    scenes = [
        (
            int((b[0] - xmin) * sx),
            int((ymax - b[3]) * sy),
            min(width - 1, int((b[2] - xmin) * sx)),
            min(height - 1, int((ymax - b[1]) * sy)),
        )
        for b in bounds
    ]
    image = density_image(counts, scenes)
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), f"{total} detections, {len(extents)} scene(s)", fill=(0, 0, 0))
    corners = f"x {xmin:.5g}..{xmax:.5g}  y {ymin:.5g}..{ymax:.5g}  ({datasets[0].crs.to_string()})"
    draw.text((4, height - 14), corners, fill=(0, 0, 0))
    _write_png(image, destination)
    return destination
