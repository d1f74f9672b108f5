"""The run's streaming flow: one scene's fault fails that scene alone, a failed scene's other
tiles are not read, a layout that cannot be scheduled is refused, a stalled run gives its
actors back. Real parts: the session's local Ray, real rasters, the real detector stage with
one behaviour changed by a subclass defined in the test (Ray ships it to the actors)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from faults import output_rows, threshold_job, write_archive

from pipeline.config import parse_job
from pipeline.errors import GeoRetinaError
from pipeline.io.ledger import Ledger
from pipeline.jobs.run import DetectorActor, run_job

pytestmark = pytest.mark.ray

SCENES = 4


def quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("flow_archive")
    write_archive(folder, SCENES)
    return folder


@pytest.fixture(scope="module")
def clean(ray_session, archive, tmp_path_factory) -> dict[str, list[tuple]]:
    output = tmp_path_factory.mktemp("flow_clean") / "out"
    report = run_job(
        parse_job(threshold_job(sorted(archive.glob("*.tif")), output)), progress=quiet
    )
    assert report.count("done") == SCENES
    return output_rows(str(output))


def poisoned_id(report, name: str = "scene_001") -> str:
    (scene,) = [s for s in report.scenes if s.scene_id.startswith(name)]
    return scene.scene_id


def run_with(detector: type, archive: Path, output: Path, **sections: dict):
    spec = parse_job(threshold_job(sorted(archive.glob("*.tif")), output, **sections))
    return run_job(spec, progress=quiet, detector_actor=detector)


def assert_only_poisoned_failed(report, clean, output: Path, reason: str) -> None:
    failed = [s for s in report.scenes if s.status == "failed"]
    assert [s.scene_id.split("-")[0] for s in failed] == ["scene_001"], report.scenes
    assert reason in failed[0].error, failed[0].error
    assert report.count("done") == SCENES - 1
    expected = {k: v for k, v in clean.items() if not k.startswith("scene_001")}
    assert output_rows(str(output)) == expected
    latest = {r.scene_id: r.status for r in Ledger(str(output)).records()}
    assert latest == {s.scene_id: s.status for s in report.scenes}


def test_a_detector_batch_that_raises_fails_only_its_scene(ray_session, archive, clean, tmp_path):
    """Batches mix scenes (3 tiles a batch, 9 tiles a scene): the batch is run again scene
    by scene, and only the scene whose own tiles raise fails."""

    class RaisingDetector(DetectorActor):
        def _detect(self, batch):
            if any(str(s).startswith("scene_001") for s in batch["scene_id"]):
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return super()._detect(batch)

    output = tmp_path / "out"
    report = run_with(RaisingDetector, archive, output, detect={"batch_size": 4})
    assert_only_poisoned_failed(report, clean, output, "detector failed: CUDA error")


@pytest.mark.slow
def test_an_actor_killed_by_one_scenes_tiles_fails_only_that_scene(
    ray_session, archive, clean, tmp_path
):
    """Tiles of one scene kill the actor (a segfault, an OOM): Ray restarts it and runs the
    batch again, scene by scene from the second attempt; the scene whose tiles keep killing
    it fails after its attempts, every other scene is done with the clean run's rows."""

    class KillingDetector(DetectorActor):
        def _detect(self, batch):
            if any(str(s).startswith("scene_001") for s in batch["scene_id"]):
                os._exit(1)
            return super()._detect(batch)

    output = tmp_path / "out"
    report = run_with(KillingDetector, archive, output, detect={"batch_size": 4})
    assert_only_poisoned_failed(report, clean, output, "its actor died 4 times")


