"""`compact`: one spatially partitioned dataset with the same rows, rebuilt incrementally."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import duckdb
import geopandas
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from detections_data import scene_rows, write_indexed

from pipeline.io.partition import compact_dataset, quadkeys
from pipeline.io.query import QueryFilter, query_detections

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
    assert len(done.cells_rebuilt) > 1 and done.rows == 800
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
    assert counted == (800, len(done.cells_rebuilt))


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

    def crash(cell: str) -> None:
        raise KeyboardInterrupt(f"killed after {cell}")

    with pytest.raises(KeyboardInterrupt):
        compact_dataset(str(source), str(dest), after_cell=crash)
    again = compact_dataset(str(source), str(dest))  # the zoom kept from the first run
    rows, count = compacted_rows(dest)
    expected = source_rows(source)
    assert rows == expected and count == len(expected) == 4 * 100 + 60
    assert again.zoom == ZOOM and again.files_read == 3  # only s0, s3 and s4 were read
    nothing = compact_dataset(str(source), str(dest))
    assert nothing.cells_rebuilt == [] and compacted_rows(dest)[1] == count


def test_quadkeys_of_known_places():
    keys = quadkeys(
        pa.array([-179.9, 179.9, 0.1]).to_numpy(), pa.array([85.0, -85.0, 0.1]).to_numpy(), 2
    )
    assert list(keys) == ["q00", "q33", "q12"]  # tile x 2, y 1 just north of (0, 0)
    assert list(quadkeys(pa.array([10.0]).to_numpy(), pa.array([45.0]).to_numpy(), 0)) == ["q"]
