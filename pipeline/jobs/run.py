"""The run: what to process → pre-flight and plan → read → detect → merge and write → record.

Ray Data streams scenes through the plan, read and detect stages (:mod:`pipeline.jobs.stages`);
each scene's merge and write is a Ray task (:mod:`pipeline.jobs.merging`), launched when its
last tile is back. The driver only routes tile results to their scene, column-wise, and keeps
counters (:mod:`pipeline.jobs.tracking`); stages report failures to the scene board
(:mod:`pipeline.jobs.board`), so a bad scene fails alone and its other tiles are not read.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.config import JobSpec
from pipeline.errors import GeoRetinaError, SceneError
from pipeline.io.discovery import discover_scenes
from pipeline.io.ledger import Ledger
from pipeline.io.scenes import Scene
from pipeline.io.writable import check_output_writable
from pipeline.jobs.board import SceneBoard
from pipeline.jobs.merging import SceneOutcome
from pipeline.jobs.ray_session import (
    ALLOCATOR_ENV,
    check_layout_fits,
    check_object_store,
    ensure_ray,
)
from pipeline.jobs.report import RunProgress
from pipeline.jobs.stages import (
    DetectorActor,
    first_line,
    plan_scene,
    read_chunk,
    tile_alignment,
)
from pipeline.jobs.tracking import RunReport, SceneTracker
from pipeline.ops.boxes import MergeOptions, core_margin
from pipeline.ops.tiles import planned_overlap
from pipeline.redact import redact_text

__all__ = ["DetectorActor", "RunReport", "SceneOutcome", "run_job"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Read tasks are short and mostly decompression; a fraction of a CPU each lets them run beside
# detector actors that take the remaining cores (on a CPU machine, one single-threaded actor
# per core beats one multi-threaded actor: no OpenMP barrier stalls when a read task runs).
READ_TASK_CPUS = 0.5
PLAN_TASK_CPUS = 0.25
# Ray Data's repartition (a plan's chunks into one block each) takes no num_cpus: its tasks
# ask for one whole CPU. Detector actors that leave less than that free hang before their
# first tile (two actors of 0.75 CPU on 2 CPUs did, as did one of 1.5): refused at start.
REPARTITION_TASK_CPUS = 1.0


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
    ray_progress_bars: bool = False,
) -> RunReport:
    """Run a job to the end and return its report; one bad scene never stops the others.

    Every ``progress_every_s`` and once at the end, the run's progress goes to
    ``on_progress`` as a :class:`RunProgress` when given (a progress bar), else to
    ``progress`` as a plain line; scenes done and failed always go to ``progress``.

    ``ray_progress_bars`` shows Ray Data's own progress bars (``georetina -v``).

    ``detector_actor`` replaces the detector stage's class (same constructor and call) for
    benchmarks and fault tests: a simulated GPU, a detector that fails on purpose.
    """
    started = time.perf_counter()
    progress = _redacting(progress)
    run_id = run_id or time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    check_output_writable(spec.output.path)
    from pipeline.model.build import model_id_for  # torch: imported by the driver only

    model_id = model_id_for(spec.model, spec.tiling.tile_size)  # a bad checkpoint fails here
    report = RunReport(run_id=run_id, job=spec.name, model_id=model_id, output=spec.output.path)
    todo = scenes_to_run(spec, model_id, report, force)
    progress(
        f"run {run_id}: {len(todo) + report.count('skipped')} scene(s), "
        f"{len(todo)} to process, model {model_id}"
    )
    if todo:
        before_ray = time.perf_counter()
        ensure_ray(address)
        report.ray_start_s = time.perf_counter() - before_ray
        detect = spec.detect
        check_object_store(detect.num_actors, detect.inflight_mb_per_actor)
        check_layout_fits(
            detect.num_actors,
            detect.num_cpus_per_actor,
            detect.num_gpus_per_actor,
            # The largest task a tile must pass through; plan and merge tasks take less.
            max(READ_TASK_CPUS, REPARTITION_TASK_CPUS),
        )
        Flow(
            spec,
            report,
            progress,
            progress_every_s,
            started,
            detector_actor,
            on_progress,
            ray_progress_bars=ray_progress_bars,
        ).run(todo)
    report = _finish(report, started, spec.output.path)
    compact_after_run(spec, report, progress)
    return report


def scenes_to_run(spec: JobSpec, model_id: str, report: RunReport, force: bool) -> list[dict]:
    """The job's scenes not yet done with this model and settings, as the plan stage's rows.

    Scenes already done are recorded as skipped; what the driver keeps of the rest is one
    small row each until Ray Data has them.
    """
    settings_hash = spec.settings_hash()
    done = set() if force else Ledger(spec.output.path).done_keys()
    rows = []
    vrt_folder = spec.output.vrt_folder  # mosaic inputs' VRTs, readable from every node
    for scene in discover_scenes(spec.inputs, spec.tiling.read_timeout_s, vrt_folder):
        if (scene.identity, model_id, settings_hash) in done:
            report.log.add(SceneOutcome(scene.scene_id, scene.public_uri, "skipped"))
        else:
            rows.append(_scene_row(scene))
    return rows


def _scene_row(scene: Scene) -> dict[str, str]:
    return {
        "scene_id": scene.scene_id,
        "uri": scene.uri,
        "identity": scene.identity,
        "acquired_at": scene.acquired_at.isoformat() if scene.acquired_at else "",
        "stac_item_id": scene.stac_item_id or "",
        "problem": scene.problem or "",
    }


class Flow:
    """One run's streaming part: the board, the dataset, and the loop that drains it."""

    def __init__(
        self,
        spec: JobSpec,
        report: RunReport,
        progress: Callable[[str], None],
        progress_every_s: float,
        started: float,
        detector_actor: type = DetectorActor,
        on_progress: Callable[[RunProgress], None] | None = None,
        ray_progress_bars: bool = False,
    ) -> None:
        self.spec, self.report, self.progress = spec, report, progress
        self.ray_progress_bars = ray_progress_bars
        self.detector_actor, self.on_progress = detector_actor, on_progress
        self.progress_every_s, self.started = progress_every_s, started
        # On the driver's node: a worker node that goes away takes no scene state with it.
        self.board = (
            ray.remote(SceneBoard)
            .options(
                num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(
                    ray.get_runtime_context().get_node_id(), soft=False
                ),
            )
            .remote()
        )
        self.tracker = SceneTracker(self.board, self._common(), spec.output.path, report, progress)

    def _common(self) -> dict[str, Any]:
        """The fields every scene's merge context shares."""
        spec = self.spec
        tile, overlap = spec.tiling.tile_size, spec.tiling.overlap
        return {
            "tile_size": tile,
            "core_margin": core_margin(planned_overlap(tile, overlap, tile_alignment(spec))),
            "edge_tolerance": spec.merge.edge_tolerance,
            "merge": MergeOptions(
                **spec.merge.model_dump(include={"iou_threshold", "metric", "class_aware", "mode"})
            ),
            "class_names": tuple(spec.model.classes),
            "model_id": self.report.model_id,
            "settings_hash": spec.settings_hash(),
            "run_id": self.report.run_id,
            "output_crs": spec.output.crs,
            "row_group_size": spec.output.row_group_size,
        }

    def run(self, todo: list[dict]) -> None:
        scenes_total = len(todo)
        runnable = []
        for row in todo:  # known bad at discovery (a STAC item without the asset)
            if row["problem"]:
                error = str(SceneError(row["scene_id"], row["problem"]))
                self.tracker.fail(row["scene_id"], error, row)
            else:
                runnable.append(row)
        del todo
        stage_error = None
        if runnable:
            dataset = build_dataset(
                self.spec, runnable, self.board, self.detector_actor, self.ray_progress_bars
            )
            del runnable
            try:
                self._drain(dataset, scenes_total)
            except Exception as error:  # noqa: BLE001 - the scenes in flight fail, the rest stand
                stage_error = f"tiles lost: {first_line(error)}"
            finally:
                release(dataset)
        self.tracker.finish(stage_error)
        self.report.tiles = self.tracker.tiles_seen
        self._report_progress(scenes_total)  # the last word: every merge is in
        closed = sum(self.report.log.counts[s] for s in ("done", "failed"))
        self.report.scenes_not_started = max(0, scenes_total - closed)
        if self.report.scenes_not_started:
            self.progress(
                f"  {self.report.scenes_not_started} scene(s) not started: the run ended "
                f"early ({stage_error}); the next run does them"
            )
        ray.kill(self.board)

    def _drain(self, dataset: ray.data.Dataset, scenes_total: int) -> None:
        last_report = time.perf_counter()
        batches = dataset.iter_batches(batch_size=None, batch_format="pyarrow")
        for batch in _until_stalled(batches, self.spec.detect.stall_timeout_s):
            self.tracker.add_batch(batch)
            self.tracker.drain()
            if time.perf_counter() - last_report >= self.progress_every_s:
                self._report_progress(scenes_total)
                last_report = time.perf_counter()

    def _report_progress(self, scenes_total: int) -> None:
        busy = time.perf_counter() - self.started - self.report.ray_start_s
        if self.on_progress is not None:
            self.on_progress(self.tracker.snapshot(scenes_total, busy))
        else:
            self.progress(f"  {self.tracker.progress_line(scenes_total, busy)}")


