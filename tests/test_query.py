"""`georetina query`: the same rows as a full read filtered by hand, with row groups skipped."""

import io
import json
from datetime import UTC, datetime
from pathlib import Path

import geopandas
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest
from detections_data import write_dataset
from pyproj import CRS, Transformer

from pipeline.cli.main import main
from pipeline.errors import QueryError
from pipeline.io.query import (
    FOOTER_READ,
    QueryFilter,
    count_detections,
    may_match,
    open_detections,
    parse_bbox,
    parse_time,
    query_detections,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("query") / "out"
    write_dataset(root, scenes=4, count=300, row_group_size=50)
    return root


@pytest.fixture(scope="module")
def everything(dataset) -> pd.DataFrame:
    """The whole dataset, read plainly, for filtering by hand."""
    frame = pq.read_table(sorted((dataset / "detections").glob("*.parquet"))).to_pandas()
    for name in ("xmin", "ymin", "xmax", "ymax"):
        frame[name] = frame.bbox.map(lambda b, n=name: b[n])
    return frame


def by_hand(frame: pd.DataFrame, where: QueryFilter) -> set[str]:
    keep = np.ones(len(frame), bool)
    if where.bbox is not None:
        x0, y0, x1, y1 = where.bbox
        keep &= (frame.xmin <= x1) & (frame.xmax >= x0) & (frame.ymin <= y1) & (frame.ymax >= y0)
    if where.classes:
        keep &= frame.class_name.isin(where.classes)
    if where.scenes:
        keep &= frame.scene_id.isin(where.scenes)
    if where.min_score is not None:
        keep &= frame.score >= np.float32(where.min_score)
    if where.since is not None:
        keep &= frame.acquired_at >= where.since
    if where.until is not None:
        keep &= frame.acquired_at < where.until
    return set(frame.detection_id[keep])


def ids(table: pa.Table) -> set[str]:
    return set(table.column("detection_id").to_pylist())


FILTERS = {
    "nothing": QueryFilter(),
    "bbox": QueryFilter(bbox=(15.012, 42.002, 15.025, 42.006)),
    "class": QueryFilter(classes=("ship",)),
    "classes": QueryFilter(classes=("ship", "plane")),
    "score": QueryFilter(min_score=0.6),
    "since": QueryFilter(since=datetime(2026, 5, 30, tzinfo=UTC)),
    "until": QueryFilter(until=datetime(2026, 5, 30, 9, tzinfo=UTC)),  # exclusive: s0, s1
    "scene": QueryFilter(scenes=("s2", "s3")),
    "all": QueryFilter(
        bbox=(15.005, 42.0, 15.035, 42.004),
        classes=("ship",),
        min_score=0.5,
        since=datetime(2026, 5, 29, tzinfo=UTC),
        until=datetime(2026, 6, 1, tzinfo=UTC),
        scenes=("s1", "s2", "s3"),
    ),
}


@pytest.mark.parametrize("name", FILTERS)
def test_each_filter_gives_the_rows_a_full_read_filtered_by_hand(dataset, everything, name):
    where = FILTERS[name]
    expected = by_hand(everything, where)
    assert 0 < len(expected) <= len(everything)
    found = query_detections(str(dataset), where)
    assert ids(found) == expected
    assert found.num_rows == len(expected)  # no duplicates
    assert found.schema.names == everything.columns[: found.num_columns].tolist()


def test_a_bbox_outside_every_file_reads_only_footers(dataset):
    found = open_detections(str(dataset), count_reads=True)
    result = query_detections(found, QueryFilter(bbox=(16.0, 43.0, 16.1, 43.1)))
    assert result.num_rows == 0
    # Each file's footer exactly: one read of its end, and the rest of a longer footer (the
    # first file's twice: once for the dataset's CRS).
    expected = 0
    for path in [found.files[0], *found.files]:
        footer = footer_length(Path(path)) + 8
        expected += max(footer, min(FOOTER_READ, Path(path).stat().st_size))
    assert found.reads.bytes == expected


def footer_length(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[-8:-4], "little")


def test_row_groups_outside_the_bbox_are_never_read(dataset, everything):
    where = QueryFilter(bbox=(15.0, 42.0, 15.002, 42.002))  # a corner of scene s0
    found = open_detections(str(dataset), count_reads=True)
    result = query_detections(found, where)
    assert ids(result) == by_hand(everything, where) and result.num_rows > 0
    files = [found.files[0], *found.files]  # every file's footer was read...
    footers = sum(max(footer_length(Path(p)) + 8, FOOTER_READ) for p in files)
    s0 = (dataset / "detections" / "s0.parquet").stat().st_size
    data = found.reads.bytes - footers
    # ...and of the data, only a part of s0: its other row groups were skipped.
    assert 0 < data < s0 / 2


def test_the_bbox_can_be_given_in_another_crs(dataset, everything):
    lonlat = (15.012, 42.002, 15.025, 42.006)
    to_utm = Transformer.from_crs("OGC:CRS84", "EPSG:32633", always_xy=True)
    utm = to_utm.transform_bounds(*lonlat)
    found = query_detections(str(dataset), QueryFilter(bbox=utm, bbox_crs="EPSG:32633"))
    # The UTM box reprojected covers the lon/lat box (and a little more at its corners).
    assert ids(found) >= by_hand(everything, QueryFilter(bbox=lonlat))
    back = Transformer.from_crs("EPSG:32633", "OGC:CRS84", always_xy=True)
    cover = back.transform_bounds(*utm, densify_pts=21)
    assert ids(found) == by_hand(everything, QueryFilter(bbox=cover))


def test_count_per_scene_and_class(dataset, everything):
    where = QueryFilter(min_score=0.5)
    counts = count_detections(str(dataset), where).to_pandas()
    kept = everything[everything.detection_id.isin(by_hand(everything, where))]
    expected = kept.groupby(["scene_id", "class_name"]).size().reset_index(name="count")
    assert counts.to_dict("records") == expected.to_dict("records")


def test_limit_and_columns(dataset):
    result = query_detections(str(dataset), columns=["detection_id", "score"], limit=7)
    assert result.num_rows == 7 and result.column_names == ["detection_id", "score"]
    with pytest.raises(QueryError, match="nope"):
        query_detections(str(dataset), columns=["nope"])


def test_a_file_still_being_written_is_not_read(tmp_path):
    write_dataset(tmp_path, scenes=1, count=20)
    (tmp_path / "detections" / "s9.parquet.tmp-0123abcd").write_bytes(b"half a file")
    assert query_detections(str(tmp_path)).num_rows == 20


def test_sources_root_folder_glob_and_file(dataset):
    total = query_detections(str(dataset)).num_rows
    assert query_detections(str(dataset / "detections")).num_rows == total
    assert query_detections(str(dataset / "detections" / "s*.parquet")).num_rows == total
    assert query_detections(str(dataset / "detections" / "s1.parquet")).num_rows == total // 4


def test_an_empty_folder_gives_no_rows_with_the_schema(tmp_path):
    result = query_detections(str(tmp_path), QueryFilter(min_score=0.5))
    assert result.num_rows == 0 and "bbox" in result.column_names


def test_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(QueryError, match="no such file"):
        open_detections(str(tmp_path / "missing"))
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"a": [1]}), plain)
    with pytest.raises(QueryError, match=f"{plain}: has no GeoParquet"):
        open_detections(str(plain))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(QueryError, match="broken.parquet: is not a Parquet file"):
        open_detections(str(broken))
    with pytest.raises(QueryError, match="expected four numbers"):
        parse_bbox("1,2,3")
    with pytest.raises(QueryError, match="xmin must be <= xmax"):
        parse_bbox("2,0,1,1")
    with pytest.raises(QueryError, match="--since 'last week'"):
        parse_time("last week", "--since")
    (tmp_path / "empty").mkdir()
    with pytest.raises(QueryError, match="EPSG:99999999"):
        query_detections(
            str(tmp_path / "empty"), QueryFilter(bbox=(0, 0, 1, 1), bbox_crs="EPSG:99999999")
        )


