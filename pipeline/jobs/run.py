"""The Ray flow: scenes → pre-flight → tile plan → read tasks → detector actors → merge tasks.

This module only wires stages together; the pixel math lives in tiling/merge/detect.

Detections are tiny next to pixels, so they stream back to the driver, which groups them
by scene and launches that scene's merge-and-write task as soon as its last tile is in.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - registers pa.compute
import ray
from rasterio.windows import Window

from pipeline.config import JobSpec, TilingSettings
from pipeline.errors import GeoRetinaError, SceneError
from pipeline.io.discovery import discover_scenes
from pipeline.io.ledger import Ledger, LedgerRecord, now
from pipeline.io.rasters import RasterInfo, inspect_raster_within
from pipeline.io.reads import read_tiles
from pipeline.io.scenes import Scene
from pipeline.jobs.report import footprint_km2, progress_line, run_totals
from pipeline.merge.scene import SceneContext, SceneStream, SceneWritten, scene_output_uri
from pipeline.model.detector import TileDetections, detect_tiles, make_detector
from pipeline.ops.boxes import MergeOptions
from pipeline.ops.tiles import Tile, plan_tiles
from pipeline.redact import redact_text

log = logging.getLogger(__name__)

T = TypeVar("T")

# glibc returns freed arenas to the OS after every forward pass and maps them back on the
# next; these keep them (measured: 75.0 s → 53.6 s for a tile loop, ~200 MB more peak).
ALLOCATOR_ENV = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "8000000000",
    "MALLOC_TOP_PAD_": "1000000000",
}


# Ray deletes dead objects from the object store in batches, once a second by default. Tiles
# stream through it at 100+ MB/s, so a second's worth lingered: 290 MB of store pages in use
# while 13 MB of objects were alive, and a 32k x 32k scene peaked at 1.29x the memory of a 4k
# one. Every 100 ms keeps that to a tenth. Clusters set it on every node as
# RAY_free_objects_period_milliseconds (infra/Dockerfile: KubeRay and the launcher run it).
RAY_SYSTEM_CONFIG = {"free_objects_period_milliseconds": 100}

# Read tasks are short and mostly decompression; a fraction of a CPU each lets them run beside
# detector actors that take the remaining cores (on a CPU machine, one single-threaded actor
# per core beats one multi-threaded actor: no OpenMP barrier stalls when a read task runs).
READ_TASK_CPUS = 0.5

# A read task whose worker dies (OOM, preemption, a kill) runs again this many times; one
# that kills every worker it reaches then fails its scenes instead of looping.
TASK_RETRIES = 3


# --------------------------------------------------------------------------------------------
# Stage functions run by Ray (thin: they call the pure modules)
# --------------------------------------------------------------------------------------------


@ray.remote(num_cpus=0.25, max_retries=2)
def _inspect(scene: Scene, tiling: TilingSettings) -> RasterInfo:
    return inspect_raster_within(
        scene.scene_id,
        scene.uri,
        tiling.bands,
        tiling.scale_range,
        tiling.read_timeout_s,
        tiling.allow_pixel_coordinates,
    )


def read_chunk(
    batch: dict[str, np.ndarray], tile_size: int, read_timeout_s: float = 300.0
) -> dict[str, np.ndarray]:
    """Ray Data stage: read one chunk of one scene's tiles through one open dataset.

    A read failure becomes an ``error`` on every tile of the chunk (with blank images), so
    the scene is recorded as failed instead of the exception aborting the whole dataset.
    """
    scene_id = str(batch["scene_id"][0])
    uri = str(batch["uri"][0])
    indexes = np.asarray(batch["tile_index"][0], dtype=np.int32)
    col_offs = np.asarray(batch["col_off"][0], dtype=np.int32)
    row_offs = np.asarray(batch["row_off"][0], dtype=np.int32)
    bands = [int(b) for b in batch["bands"][0]]
    scale = (float(batch["scale_lo"][0]), float(batch["scale_hi"][0]))
    flat_palette = np.asarray(batch["palette"][0], dtype=np.uint8)
    palette = flat_palette.reshape(256, 3) if flat_palette.size else None
    count = len(indexes)
    error = ""
    windows = [
        Window(int(c), int(r), tile_size, tile_size)
        for c, r in zip(col_offs, row_offs, strict=True)
    ]
    try:
        images, valid = read_tiles(uri, windows, bands, scale, palette, tile_size, read_timeout_s)
    except Exception as failure:  # noqa: BLE001 - any read failure fails this scene only
        images = np.zeros((count, 3, tile_size, tile_size), dtype=np.uint8)
        valid = np.zeros((count, tile_size, tile_size), dtype=np.uint8)
        what = "read timed out" if isinstance(failure, TimeoutError) else "read failed"
        error = str(SceneError(scene_id, f"{what}: {failure}"))
    return {
        "scene_id": np.full(count, scene_id, dtype=object),
        "tile_index": indexes,
        "col_off": col_offs,
        "row_off": row_offs,
        "image": images,
        # One bit a pixel through the object store: 8x fewer bytes than the 0/1 mask.
        "valid_bits": np.packbits(valid, axis=-1),
        "error": np.full(count, error, dtype=object),
    }


class DetectorActor:
    """Ray Data actor: the detector is built once per actor; each call is one batch."""

    def __init__(self, spec_json: str) -> None:
        spec = JobSpec.model_validate_json(spec_json)
        # On the CPU, the actors of the pool share the node's cores unless told otherwise.
        threads = spec.detect.torch_threads or max(
            1, (os.cpu_count() or 1) // spec.detect.num_actors
        )
        self.detector = make_detector(
            spec.model,
            spec.tiling.tile_size,
            torch_threads=threads,
            precision=spec.detect.precision,
        )
        self.min_valid_fraction = spec.merge.min_valid_fraction
        self.tile_size = spec.tiling.tile_size

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        runnable = np.array([not e for e in batch["error"]], dtype=bool)
        valid = np.unpackbits(batch["valid_bits"], axis=-1, count=self.tile_size)
        found = detect_tiles(
            self.detector, batch["image"], valid, runnable, self.min_valid_fraction
        )
        has_data = batch["valid_bits"].reshape(len(runnable), -1).any(axis=1)
        return detections_to_arrow(batch, found, has_data)


def detections_to_arrow(
    batch: dict[str, np.ndarray], found: list[TileDetections], has_data: np.ndarray
) -> pa.Table:
    """One row per tile; boxes, scores and class ids as list columns (empty when none)."""
    lengths = np.array([len(f.scores) for f in found], dtype=np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))

    def listed(values: list[np.ndarray], dtype: pa.DataType, width: int = 1) -> pa.Array:
        flat = np.concatenate(values) if values else np.zeros(0)
        return pa.ListArray.from_arrays(
            pa.compute.multiply(offsets, width), pa.array(flat, type=dtype)
        )

    return pa.table(
        {
            "scene_id": pa.array([str(s) for s in batch["scene_id"]], pa.string()),
            "tile_index": pa.array(batch["tile_index"], pa.int32()),
            "col_off": pa.array(batch["col_off"], pa.int32()),
            "row_off": pa.array(batch["row_off"], pa.int32()),
            "error": pa.array([str(e) for e in batch["error"]], pa.string()),
            "has_data": pa.array(has_data, pa.bool_()),
            "boxes": listed([f.boxes.reshape(-1) for f in found], pa.float32(), width=4),
            "scores": listed([f.scores for f in found], pa.float32()),
            "class_ids": listed([f.class_ids for f in found], pa.int16()),
        }
    )


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


@dataclass
class SceneOutcome:
    scene_id: str
    uri: str
    status: str  # done / failed / skipped
    tiles: int = 0
    detections: int = 0
    output: str | None = None
    error: str | None = None
    tiles_without_data: int = 0  # all nodata: never sent to the detector
    per_class: dict[str, int] = field(default_factory=dict)
    area_km2: float = 0.0  # the scene's footprint, geodesic


@dataclass
class RunReport:
    run_id: str
    job: str
    model_id: str
    output: str
    wall_s: float = 0.0
    ray_start_s: float = 0.0  # starting an embedded Ray; tiles_per_s excludes it
    tiles: int = 0
    tiles_per_s: float = 0.0
    detections: int = 0
    # Filled in by _finish from the scenes (pipeline.jobs.report.run_totals).
    scenes_done: int = 0
    scenes_skipped: int = 0
    scenes_failed: int = 0
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    detections_per_class: dict[str, int] = field(default_factory=dict)
    area_km2: float = 0.0
    km2_per_hour: float = 0.0
    map: str | None = None  # PNG of where this run's detections fall (None: no detections)
    scenes: list[SceneOutcome] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for s in self.scenes if s.status == status)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _PendingScene:
    """A scene in flight: its tiles arrive in any order and are merged and written band by
    band (tile rows, top to bottom) as soon as a band is complete and all above it are done,
    so the driver holds about one band of a scene's boxes, not the scene."""

    scene: Scene
    context: SceneContext
    expected: int
    band_tops: list[int]  # each band's first row, top to bottom
    band_sizes: dict[int, int]  # tiles per band
    bands: dict[int, dict[int, tuple[tuple[int, int], TileDetections]]] = field(
        default_factory=dict
    )
    next_band: int = 0
    received: int = 0
    stream: SceneStream | None = None
    error: str | None = None
    closed: bool = False  # written, or failed
    without_data: int = 0
    area_km2: float = 0.0

    def add(self, tile_index: int, offset: tuple[int, int], found: TileDetections) -> None:
        self.bands.setdefault(offset[1], {})[tile_index] = (offset, found)
        self.received += 1

    def ready_bands(self) -> Iterator[tuple[list, list, int | None]]:
        """Complete bands next in order: ``(offsets, detections, next band's top)``."""
        while self.next_band < len(self.band_tops):
            top = self.band_tops[self.next_band]
            tiles = self.bands.get(top, {})
            if len(tiles) < self.band_sizes[top]:
                return
            del self.bands[top]
            self.next_band += 1
            below = self.band_tops[self.next_band] if self.next_band < len(self.band_tops) else None
            ordered = [tiles[i] for i in sorted(tiles)]
            yield [o for o, _ in ordered], [f for _, f in ordered], below


