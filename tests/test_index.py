"""The dataset index: queries read the scene table first and open only files that can match."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from detections_data import scene_rows, write_indexed, write_indexed_dataset, write_rows
from test_query import FILTERS, by_hand, ids

from pipeline.io.ledger import Ledger
from pipeline.io.query import (
    READ_THREADS,
    QueryFilter,
    candidates,
    open_detections,
    query_detections,
)

SCENES = 6


@pytest.fixture(scope="module")
def indexed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("index") / "out"
    write_indexed_dataset(root, scenes=SCENES, count=300, row_group_size=50)
    return root


@pytest.fixture(scope="module")
def everything(indexed) -> pd.DataFrame:
    frame = pq.read_table(sorted((indexed / "detections").glob("*.parquet"))).to_pandas()
    for name in ("xmin", "ymin", "xmax", "ymax"):
        frame[name] = frame.bbox.map(lambda b, n=name: b[n])
    return frame


@pytest.mark.parametrize("name", FILTERS)
def test_each_filter_through_the_index_gives_the_rows_of_a_full_read(indexed, everything, name):
    where = FILTERS[name]
    found = open_detections(str(indexed))
    assert found.index is not None and len(found.files) == SCENES
    result = query_detections(found, where)
    assert ids(result) == by_hand(everything, where) and result.num_rows == len(ids(result))
    plain = query_detections(open_detections(str(indexed), use_index=False), where)
    assert result.equals(plain)  # the same rows in the same order, index or not


def opened_for(root: Path, where: QueryFilter) -> tuple[int, int]:
    """Files the query opens, and the bytes it reads (the index's included)."""
    found = open_detections(str(root), count_reads=True)
    files = len(candidates(found, where))
    query_detections(found, where)
    return files, found.reads.bytes


def test_only_files_whose_entry_can_match_are_opened(indexed):
    # Scene k spans longitude 15 + 0.01 k .. 15 + 0.01 (k + 1), acquired k days after 28 May.
    inside_s1 = QueryFilter(bbox=(15.012, 42.002, 15.018, 42.006))
    assert opened_for(indexed, inside_s1)[0] == 1  # no other footer, not even for the CRS
    nowhere = opened_for(indexed, QueryFilter(bbox=(16.0, 43.0, 16.1, 43.1)))
    assert nowhere == opened_for(indexed, QueryFilter(scenes=("nope",)))
    assert nowhere[0] == 0  # nothing opened: only the index was read
    assert opened_for(indexed, QueryFilter(scenes=("s2", "s4")))[0] == 2
    from datetime import UTC, datetime

    late = QueryFilter(since=datetime(2026, 6, 1, tzinfo=UTC))  # s4 (1 June 9:00) and s5
    assert opened_for(indexed, late)[0] == 2
    assert opened_for(indexed, QueryFilter(classes=("submarine",)))[0] == 0


def test_a_footer_is_read_in_one_request_of_its_exact_length(indexed):
    found = open_detections(str(indexed), count_reads=True)
    index_requests, index_bytes = found.reads.requests, found.reads.bytes
    assert index_requests == SCENES  # one fragment per scene: not compacted yet
    query_detections(found, QueryFilter(bbox=(16.0, 43.0, 16.1, 43.1)))  # nothing opened
    path = indexed / "detections" / "s1.parquet"
    blob = path.read_bytes()
    footer = int.from_bytes(blob[-8:-4], "little") + 8
    where = QueryFilter(bbox=(15.012, 42.002, 15.018, 42.006))
    counted = open_detections(str(indexed), count_reads=True)
    metadata = pq.read_metadata(path)
    result = query_detections(counted, where)
    assert result.num_rows > 0
    data = counted.reads.bytes - index_bytes - footer
    groups = sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
    assert 0 < data < groups  # a part of s1's row groups, after exactly its footer


def test_a_limit_stops_reading_files(tmp_path):
    root = tmp_path / "out"
    write_indexed_dataset(root, scenes=3 * READ_THREADS, count=20, row_group_size=50)
    found = open_detections(str(root), count_reads=True)
    result = query_detections(found, limit=5)
    assert result.num_rows == 5
    assert found.reads.opened <= 2 * READ_THREADS < 2 * 3 * READ_THREADS  # 2 opens a file


def test_the_latest_done_record_describes_a_rewritten_file(tmp_path):
    root = tmp_path / "out"
    write_indexed(root, scene_rows(0, 50))
    moved = scene_rows(3, 40)  # scene s3's boxes, written under s0's name
    write_indexed(root, type(moved)(**{**asdict(moved), "scene_id": "s0"}), run_id="r2")
    found = open_detections(str(root))
    assert len(found.files) == 1 and found.index.column("run_id").to_pylist() == ["r2"]
    in_s3 = QueryFilter(bbox=(15.032, 42.002, 15.038, 42.006))
    assert query_detections(found, in_s3).num_rows > 0


def test_files_without_an_index_entry_are_still_read(tmp_path):
    """Old-format JSON records (no bbox, no classes): their files are opened; a file without
    any record (its run died before recording it done) is not part of the dataset."""
    root = tmp_path / "out"
    uris = [write_rows(root, scene_rows(k, 30)) for k in range(3)]
    for k, uri in enumerate(uris[:2]):
        folder = root / "_ledger" / f"s{k}"
        folder.mkdir(parents=True)
        record = {
            "scene_id": f"s{k}", "identity": f"/s{k}.tif|1|2", "model_id": "m",
            "settings_hash": "h", "status": "done", "run_id": "old", "recorded_at": 1.0 + k,
            "detections": 30, "output": uri, "error": None,
        }  # fmt: skip
        (folder / "1000000-old-done.json").write_text(json.dumps(record))
    write_indexed(root, scene_rows(5, 30))
    found = open_detections(str(root), count_reads=True)
    assert [Path(p).name for p in found.files] == ["s0.parquet", "s1.parquet", "s5.parquet"]
    far_west = QueryFilter(bbox=(14.0, 41.0, 14.001, 41.001))
    assert query_detections(found, far_west).num_rows == 0
    assert len(candidates(found, far_west)) == 2  # the files the index cannot rule out
    assert len(open_detections(str(root), use_index=False).files) == 4


def test_the_index_on_object_storage(s3_endpoint, indexed, everything):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("index-bucket")
    root = "s3://index-bucket/out"
    for k in range(SCENES):
        write_indexed(root, scene_rows(k, 300), row_group_size=50)
    Ledger(root).compact()
    where = QueryFilter(bbox=(15.012, 42.002, 15.025, 42.006), min_score=0.3)
    found = open_detections(root, count_reads=True)
    assert found.reads.requests == 1  # the compacted index: one GET
    sizes = found.index.column("bytes").to_pylist()
    assert sizes == [fs.size(f"index-bucket/out/detections/s{k}.parquet") for k in range(SCENES)]
    result = query_detections(found, where)
    assert ids(result) == by_hand(everything, where)
    assert [Path(p).name for p, _ in candidates(found, where)] == ["s1.parquet", "s2.parquet"]
