"""Faults survived with the same rows and detection ids as a clean run: a scene that hangs on
read (a per-scene timeout fails it, the others go on), a detector actor killed mid-run, the
driver killed and the job re-run, object storage answering 503 to every first request.

Real parts only: the session's local Ray, HTTP servers and an S3 proxy on loopback in front
of moto, and ``georetina run`` subprocesses with their own embedded Ray where a test must
kill the driver or give the workers another environment."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import rasterio
import s3fs
import yaml
from faults import (
    GEORETINA,
    OVERLAP,
    SIZE,
    SMALL_RETINANET,
    TILE,
    KillAfterFirstDone,
    clean_env,
    command_line,
    descendants,
    kill_tree,
    output_rows,
    threshold_job,
    write_archive,
)
from servers import FlakyProxy, RangeServer

from pipeline.config import parse_job
from pipeline.io.ledger import Ledger
from pipeline.io.synthetic import plan_objects, write_scene
from pipeline.jobs.run import DetectorActor, run_job
from pipeline.jobs.stages import tile_alignment
from pipeline.ops.tiles import plan_tiles

pytestmark = pytest.mark.ray

SCENES = 6
RETINANET_SCENES = 3  # the slow detector's runs take half of the archive


def quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    folder = tmp_path_factory.mktemp("archive")
    return folder, write_archive(folder, SCENES)


@pytest.fixture(scope="module")
def clean(ray_session, archive, tmp_path_factory) -> dict[str, list[tuple]]:
    """The rows of a clean run over the whole archive: what every faulty run must match."""
    folder, planted = archive
    output = tmp_path_factory.mktemp("clean") / "out"
    spec = parse_job(threshold_job(sorted(folder.glob("*.tif")), output))
    report = run_job(spec, progress=quiet)
    assert report.count("done") == SCENES
    rows = output_rows(str(output))
    assert sorted(len(r) for r in rows.values()) == sorted(planted.values())
    return rows


def scene_ids_of(report) -> dict[str, str]:
    return {Path(s.uri.split("?")[0]).name: s.scene_id for s in report.scenes}


def test_a_scene_that_never_answers_fails_by_timeout_and_the_rest_match_a_clean_run(
    ray_session, archive, clean, tmp_path
):
    folder, _ = archive
    hung = RangeServer({"/hung.tif": (folder / "scene_000.tif").read_bytes()})
    hung.hang("/hung.tif")  # accepts the connection, never answers
    try:
        inputs = [folder / "scene_000.tif", folder / "scene_001.tif", f"{hung.url}/hung.tif"]
        spec = parse_job(threshold_job(inputs, tmp_path / "out", tiling={"read_timeout_s": 2}))
        report = run_job(spec, progress=quiet)
    finally:
        hung.close()
    by_name = {Path(s.uri).name: s for s in report.scenes}
    stuck = by_name["hung.tif"]
    assert stuck.status == "failed"
    assert stuck.error.startswith(f"scene {stuck.scene_id}: read timed out: pre-flight took")
    assert "tiling.read_timeout_s" in stuck.error
    assert [by_name[n].status for n in ("scene_000.tif", "scene_001.tif")] == ["done", "done"]
    rows = output_rows(str(tmp_path / "out"))
    assert rows == {k: clean[k] for k in rows} and len(rows) == 2
    latest = {r.scene_id: r.status for r in Ledger(str(tmp_path / "out")).records()}
    assert latest[stuck.scene_id] == "failed"


def test_a_scene_whose_tile_reads_hang_fails_by_timeout_after_its_preflight(
    ray_session, archive, clean, tmp_path
):
    """Pre-flight (header and last block) answers; reads of the first block never do."""
    folder, _ = archive
    objects = plan_objects(1024, TILE, OVERLAP, count=8, seed=7, max_side=30)
    cog = tmp_path / "slow.tif"
    write_scene(cog, 1024, objects, seed=7, block=256, overviews=True)
    with rasterio.open(cog) as dataset:
        block_0_0 = int(dataset.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1))
        block_0_1 = int(dataset.get_tag_item("BLOCK_OFFSET_0_1", "TIFF", bidx=1))
    server = RangeServer({"/slow.tif": cog.read_bytes()})
    # Past the 32 KiB GDAL reads first (header), inside block (0, 0): only tile reads ask.
    assert block_0_1 > 2**16
    server.hang("/slow.tif", max(block_0_0, 2**16), block_0_1 - 1)
    try:
        inputs = [f"{server.url}/slow.tif", folder / "scene_002.tif"]
        spec = parse_job(threshold_job(inputs, tmp_path / "out", tiling={"read_timeout_s": 2}))
        report = run_job(spec, progress=quiet)
    finally:
        server.close()
    by_name = {Path(s.uri).name: s for s in report.scenes}
    slow = by_name["slow.tif"]
    assert slow.status == "failed"
    tiles = len(plan_tiles(1024, 1024, TILE, OVERLAP))
    assert slow.tiles == tiles, server.requests  # it passed pre-flight
    assert slow.error.startswith(f"scene {slow.scene_id}: read timed out: ")
    assert "took longer than 2 s" in slow.error
    assert by_name["scene_002.tif"].status == "done"
    rows = output_rows(str(tmp_path / "out"))
    assert rows == {by_name["scene_002.tif"].scene_id: clean[by_name["scene_002.tif"].scene_id]}


def detector_actors() -> list[int]:
    """The pids of this session's detector actors (Ray names their processes after them)."""
    return [p for p in descendants(os.getpid()) if "DetectorActor" in command_line(p)]