def ensure_ray(address: str | None = None, log_to_driver: bool = False) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start Ray embedded in this process.

    ``log_to_driver`` shows workers' prints (training progress); jobs keep them quiet.
    """
    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    if target == "local":
        start_embedded_ray(log_to_driver=log_to_driver)
        return
    ray.init(
        address=target,
        include_dashboard=False,
        log_to_driver=log_to_driver,
        logging_level=logging.WARNING,
    )


def start_embedded_ray(num_cpus: int | None = None, log_to_driver: bool = False) -> None:
    """A fresh single-node Ray in this process, with the object store settings jobs need."""
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=log_to_driver,
        logging_level=logging.WARNING,
        _system_config=dict(RAY_SYSTEM_CONFIG),  # a copy: ray.init adds its own keys to it
    )


def check_output_writable(output_root: str) -> None:
    """Fail before any GPU work when the output cannot be written."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(output_root)
    probe = f"{root.rstrip('/')}/_write_probe_{uuid.uuid4().hex}"
    try:
        fs.makedirs(root, exist_ok=True)
        with fs.open(probe, "wb") as handle:
            handle.write(b"ok")
        fs.rm(probe)
    except (OSError, PermissionError, ValueError) as error:
        raise GeoRetinaError(f"output {output_root} is not writable: {error}") from None


