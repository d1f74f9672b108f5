"""Training labels: geo boxes in any CRS, or DeepForest-style pixel CSVs, as scene-pixel boxes.

Everything downstream (chip sampling, training) works in the raster's pixel grid, with the
pipeline's convention: ``(x0, y0, x1, y1)`` pixel edges, origin at the upper-left corner.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rasterio.transform import Affine

from pipeline.config import LabelSource
from pipeline.errors import InvalidInputError


class LabelError(InvalidInputError):
    """Labels that cannot be used: the message names the file and what is wrong."""


@dataclass(frozen=True)
class LabelledRaster:
    """One raster and its boxes in its own pixel grid."""

    uri: str
    boxes: np.ndarray  # (n, 4) float64 pixel edges
    class_ids: np.ndarray  # (n,) int64, index into the model's classes


PIXEL_CSV_COLUMNS = ("image_path", "xmin", "ymin", "xmax", "ymax", "label")


def class_ids(names: list[str], classes: list[str], source: str) -> np.ndarray:
    """Class names to ids; unknown names fail, naming them and the file."""
    lookup = {name: i for i, name in enumerate(classes)}
    unknown = sorted({name for name in names if name not in lookup})
    if unknown:
        raise LabelError(f"labels {source}: classes {unknown} are not in the model's {classes}")
    return np.array([lookup[name] for name in names], dtype=np.int64)


def geometries_to_pixel_boxes(coords: list[np.ndarray], transform: Affine) -> np.ndarray:
    """Each geometry's vertices (in the raster's CRS) to its pixel-space bounding box.

    Through the inverse of the full affine, so rotated and south-up rasters are right.
    """
    inverse = ~transform
    boxes = np.zeros((len(coords), 4), dtype=np.float64)
    for i, xy in enumerate(coords):
        cols, rows = inverse * (xy[:, 0], xy[:, 1])
        boxes[i] = (np.min(cols), np.min(rows), np.max(cols), np.max(rows))
    return boxes


def _read_bytes(uri: str) -> bytes:
    import fsspec

    try:
        with fsspec.open(uri, "rb") as handle:
            return handle.read()
    except (OSError, ValueError) as error:
        raise LabelError(f"labels {uri}: cannot be read: {error}") from None


def read_geo_labels(source: LabelSource, classes: list[str]) -> LabelledRaster:
    """Boxes from a GeoParquet / GeoJSON / GeoPackage file, reprojected to the raster."""
    import geopandas
    import shapely

    from pipeline.io.rasters import open_raster

    assert source.raster is not None
    blob = _read_bytes(source.labels)
    try:
        if source.labels.lower().endswith((".parquet", ".geoparquet")):
            frame = geopandas.read_parquet(io.BytesIO(blob))
        else:
            frame = geopandas.read_file(io.BytesIO(blob))
    except Exception as error:  # noqa: BLE001 - GDAL/pyarrow raise many kinds for a bad file
        raise LabelError(f"labels {source.labels}: not a readable vector file: {error}") from None
    if frame.crs is None:
        raise LabelError(f"labels {source.labels}: no CRS; set one (e.g. frame.set_crs(...))")
    with open_raster(source.raster) as dataset:
        raster_crs, transform = dataset.crs, dataset.transform
    if raster_crs is None:
        raise LabelError(f"raster {source.raster} has no CRS: geo labels cannot be placed")
    frame = frame[~frame.geometry.is_empty & frame.geometry.notna()].to_crs(raster_crs)
    if source.class_column in frame.columns:
        names = [str(name) for name in frame[source.class_column]]
    elif len(classes) == 1:
        names = [classes[0]] * len(frame)
    else:
        raise LabelError(
            f"labels {source.labels}: no column {source.class_column!r} and the model has "
            f"{len(classes)} classes; set class_column"
        )
    coords = [shapely.get_coordinates(geometry) for geometry in frame.geometry]
    return LabelledRaster(
        source.raster,
        geometries_to_pixel_boxes(coords, transform),
        class_ids(names, classes, source.labels),
    )


def read_pixel_csv(source: LabelSource, classes: list[str]) -> list[LabelledRaster]:
    """DeepForest's CSV: one row per box, ``image_path`` relative to the CSV's folder."""
    text = _read_bytes(source.labels).decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in PIXEL_CSV_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise LabelError(f"labels {source.labels}: missing column(s) {missing}")
    per_image: dict[str, list[tuple[list[float], str]]] = {}
    for line, row in enumerate(reader, start=2):
        try:
            box = [float(row[c]) for c in ("xmin", "ymin", "xmax", "ymax")]
        except ValueError:
            raise LabelError(
                f"labels {source.labels}: line {line}: coordinates not numbers"
            ) from None
        if box[2] <= box[0] or box[3] <= box[1]:
            raise LabelError(f"labels {source.labels}: line {line}: empty box {box}")
        per_image.setdefault(row["image_path"], []).append((box, row["label"]))
    base = source.labels.rsplit("/", 1)[0] if "/" in source.labels else "."
    rasters = []
    for image, rows in per_image.items():
        uri = image if "://" in image or Path(image).is_absolute() else f"{base}/{image}"
        boxes = np.array([box for box, _ in rows], dtype=np.float64)
        rasters.append(
            LabelledRaster(uri, boxes, class_ids([n for _, n in rows], classes, source.labels))
        )
    return rasters


def read_labels(sources: list[LabelSource], classes: list[str]) -> list[LabelledRaster]:
    """Every source's rasters with their pixel boxes."""
    rasters: list[LabelledRaster] = []
    for source in sources:
        if source.labels.lower().endswith(".csv"):
            rasters.extend(read_pixel_csv(source, classes))
        else:
            rasters.append(read_geo_labels(source, classes))
    return rasters
