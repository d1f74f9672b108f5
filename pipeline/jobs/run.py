"""The run: what to process → scene workers (plan, read, detect, merge, write, record) → report.

The driver streams the job's scenes as discovery finds them (those the ledger has done are
skipped on the way) and hands each to a scene worker (:mod:`pipeline.jobs.worker`), a few
ahead of what the workers are running; it hears back one result a scene, writes it to the
report's scene log and keeps counters. Nothing it holds grows with the archive: no tile, pixel
or detection passes through it, and a finished scene leaves one line in a file. Detector actors
(:mod:`pipeline.jobs.stages`) are one pool that every worker feeds.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayError

from pipeline.config import JobSpec
from pipeline.errors import SceneError
from pipeline.io.discovery import iter_scenes
from pipeline.io.ledger import Ledger
from pipeline.io.scenes import Scene
from pipeline.io.writable import check_output_writable
from pipeline.jobs.merging import MERGE_TASK_CPUS, SceneOutcome, failed_record
from pipeline.jobs.ray_session import (
    ALLOCATOR_ENV,
    check_layout_fits,
    check_object_store,
    ensure_ray,
)
from pipeline.jobs.report import RunProgress
from pipeline.jobs.stages import (
    MAX_ATTEMPTS,
    READ_TASK_CPUS,
    DetectorActor,
    chunk_bytes,
    could_not_start,
    first_line,
    stall_reason,
    tile_alignment,
)
from pipeline.jobs.tracking import RunReport
from pipeline.jobs.worker import SceneResult, SceneWorker, WorkerSetup
from pipeline.ops.boxes import MergeOptions, core_margin
from pipeline.ops.tiles import planned_overlap
from pipeline.redact import redact_text, redact_uri

__all__ = ["DetectorActor", "RunReport", "SceneOutcome", "run_job"]

log = logging.getLogger(__name__)

# A worker runs this many scenes at once (a thread each: they mostly wait) and is handed a
# few more, so that it never waits for the driver.
SCENES_PER_WORKER = 16
SCENES_QUEUED_PER_WORKER = 4
# One scene worker for this many detector actors: a worker's own cost is per chunk and per
# scene (about a millisecond each), far below what it takes a detector to eat a chunk.
ACTORS_PER_WORKER = 4
# The driver's own stall guard, beyond the workers' (a worker stuck where no clock runs).
DRIVER_STALL_GRACE_S = 60.0
# A scene whose worker was lost goes out again after this long (a lost node's actors answer
# "unavailable" at once until Ray knows the node is dead: those answers are not attempts).
HAND_AGAIN_AFTER_S = 1.0


def run_job(
    spec: JobSpec,
    *,
    address: str | None = None,
    run_id: str | None = None,
    force: bool = False,
    progress: Callable[[str], None] = print,
    progress_every_s: float = 10.0,
    detector_actor: type = DetectorActor,
    on_progress: Callable[[RunProgress], None] | None = None,
) -> RunReport:
    """Run a job to the end and return its report; one bad scene never stops the others.

    Every ``progress_every_s`` and once at the end, the run's progress goes to
    ``on_progress`` as a :class:`RunProgress` when given (a progress bar), else to
    ``progress`` as a plain line; scenes done and failed always go to ``progress``.

    ``detector_actor`` replaces the detector stage's class (same constructor and
    ``run_chunk``) for benchmarks and fault tests: a simulated GPU, a detector that fails.
    """
    started = time.perf_counter()
    progress = _redacting(progress)
    run_id = run_id or time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    check_output_writable(spec.output.path)
    from pipeline.model.build import model_id_for  # torch: imported by the driver only

    model_id = model_id_for(spec.model, spec.tiling.tile_size)  # a bad checkpoint fails here
    report = RunReport(run_id=run_id, job=spec.name, model_id=model_id, output=spec.output.path)
    progress(f"run {run_id}: model {model_id}, scenes handed out as they are found")
    todo = SceneFeed(spec, model_id, report, force)
    first = todo.peek()
    if first is not None:
        before_ray = time.perf_counter()
        ensure_ray(address)
        report.ray_start_s = time.perf_counter() - before_ray
        detect = spec.detect
        check_object_store(detect.num_actors, detect.inflight_mb_per_actor)
        # The largest task a tile must pass through; merge tasks take less.
        check_layout_fits(
            detect.num_actors, detect.num_cpus_per_actor, detect.num_gpus_per_actor, READ_TASK_CPUS
        )
        Flow(spec, report, progress, progress_every_s, started, detector_actor, on_progress).run(
            todo
        )
    progress(
        f"run {run_id}: {todo.found} scene(s), {todo.found - report.count('skipped')} processed"
    )
    report = _finish(report, started, spec.output.path)
    compact_after_run(spec, report, progress)
    return report


class SceneFeed:
    """The job's scenes not yet done with this model and settings, as discovery finds them.

    Scenes already done are recorded as skipped on the way; the rest come out as small rows
    for the workers. What it holds: the ledger's done keys, and one scene looked ahead.
    """

    def __init__(self, spec: JobSpec, model_id: str, report: RunReport, force: bool) -> None:
        self.report = report
        self.key = (model_id, spec.settings_hash())
        self.done = set() if force else Ledger(spec.output.path).done_keys()
        # Mosaic inputs' VRTs go where every node can read them.
        self.scenes = iter_scenes(spec.inputs, spec.tiling.read_timeout_s, spec.output.vrt_folder)
        self.found = 0
        self.finished = False
        self._next: dict | None = None

    def peek(self) -> dict | None:
        if self._next is None:
            self._next = self._advance()
        return self._next

    def next(self) -> dict | None:
        row = self.peek()
        self._next = None
        return row

    def _advance(self) -> dict | None:
        for scene in self.scenes:
            self.found += 1
            if (scene.identity, *self.key) in self.done:
                self.report.log.add(SceneOutcome(scene.scene_id, scene.public_uri, "skipped"))
            else:
                return scene_row(scene)
        self.finished = True
        return None


def scene_row(scene: Scene) -> dict[str, str]:
    return {
        "scene_id": scene.scene_id,
        "uri": scene.uri,
        "identity": scene.identity,
        "acquired_at": scene.acquired_at.isoformat() if scene.acquired_at else "",
        "stac_item_id": scene.stac_item_id or "",
        "problem": scene.problem or "",
    }


def merge_common(spec: JobSpec, report: RunReport) -> dict[str, Any]:
    """The fields every scene's merge context shares."""
    tile, overlap = spec.tiling.tile_size, spec.tiling.overlap
    return {
        "tile_size": tile,
        "core_margin": core_margin(planned_overlap(tile, overlap, tile_alignment(spec))),
        "edge_tolerance": spec.merge.edge_tolerance,
        "merge": MergeOptions(
            **spec.merge.model_dump(include={"iou_threshold", "metric", "class_aware", "mode"})
        ),
        "class_names": tuple(spec.model.classes),
        "model_id": report.model_id,
        "settings_hash": spec.settings_hash(),
        "run_id": report.run_id,
        "output_crs": spec.output.crs,
        "row_group_size": spec.output.row_group_size,
    }


