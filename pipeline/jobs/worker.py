"""Scene workers: Ray actors that each take a whole scene from plan to ledger record.

A worker runs many scenes at once, one thread each (:class:`SceneRun`): it plans the scene,
starts a read task per chunk of tiles and hands each read's output, by reference, to the least
busy detector actor, then gives the detectors' tables to a merge task that writes the scene's
GeoParquet and its ledger record. The driver only hands out scenes and hears back one
:class:`SceneResult` each: no tile, pixel or detection passes through it.

What a scene's own tiles do wrong fails that scene alone: its chunks hold no other scene's
tiles. Once it has failed, its chunks not yet started are not read. Reads ahead of the
detectors are bounded by a number of chunks in flight per worker (memory flat in raster size).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from pipeline.config import JobSpec
from pipeline.errors import SceneError
from pipeline.io.ledger import Ledger
from pipeline.jobs.merging import SceneJob, SceneOutcome, failed_record, merge_scene, scene_context
from pipeline.jobs.stages import (
    ReadFailed,
    ScenePlan,
    SceneReads,
    could_not_start,
    first_line,
    plan_scene,
    read_chunk,
    stall_reason,
)
from pipeline.redact import redact_text, redact_uri

# How long a scene's thread waits for a result before it looks at the stall clock again.
POLL_S = 0.5
# A worker keeps this many calls queued on each detector: one running, one arriving. Beyond
# that, chunks wait in the worker, where the oldest scene's go first.
CALLS_QUEUED_PER_DETECTOR = 2


class OrderedSlots:
    """Slots shared by a worker's scenes, granted to the oldest scene that wants one: scenes
    finish in the order they came (their tables wait less for the merge, the first is done
    soonest). A scene says whether it wants a slot (:meth:`want`) whenever that changes."""

    def __init__(self, count: int) -> None:
        self.free = count
        self.wanting: set[int] = set()
        self.changed = threading.Condition()

    def want(self, order: int, wanting: bool) -> None:
        with self.changed:
            if wanting:
                self.wanting.add(order)
            else:
                self.wanting.discard(order)
            self.changed.notify_all()

    def acquire(self, order: int, timeout: float) -> bool:
        """A slot for the scene ``order`` (which wants one), within ``timeout`` seconds."""
        with self.changed:
            granted = self.changed.wait_for(
                lambda: self.free > 0 and order == min(self.wanting, default=order), timeout
            )
            if granted:
                self.free -= 1
            return granted

    def release(self) -> None:
        with self.changed:
            self.free += 1
            self.changed.notify_all()


@dataclass(frozen=True)
class WorkerSetup:
    """What every scene of a run shares, for the workers."""

    spec: JobSpec
    common: dict  # the merge context's run-wide fields (:func:`pipeline.jobs.run.merge_common`)
    align: int  # tile offsets' multiple: the model's largest stride
    chunks_in_flight: int  # per worker: chunks read and not yet detected


@dataclass
class SceneResult:
    """What a worker says of one scene: its outcome, tiles detected, and why the run must
    stop, if this scene's failure says so: a stall (no tile came back for
    ``detect.stall_timeout_s``) or a detector that cannot start."""

    outcome: SceneOutcome
    tiles_back: int = 0
    stop: str | None = None


class SceneWorker:
    """Ray actor (threaded: one scene a thread); see the module's docstring."""

    def __init__(self, setup: WorkerSetup, detector_names: list[str]) -> None:
        self.setup = setup
        self.detectors = [ray.get_actor(name) for name in detector_names]
        # Reads in flight: the memory bound. Calls queued on each detector: the order bound
        # (a detector runs its calls in the order they came, so scenes finish in order).
        self.reads = OrderedSlots(max(1, setup.chunks_in_flight))
        self.calls = OrderedSlots(CALLS_QUEUED_PER_DETECTOR * len(self.detectors))
        self.lock = threading.Lock()
        self.busy = [0] * len(self.detectors)  # calls this worker has on each detector
        self.in_flight = 0
        self.last_back = time.monotonic()
        self.tiles_planned = 0
        self.tiles_back = 0

    def run_scene(self, scene: dict[str, str], order: int) -> SceneResult:
        """Run one scene; ``order``: the driver's count of scenes handed out, so that this
        worker's scenes take their slots in the order the job lists them."""
        return SceneRun(self, scene, order).run()

    @ray.method(concurrency_group="status")
    def status(self) -> tuple[int, int]:
        """Tiles planned and detected by this worker so far (for progress lines)."""
        return self.tiles_planned, self.tiles_back

    # -- shared by the worker's scene threads --------------------------------------------

    def take_detector(self) -> int:
        """The detector with the fewest of this worker's calls (a call slot is held)."""
        with self.lock:
            index = min(range(len(self.busy)), key=self.busy.__getitem__)
            self.busy[index] += 1
            if self.in_flight == 0:  # the stall clock starts with the first call out
                self.last_back = time.monotonic()
            self.in_flight += 1
            return index

    def call_back(self, index: int, tiles: int) -> None:
        """A detector call is back (``tiles`` detected) or abandoned (0): its chunk's read
        slot and call slot are free."""
        with self.lock:
            self.busy[index] -= 1
            self.in_flight -= 1
            self.tiles_back += tiles
            if tiles:
                self.last_back = time.monotonic()
        self.calls.release()
        self.reads.release()

    def planned(self, tiles: int) -> None:
        with self.lock:
            self.tiles_planned += tiles

    def stalled(self) -> bool:
        with self.lock:
            waiting = self.in_flight > 0
            return (
                waiting
                and time.monotonic() - self.last_back > self.setup.spec.detect.stall_timeout_s
            )


