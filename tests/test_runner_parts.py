"""The runner's parts that hold no Ray code, tested alone: the scene feed, the slots a
worker's scenes share, the death log of a detector actor, and the run's scene log."""

from __future__ import annotations

import io
import json
import tempfile
import threading
import time

from faults import threshold_job

from pipeline.config import parse_job
from pipeline.io.discovery import discover_scenes
from pipeline.io.ledger import Ledger, LedgerRecord
from pipeline.jobs.merging import SceneOutcome
from pipeline.jobs.run import SceneFeed
from pipeline.jobs.stages import DeathLog
from pipeline.jobs.tracking import RunReport
from pipeline.jobs.worker import OrderedSlots


def new_report() -> RunReport:
    return RunReport(run_id="r1", job="test", model_id="m1", output="out")


# -- the scene feed ----------------------------------------------------------------------------


def test_the_feed_skips_what_the_ledger_has_done_and_hands_out_the_rest_in_order(tmp_path):
    paths = [tmp_path / f"scene_{i}.tif" for i in range(3)]
    for path in paths:
        path.write_bytes(b"not opened by discovery")
    spec = parse_job(threshold_job(paths, tmp_path / "out"))
    model_id = "threshold:test"
    scenes = discover_scenes(spec.inputs)
    done = scenes[1]
    Ledger(spec.output.path).record(
        LedgerRecord(
            done.scene_id, done.identity, model_id, spec.settings_hash(), "done", "r0", 1.0
        )
    )
    report = new_report()
    feed = SceneFeed(spec, model_id, report, force=False)
    first = feed.peek()
    assert first is not None and feed.peek() is first  # a look ahead, not a step
    rows = [feed.next(), feed.next()]
    assert [row["scene_id"] for row in rows] == [scenes[0].scene_id, scenes[2].scene_id]
    assert rows[0]["uri"] == str(paths[0]) and rows[0]["problem"] == ""
    assert not feed.finished
    assert feed.next() is None and feed.finished and feed.found == 3
    (skipped,) = report.scenes
    assert (skipped.scene_id, skipped.status) == (done.scene_id, "skipped")


def test_force_hands_out_what_the_ledger_has_done(tmp_path):
    path = tmp_path / "scene.tif"
    path.write_bytes(b"x")
    spec = parse_job(threshold_job([path], tmp_path / "out"))
    (scene,) = discover_scenes(spec.inputs)
    record = LedgerRecord(scene.scene_id, scene.identity, "m", spec.settings_hash(), "done", "r", 1)
    Ledger(spec.output.path).record(record)
    assert SceneFeed(spec, "m", new_report(), force=False).next() is None
    assert SceneFeed(spec, "m", new_report(), force=True).next()["scene_id"] == scene.scene_id


# -- a worker's slots ---------------------------------------------------------------------------


def test_a_slot_goes_to_the_oldest_scene_that_wants_one():
    slots = OrderedSlots(1)
    slots.want(5, True)
    slots.want(2, True)
    assert not slots.acquire(5, timeout=0.05)  # scene 2 came first
    assert slots.acquire(2, timeout=0)
    slots.want(2, False)
    assert not slots.acquire(5, timeout=0.05)  # none free
    slots.release()
    assert slots.acquire(5, timeout=0)


def test_a_scene_that_stops_wanting_no_longer_holds_back_younger_ones():
    slots = OrderedSlots(1)
    slots.want(1, True)
    slots.want(2, True)
    granted: list[bool] = []
    waiter = threading.Thread(target=lambda: granted.append(slots.acquire(2, timeout=60)))
    waiter.start()
    time.sleep(0.05)
    slots.want(1, False)  # scene 1 waits on something else now: scene 2 goes ahead
    waiter.join(timeout=60)
    assert granted == [True]


def test_slots_never_grant_more_than_they_hold():
    slots = OrderedSlots(2)
    for order in range(4):
        slots.want(order, True)
    assert slots.acquire(0, 0)
    assert not slots.acquire(1, 0)  # scene 0 still wants more: it goes first
    slots.want(0, False)
    assert slots.acquire(1, 0)
    slots.want(1, False)
    assert not slots.acquire(2, timeout=0.05)
    slots.release()
    assert slots.acquire(2, 0)


# -- a detector's death log ----------------------------------------------------------------------


def test_the_death_log_blames_only_the_call_that_never_ended(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    log = DeathLog("actor-1")
    assert log.begin("scene_a:0") == 0
    log.end()
    assert not log.path.exists()  # a clean call leaves nothing behind
    assert log.begin("scene_b:3") == 0  # ... and the actor dies here
    restarted = DeathLog("actor-1")  # the new process finds the note
    assert restarted.begin("scene_c:0") == 0  # queued calls run again, unblamed
    restarted.end()
    assert restarted.begin("scene_b:3") == 1  # the chunk that killed it knows its count
    restarted.end()
    state = json.loads(restarted.path.read_text())
    assert state == {"running": None, "deaths": {"scene_b:3": 1}}
    assert DeathLog("actor-2").begin("scene_b:3") == 0  # another actor's log is its own


# -- the run's scene log --------------------------------------------------------------------------


def test_the_scene_log_keeps_counts_in_memory_and_outcomes_on_disk():
    report = new_report()
    outcomes = [
        SceneOutcome("a", "a.tif", "done", tiles=4, detections=3, per_class={"tree": 3}),
        SceneOutcome("b", "b.tif", "failed", tiles=2, error="scene b: read failed: broken"),
        SceneOutcome("c", "c.tif", "skipped"),
    ]
    for outcome in outcomes:
        report.log.add(outcome)
    assert (report.count("done"), report.count("failed"), report.count("skipped")) == (1, 1, 1)
    assert report.scenes == outcomes
    report.totals_from_log(busy_s=10.0)
    assert report.detections == 3 and report.detections_per_class == {"tree": 3}
    assert report.failures_by_reason == {"read failed": 1}
    written = io.StringIO()
    report.write_json(written)
    assert json.loads(written.getvalue()) == json.loads(json.dumps(report.as_dict(), default=str))