def test_a_failed_scenes_other_tiles_are_not_read(ray_session, tmp_path):
    """The detector fails a scene's first batch; of its 100 tiles, the ones read after the
    board knew are never read: the detector sees only those already read ahead."""
    folder = tmp_path / "archive"
    write_archive(folder, 2, size=4096)
    seen = tmp_path / "seen"
    seen.mkdir()

    class CountingDetector(DetectorActor):
        def _detect(self, batch):
            for scene_id, tile in zip(batch["scene_id"], batch["tile_index"], strict=True):
                (seen / f"{scene_id}.{tile}").touch()
            if any(str(s).startswith("scene_000") for s in batch["scene_id"]):
                raise RuntimeError("this scene's tiles are bad")
            return super()._detect(batch)

    spec = parse_job(
        threshold_job(
            sorted(folder.glob("*.tif")),
            tmp_path / "out",
            tiling={"tile_size": 512, "overlap": 64, "tiles_per_read_task": 1},
            detect={"batch_size": 1, "inflight_mb_per_actor": 16},
        )
    )
    report = run_job(spec, progress=quiet, detector_actor=CountingDetector)
    statuses = {s.scene_id.split("-")[0]: s.status for s in report.scenes}
    assert statuses == {"scene_000": "failed", "scene_001": "done"}
    detected = [p.name for p in seen.iterdir() if p.name.startswith("scene_000")]
    # 100 tiles planned; 16 MB of read-ahead holds about 20 of 768 KB.
    assert 0 < len(detected) < 50, len(detected)


def test_a_layout_that_leaves_no_cpu_for_reads_is_refused(ray_session, archive, tmp_path):
    spec = parse_job(
        threshold_job(sorted(archive.glob("*.tif")), tmp_path / "out", detect={"num_actors": 2})
    )
    with pytest.raises(GeoRetinaError, match=r"detect\.num_cpus_per_actor to at most 0\.75"):
        run_job(spec, progress=quiet)


@pytest.mark.timeout(300)
def test_a_detector_that_cannot_start_stops_the_run_with_its_reason(
    ray_session, archive, tmp_path, monkeypatch
):
    """A detector whose constructor raises (a model that cannot load, a GPU out of memory)
    is dead for good: the scene in flight fails with that error, and the run stops instead
    of failing every other scene on it; those are left to the next run."""
    import pipeline.jobs.run as run

    monkeypatch.setattr(run, "SCENES_PER_WORKER", 1)  # one scene in flight at a time
    monkeypatch.setattr(run, "SCENES_QUEUED_PER_WORKER", 0)

    class CannotStart(DetectorActor):
        def __init__(self, spec_json: str) -> None:
            raise RuntimeError("CUDA out of memory (a test's detector)")

    output = tmp_path / "out"
    spec = parse_job(threshold_job(sorted(archive.glob("*.tif")), output))
    lines: list[str] = []
    report = run_job(spec, progress=lines.append, detector_actor=CannotStart)
    reason = "could not start: RuntimeError: CUDA out of memory (a test's detector)"
    (failed,) = report.scenes
    assert failed.status == "failed" and reason in failed.error, failed
    assert report.scenes_not_started == SCENES - 1
    assert any(line.startswith("  the run stops: ") and reason in line for line in lines), lines
    assert [r.status for r in Ledger(str(output)).records()] == ["failed"]


@pytest.mark.timeout(300)
def test_a_run_stalled_before_its_first_batch_gives_its_actors_back(ray_session, archive, tmp_path):
    """No chunk is ever detected: the stall timeout ends the run, the scenes in flight fail
    with it, and the run's actors are gone: their CPUs are free again."""
    import time

    class NeverReady(DetectorActor):  # defined here: Ray ships a local class by value
        """A detector whose start-up never ends (a model that hangs while it loads)."""

        def __init__(self, spec_json: str, board: object = None) -> None:
            time.sleep(3600)

    report = run_with(NeverReady, archive, tmp_path / "out", detect={"stall_timeout_s": 8})
    assert report.count("done") == 0
    assert report.count("failed") + report.scenes_not_started == SCENES, report.scenes
    total = ray_session.cluster_resources()["CPU"]
    for _ in range(600):  # a kill takes a moment to show in the resources
        if ray_session.available_resources().get("CPU", 0.0) == total:
            break
        time.sleep(0.1)
    assert ray_session.available_resources().get("CPU", 0.0) == total


@pytest.mark.timeout(300)
def test_two_actors_that_leave_a_cpu_free_give_the_clean_rows(
    ray_session, archive, clean, tmp_path
):
    """Two detector actors of 0.5 CPU on the session's 2: the read tasks still fit, and the
    rows are the one-actor run's."""
    output = tmp_path / "out"
    spec = parse_job(
        threshold_job(
            sorted(archive.glob("*.tif")),
            output,
            detect={"num_actors": 2, "num_cpus_per_actor": 0.5, "stall_timeout_s": 120},
        )
    )
    report = run_job(spec, progress=quiet)
    assert report.count("done") == SCENES, report.scenes
    assert output_rows(str(output)) == clean