@dataclass
class _Chunk:
    first: int
    tiles: int
    read: ray.ObjectRef
    detector: int = -1
    table: ray.ObjectRef | None = None


class SceneRun:
    """One scene in a worker: plan → chunks through read tasks and detectors → merge task."""

    def __init__(self, worker: SceneWorker, scene: dict[str, str], order: int) -> None:
        self.worker, self.scene, self.order = worker, scene, order
        self.setup = worker.setup
        self.scene_id = scene["scene_id"]
        self.read: deque[_Chunk] = deque()  # reads started, not yet handed to a detector
        self.pending: dict[ray.ObjectRef, _Chunk] = {}  # detector calls: error ref -> chunk
        self.tables: list[tuple[int, ray.ObjectRef]] = []
        self.tiles_back = 0
        self.stop: str | None = None  # why the run must stop (a stall, a dead detector)

    def run(self) -> SceneResult:
        spec = self.setup.spec
        try:
            plan = plan_scene(
                self.scene, spec.tiling, self.setup.align, spec.model.read_resolution()
            )
        except Exception as error:  # noqa: BLE001 - this scene fails, the others go on
            if not isinstance(error, SceneError):
                error = SceneError(self.scene_id, first_line(error))
            return self.failed(str(error), 0)
        self.worker.planned(plan.tiles)
        error = self.detect_all(plan)
        if error is not None:
            return self.failed(error, plan.tiles)
        context = scene_context(self.setup.common, spec.output.path, self.scene, plan.info)
        job = SceneJob(context, self.scene["identity"], plan.tiles, spec.output.path)
        refs = [table for _, table in sorted(self.tables, key=lambda part: part[0])]
        try:
            outcome = ray.get(merge_scene.remote(job, *refs))
        except RayError as lost:  # the merge task died past its retries
            error = redact_text(f"merge/write lost: {first_line(lost)}")
            outcome = SceneOutcome(
                self.scene_id, context.scene_uri, "failed", plan.tiles, error=error
            )
        return SceneResult(outcome, self.tiles_back)

    # -- chunks ----------------------------------------------------------------------------

    def detect_all(self, plan: ScenePlan) -> str | None:
        """Every chunk read and detected: ``None``, else why the scene fails (and
        :attr:`stop` says whether that ends the run)."""
        spec = self.setup.spec
        how = SceneReads.of(self.scene_id, self.scene["uri"], plan.info, spec.tiling)
        step = spec.tiling.tiles_per_read_task
        starts = deque(range(0, plan.tiles, step))
        try:
            while starts or self.read or self.pending:
                # Only what can be used at once is wanted: a scene that waits for read slots
                # must not hold back the calls of younger scenes whose reads free them.
                self.worker.reads.want(self.order, bool(starts))
                idle = not self.pending  # nothing of ours to wait for: wait for a slot
                while starts and self.worker.reads.acquire(
                    self.order, POLL_S if idle and not self.read else 0
                ):
                    first = starts.popleft()
                    offsets = (plan.cols[first : first + step], plan.rows[first : first + step])
                    self.read.append(
                        _Chunk(first, len(offsets[0]), read_chunk.remote(how, first, *offsets))
                    )
                self.worker.calls.want(self.order, bool(self.read))
                while self.read and self.worker.calls.acquire(self.order, POLL_S if idle else 0):
                    self.call_detector(self.read.popleft())
                    idle = False
                self.worker.calls.want(self.order, bool(self.read))
                error = self.collect(plan.tiles)
                if error is not None:
                    return error
                if self.worker.stalled():
                    self.stop = stall_reason(self.setup.spec.detect.stall_timeout_s)
                    return self.lost(plan.tiles, self.stop)
            return None
        finally:
            self.worker.reads.want(self.order, False)
            self.worker.calls.want(self.order, False)
            self.abandon()

    def call_detector(self, chunk: _Chunk) -> None:
        chunk.detector = self.worker.take_detector()
        detector = self.worker.detectors[chunk.detector]
        key = f"{self.scene_id}:{chunk.first}"
        error, chunk.table = detector.run_chunk.options(num_returns=2).remote(key, chunk.read)
        self.pending[error] = chunk

    def collect(self, tiles: int) -> str | None:
        """Take the detector calls that are back; why the scene fails, if one says so."""
        if not self.pending:
            return None
        ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=POLL_S)
        for ref in ready:
            chunk = self.pending.pop(ref)
            try:
                refused = ray.get(ref)  # the detector's own word: why the scene fails
                error = str(SceneError(self.scene_id, refused)) if refused else None
            except RayTaskError as failure:
                cause = failure.cause
                error = str(cause) if isinstance(cause, ReadFailed) else self.lost(tiles, failure)
            except RayActorError as failure:
                if failure.actor_init_failed:  # dead for good: every scene would fail on it
                    self.stop = could_not_start("a detector", failure)
                error = self.lost(tiles, self.stop or failure)
            except RayError as failure:  # a read whose workers died past its retries
                error = self.lost(tiles, failure)
            self.worker.call_back(chunk.detector, 0 if error else chunk.tiles)
            if error is not None:
                return error
            self.tiles_back += chunk.tiles
            self.tables.append((chunk.first, chunk.table))
        return None

    def lost(self, tiles: int, reason: str | BaseException) -> str:
        reason = reason if isinstance(reason, str) else first_line(reason)
        return f"only {self.tiles_back} of {tiles} tiles came back: tiles lost: {reason}"

    def abandon(self) -> None:
        """Chunks not back when the scene ends (it failed): cancelled, their slots freed."""
        for chunk in [*self.read, *self.pending.values()]:
            for ref in (chunk.read, chunk.table):
                if ref is not None:
                    try:
                        ray.cancel(ref)
                    except Exception:  # noqa: BLE001, S110 - finished or gone already
                        pass
        for chunk in self.pending.values():
            self.worker.call_back(chunk.detector, 0)
        for _ in self.read:
            self.worker.reads.release()
        self.read.clear()
        self.pending.clear()

    # -- outcomes --------------------------------------------------------------------------

    def failed(self, error: str, tiles: int) -> SceneResult:
        """Record the scene as failed in the ledger; its outcome for the driver."""
        error = redact_text(error)
        record = failed_record(self.scene_id, self.scene["identity"], self.setup.common, error)
        Ledger(self.setup.spec.output.path).record(record)
        outcome = SceneOutcome(
            self.scene_id, redact_uri(self.scene["uri"]), "failed", tiles, error=error
        )
        return SceneResult(outcome, self.tiles_back, self.stop)
