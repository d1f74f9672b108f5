"""One scene's end: tile boxes → merged scene detections → GeoParquet. No Ray here."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from pyproj import CRS, Transformer

from pipeline.io.geoparquet import SceneFileWriter, SceneRows, detections_table
from pipeline.io.ledger import LedgerRecord, now
from pipeline.io.rasters import RasterInfo
from pipeline.merge.bands import BandMerger
from pipeline.model.detector import TileDetections
from pipeline.ops.boxes import (
    Candidates,
    MergeOptions,
    box_rings,
    detection_ids,
    in_tile_core,
    touches_inner_edge,
)
from pipeline.ops.tiles import inner_edges


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
    core_margin: float = 0.0  # a tile drops boxes centred nearer its inner edges (ops.boxes)


@dataclass(frozen=True)
class SceneWritten:
    """What a scene's write produced: its row count and detections per class name, and
    what the dataset index needs (bbox in the output CRS, time range, the file's bytes)."""

    rows: int
    per_class: dict[str, int]
    bbox: tuple[float, float, float, float] | None = None  # None: no rows, or pixels only
    time_start: datetime | None = None  # the rows' acquisition time range
    time_end: datetime | None = None
    bytes: int | None = None  # the file's size
    footer_bytes: int | None = None  # its Parquet footer's length


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
        if context.core_margin > 0:  # each box from a tile that sees enough around it
            size = context.tile_size
            keep = in_tile_core(detections.boxes, size, size, inner, context.core_margin)
            detections = detections.select(keep)
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


def rings_in_crs(pixel_boxes: np.ndarray, info: RasterInfo, output_crs: str) -> np.ndarray | None:
    """Box rings in the output CRS: affine to the scene's CRS, then one pyproj call.

    None for a scene in pixel coordinates only (no CRS or geotransform to map them by).
    """
    if info.crs_wkt is None:
        return None
    rings = box_rings(pixel_boxes, info.transform)
    source, target = CRS.from_wkt(info.crs_wkt), CRS.from_user_input(output_crs)
    if len(rings) and source != target:
        transformer = Transformer.from_crs(source, target, always_xy=True)
        xs, ys = transformer.transform(rings[..., 0].ravel(), rings[..., 1].ravel())
        rings = np.stack([np.asarray(xs), np.asarray(ys)], axis=-1).reshape(rings.shape)
    return rings


def merge_in_memory(
    context: SceneContext, cols: np.ndarray, rows: np.ndarray, found: list[TileDetections]
) -> Candidates:
    """A scene's merge without its file: the candidates :class:`SceneStream` would write,
    band by band in the same order, their boxes in the planned grid's pixels (the scene's
    own unless ``model.resolution_m`` resampled it). Benchmarks and tests compare them."""
    merger, kept = BandMerger(context.merge), []
    tops = sorted(set(rows.tolist()))
    for position, top in enumerate(tops):
        band = np.flatnonzero(rows == top)
        offsets = [(int(cols[i]), int(rows[i])) for i in band]
        candidates = Candidates(*gather_candidates(context, offsets, [found[i] for i in band]))
        below = tops[position + 1] if position + 1 < len(tops) else None
        kept.append(merger.add(candidates, below))
    return Candidates.concat(kept)


class SceneStream:
    """Merges and writes one scene band by band (tile rows, top to bottom).

    Only boxes that a later band can still reach are held (:class:`BandMerger`), plus one
    row group of output (:class:`SceneFileWriter`): memory does not grow with the scene.
    The file appears at :meth:`close`, whole, or not at all after :meth:`abort`.
    """

    def __init__(self, context: SceneContext) -> None:
        self.context = context
        self.merger = BandMerger(context.merge)
        self.crs_json = CRS.from_user_input(context.output_crs).to_json_dict()
        self.writer = SceneFileWriter(context.output_uri, self.crs_json, context.row_group_size)
        self.per_class: Counter[str] = Counter()

    def add_band(
        self,
        offsets: list[tuple[int, int]],
        found: list[TileDetections],
        next_top: int | None,
    ) -> None:
        """One band's tiles; ``next_top``: the next band's first row (None: this was the last)."""
        band = Candidates(*gather_candidates(self.context, offsets, found))
        final = self.merger.add(band, next_top)
        if len(final):
            self.writer.write(detections_table(self._rows(final), self.crs_json))

    def close(self) -> SceneWritten:
        self.add_band([], [], None)  # what was still open is final now
        rows = self.writer.close()
        file = self.writer.written
        return SceneWritten(
            rows,
            dict(self.per_class),
            bbox=file.extent,
            time_start=file.time_start,
            time_end=file.time_end,
            bytes=file.bytes,
            footer_bytes=file.footer_bytes,
        )

    def abort(self) -> None:
        self.writer.abort()

    def _rows(self, final: Candidates) -> SceneRows:
        context = self.context
        names = [context.class_names[int(c)] for c in final.class_ids]
        self.per_class.update(names)
        # Merged in the tiled grid; reported in the scene's own pixels (they differ when the
        # scene was read resampled to model.resolution_m). The rings come from the grid's
        # transform, which is the scene's scaled by the same factor: the same places.
        scene_boxes = context.info.scene_pixels(final.boxes)
        return SceneRows(
            scene_id=context.scene_id,
            scene_uri=context.scene_uri,
            scene_crs=context.info.crs_name,
            acquired_at=context.acquired_at or context.info.acquired_at,
            model_id=context.model_id,
            run_id=context.run_id,
            detection_ids=detection_ids(
                context.scene_id,
                context.model_id,
                context.settings_hash,
                scene_boxes,
                final.class_ids,
            ),
            class_ids=final.class_ids,
            class_names=names,
            scores=final.scores,
            pixel_boxes=scene_boxes,
            rings=rings_in_crs(final.boxes, context.info, context.output_crs),
            stac_item_id=context.stac_item_id,
        )


def done_record(
    context: SceneContext, identity: str, written: SceneWritten, tiles_without_data: int
) -> LedgerRecord:
    """The ledger's done record for a committed scene file, with its dataset-index entry.

    Record it only after the file is committed (:meth:`SceneStream.close`): a crash between
    the two leaves the scene not done, to be written again.
    """
    return LedgerRecord(
        context.scene_id,
        identity,
        context.model_id,
        context.settings_hash,
        "done",
        context.run_id,
        now(),
        detections=written.rows,
        output=context.output_uri,
        bbox=written.bbox,
        crs=context.output_crs,
        time_start=written.time_start,
        time_end=written.time_end,
        per_class=dict(written.per_class),
        bytes=written.bytes,
        footer_bytes=written.footer_bytes,
        tiles_without_data=tiles_without_data,
    )


def finalize_scene(
    context: SceneContext, offsets: list[tuple[int, int]], found: list[TileDetections]
) -> SceneWritten:
    """Merge all of a scene's tile detections at once and write its GeoParquet file."""
    stream = SceneStream(context)
    try:
        stream.add_band(offsets, found, None)
        return stream.close()
    except BaseException:
        stream.abort()
        raise
