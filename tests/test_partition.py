"""`compact`: one spatially partitioned dataset with the same rows, rebuilt incrementally."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import geopandas
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from detections_data import scene_rows, write_indexed
from pyproj import Transformer

from pipeline.errors import CompactionError
from pipeline.io.partition import NO_DATE, cell_bounds, compact_dataset, quadkeys
from pipeline.io.query import (
    QueryFilter,
    candidates,
    in_dataset_crs,
    matching_cells,
    open_detections,
    query_detections,
)

ZOOM = 14  # cells of about 0.022 degrees: the 0.01-degree scenes fall into a few


def source_rows(root: Path) -> dict[str, bytes]:
    """detection id -> geometry (WKB) over the scene files the index lists."""
    table = query_detections(str(root), QueryFilter(), columns=["detection_id", "geometry"])
    return dict(zip(table["detection_id"].to_pylist(), table["geometry"].to_pylist(), strict=True))


def compacted_rows(dest: Path) -> tuple[dict[str, bytes], int]:
    table = pq.read_table(sorted(dest.glob("cell=*/part.parquet")))
    rows = dict(zip(table["detection_id"].to_pylist(), table["geometry"].to_pylist(), strict=True))
    return rows, table.num_rows


def test_compacting_keeps_every_row_once_in_hilbert_ordered_cells(tmp_path):
    source, dest = tmp_path / "out", tmp_path / "compacted"
    for k in range(4):
        write_indexed(source, scene_rows(k, 200))
    done = compact_dataset(str(source), str(dest), zoom=ZOOM)
    rows, count = compacted_rows(dest)
    assert rows == source_rows(source) and count == 800  # ids and geometries, each once
    assert len(done.partitions_rebuilt) > 1 and done.rows == 800
    for path in dest.glob("cell=*/part.parquet"):
        cell = path.parent.name.removeprefix("cell=")
        frame = geopandas.read_parquet(path)
        centres = frame.bounds
        lon = ((centres.minx + centres.maxx) / 2).to_numpy()
        lat = ((centres.miny + centres.maxy) / 2).to_numpy()
        assert set(quadkeys(lon, lat, ZOOM)) == {cell}
        geo = json.loads(pq.read_schema(path).metadata[b"geo"])
        assert geo["columns"]["geometry"]["covering"]["bbox"]["xmin"] == ["bbox", "xmin"]
        assert pq.read_metadata(path).row_group(0).column(0).compression == "ZSTD"
    # DuckDB reads the cells as hive partitions.
    counted = duckdb.sql(
        f"select count(*), count(distinct cell) from read_parquet('{dest}/cell=*/*.parquet', "
        "hive_partitioning = true)"
    ).fetchall()[0]
    assert counted == (800, len(done.partitions_rebuilt))


def test_a_second_compaction_after_a_crash_loses_and_duplicates_nothing(tmp_path):
    source, dest = tmp_path / "out", tmp_path / "compacted"
    for k in range(3):
        write_indexed(source, scene_rows(k, 100))
    compact_dataset(str(source), str(dest), zoom=ZOOM)
    # New scenes, and scene s0 re-done with other boxes (a new model, say).
    for k in (3, 4):
        write_indexed(source, scene_rows(k, 100))
    redone = scene_rows(0, 60, seed=9)
    write_indexed(source, type(redone)(**{**asdict(redone), "run_id": "r2"}), run_id="r2")

    def crash(partition: str) -> None:
        raise KeyboardInterrupt(f"killed after {partition}")

    with pytest.raises(KeyboardInterrupt):
        compact_dataset(str(source), str(dest), after_partition=crash)
    again = compact_dataset(str(source), str(dest))  # the zoom kept from the first run
    rows, count = compacted_rows(dest)
    expected = source_rows(source)
    assert rows == expected and count == len(expected) == 4 * 100 + 60
    assert again.zoom == ZOOM and again.files_read == 3  # only s0, s3 and s4 were read
    nothing = compact_dataset(str(source), str(dest))
    assert nothing.partitions_rebuilt == [] and compacted_rows(dest)[1] == count


def test_quadkeys_of_known_places():
    keys = quadkeys(
        pa.array([-179.9, 179.9, 0.1]).to_numpy(), pa.array([85.0, -85.0, 0.1]).to_numpy(), 2
    )
    assert list(keys) == ["q00", "q33", "q12"]  # tile x 2, y 1 just north of (0, 0)
    assert list(quadkeys(pa.array([10.0]).to_numpy(), pa.array([45.0]).to_numpy(), 0)) == ["q"]


def test_cell_bounds_hold_the_points_their_quadkeys_name():
    rng = np.random.default_rng(1)
    lon, lat = rng.uniform(-180, 180, 500), rng.uniform(-85, 85, 500)
    for zoom in (0, 3, 11, 18):
        west, south, east, north = cell_bounds(list(quadkeys(lon, lat, zoom)))
        assert np.all((west <= lon) & (lon <= east) & (south <= lat) & (lat <= north))


def utm_rows(index: int, count: int):
    """:func:`scene_rows` with its rings in UTM 33N, as a job with ``output.crs`` gives."""
    rows = scene_rows(index, count)
    to_utm = Transformer.from_crs("OGC:CRS84", "EPSG:32633", always_xy=True)
    x, y = to_utm.transform(rows.rings[..., 0], rows.rings[..., 1])
    return replace(rows, rings=np.stack([x, y], axis=-1))


def ids(source: Path, where: QueryFilter) -> list[str]:
    table = query_detections(str(source), where, columns=["detection_id"])
    return sorted(table["detection_id"].to_pylist())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("crs", ["OGC:CRS84", "EPSG:32633"])
@pytest.mark.parametrize("by_date", [False, True], ids=["cells", "cells and days"])
def test_a_query_over_the_compacted_dataset_gives_the_scene_files_rows(tmp_path, crs, by_date):
    source, dest = tmp_path / "out", tmp_path / "compacted"
    for k in range(4):
        rows = scene_rows(k, 150) if crs == "OGC:CRS84" else utm_rows(k, 150)
        write_indexed(source, rows, crs=crs)
    compact_dataset(str(source), str(dest), zoom=16, by_date=by_date)
    found = open_detections(str(dest))
    assert found.partitions is not None and len(found.files) > 8
    to_crs = Transformer.from_crs("OGC:CRS84", crs, always_xy=True)
    rng = np.random.default_rng(7)
    pruned = 0
    for _ in range(25):  # boxes of every size, many of them meeting a cell's edge
        west, south = rng.uniform(14.995, 15.04), rng.uniform(41.995, 42.01)
        side = rng.choice([1e-4, 1e-3, 5e-3, 2e-2])
        box = to_crs.transform_bounds(west, south, west + side, south + side)
        day = datetime(2026, 5, 28 + int(rng.integers(0, 4)), 12, tzinfo=UTC)
        for where in (QueryFilter(bbox=box), QueryFilter(bbox=box, since=day, until=None)):
            assert ids(dest, where) == ids(source, where)
            pruned += len(candidates(found, in_dataset_crs(where, found.crs))) < len(found.files)
    assert pruned > 25  # the partitions really were skipped
    assert ids(dest, QueryFilter()) == ids(source, QueryFilter())
    lonlat = QueryFilter(bbox=(15.001, 42.001, 15.002, 42.002), bbox_crs="OGC:CRS84")
    assert 0 < len(matching_cells(str(dest), lonlat)) <= 4


@pytest.mark.timeout(120)
def test_date_partitions_hold_each_day_and_keep_their_layout(tmp_path):
    source, dest = tmp_path / "out", tmp_path / "compacted"
    for k in range(3):
        write_indexed(source, scene_rows(k, 50))
    undated = scene_rows(3, 50)
    write_indexed(source, replace(undated, acquired_at=None))
    compact_dataset(str(source), str(dest), zoom=12, by_date=True)
    days = {p.parent.name for p in dest.glob("cell=*/date=*/part.parquet")}
    assert days == {f"date=2026-05-{28 + k}" for k in range(3)} | {f"date={NO_DATE}"}
    table = duckdb.sql(
        f"select count(*), count(date) from read_parquet('{dest}/cell=*/date=*/*.parquet', "
        "hive_partitioning = true)"
    ).fetchall()[0]
    assert table == (200, 150)  # the undated scene's rows read as null days
    since = QueryFilter(since=datetime(2026, 5, 29, tzinfo=UTC))
    assert ids(dest, since) == ids(source, since)
    with pytest.raises(CompactionError, match="by_date True, not False"):
        compact_dataset(str(source), str(dest), by_date=False)
    write_indexed(source, scene_rows(4, 50))
    again = compact_dataset(str(source), str(dest))  # left out: kept
    assert again.layout.by_date and again.partitions_rebuilt  # only the new scene's day
    assert all(key.endswith("/date=2026-06-01") for key in again.partitions_rebuilt)
