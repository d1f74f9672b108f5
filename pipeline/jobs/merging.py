"""A scene's end, as a Ray task: its tiles' detections → band-by-band merge → GeoParquet →
the ledger. Many run at once, on any node; a scene worker hands each its tiles' tables by
reference (they go from the detector actors to the task without passing through it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.io.ledger import Ledger, LedgerRecord, now
from pipeline.io.rasters import RasterInfo
from pipeline.jobs.report import footprint_km2
from pipeline.jobs.stages import first_line
from pipeline.merge.scene import SceneContext, SceneStream, done_record, scene_output_uri
from pipeline.model.detector import TileDetections
from pipeline.redact import redact_text, redact_uri

# Merging is light next to reading and detecting; a quarter CPU lets it run beside them.
MERGE_TASK_CPUS = 0.25


@dataclass
class SceneOutcome:
    scene_id: str
    uri: str
    status: str  # done / failed / skipped
    tiles: int = 0
    detections: int = 0
    output: str | None = None
    error: str | None = None
    tiles_without_data: int = 0  # all nodata: never sent to the detector
    per_class: dict[str, int] = field(default_factory=dict)
    area_km2: float = 0.0  # the scene's footprint, geodesic


@dataclass(frozen=True)
class SceneJob:
    """One scene's merge: where its file goes and what its ledger record says."""

    context: SceneContext
    identity: str
    expected: int
    output_root: str


def scene_context(common: dict, output_root: str, scene: dict, info: RasterInfo) -> SceneContext:
    """The merge's context for a planned scene; ``common`` holds the run's own fields."""
    acquired = scene.get("acquired_at") or ""
    return SceneContext(
        **common,
        scene_id=scene["scene_id"],
        scene_uri=redact_uri(scene["uri"]),
        info=info,
        output_uri=scene_output_uri(output_root, scene["scene_id"]),
        acquired_at=datetime.fromisoformat(acquired) if acquired else None,
        stac_item_id=scene.get("stac_item_id") or None,
    )


def failed_record(scene_id: str, identity: str, common: dict, error: str) -> LedgerRecord:
    """A scene's failure for the ledger; ``common``: the run's model id, settings hash, run id."""
    return LedgerRecord(
        scene_id,
        identity,
        common["model_id"],
        common["settings_hash"],
        "failed",
        common["run_id"],
        now(),
        error=error,
    )


def bands_of(table: pa.Table) -> list[tuple[int, list[tuple[int, int]], list[TileDetections]]]:
    """A scene's tile rows as bands (tile rows, top to bottom), tiles in plan order:
    ``(band top, tile offsets, tile detections)`` each."""
    table = table.sort_by([("row_off", "ascending"), ("tile_index", "ascending")])
    rows = table["row_off"].to_numpy()
    cols = table["col_off"].to_numpy()
    boxes = table["boxes"].combine_chunks()
    scores = table["scores"].combine_chunks()
    class_ids = table["class_ids"].combine_chunks()
    box_values = boxes.values.to_numpy(zero_copy_only=False).reshape(-1, 4)
    score_values = scores.values.to_numpy(zero_copy_only=False)
    class_values = class_ids.values.to_numpy(zero_copy_only=False)
    starts = scores.offsets.to_numpy()
    found = [
        TileDetections(
            box_values[starts[i] : starts[i + 1]],
            score_values[starts[i] : starts[i + 1]],
            class_values[starts[i] : starts[i + 1]],
        )
        for i in range(len(rows))
    ]
    tops = np.flatnonzero(np.diff(rows, prepend=-1)) if len(rows) else np.zeros(0, int)
    bounds = [*tops.tolist(), len(rows)]
    return [
        (int(rows[a]), list(zip(cols[a:b].tolist(), rows[a:b].tolist(), strict=True)), found[a:b])
        for a, b in zip(bounds, bounds[1:], strict=False)
    ]


def merge_and_write(job: SceneJob, table: pa.Table) -> SceneOutcome:
    """Merge a scene's tiles band by band, commit its file, then record it as done."""
    context = job.context
    unique = pc.unique(table["tile_index"])
    if len(unique) != job.expected or len(table) != job.expected:
        raise ValueError(f"{len(unique)} distinct of {len(table)} tiles, {job.expected} planned")
    stream = SceneStream(context)
    try:
        bands = bands_of(table)
        for position, (_, offsets, found) in enumerate(bands):
            below = bands[position + 1][0] if position + 1 < len(bands) else None
            stream.add_band(offsets, found, below)
        written = stream.close()
    except BaseException:
        stream.abort()  # nothing of this attempt appears; an older file stays
        raise
    # Done goes to the ledger as soon as the file is committed: a run killed later skips it.
    without_data = int(pc.sum(pc.invert(table["has_data"])).as_py() or 0)
    Ledger(job.output_root).record(done_record(context, job.identity, written, without_data))
    info = context.info
    return SceneOutcome(
        context.scene_id,
        context.scene_uri,
        "done",
        job.expected,
        written.rows,
        context.output_uri,
        tiles_without_data=without_data,
        per_class=written.per_class,
        area_km2=footprint_km2(info.width, info.height, info.transform, info.crs_wkt),
    )


@ray.remote(num_cpus=MERGE_TASK_CPUS, max_retries=3)
def merge_scene(job: SceneJob, *tables: pa.Table) -> SceneOutcome:
    """Ray task: :func:`merge_and_write`; a failure is recorded for this scene and returned."""
    try:
        return merge_and_write(job, pa.concat_tables(tables))
    except Exception as error:  # noqa: BLE001 - recorded per scene
        message = redact_text(f"merge/write failed: {first_line(error)}")
        context = job.context
        common = {"model_id": context.model_id, "settings_hash": context.settings_hash}
        record = failed_record(
            context.scene_id, job.identity, {**common, "run_id": context.run_id}, message
        )
        Ledger(job.output_root).record(record)
        return SceneOutcome(
            context.scene_id, context.scene_uri, "failed", job.expected, error=message
        )