def retinanet_job(folder: Path, output: Path, **sections: dict) -> dict:
    """RetinaNet (untrained, seeded: deterministic) on the CPU: slow enough (~0.1 s a tile)
    that a kill lands while tiles are still to be detected; a narrow FPN keeps it at that."""
    model = SMALL_RETINANET
    inputs = sorted(folder.glob("*.tif"))[:RETINANET_SCENES]
    return {**threshold_job(inputs, output), "model": model, **sections}


@pytest.fixture(scope="module")
def clean_retinanet(ray_session, archive, tmp_path_factory) -> dict[str, list[tuple]]:
    folder, _ = archive
    output = tmp_path_factory.mktemp("clean_retinanet") / "out"
    report = run_job(parse_job(retinanet_job(folder, output)), progress=quiet)
    assert report.count("done") == RETINANET_SCENES
    rows = output_rows(str(output))
    assert sum(len(r) for r in rows.values()) > 0
    return rows


def test_a_killed_detector_actor_is_restarted_and_its_batches_run_again(
    ray_session, archive, clean_retinanet, tmp_path
):
    folder, _ = archive
    spec = parse_job(retinanet_job(folder, tmp_path / "out"))
    # As the run plans: offsets on the RetinaNet's coarsest feature grid.
    total = RETINANET_SCENES * len(plan_tiles(SIZE, SIZE, TILE, OVERLAP, tile_alignment(spec)))
    killed: list[tuple[list[int], int]] = []  # (pids, tiles the driver had seen)
    # A run's killed actors exit a moment after it returns: the previous run's may still be
    # on their way out, and are not this run's.
    earlier = set(detector_actors())

    def kill_once(line: str) -> None:
        if killed or not line.strip().startswith("scenes "):
            return
        seen = int(line.split("tiles ", 1)[1].split("/", 1)[0])
        pids = [pid for pid in detector_actors() if pid not in earlier]
        if not pids:  # the driver reports from the start: the actor may not be up yet
            return
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        killed.append((pids, seen))

    report = run_job(spec, progress=kill_once, progress_every_s=0)
    assert len(killed) == 1
    pids, seen_at_kill = killed[0]
    assert len(pids) == 1  # the pool's one actor
    assert seen_at_kill < total / 2  # killed early: most tiles went through its restart
    assert report.count("done") == RETINANET_SCENES and report.tiles == total
    assert output_rows(str(tmp_path / "out")) == clean_retinanet
    assert pids[0] not in detector_actors()