def _read_items(scene: Scene, info: RasterInfo, tiles: list[Tile], chunk: int) -> list[dict]:
    return [
        {
            "scene_id": scene.scene_id,
            "uri": scene.uri,
            "tile_index": list(range(start, min(start + chunk, len(tiles)))),
            "col_off": [t.col_off for t in tiles[start : start + chunk]],
            "row_off": [t.row_off for t in tiles[start : start + chunk]],
            "bands": list(info.bands),
            "scale_lo": info.scale_range[0],
            "scale_hi": info.scale_range[1],
            "palette": list(info.palette or ()),
        }
        for start in range(0, len(tiles), chunk)
    ]


def _tile_detections(row: dict) -> TileDetections:
    return TileDetections(
        np.asarray(row["boxes"], dtype=np.float32).reshape(-1, 4),
        np.asarray(row["scores"], dtype=np.float32),
        np.asarray(row["class_ids"], dtype=np.int16),
    )


def run_job(
    spec: JobSpec,
    *,
    address: str | None = None,
    run_id: str | None = None,
    force: bool = False,
    progress: Callable[[str], None] = print,
    progress_every_s: float = 10.0,
) -> RunReport:
    """Run a job to the end and return its report; one bad scene never stops the others."""
    started = time.perf_counter()
    progress = _redacting(progress)
    run_id = run_id or time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    output_root = spec.output.path
    check_output_writable(output_root)
    from pipeline.model.build import (
        model_id_for,  # torch: imported by the driver, not read workers
    )

    model_id = model_id_for(spec.model, spec.tiling.tile_size)  # a bad checkpoint fails here
    settings_hash = spec.settings_hash()
    report = RunReport(run_id=run_id, job=spec.name, model_id=model_id, output=output_root)
    ledger = Ledger(output_root)

    scenes = discover_scenes(spec.inputs, timeout_s=spec.tiling.read_timeout_s)
    done = set() if force else ledger.done_keys()
    todo = []
    for scene in scenes:
        if (scene.identity, model_id, settings_hash) in done:
            report.scenes.append(SceneOutcome(scene.scene_id, scene.public_uri, "skipped"))
        else:
            todo.append(scene)
    progress(f"run {run_id}: {len(scenes)} scene(s), {len(todo)} to process, model {model_id}")

    def fail(scene: Scene, error: str, tiles: int = 0) -> None:
        error = redact_text(error)
        progress(f"  failed {scene.scene_id}: {error}")
        report.scenes.append(
            SceneOutcome(scene.scene_id, scene.public_uri, "failed", tiles, error=error)
        )
        ledger.record(
            LedgerRecord(
                scene.scene_id,
                scene.identity,
                model_id,
                settings_hash,
                "failed",
                run_id,
                now(),
                error=error,
            )
        )

    if not todo:
        return _finish(report, started, output_root)
    before_ray = time.perf_counter()
    ensure_ray(address)
    report.ray_start_s = time.perf_counter() - before_ray
    check_object_store(spec)

    # Pre-flight every scene in parallel: a bad file fails here, in seconds.
    tiling = spec.tiling
    info_refs = [None if s.problem else _inspect.remote(s, tiling) for s in todo]
    pending: dict[str, _PendingScene] = {}
    items: list[dict] = []
    merge_options = MergeOptions(
        **spec.merge.model_dump(include={"iou_threshold", "metric", "class_aware", "mode"})
    )
    for scene, ref in zip(todo, info_refs, strict=True):
        if scene.problem is not None:
            fail(scene, str(SceneError(scene.scene_id, scene.problem)))
            continue
        try:
            info = ray.get(ref)
        except Exception as error:  # noqa: BLE001 - recorded per scene
            fail(scene, str(getattr(error, "cause", None) or error))
            continue
        tiles = plan_tiles(info.width, info.height, tiling.tile_size, tiling.overlap)
        context = SceneContext(
            scene_id=scene.scene_id,
            scene_uri=scene.public_uri,
            info=info,
            tile_size=tiling.tile_size,
            edge_tolerance=spec.merge.edge_tolerance,
            merge=merge_options,
            class_names=tuple(spec.model.classes),
            model_id=model_id,
            settings_hash=settings_hash,
            run_id=run_id,
            output_crs=spec.output.crs,
            output_uri=scene_output_uri(output_root, scene.scene_id),
            row_group_size=spec.output.row_group_size,
            acquired_at=scene.acquired_at,
            stac_item_id=scene.stac_item_id,
        )
        band_sizes = Counter(tile.row_off for tile in tiles)
        pending[scene.scene_id] = _PendingScene(
            scene,
            context,
            len(tiles),
            band_tops=sorted(band_sizes),
            band_sizes=dict(band_sizes),
            area_km2=footprint_km2(info.width, info.height, info.transform, info.crs_wkt),
        )
        items.extend(_read_items(scene, info, tiles, tiling.tiles_per_read_task))
    total_tiles = sum(p.expected for p in pending.values())
    progress(f"  {len(pending)} scene(s) planned: {total_tiles} tiles")

    def record_done(state: _PendingScene, written: SceneWritten) -> None:
        """Done goes to the ledger as soon as the scene's file is committed, so a run
        killed later does not redo it."""
        ledger.record(
            LedgerRecord(
                state.scene.scene_id,
                state.scene.identity,
                model_id,
                settings_hash,
                "done",
                run_id,
                now(),
                detections=written.rows,
                output=state.context.output_uri,
            )
        )
        report.scenes.append(
            SceneOutcome(
                state.scene.scene_id,
                state.scene.public_uri,
                "done",
                state.expected,
                written.rows,
                state.context.output_uri,
                tiles_without_data=state.without_data,
                per_class=written.per_class,
                area_km2=state.area_km2,
            )
        )
        progress(
            f"  done {state.scene.scene_id}: {state.expected} tiles "
            f"({state.without_data} without data), {written.rows} detections"
        )

    def give_up(state: _PendingScene, error: str) -> None:
        state.closed = True
        if state.stream is not None:
            state.stream.abort()  # nothing of this attempt appears; an older file stays
        fail(state.scene, error, state.expected)

    def advance(state: _PendingScene) -> None:
        """Merge and write every band that is complete; close the scene after its last."""
        if state.error is not None:
            give_up(state, state.error)
            return
        try:
            for offsets, found, next_top in state.ready_bands():
                state.stream = state.stream or SceneStream(state.context)
                state.stream.add_band(offsets, found, next_top)
            if state.next_band == len(state.band_tops):
                state.stream = state.stream or SceneStream(state.context)
                written = state.stream.close()
                state.closed = True
                record_done(state, written)
        except Exception as error:  # noqa: BLE001 - recorded per scene
            give_up(state, f"merge/write failed: {_first_line(error)}")

    stage_error: str | None = None
    if items:
        dataset = _build_dataset(spec, items)
        tiles_seen = 0
        last_report = time.perf_counter()
        try:
            batches = dataset.iter_batches(batch_size=None, batch_format="pyarrow")
            for batch in _until_stalled(batches, spec.detect.stall_timeout_s):
                for row in batch.to_pylist():
                    state = pending[row["scene_id"]]
                    tiles_seen += 1
                    if state.closed:
                        continue
                    state.add(
                        row["tile_index"],
                        (row["col_off"], row["row_off"]),
                        _tile_detections(row),
                    )
                    state.without_data += not row["has_data"]
                    if row["error"] and state.error is None:
                        state.error = row["error"]
                    advance(state)
                if time.perf_counter() - last_report >= progress_every_s:
                    busy = time.perf_counter() - started - report.ray_start_s
                    through = report.count("done") + report.count("failed")
                    line = progress_line(through, len(todo), tiles_seen, total_tiles, busy)
                    progress(f"  {line}")
                    last_report = time.perf_counter()
        except Exception as error:  # noqa: BLE001 - the scenes in flight fail, the rest stand
            # A read or detector task failed past its retries: the scenes whose tiles had not
            # all come back fail with this error; finished ones are kept and recorded.
            stage_error = f"tiles lost: {_first_line(error)}"
        report.tiles = tiles_seen

    for state in pending.values():
        if not state.closed:  # some of its tiles never came back
            lost = f"only {state.received} of {state.expected} tiles came back"
            give_up(state, state.error or (f"{lost}: {stage_error}" if stage_error else lost))
    return _finish(report, started, output_root)