def start_detectors(spec: JobSpec, detector_actor: type, run_id: str) -> dict[str, Any]:
    """The detector pool. Ray restarts an actor that dies and runs its calls again, without
    a limit: the actor itself refuses the chunk that has killed it too often (``DeathLog``)."""
    detect = spec.detect
    env = dict(ALLOCATOR_ENV)
    if detect.torch_threads:
        # Size OpenMP's pool at start-up rather than resizing it later (~3% faster on CPU).
        env["OMP_NUM_THREADS"] = str(detect.torch_threads)
    actor = ray.remote(detector_actor)
    options = {
        "num_cpus": detect.num_cpus_per_actor,
        "num_gpus": detect.num_gpus_per_actor,
        "max_restarts": -1,
        "max_task_retries": -1,
        "runtime_env": {"env_vars": env},
    }
    # by_alias: list inputs are spelt {list: ...} (their field is named uris).
    spec_json = spec.model_dump_json(by_alias=True)
    # Named: a scene worker finds them by name, also after a restart (handles passed to an
    # actor's constructor would have to outlive it in the object store).
    names = [f"georetina-{run_id}-detector-{index}" for index in range(detect.num_actors)]
    return {name: actor.options(name=name, **options).remote(spec_json) for name in names}


def start_workers(spec: JobSpec, common: dict, detectors: list[str]) -> list[Any]:
    """Scene workers, one for every ``ACTORS_PER_WORKER`` detectors; they share the
    run's read-ahead budget (``detect.inflight_mb_per_actor`` per actor)."""
    detect = spec.detect
    count = max(1, math.ceil(detect.num_actors / ACTORS_PER_WORKER))
    budget = detect.num_actors * detect.inflight_mb_per_actor * 2**20
    chunk = chunk_bytes(spec.tiling.tiles_per_read_task, spec.tiling.tile_size)
    per_worker = max(2, budget // chunk // count)
    setup = WorkerSetup(spec, common, tile_alignment(spec), per_worker)
    worker = ray.remote(concurrency_groups={"status": 1})(SceneWorker).options(
        num_cpus=0,
        max_restarts=-1,  # a lost node: the driver hands its scenes out again
        max_concurrency=SCENES_PER_WORKER,
        scheduling_strategy="SPREAD",
    )
    return [worker.remote(setup, detectors) for _ in range(count)]


@dataclass
class _Handed:
    row: dict[str, str]
    worker: int
    attempt: int = 1


class Flow:
    """One run's streaming part: the actors, the scenes handed out, the results taken in."""

    def __init__(
        self,
        spec: JobSpec,
        report: RunReport,
        progress: Callable[[str], None],
        progress_every_s: float,
        started: float,
        detector_actor: type = DetectorActor,
        on_progress: Callable[[RunProgress], None] | None = None,
    ) -> None:
        self.spec, self.report, self.progress = spec, report, progress
        self.progress_every_s, self.started = progress_every_s, started
        self.detector_actor, self.on_progress = detector_actor, on_progress
        self.handed: dict[ray.ObjectRef, _Handed] = {}
        self.again: deque[tuple[float, _Handed]] = deque()  # (when, scene): to hand out again
        self.scenes_handed = 0
        self.stop_reason: str | None = None  # set: no more scenes are handed out
        self.tiles_status = (0, 0)  # planned, detected: the workers' last word
        self.tiles_closed = 0  # tiles planned by the scenes closed so far
        self.last_change = time.monotonic()
        self.common = merge_common(spec, report)  # the merge's run-wide fields, and the ledger's

    def run(self, feed: SceneFeed) -> None:
        self.feed = feed
        self.detectors = start_detectors(self.spec, self.detector_actor, self.report.run_id)
        # Each detector's start: a constructor that raises stops the run (_check_detectors).
        self.starting = [actor.__ray_ready__.remote() for actor in self.detectors.values()]
        self.workers = start_workers(self.spec, self.common, list(self.detectors))
        self.load = [0] * len(self.workers)
        try:
            self._stream()
        finally:
            self._release()
        # The last word, every scene in: tiles detected, of those planned by closed scenes.
        self.tiles_status = (self.tiles_closed, self.report.tiles)
        self._report_progress()
        closed = self.report.count("done") + self.report.count("failed")
        while feed.next() is not None:  # counted, so the report can say what was left
            pass
        self.report.scenes_not_started = feed.found - self.report.count("skipped") - closed
        if self.report.scenes_not_started:
            self.progress(
                f"  {self.report.scenes_not_started} scene(s) not started: the run ended "
                f"early ({self.stop_reason}); the next run does them"
            )

    def _stream(self) -> None:
        last_report = time.perf_counter()
        while True:
            self._check_detectors()
            self._hand_out()
            if not self.handed and not self.again:
                return
            if self.handed:
                ready, _ = ray.wait(list(self.handed), num_returns=len(self.handed), timeout=1.0)
            else:
                ready = []
                time.sleep(HAND_AGAIN_AFTER_S)
            for ref in ready:
                self._take(ref)
            if time.perf_counter() - last_report >= self.progress_every_s:
                self._poll_workers()
                self._report_progress()
                last_report = time.perf_counter()
            self._check_stall()

    def _hand_out(self) -> None:
        room = SCENES_PER_WORKER + SCENES_QUEUED_PER_WORKER
        while self.again and self.again[0][0] <= time.monotonic():
            _, handed = self.again.popleft()
            if self.stop_reason is None:
                self._hand(_Handed(handed.row, self._least_loaded(), handed.attempt))
            else:
                self._fail(handed.row, f"tiles lost: {self.stop_reason}")
        while self.stop_reason is None and min(self.load) < room:
            row = self.feed.next()
            if row is None:
                return
            if row["problem"]:  # known bad at discovery (a STAC item without the asset)
                self._fail(row, str(SceneError(row["scene_id"], row["problem"])))
            else:
                self._hand(_Handed(row, self._least_loaded()))

    def _least_loaded(self) -> int:
        return self.load.index(min(self.load))

    def _hand(self, handed: _Handed) -> None:
        self.load[handed.worker] += 1
        self.scenes_handed += 1
        call = self.workers[handed.worker].run_scene.remote(handed.row, self.scenes_handed)
        self.handed[call] = handed

    def _take(self, ref: ray.ObjectRef) -> None:
        handed = self.handed.pop(ref)
        self.load[handed.worker] -= 1
        try:
            result: SceneResult = ray.get(ref)
        except ActorUnavailableError:  # its node is lost, and Ray does not know it yet
            self.again.append((time.monotonic() + HAND_AGAIN_AFTER_S, handed))
            return
        except RayError as error:  # the worker died (its node was lost): the scene again
            if isinstance(error, RayActorError) and error.actor_init_failed:  # dead for good
                # A worker cannot start when a detector it looks up is dead: say why that is.
                self._check_detectors(timeout=10.0)
                self._stop(could_not_start("a scene worker", error))
            if self.stop_reason is not None:
                self._fail(handed.row, f"tiles lost: {self.stop_reason}")
            elif handed.attempt >= MAX_ATTEMPTS:
                died = f"its scene worker died {MAX_ATTEMPTS} times: {first_line(error)}"
                self._fail(handed.row, str(SceneError(handed.row["scene_id"], died)))
            else:
                handed.attempt += 1
                self.again.append((time.monotonic() + HAND_AGAIN_AFTER_S, handed))
            return
        self.last_change = time.monotonic()
        self.report.tiles += result.tiles_back
        if result.stop:
            self._stop(result.stop)
        self._close(result.outcome)

    def _stop(self, reason: str) -> None:
        """No more scenes are handed out, and the run says why (the first reason stands)."""
        if self.stop_reason is None:
            self.stop_reason = reason
            self.progress(f"  the run stops: {reason}")

    def _check_detectors(self, timeout: float = 0.0) -> None:
        """A detector whose constructor raised (a model that cannot load, a GPU out of
        memory) is dead for good: the run stops rather than fail every scene on it."""
        if not self.starting:
            return
        ready, _ = ray.wait(self.starting, num_returns=len(self.starting), timeout=timeout)
        for ref in ready:
            self.starting.remove(ref)
            try:
                ray.get(ref)
            except RayActorError as error:
                if error.actor_init_failed:
                    self._stop(could_not_start("a detector", error))
            except RayError:  # lost with its node before it started: Ray starts it again
                pass

    def _fail(self, row: dict[str, str], error: str) -> None:
        """A scene failed here, not in a worker: its ledger record and outcome."""
        error = redact_text(error)
        Ledger(self.spec.output.path).record(
            failed_record(row["scene_id"], row["identity"], self.common, error)
        )
        self._close(SceneOutcome(row["scene_id"], redact_uri(row["uri"]), "failed", error=error))

    def _close(self, outcome: SceneOutcome) -> None:
        self.report.log.add(outcome)
        self.tiles_closed += outcome.tiles
        if outcome.status == "failed":
            self.progress(f"  failed {outcome.scene_id}: {outcome.error}")
        elif outcome.status == "done":
            self.progress(
                f"  done {outcome.scene_id}: {outcome.tiles} tiles "
                f"({outcome.tiles_without_data} without data), {outcome.detections} detections"
            )

    def _poll_workers(self) -> None:
        """The workers' tile counts, from those that answer within a few seconds."""
        asked = [worker.status.remote() for worker in self.workers]
        ready, _ = ray.wait(asked, num_returns=len(asked), timeout=5.0)
        counts = []
        for ref in ready:
            try:
                counts.append(ray.get(ref))
            except RayError:  # a worker lost with its node: its scenes come back as errors
                pass
        if len(counts) == len(asked):
            status = (sum(c[0] for c in counts), sum(c[1] for c in counts))
            if status[1] != self.tiles_status[1]:
                self.last_change = time.monotonic()
            self.tiles_status = status

    def _check_stall(self) -> None:
        """The workers end their own scenes when no tile comes back; this ends a run whose
        workers themselves stopped answering (stuck where no clock of theirs runs)."""
        stall_s = self.spec.detect.stall_timeout_s
        if time.monotonic() - self.last_change < stall_s + DRIVER_STALL_GRACE_S:
            return
        self._poll_workers()
        if time.monotonic() - self.last_change < stall_s + DRIVER_STALL_GRACE_S:
            return
        reason = stall_reason(stall_s)
        self._stop(reason)
        for ref, handed in list(self.handed.items()):
            del self.handed[ref]
            self._fail(handed.row, f"tiles lost: {reason}")

    def _report_progress(self) -> None:
        counts = self.report.log.counts
        busy = time.perf_counter() - self.started - self.report.ray_start_s
        planned, done = self.tiles_status
        if self.on_progress is not None:
            self.on_progress(
                RunProgress(
                    counts["done"],
                    counts["failed"],
                    counts["skipped"],
                    self.feed.found,
                    self.feed.finished,
                    done,
                    planned,
                    busy,
                )
            )
            return
        # The plain line counts this run's scenes through, failed or done, skips left out.
        through = counts["done"] + counts["failed"]
        to_run = self.feed.found - counts["skipped"]
        line = RunProgress(through, 0, 0, to_run, self.feed.finished, done, planned, busy).line()
        self.progress(f"  {line}")

    def _release(self) -> None:
        """The run's actors go, whatever ended it: a notebook or a service runs many jobs in
        one Ray session, and a run must not leave actors holding its CPUs or GPUs."""
        for actor in [*self.workers, *self.detectors.values()]:
            ray.kill(actor, no_restart=True)


def _redacting(progress: Callable[[str], None]) -> Callable[[str], None]:
    """Progress lines pass through :func:`redact_text` (they name URIs and errors)."""
    return lambda line: progress(redact_text(line))


def _finish(report: RunReport, started: float, output_root: str) -> RunReport:
    import fsspec

    report.wall_s = time.perf_counter() - started
    busy = report.wall_s - report.ray_start_s
    report.tiles_per_s = report.tiles / busy if busy > 0 else 0.0
    report.totals_from_log(busy)
    report.map = _run_map(report, output_root)
    with fsspec.open(
        f"{output_root.rstrip('/')}/_runs/{report.run_id}.json", "w", auto_mkdir=True
    ) as handle:
        report.write_json(handle)
    return report


def _run_map(report: RunReport, output_root: str) -> str | None:
    """``_runs/<run_id>.png``, drawn by a Ray task (it reads every detection's box: not the
    driver's work); a map that cannot be drawn is logged, never fails the run."""
    outputs = [s.output for s in report.log.outcomes() if s.status == "done" and s.detections]
    if not outputs:  # no scene done with detections, and then maybe no Ray started
        return None
    destination = f"{output_root.rstrip('/')}/_runs/{report.run_id}.png"
    try:
        return ray.get(draw_run_map.remote(outputs, destination))
    except RayError as error:
        log.warning("run map not drawn: %s", first_line(getattr(error, "cause", None) or error))
        return None


@ray.remote(num_cpus=MERGE_TASK_CPUS)
def draw_run_map(outputs: list[str], destination: str) -> str | None:
    """Ray task: :func:`pipeline.io.quicklook.render_run_map`."""
    from pipeline.io.quicklook import render_run_map

    return render_run_map(outputs, destination)


def compact_after_run(spec: JobSpec, report: RunReport, progress: Callable[[str], None]) -> None:
    """``output.compact``: the output compacted into that dataset once the run is recorded
    (its report written), when the run has scenes done.

    A compaction that fails is logged (with its traceback) and said in the progress; it never
    fails the run: every scene is written and recorded already, and a compaction stopped
    part-way loses nothing (:mod:`pipeline.io.partition`), so the next run with scenes done,
    or ``georetina compact``, finishes it.
    """
    dest = spec.output.compact
    if dest is None or not report.count("done"):
        return
    from pipeline.io.partition import compact_dataset

    try:
        done = compact_dataset(spec.output.path, dest)
    except Exception as error:  # noqa: BLE001 - the run's scenes stand; this can be redone
        log.warning("output.compact %s failed", redact_text(dest), exc_info=True)
        progress(
            f"compact {dest}: failed ({first_line(error)}); the run's scenes are recorded: "
            f"`georetina compact {spec.output.path} {dest}` or the next run compacts them"
        )
        return
    progress(f"compact {dest}: {done.line()}")