def test_times_without_a_zone_are_utc():
    assert parse_time("2026-06-01") == datetime(2026, 6, 1, tzinfo=UTC)
    assert parse_time("2026-06-01T12:00:00+02:00").utcoffset().total_seconds() == 7200


def test_may_match_rules_out_only_what_statistics_prove():
    stats = {
        "bbox.xmin": (10.0, 11.0),
        "bbox.xmax": (10.1, 11.1),
        "bbox.ymin": (40.0, 41.0),
        "bbox.ymax": (40.1, 41.1),
        "class_name": ("boat", "plane"),
        "score": (0.1, 0.7),
        "acquired_at": (datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)),
    }
    assert may_match(stats, QueryFilter(bbox=(11.1, 41.1, 12, 42)))  # touching corners
    assert not may_match(stats, QueryFilter(bbox=(11.2, 40, 12, 42)))
    assert not may_match(stats, QueryFilter(bbox=(9, 40, 9.9, 42)))
    assert may_match(stats, QueryFilter(classes=("car", "dog")))  # between boat and plane
    assert not may_match(stats, QueryFilter(classes=("ship", "airplane")))
    assert not may_match(stats, QueryFilter(min_score=0.8))
    assert may_match(stats, QueryFilter(min_score=0.7))
    assert not may_match(stats, QueryFilter(since=datetime(2026, 1, 3, tzinfo=UTC)))
    assert not may_match(stats, QueryFilter(until=datetime(2026, 1, 1, tzinfo=UTC)))
    assert may_match(stats, QueryFilter(until=datetime(2026, 1, 1, 0, 1, tzinfo=UTC)))
    assert may_match({}, QueryFilter(bbox=(0, 0, 1, 1), min_score=0.9))  # no statistics


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------