def build_dataset(
    spec: JobSpec,
    scenes: list[dict],
    board: Any,
    detector_actor: type = DetectorActor,
    ray_progress_bars: bool = False,
) -> ray.data.Dataset:
    """scenes → plan (one row a chunk) → read → detect, streamed, memory bounded by budget."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = ray_progress_bars  # georetina -v
    context.print_on_execution_start = ray_progress_bars
    # A block that fails past its retries drops its tiles; their scene then fails alone
    # ("only k of n tiles came back") instead of the whole dataset stopping.
    context.max_errored_blocks = -1
    # Reads run ahead of the detector only this far: memory stays flat in the raster's size.
    budget = spec.detect.num_actors * spec.detect.inflight_mb_per_actor * 2**20
    context.execution_options.resource_limits = ray.data.ExecutionResources.for_limits(
        object_store_memory=budget
    )
    # Ray Data logs its progress at INFO when stdout is not a terminal.
    logging.getLogger("ray.data").setLevel(logging.INFO if ray_progress_bars else logging.WARNING)
    detect = spec.detect
    actor_env = dict(ALLOCATOR_ENV)
    if detect.torch_threads:
        # Size OpenMP's pool at start-up rather than resizing it later (~3% faster on CPU).
        actor_env["OMP_NUM_THREADS"] = str(detect.torch_threads)
    # by_alias: list inputs are spelt {list: ...} (their field is named uris).
    spec_json = spec.model_dump_json(by_alias=True)
    dataset = (
        # One block a scene: scenes are planned in parallel (20 scenes a block made 2,000
        # one-tile scenes take 259 s instead of 115 s: each block's plans ran one by one).
        ray.data.from_items(scenes, override_num_blocks=len(scenes))
        .map_batches(
            plan_scene,
            batch_size=1,
            # Offsets on the model's coarsest feature grid: tiles see what the whole image would.
            fn_kwargs={
                "tiling": spec.tiling,
                "board": board,
                "align": tile_alignment(spec),
                "resolution": spec.model.read_resolution(),  # model.resolution_m: read grid
            },
            num_cpus=PLAN_TASK_CPUS,
        )
        # One read task a chunk: a plan's chunks would otherwise share one block.
        .repartition(target_num_rows_per_block=1)
        .map_batches(
            read_chunk,
            batch_size=1,
            fn_kwargs={
                "tile_size": spec.tiling.tile_size,
                "read_timeout_s": spec.tiling.read_timeout_s,
                "board": board,
            },
            num_cpus=READ_TASK_CPUS,
        )
        .map_batches(
            detector_actor,
            fn_constructor_kwargs={"spec_json": spec_json, "board": board},
            batch_size=detect.batch_size,
            # Ray Data restarts a killed actor and runs its unfinished batches again, without
            # a limit; the board bounds the attempts of each batch instead (a lost node's
            # retries fail at once while it is not yet known dead: a bound on Ray's retries
            # lost the scenes in flight).
            compute=ray.data.ActorPoolStrategy(size=detect.num_actors),
            num_cpus=detect.num_cpus_per_actor,
            num_gpus=detect.num_gpus_per_actor,
            runtime_env={"env_vars": actor_env},
        )
    )
    _keep_executor(dataset)
    return dataset


def _keep_executor(dataset: ray.data.Dataset) -> None:
    """Note the dataset's executor as soon as it is made, for :func:`release`.

    Ray Data puts it on the dataset (``_current_executor``) only once the first batch is
    out; a run that stalled before that (actors that never start) could not be stopped.
    """
    create = dataset._create_executor

    def create_and_keep() -> Any:
        dataset._georetina_executor = create()
        return dataset._georetina_executor

    dataset._create_executor = create_and_keep


def release(dataset: ray.data.Dataset) -> None:
    """Stop a dataset's execution now, its actors and tasks with it (a stall, an error).

    A run that ends early must not leave actors holding the cluster's CPUs or GPUs: a
    notebook or service runs many jobs in one Ray session. Shutting the executor down is
    what Ray Data's own blocking calls do when they finish.
    """
    for name in ("_current_executor", "_georetina_executor"):
        executor = getattr(dataset, name, None)
        if executor is not None:
            executor.shutdown(force=True)
            setattr(dataset, name, None)


def _until_stalled(batches: Iterator[T], stall_s: float) -> Iterator[T]:
    """``batches``, pulled by a thread; ``TimeoutError`` when none comes for ``stall_s``.

    Detector actors and their batches are retried without limit (a lost node must not lose
    scenes), so an actor that dies at every start would stall a run forever; this ends it.
    """
    handoff: queue.Queue = queue.Queue(maxsize=1)
    abandoned = threading.Event()

    def pump() -> None:
        try:
            for item in batches:
                if abandoned.is_set():
                    return
                handoff.put(("item", item))
            handoff.put(("end", None))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            handoff.put(("error", error))

    threading.Thread(target=pump, name="georetina batches", daemon=True).start()
    try:
        while True:
            try:
                kind, value = handoff.get(timeout=stall_s)
            except queue.Empty:
                raise TimeoutError(
                    f"no tile came back for {stall_s:g} s (detect.stall_timeout_s)"
                ) from None
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        abandoned.set()
        while not handoff.empty():  # the pump may be blocked on a full queue
            handoff.get_nowait()


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
    """``_runs/<run_id>.png``; a map that cannot be drawn is logged, never fails the run."""
    from pipeline.io.quicklook import render_run_map

    outputs = [s.output for s in report.log.outcomes() if s.status == "done" and s.detections]
    if not outputs:
        return None
    try:
        return render_run_map(outputs, f"{output_root.rstrip('/')}/_runs/{report.run_id}.png")
    except (GeoRetinaError, OSError) as error:
        log.warning("run map not drawn: %s", error)
        return None


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
