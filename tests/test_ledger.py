"""The ledger: whole records or none, unreadable ones skipped, concurrent writers safe,
old JSON records still read, and compaction that keeps a read to a few requests."""

from __future__ import annotations

import json
import threading
from dataclasses import asdict

import pytest

from pipeline.io.index import COMPACTED, FRAGMENTS
from pipeline.io.ledger import Ledger, LedgerRecord, parse_record


def record(scene: str, status: str, at: float, run: str = "r1", **extra) -> LedgerRecord:
    return LedgerRecord(scene, f"/{scene}.tif|1|2", "m", "h", status, run, at, **extra)


def test_a_record_is_written_whole_under_its_final_name(tmp_path):
    ledger = Ledger(str(tmp_path))
    ledger.record(record("a", "done", 1.0, detections=3, output="out/a.parquet"))
    (path,) = (tmp_path / "_ledger" / FRAGMENTS).iterdir()
    assert path.name.endswith("-done.parquet")  # no temporary name left behind
    assert ledger.records() == [record("a", "done", 1.0, detections=3, output="out/a.parquet")]


def test_an_unreadable_record_is_skipped_and_its_scene_is_not_done(tmp_path, caplog):
    ledger = Ledger(str(tmp_path))
    ledger.record(record("a", "done", 1.0))
    ledger.record(record("b", "failed", 1.0))
    # A later "done" for b cut short (disk full, a crash on a filesystem without rename).
    (tmp_path / "_ledger" / "b").mkdir()
    torn = tmp_path / "_ledger" / "b" / "2000000-r2-done.json"
    torn.write_text('{"scene_id": "b", "status": "do')
    (tmp_path / "_ledger" / "b" / "3000000-r3-done.json").write_text('["not", "a", "record"]')
    (tmp_path / "_ledger" / FRAGMENTS / "4000000-r4-0-done.parquet").write_bytes(b"PAR1 torn")
    assert {key[0] for key in ledger.done_keys()} == {"/a.tif|1|2"}
    assert "cannot be read" in caplog.text and torn.name in caplog.text


def test_records_from_newer_versions_with_more_fields_still_load():
    text = (
        '{"scene_id": "a", "identity": "i", "model_id": "m", "settings_hash": "h", '
        '"status": "done", "run_id": "r", "recorded_at": 1.0, "new_field": 1}'
    )
    assert parse_record(text) == LedgerRecord("a", "i", "m", "h", "done", "r", 1.0)
    assert parse_record("") is None and parse_record('{"scene_id": "a"}') is None


