"""One scene's end: tile boxes → merged scene detections → GeoParquet. No Ray here."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from pyproj import CRS, Transformer

from pipeline.detect import TileDetections
from pipeline.geoparquet import SceneRows, detections_table, write_parquet_atomic
from pipeline.merge import (
    MergeOptions,
    box_rings,
    detection_ids,
    merge_detections,
    touches_inner_edge,
)
from pipeline.rasters import RasterInfo
from pipeline.tiling import inner_edges


@dataclass(frozen=True)
class SceneContext:
    """Everything needed to merge and write one scene."""

    scene_id: str
    scene_uri: str
    info: RasterInfo
    tile_size: int
    edge_tolerance: float
    merge: MergeOptions
    class_names: tuple[str, ...]
    model_id: str
    settings_hash: str
    run_id: str
    output_crs: str
    output_uri: str
    row_group_size: int
    acquired_at: datetime | None = None  # from the source (STAC); else the raster's tags
    stac_item_id: str | None = None


@dataclass(frozen=True)
class SceneWritten:
    """What a scene's write produced: its row count and detections per class name."""

    rows: int
    per_class: dict[str, int]


def scene_output_uri(output_root: str, scene_id: str) -> str:
    return f"{output_root.rstrip('/')}/detections/{scene_id}.parquet"


def gather_candidates(
    context: SceneContext, offsets: list[tuple[int, int]], found: list[TileDetections]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All tiles' boxes in scene pixels, with scores, class ids and a 'cut by a tile edge' flag."""
    boxes, scores, class_ids, is_cut = [], [], [], []
    for (col_off, row_off), detections in zip(offsets, found, strict=True):
        if len(detections.boxes) == 0:
            continue
        inner = inner_edges(
            col_off, row_off, context.tile_size, context.info.width, context.info.height
        )
        is_cut.append(
            touches_inner_edge(
                detections.boxes,
                context.tile_size,
                context.tile_size,
                inner,
                context.edge_tolerance,
            )
        )
        shift = np.array([col_off, row_off, col_off, row_off], dtype=np.float64)
        boxes.append(detections.boxes.astype(np.float64) + shift)
        scores.append(detections.scores)
        class_ids.append(detections.class_ids)
    if not boxes:
        return (np.zeros((0, 4)), np.zeros(0, np.float32), np.zeros(0, np.int16), np.zeros(0, bool))
    return (
        np.concatenate(boxes),
        np.concatenate(scores),
        np.concatenate(class_ids),
        np.concatenate(is_cut),
    )


def rings_in_crs(pixel_boxes: np.ndarray, info: RasterInfo, output_crs: str) -> np.ndarray:
    """Box rings in the output CRS: affine to the scene's CRS, then one pyproj call."""
    rings = box_rings(pixel_boxes, info.transform)
    source, target = CRS.from_wkt(info.crs_wkt), CRS.from_user_input(output_crs)
    if len(rings) and source != target:
        transformer = Transformer.from_crs(source, target, always_xy=True)
        xs, ys = transformer.transform(rings[..., 0].ravel(), rings[..., 1].ravel())
        rings = np.stack([np.asarray(xs), np.asarray(ys)], axis=-1).reshape(rings.shape)
    return rings


def finalize_scene(
    context: SceneContext, offsets: list[tuple[int, int]], found: list[TileDetections]
) -> SceneWritten:
    """Merge a scene's tile detections and write its GeoParquet file."""
    boxes, scores, class_ids, is_cut = gather_candidates(context, offsets, found)
    keep, boxes = merge_detections(boxes, scores, class_ids, is_cut, context.merge)
    scores, class_ids = scores[keep], class_ids[keep]
    rows = SceneRows(
        scene_id=context.scene_id,
        scene_uri=context.scene_uri,
        scene_crs=context.info.crs_name,
        acquired_at=context.acquired_at or context.info.acquired_at,
        model_id=context.model_id,
        run_id=context.run_id,
        detection_ids=detection_ids(
            context.scene_id, context.model_id, context.settings_hash, boxes, class_ids
        ),
        class_ids=class_ids,
        class_names=[context.class_names[int(c)] for c in class_ids],
        scores=scores,
        pixel_boxes=boxes,
        rings=rings_in_crs(boxes, context.info, context.output_crs),
        stac_item_id=context.stac_item_id,
    )
    crs_json = CRS.from_user_input(context.output_crs).to_json_dict()
    table = detections_table(rows, crs_json)
    write_parquet_atomic(table, context.output_uri, context.row_group_size)
    return SceneWritten(table.num_rows, dict(Counter(rows.class_names)))