@pytest.mark.slow
def test_a_killed_driver_leaves_done_scenes_done_and_a_rerun_completes_them(
    archive, clean_retinanet, tmp_path
):
    folder, _ = archive
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(retinanet_job(folder, tmp_path / "out")))
    ledger = tmp_path / "out" / "_ledger"
    with open(tmp_path / "first.log", "wb") as log:
        driver = subprocess.Popen(
            [GEORETINA, "run", str(job)], stdout=log, stderr=subprocess.STDOUT, env=clean_env()
        )
        try:
            deadline = time.time() + 300
            while time.time() < deadline and driver.poll() is None:
                if ledger.is_dir() and any(ledger.rglob("*-done.parquet")):
                    break
                time.sleep(0.05)
        finally:
            kill_tree(driver.pid)
            driver.wait()
    assert driver.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()
    done_before = {r.scene_id for r in Ledger(str(tmp_path / "out")).records()}
    assert 0 < len(done_before) < RETINANET_SCENES  # killed mid-run, some scenes done

    again = subprocess.run(
        [GEORETINA, "run", str(job)], capture_output=True, text=True, env=clean_env(), timeout=400
    )
    assert again.returncode == 0, again.stdout + again.stderr
    skipped = len(done_before)
    left = RETINANET_SCENES - skipped
    assert f"scenes: {left} done, {skipped} skipped, 0 failed" in again.stdout
    assert output_rows(str(tmp_path / "out")) == clean_retinanet
    records = Ledger(str(tmp_path / "out")).records()
    assert sorted(r.scene_id for r in records) == sorted(clean_retinanet)  # each done once


@pytest.fixture(scope="module")
def s3_archive(s3_endpoint, archive):
    folder, planted = archive
    fs = s3fs.S3FileSystem()
    fs.mkdir("georetina-faults")
    for name in sorted(planted)[:2]:
        fs.put(str(folder / name), f"georetina-faults/archive/{name}")
    return fs


@pytest.mark.slow
def test_object_storage_answering_503_to_every_first_request_changes_nothing(
    ray_session, s3_endpoint, s3_archive, tmp_path
):
    job = threshold_job(["s3://georetina-faults/archive/*.tif"], "s3://georetina-faults/clean")
    assert run_job(parse_job(job), progress=quiet).count("done") == 2
    clean_rows = output_rows("s3://georetina-faults/clean")

    proxy = FlakyProxy(s3_endpoint)
    flaky_job = tmp_path / "job.yaml"
    flaky_job.write_text(yaml.safe_dump({**job, "output": {"path": "s3://georetina-faults/flaky"}}))
    try:
        result = subprocess.run(
            [GEORETINA, "run", str(flaky_job)],
            capture_output=True,
            text=True,
            timeout=400,
            env=clean_env(
                AWS_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}",
                AWS_S3_ENDPOINT=f"127.0.0.1:{proxy.port}",
            ),
        )
    finally:
        proxy.close()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "scenes: 2 done, 0 skipped, 0 failed" in result.stdout
    assert output_rows("s3://georetina-faults/flaky") == clean_rows
    failed = proxy.failed
    # Every kind of request was refused once and retried: raster reads (GDAL), the listing,
    # GeoParquet writes, ledger records and the run report (s3fs / botocore).
    assert any(m == "GET" and "/archive/scene_" in p for m, p in failed)
    assert any(m == "PUT" and "/flaky/detections/" in p for m, p in failed)
    assert any(m == "PUT" and "/flaky/_ledger/" in p for m, p in failed)
    assert any(m == "PUT" and "/flaky/_runs/" in p for m, p in failed)
    print(f"503s sent: {len(failed)}, requests forwarded: {proxy.forwarded}")


def test_a_deadline_abandons_a_call_stuck_in_io_and_passes_results_through():
    import threading
    import urllib.request

    from pipeline.io.deadline import call_with_deadline

    # One helper thread serves a caller's calls, not the caller itself...
    helper = call_with_deadline(threading.get_ident, 5, "who")
    assert call_with_deadline(threading.get_ident, 5, "who") == helper != threading.get_ident()
    server = RangeServer({"/x": b"x"})
    server.hang("/x")
    stuck_in: list[int] = []

    def stuck_read() -> bytes:
        stuck_in.append(threading.get_ident())
        return urllib.request.urlopen(f"{server.url}/x", timeout=60).read()

    try:
        with pytest.raises(TimeoutError, match="stuck read took longer than 0.5 s"):
            call_with_deadline(stuck_read, 0.5, "stuck read")
        # ...until one is abandoned: the next call, while it is still stuck, gets a new one.
        assert call_with_deadline(threading.get_ident, 5, "who") not in (helper, stuck_in[0])
    finally:
        server.close()
    assert stuck_in == [helper]
    assert call_with_deadline(lambda: 7, 5, "quick") == 7
    with pytest.raises(ZeroDivisionError):
        call_with_deadline(lambda: 1 / 0, 5, "failing")