def test_two_runs_recording_at_once_lose_nothing(tmp_path):
    def run(name: str) -> None:
        ledger = Ledger(str(tmp_path))
        for index in range(50):
            ledger.record(record(f"s{index % 10}", "done", 1000.0 + index, run=name))

    threads = [threading.Thread(target=run, args=(f"run{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(Ledger(str(tmp_path)).records()) == 200


def test_credentials_in_a_record_are_redacted(tmp_path):
    ledger = Ledger(str(tmp_path))
    ledger.record(
        record("a", "failed", 1.0, error="scene a: cannot open https://h/a.tif?sig=SECRET1")
    )
    (error,) = [r.error for r in ledger.records()]
    assert "SECRET1" not in error and "sig=REDACTED" in error


def legacy_json(root, rec: LedgerRecord) -> None:
    """A record as earlier versions wrote it: one JSON object under _ledger/<scene_id>/."""
    folder = root / "_ledger" / rec.scene_id
    folder.mkdir(parents=True, exist_ok=True)
    stamp = f"{rec.recorded_at:.6f}".replace(".", "")
    (folder / f"{stamp}-{rec.run_id}-{rec.status}.json").write_text(json.dumps(asdict(rec)))


def test_old_json_records_are_read_and_folded_in_by_a_compaction(tmp_path):
    old = [
        record("a", "done", 1.0, detections=3, output=f"{tmp_path}/detections/a.parquet"),
        record("b", "failed", 1.0, error="boom"),
    ]
    for rec in old:
        legacy_json(tmp_path, rec)
    ledger = Ledger(str(tmp_path))
    ledger.record(record("b", "done", 2.0, run="r2"))
    assert ledger.records() == [old[0], old[1], record("b", "done", 2.0, run="r2")]
    assert ledger.done_keys() == {("/a.tif|1|2", "m", "h"), ("/b.tif|1|2", "m", "h")}
    ledger.compact()
    assert not list((tmp_path / "_ledger").rglob("*.json"))  # folded in, then removed
    assert not list((tmp_path / "_ledger" / FRAGMENTS).iterdir())
    again = Ledger(str(tmp_path))
    assert again.records() == [old[0], old[1], record("b", "done", 2.0, run="r2")]
    assert again.snapshot().requests == 1  # one compacted file, nothing loose


def test_a_run_that_finds_many_records_compacts_them_and_reads_stay_few(tmp_path):
    writer = Ledger(str(tmp_path), compact_at=None)
    for index in range(200):
        writer.record(record(f"s{index}", "done", 1000.0 + index))
    assert writer.snapshot().requests == 200  # one GET per record while uncompacted
    reader = Ledger(str(tmp_path), compact_at=50)
    assert len(reader.done_keys()) == 200  # this read compacted
    for index in range(10):
        writer.record(record(f"s{index}", "failed", 5000.0 + index, run="r2"))
    found = Ledger(str(tmp_path), compact_at=50).snapshot()
    assert (len(found.compacted), len(found.loose)) == (1, 10)  # 11 GETs, not 210
    assert len(Ledger(str(tmp_path)).done_keys()) == 190


def test_two_runs_recording_and_compacting_at_once_lose_nothing(tmp_path):
    """Writers and compacting readers race; every record is found, each once."""
    errors: list[BaseException] = []

    def write(name: str) -> None:
        ledger = Ledger(str(tmp_path), compact_at=None)
        for index in range(60):
            ledger.record(record(f"s{index % 12}", "done", 1000.0 + index, run=name))

    def compact() -> None:
        try:
            for _ in range(8):
                Ledger(str(tmp_path), compact_at=1).snapshot()
        except BaseException as error:  # noqa: BLE001 - reported by the assert below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(f"run{i}",)) for i in range(2)]
    threads += [threading.Thread(target=compact) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    records = Ledger(str(tmp_path)).records()
    assert len(records) == 120 and len({(r.run_id, r.recorded_at) for r in records}) == 120
    Ledger(str(tmp_path)).compact()
    assert len(list((tmp_path / "_ledger" / COMPACTED).iterdir())) == 1
    assert len(Ledger(str(tmp_path)).records()) == 120


def test_the_ledger_on_s3_records_compacts_and_reads(s3_endpoint):
    import s3fs

    s3fs.S3FileSystem().mkdir("georetina-ledger")
    root = "s3://georetina-ledger/out"
    writer = Ledger(root, compact_at=None)
    for index in range(30):
        writer.record(record(f"s{index}", "done", 1000.0 + index))
    assert Ledger(root, compact_at=20).snapshot().requests == 1  # compacted on the way
    writer.record(record("s0", "failed", 9000.0, run="r2", error="x"))
    found = Ledger(root).snapshot()
    assert (len(found.compacted), len(found.loose)) == (1, 1)
    assert len(Ledger(root).done_keys()) == 29


@pytest.mark.parametrize("status", ["done", "failed"])
def test_index_fields_round_trip(tmp_path, status):
    from datetime import UTC, datetime

    rec = record(
        "a",
        status,
        1.0,
        detections=5,
        output=f"{tmp_path}/detections/a.parquet",
        bbox=(1.0, 2.0, 3.0, 4.0),
        crs="OGC:CRS84",
        time_start=datetime(2026, 5, 1, tzinfo=UTC),
        time_end=datetime(2026, 5, 1, tzinfo=UTC),
        per_class={"ship": 3, "boat": 2},
        bytes=1234,
        footer_bytes=321,
        tiles_without_data=0,
    )
    ledger = Ledger(str(tmp_path))
    ledger.record(rec)
    assert ledger.records() == [rec]
    row = ledger.snapshot().table.to_pylist()[0]
    assert row["path"] == ("detections/a.parquet" if status == "done" else None)
    assert row["classes"] == ["boat", "ship"] and row["class_counts"] == [2, 3]