def _until_stalled(batches: Iterator[T], stall_s: float) -> Iterator[T]:
    """``batches``, pulled by a thread; ``TimeoutError`` when none comes for ``stall_s``.

    Detector actors and their batches are retried without limit (a lost node must not lose
    scenes), so an actor that dies at every start would stall a run forever; this ends it.
    After a stall the thread goes on pulling and dropping batches, so the dataset still runs
    to its end (releasing its actors) if its actors ever come back.
    """
    handoff: queue.Queue = queue.Queue(maxsize=1)
    abandoned = threading.Event()

    def pump() -> None:
        try:
            for item in batches:
                if not abandoned.is_set():
                    handoff.put(("item", item))
            handoff.put(("end", None))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            handoff.put(("error", error))

    threading.Thread(target=pump, name="georetina batches", daemon=True).start()
    while True:
        try:
            kind, value = handoff.get(timeout=stall_s)
        except queue.Empty:
            abandoned.set()
            while not handoff.empty():  # the pump may be blocked on a full queue
                handoff.get_nowait()
            raise TimeoutError(
                f"no tile came back for {stall_s:g} s (detect.stall_timeout_s)"
            ) from None
        if kind == "end":
            return
        if kind == "error":
            raise value
        yield value


def _first_line(error: BaseException, limit: int = 500) -> str:
    """The message of a (Ray-wrapped) error without its traceback."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:limit]


def _redacting(progress: Callable[[str], None]) -> Callable[[str], None]:
    """Progress lines pass through :func:`redact_text` (they name URIs and errors)."""
    return lambda line: progress(redact_text(line))


def check_object_store(spec: JobSpec) -> None:
    """Fail before any read when the tiles in flight cannot fit the cluster's object store."""
    budget = spec.detect.num_actors * spec.detect.inflight_mb_per_actor * 2**20
    capacity = ray.cluster_resources().get("object_store_memory", 0.0)
    if capacity and budget > capacity:
        raise GeoRetinaError(
            f"detect.num_actors x detect.inflight_mb_per_actor = {budget / 2**20:.0f} MB of "
            f"tiles in flight, more than the cluster's object store ({capacity / 2**20:.0f} MB):"
            " lower detect.inflight_mb_per_actor or tiling.tile_size"
        )


