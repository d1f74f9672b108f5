"""Real detections datasets for query and picture tests, written by the project's own writer."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from pyproj import CRS

from pipeline.io.geoparquet import SceneRows, detections_table, write_parquet_atomic
from pipeline.merge.scene import scene_output_uri

CLASSES = ("ship", "boat", "plane")
WEST, SOUTH = 15.0, 42.0
SCENE_DEG = 0.01  # scene k covers [15 + 0.01 k, 15 + 0.01 (k + 1)] x [42, 42.01]
START = datetime(2026, 5, 28, 9, 0, tzinfo=UTC)  # scene k acquired k days later


def scene_rows(
    index: int,
    count: int,
    *,
    scene_uri: str = "",
    pixel_size: float = 1e-5,
    seed: int = 0,
) -> SceneRows:
    """``count`` boxes inside scene ``index``; pixels of ``pixel_size`` degrees, north up."""
    rng = np.random.default_rng((seed, index))
    side = SCENE_DEG / pixel_size  # scene side in pixels
    x0 = rng.uniform(0, side - 60, count)
    y0 = rng.uniform(0, side - 60, count)
    w, h = rng.uniform(8, 60, count), rng.uniform(8, 60, count)
    pixel = np.stack([x0, y0, x0 + w, y0 + h], axis=1)
    return rows_from_pixels(index, pixel, rng, scene_uri=scene_uri, pixel_size=pixel_size)


def rows_from_pixels(
    index: int,
    pixel: np.ndarray,
    rng: np.random.Generator,
    *,
    scene_uri: str = "",
    pixel_size: float = 1e-5,
    class_ids: np.ndarray | None = None,
    scores: np.ndarray | None = None,
) -> SceneRows:
    count = len(pixel)
    west, north = WEST + SCENE_DEG * index, SOUTH + SCENE_DEG
    lon0, lon1 = west + pixel[:, 0] * pixel_size, west + pixel[:, 2] * pixel_size
    lat0, lat1 = north - pixel[:, 3] * pixel_size, north - pixel[:, 1] * pixel_size
    corners = ((lon0, lat0), (lon1, lat0), (lon1, lat1), (lon0, lat1), (lon0, lat0))
    rings = np.stack([np.stack(c, axis=1) for c in corners], axis=1)
    if class_ids is None:
        class_ids = rng.integers(0, len(CLASSES), count).astype(np.int16)
    if scores is None:
        scores = rng.uniform(0.05, 1.0, count).astype(np.float32)
    scene_id = f"s{index}"
    return SceneRows(
        scene_id=scene_id,
        scene_uri=scene_uri or f"/archive/{scene_id}.tif",
        scene_crs="EPSG:32633",
        acquired_at=START + timedelta(days=index),
        model_id="ships:resnet18_fpn:untrained",
        run_id="r1",
        detection_ids=[f"{scene_id}-{i:05d}" for i in range(count)],
        class_ids=np.asarray(class_ids, dtype=np.int16),
        class_names=[CLASSES[int(c)] for c in class_ids],
        scores=np.asarray(scores, dtype=np.float32),
        pixel_boxes=pixel,
        rings=rings,
    )


def write_rows(output: Path | str, rows: SceneRows, row_group_size: int = 50) -> str:
    uri = scene_output_uri(str(output), rows.scene_id)
    table = detections_table(rows, CRS.from_user_input("OGC:CRS84").to_json_dict())
    write_parquet_atomic(table, uri, row_group_size)
    return uri


def write_dataset(
    output: Path | str, scenes: int = 4, count: int = 300, row_group_size: int = 50
) -> list[str]:
    """``OUTPUT/detections/s<k>.parquet`` for ``scenes`` scenes side by side, west to east."""
    return [write_rows(output, scene_rows(k, count), row_group_size) for k in range(scenes)]


def write_indexed(
    output: Path | str,
    rows: SceneRows,
    row_group_size: int = 50,
    *,
    run_id: str = "r1",
    crs: str = "OGC:CRS84",
) -> str:
    """One scene file written as a run writes it, then its done record with the index entry
    (what ``pipeline.merge.scene.done_record`` records). ``crs``: the output CRS, which
    ``rows.rings`` are in."""
    from pipeline.io.geoparquet import SceneFileWriter
    from pipeline.io.ledger import Ledger, LedgerRecord

    uri = scene_output_uri(str(output), rows.scene_id)
    projjson = CRS.from_user_input(crs).to_json_dict()
    writer = SceneFileWriter(uri, projjson, row_group_size)
    writer.write(detections_table(rows, projjson))
    writer.close()
    written = writer.written
    per_class: dict[str, int] = {}
    for name in rows.class_names:
        per_class[name] = per_class.get(name, 0) + 1
    Ledger(str(output), compact_at=None).record(
        LedgerRecord(
            rows.scene_id,
            f"{rows.scene_uri}|1|2",
            rows.model_id,
            "h",
            "done",
            run_id,
            time.time(),
            detections=written.rows,
            output=uri,
            bbox=written.extent,
            crs=crs,
            time_start=written.time_start,
            time_end=written.time_end,
            per_class=per_class,
            bytes=written.bytes,
            footer_bytes=written.footer_bytes,
            tiles_without_data=0,
        )
    )
    return uri


def write_indexed_dataset(
    output: Path | str, scenes: int = 4, count: int = 300, row_group_size: int = 50
) -> list[str]:
    """:func:`write_dataset`'s scenes, each recorded done in the scene table."""
    return [write_indexed(output, scene_rows(k, count), row_group_size) for k in range(scenes)]
