"""The ledger: whole records or none, unreadable ones skipped, concurrent writers safe."""

from __future__ import annotations

import threading

from pipeline.io.ledger import Ledger, LedgerRecord, parse_record


def record(scene: str, status: str, at: float, run: str = "r1", **extra) -> LedgerRecord:
    return LedgerRecord(scene, f"/{scene}.tif|1|2", "m", "h", status, run, at, **extra)


def test_a_record_is_written_whole_under_its_final_name(tmp_path):
    ledger = Ledger(str(tmp_path))
    ledger.record(record("a", "done", 1.0, detections=3, output="out/a.parquet"))
    (path,) = (tmp_path / "_ledger" / "a").iterdir()
    assert path.name.endswith("-r1-done.json")  # no temporary name left behind
    assert ledger.records() == [record("a", "done", 1.0, detections=3, output="out/a.parquet")]


def test_an_unreadable_record_is_skipped_and_its_scene_is_not_done(tmp_path, caplog):
    ledger = Ledger(str(tmp_path))
    ledger.record(record("a", "done", 1.0))
    ledger.record(record("b", "failed", 1.0))
    # A later "done" for b cut short (disk full, a crash on a filesystem without rename).
    torn = tmp_path / "_ledger" / "b" / "2000000-r2-done.json"
    torn.write_text('{"scene_id": "b", "status": "do')
    (tmp_path / "_ledger" / "b" / "3000000-r3-done.json").write_text('["not", "a", "record"]')
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
    text = next((tmp_path / "_ledger" / "a").iterdir()).read_text()
    assert "SECRET1" not in text and "sig=REDACTED" in text