def _build_dataset(spec: JobSpec, items: list[dict]) -> ray.data.Dataset:
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    # Reads run ahead of the detector only this far: memory stays flat in the raster's size.
    budget = spec.detect.num_actors * spec.detect.inflight_mb_per_actor * 2**20
    context.execution_options.resource_limits = ray.data.ExecutionResources.for_limits(
        object_store_memory=budget
    )
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    detect = spec.detect
    actor_env = dict(ALLOCATOR_ENV)
    if detect.torch_threads:
        # Size OpenMP's pool at start-up rather than resizing it later (~3% faster on CPU).
        actor_env["OMP_NUM_THREADS"] = str(detect.torch_threads)
    return (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(
            read_chunk,
            batch_size=1,
            fn_kwargs={
                "tile_size": spec.tiling.tile_size,
                "read_timeout_s": spec.tiling.read_timeout_s,
            },
            num_cpus=READ_TASK_CPUS,
            max_retries=TASK_RETRIES,
        )
        .map_batches(
            DetectorActor,
            # by_alias: list inputs are spelt {list: ...} (their field is named uris).
            fn_constructor_kwargs={"spec_json": spec.model_dump_json(by_alias=True)},
            batch_size=detect.batch_size,
            compute=ray.data.ActorPoolStrategy(size=detect.num_actors),
            num_cpus=detect.num_cpus_per_actor,
            num_gpus=detect.num_gpus_per_actor,
            runtime_env={"env_vars": actor_env},
            # A killed actor is restarted and its unfinished batches run again, without a
            # limit (Ray Data's defaults, made explicit). Not bounded: while a lost node is
            # not yet known dead, every retry fails at once ("actor unavailable"), so a
            # bound (3 was tried) lost the scenes in flight when a worker node went away.
            max_restarts=-1,
            max_task_retries=-1,
        )
    )