def slow_after_first() -> type:
    """The threshold detector, half a second a tile on every scene but scene_000 (made in a
    function: Ray ships a local class by value, a test module's class by a name its workers
    cannot import)."""

    class SlowAfterFirst(DetectorActor):
        def _detect(self, batch):
            if not str(batch["scene_id"][0]).startswith("scene_000"):
                time.sleep(0.5)
            return super()._detect(batch)

    return SlowAfterFirst


def test_a_chunk_that_kills_every_read_worker_fails_its_scenes_and_the_run_still_ends(
    ray_session, tmp_path
):
    """After the first scene is done, every worker running a read task is killed: the read
    tasks in flight exhaust their retries (READ_TASK_RETRIES), the run ends instead of
    retrying forever, the scenes whose tiles never came back fail with the reason, and the
    scenes done before keep their rows and ledger records. One 1024 px tile a read task: 16 MB
    of read-ahead holds five, and the detector is slow on every scene but the first, so most
    of the last two scenes' reads are still to run when the first scene is done, and 40 kills
    take the reads in flight past their retries."""
    folder = tmp_path / "archive"
    write_archive(folder, 3, size=3200)
    inputs = sorted(folder.glob("*.tif"))
    tiling = {"tile_size": 1024, "overlap": 128, "tiles_per_read_task": 1}
    run_job(parse_job(threshold_job(inputs, tmp_path / "clean", tiling=tiling)), progress=quiet)
    clean = output_rows(str(tmp_path / "clean"))
    killer = KillAfterFirstDone(
        lambda: [p for p in descendants(os.getpid()) if "read_chunk" in command_line(p)],
        limit=40,
    )
    spec = parse_job(
        threshold_job(
            inputs,
            tmp_path / "out",
            tiling=tiling,
            detect={"batch_size": 1, "inflight_mb_per_actor": 16},
        )
    )
    try:
        report = run_job(
            spec, progress=killer.progress, progress_every_s=0, detector_actor=slow_after_first()
        )
    finally:
        killer.stop()
    assert killer.killed, "the killer never ran: the first scene was not done before the last"
    done = [s for s in report.scenes if s.status == "done"]
    failed = [s for s in report.scenes if s.status == "failed"]
    assert done and failed and len(done) + len(failed) == len(inputs), report.scenes
    for scene in failed:
        assert "tiles came back: tiles lost: " in scene.error, scene.error
    rows = output_rows(str(tmp_path / "out"))
    assert rows == {s.scene_id: clean[s.scene_id] for s in done}
    latest = {r.scene_id: r.status for r in Ledger(str(tmp_path / "out")).records()}
    assert latest == {s.scene_id: s.status for s in report.scenes}
    assert (tmp_path / "out" / "_runs" / f"{report.run_id}.json").exists()


def test_an_actor_that_dies_at_every_start_ends_the_run_by_the_stall_timeout(
    ray_session, archive, clean, tmp_path
):
    """After the first scene is done, every detector actor is killed as soon as it appears,
    even while loading: Ray restarts it without end and no batch ever fails, so only the
    stall timeout (detect.stall_timeout_s) ends the run; the scenes in flight fail with it,
    the done ones keep their rows. The detector is slow on every scene but the first, so
    that the others are still in flight when the first is done."""
    folder, _ = archive
    killer = KillAfterFirstDone(
        lambda: [p for p in descendants(os.getpid()) if "SlowAfterFirst" in command_line(p)]
    )
    spec = parse_job(
        threshold_job(
            sorted(folder.glob("*.tif")),
            tmp_path / "out",
            tiling={"tiles_per_read_task": 1},
            detect={"batch_size": 1, "stall_timeout_s": 5},
        )
    )
    try:
        report = run_job(
            spec, progress=killer.progress, progress_every_s=0, detector_actor=slow_after_first()
        )
    finally:
        killer.stop()
    assert killer.killed
    done = [s for s in report.scenes if s.status == "done"]
    failed = [s for s in report.scenes if s.status == "failed"]
    assert done and failed and len(done) + len(failed) == SCENES, report.scenes
    for scene in failed:
        assert "tiles lost: no tile came back for 5 s (detect.stall_timeout_s)" in scene.error
    assert output_rows(str(tmp_path / "out")) == {s.scene_id: clean[s.scene_id] for s in done}