ARGS = ["--bbox", "15.005,42.0,15.035,42.006", "--class", "ship", "boat", "--min-score", "0.4"]
WHERE = QueryFilter(bbox=(15.005, 42.0, 15.035, 42.006), classes=("ship", "boat"), min_score=0.4)


def test_cli_csv_geojson_and_parquet_hold_the_same_rows(dataset, everything, tmp_path, capsys):
    expected = by_hand(everything, WHERE)
    assert main(["query", str(dataset), *ARGS, "--format", "csv"]) == 0
    csv = pyarrow.csv.read_csv(io.BytesIO(capsys.readouterr().out.encode()))
    assert set(csv.column("detection_id").to_pylist()) == expected
    assert csv.column("geometry")[0].as_py().startswith("POLYGON ((15.")
    assert "bbox_xmin" in csv.column_names

    out = tmp_path / "ships.geojson"
    assert main(["query", str(dataset), *ARGS, "--format", "geojson", "-o", str(out)]) == 0
    features = json.loads(out.read_text())["features"]
    assert {f["properties"]["detection_id"] for f in features} == expected
    assert features[0]["properties"]["acquired_at"].startswith("2026-")
    assert 15.0 < features[0]["geometry"]["coordinates"][0][0][0] < 15.04

    out = tmp_path / "ships.parquet"
    assert main(["query", str(dataset), *ARGS, "--format", "parquet", "-o", str(out)]) == 0
    frame = geopandas.read_parquet(out)
    assert set(frame.detection_id) == expected
    assert frame.crs == CRS.from_user_input("OGC:CRS84")
    geo = json.loads(pq.read_schema(out).metadata[b"geo"])
    xmin, ymin, xmax, ymax = geo["columns"]["geometry"]["bbox"]
    assert np.allclose([xmin, ymin, xmax, ymax], frame.total_bounds)  # these rows' extent


def test_cli_table_count_and_stats(dataset, everything, capsys):
    assert main(["query", str(dataset), *ARGS]) == 0
    out = capsys.readouterr().out
    assert out.endswith(f"\n{len(by_hand(everything, WHERE))} row(s)\n")
    assert main(["query", str(dataset), *ARGS, "--count", "--format", "csv", "--stats"]) == 0
    captured = capsys.readouterr()
    counts = pyarrow.csv.read_csv(io.BytesIO(captured.out.encode())).to_pandas()
    assert counts["count"].sum() == len(by_hand(everything, WHERE))
    assert set(counts.columns) == {"scene_id", "class_name", "count"}
    assert captured.err.startswith("read ") and "bytes" in captured.err


def test_cli_errors_exit_2_with_the_reason(dataset, capsys):
    assert main(["query", str(dataset), "--bbox", "1,2"]) == 2
    assert "bbox '1,2'" in capsys.readouterr().err
    assert main(["query", str(dataset), "--crs", "EPSG:32633"]) == 2
    assert "--crs is the CRS of --bbox" in capsys.readouterr().err
    assert main(["query", str(dataset), "--format", "parquet"]) == 2
    assert "-o FILE" in capsys.readouterr().err
    assert main(["query", str(dataset), "--count", "--format", "geojson"]) == 2


def test_query_over_object_storage(s3_endpoint, dataset, everything):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("query-bucket")
    fs.put(str(dataset / "detections"), "query-bucket/out/", recursive=True)
    where = QueryFilter(bbox=(15.012, 42.002, 15.025, 42.006), min_score=0.3)
    found = open_detections("s3://query-bucket/out", count_reads=True)
    assert len(found.files) == 4
    result = query_detections(found, where)
    assert ids(result) == by_hand(everything, where)
    # The same ranges as on local disk: no read-ahead of whole blocks behind our back.
    local = open_detections(str(dataset), count_reads=True)
    query_detections(local, where)
    assert found.reads.bytes == local.reads.bytes < found.total_bytes()