def _finish(report: RunReport, started: float, output_root: str) -> RunReport:
    import json

    import fsspec

    report.wall_s = time.perf_counter() - started
    busy = report.wall_s - report.ray_start_s
    report.tiles_per_s = report.tiles / busy if busy > 0 else 0.0
    report.detections = sum(s.detections for s in report.scenes)
    for key, value in run_totals([asdict(s) for s in report.scenes], busy).items():
        setattr(report, key, value)
    report.map = _run_map(report, output_root)
    with fsspec.open(
        f"{output_root.rstrip('/')}/_runs/{report.run_id}.json", "w", auto_mkdir=True
    ) as handle:
        handle.write(redact_text(json.dumps(report.as_dict(), indent=2, default=str)))
    return report


def _run_map(report: RunReport, output_root: str) -> str | None:
    """``_runs/<run_id>.png``; a map that cannot be drawn is logged, never fails the run."""
    from pipeline.io.quicklook import render_run_map

    outputs = [s.output for s in report.scenes if s.status == "done" and s.detections]
    if not outputs:
        return None
    try:
        return render_run_map(outputs, f"{output_root.rstrip('/')}/_runs/{report.run_id}.png")
    except (GeoRetinaError, OSError) as error:
        log.warning("run map not drawn: %s", error)
        return None
