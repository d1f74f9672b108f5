"""What happens to a scene's tiles: plan the scene, read a chunk of its tiles, detect.

The scene workers (:mod:`pipeline.jobs.worker`) make each plan themselves, run each chunk's
read as a Ray task (:func:`read_chunk`) and hand its output, by reference, to a detector actor
(:class:`DetectorActor`): pixels go from the read task to the actor through the object store
and never pass through a worker or the driver. Each chunk holds one scene's tiles, so what a
chunk does wrong (a read error, a detector that raises or kills its actor) is that scene's.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from rasterio.windows import Window

from pipeline.config import JobSpec, TilingSettings
from pipeline.errors import SceneError
from pipeline.io.rasters import RasterInfo, inspect_raster_within
from pipeline.io.reads import read_tiles
from pipeline.model.detector import TileDetections, detect_tiles, make_detector
from pipeline.ops.grid import Resample
from pipeline.ops.tiles import plan_alignment, plan_offsets

# A chunk whose tiles killed its detector actor this many times is not tried again: its
# scene fails. A scene whose worker died this many times fails too.
MAX_ATTEMPTS = 4
# Read tasks are short and mostly decompression; a fraction of a CPU each lets them run beside
# detector actors that take the remaining cores (on a CPU machine, one single-threaded actor
# per core beats one multi-threaded actor: no OpenMP barrier stalls when a read task runs).
READ_TASK_CPUS = 0.5
# A read task whose worker process died is run again this many times (a lost node, an OOM
# kill); a read that raises is not: its scene fails with the reason.
READ_TASK_RETRIES = 3


def _message_lines(error: BaseException) -> list[str]:
    return [line.strip() for line in str(error).splitlines() if line.strip()] or [
        type(error).__name__
    ]


def first_line(error: BaseException, limit: int = 500) -> str:
    """The message of a (Ray-wrapped) error without its traceback."""
    return _message_lines(error)[0][:limit]


def could_not_start(what: str, error: BaseException) -> str:
    """Why an actor whose constructor raised is dead for good (Ray restarts a lost process,
    not a constructor's error): that error, the last line of its traceback (Ray's first line
    only names the actor)."""
    return f"{what} could not start: {_message_lines(error)[-1][:500]}"


def stall_reason(stall_s: float) -> str:
    """Why the scenes in flight fail when nothing comes back (a worker's and the driver's)."""
    return f"no tile came back for {stall_s:g} s (detect.stall_timeout_s)"


def tile_alignment(spec: JobSpec) -> int:
    """What the job's tile offsets are multiples of: the model's coarsest feature grid, so
    tiles see what the whole image would (:func:`pipeline.ops.tiles.plan_alignment`)."""
    from pipeline.model.build import largest_stride  # torch: only where a plan is made

    tiling = spec.tiling
    return plan_alignment(largest_stride(spec.model), tiling.tile_size, tiling.overlap)


# -- plan ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScenePlan:
    """A scene's raster facts and its tiles' offsets (two arrays, never an object a tile)."""

    info: RasterInfo
    cols: np.ndarray
    rows: np.ndarray

    @property
    def tiles(self) -> int:
        return len(self.cols)


def plan_scene(
    scene: dict[str, str],
    tiling: TilingSettings,
    align: int = 1,
    resolution: tuple[float, float] | None = None,
) -> ScenePlan:
    """Pre-flight one scene and plan its tiles: offsets are multiples of ``align`` (the
    model's largest stride); with ``resolution`` (``model.resolution_m`` and its tolerance)
    the plan is in the scene's resampled read grid. Raises :class:`SceneError` naming it."""
    info = inspect_raster_within(
        scene["scene_id"],
        scene["uri"],
        tiling.bands,
        tiling.scale_range,
        tiling.read_timeout_s,
        tiling.allow_pixel_coordinates,
        resolution,
    )
    cols, rows = plan_offsets(info.width, info.height, tiling.tile_size, tiling.overlap, align)
    return ScenePlan(info, np.asarray(cols, np.int32), np.asarray(rows, np.int32))


# -- read ------------------------------------------------------------------------------------


class ReadFailed(Exception):
    """A chunk's read failed: its scene fails with this message, and no pixels ship."""


@dataclass(frozen=True)
class SceneReads:
    """How every chunk of one scene is read."""

    scene_id: str
    uri: str
    bands: tuple[int, ...]
    scale_range: tuple[float, float]
    palette: np.ndarray | None
    resample: Resample | None
    tile_size: int
    timeout_s: float

    @classmethod
    def of(cls, scene_id: str, uri: str, info: RasterInfo, tiling: TilingSettings) -> SceneReads:
        lo, hi = info.scale_range
        return cls(
            scene_id,
            uri,
            tuple(int(b) for b in info.bands),
            (float(lo), float(hi)),
            info.palette_table(),
            info.resample,
            tiling.tile_size,
            tiling.read_timeout_s,
        )


@ray.remote(num_cpus=READ_TASK_CPUS, max_retries=READ_TASK_RETRIES)
def read_chunk(
    how: SceneReads, first: int, col_offs: np.ndarray, row_offs: np.ndarray
) -> dict[str, np.ndarray]:
    """Ray task: read one chunk of one scene's tiles through one open dataset.

    Raises :class:`ReadFailed` (not retried) when the read fails or times out."""
    size = how.tile_size
    windows = [Window(int(c), int(r), size, size) for c, r in zip(col_offs, row_offs, strict=True)]
    try:
        images, valid = read_tiles(
            how.uri,
            windows,
            list(how.bands),
            how.scale_range,
            how.palette,
            size,
            how.timeout_s,
            how.resample,
        )
    except Exception as failure:  # noqa: BLE001 - any read failure fails this scene only
        what = "read timed out" if isinstance(failure, TimeoutError) else "read failed"
        raise ReadFailed(str(SceneError(how.scene_id, f"{what}: {failure}"))) from None
    count = len(windows)
    return {
        "scene_id": np.full(count, how.scene_id, dtype=object),
        "tile_index": np.arange(first, first + count, dtype=np.int32),
        "col_off": np.asarray(col_offs, np.int32),
        "row_off": np.asarray(row_offs, np.int32),
        "image": images,
        # One bit a pixel through the object store: 8x fewer bytes than the 0/1 mask.
        "valid_bits": np.packbits(valid, axis=-1),
    }


def chunk_bytes(tiles: int, tile_size: int) -> int:
    """What a chunk of ``tiles`` holds in the object store: pixels and the packed mask."""
    return tiles * (3 * tile_size * tile_size + tile_size * ((tile_size + 7) // 8))


# -- detect ----------------------------------------------------------------------------------


class DeathLog:
    """Which chunk a detector actor was running when it died, kept in a file beside it.

    Ray restarts a dead actor and runs every call it had queued again; only the call that
    was running when it died is to blame. Each call is noted before it runs and cleared
    after; a restarted actor finds the note of the call its predecessor never finished.
    A restart on another node (its node was lost) finds no note: nobody's tiles are blamed.
    """

    def __init__(self, actor_id: str) -> None:
        folder = Path(tempfile.gettempdir()) / "georetina-detectors"
        folder.mkdir(exist_ok=True)
        self.path = folder / f"{actor_id}.json"

    def begin(self, key: str) -> int:
        """Note that ``key`` runs now; how many times it has killed this actor before."""
        state = self._load()
        if state["running"] is not None:  # the last call never ended: it killed the actor
            deaths = state["deaths"]
            deaths[state["running"]] = deaths.get(state["running"], 0) + 1
        state["running"] = key
        self._save(state)
        return state["deaths"].get(key, 0)

    def end(self) -> None:
        state = self._load()
        if not state["deaths"]:  # nothing to remember: no file is left behind the run
            self.path.unlink(missing_ok=True)
            return
        state["running"] = None
        self._save(state)

    def _load(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {"running": None, "deaths": {}}

    def _save(self, state: dict[str, Any]) -> None:
        partial = self.path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(state))
        partial.replace(self.path)


class DetectorActor:
    """Ray actor: the detector is built once per actor; each call is one chunk of one scene.

    :meth:`run_chunk` answers ``(error, table)``: ``error`` is ``None`` or why the chunk's
    scene fails (the detector raised, or these tiles killed the actor ``MAX_ATTEMPTS``
    times); the table has one row per tile (:func:`detections_to_arrow`).
    """

    def __init__(self, spec_json: str) -> None:
        spec = JobSpec.model_validate_json(spec_json)
        self.detector = make_detector(
            spec.model,
            spec.tiling.tile_size,
            torch_threads=spec.detect.threads_per_actor(),
            precision=spec.detect.precision,
        )
        self.min_valid_fraction = spec.merge.min_valid_fraction
        self.tile_size = spec.tiling.tile_size
        self.batch_size = spec.detect.batch_size

    def run_chunk(self, key: str, chunk: dict[str, np.ndarray]) -> tuple[str | None, Any]:
        deaths = self._death_log().begin(key)
        try:
            if deaths >= MAX_ATTEMPTS:
                return f"detector failed: its actor died {deaths} times on this scene's tiles", None
            return None, self(chunk)
        except Exception as failure:  # noqa: BLE001 - this chunk's scene fails, nothing else
            return f"detector failed: {first_line(failure)}", None
        finally:
            self._death_log().end()

    def _death_log(self) -> DeathLog:
        # Made on first use, not in __init__: a subclass (a benchmark's simulated GPU) builds
        # no detector and need not call it.
        if not hasattr(self, "_deaths"):
            self._deaths = DeathLog(ray.get_runtime_context().get_actor_id())
        return self._deaths

    def __call__(self, chunk: dict[str, np.ndarray]) -> pa.Table:
        """A chunk's tiles, ``detect.batch_size`` a forward pass."""
        count = len(chunk["tile_index"])
        parts = [
            self._detect(_take(chunk, slice(start, start + self.batch_size)))
            for start in range(0, count, self.batch_size)
        ]
        return pa.concat_tables(parts) if parts else self._detect(chunk)

    def _detect(self, batch: dict[str, np.ndarray]) -> pa.Table:
        count = len(batch["scene_id"])
        valid = np.unpackbits(batch["valid_bits"], axis=-1, count=self.tile_size)
        found = detect_tiles(
            self.detector, batch["image"], valid, np.ones(count, bool), self.min_valid_fraction
        )
        has_data = batch["valid_bits"].reshape(count, -1).any(axis=1)
        return detections_to_arrow(batch, found, has_data)


def _take(batch: dict[str, np.ndarray], rows: slice | np.ndarray) -> dict[str, np.ndarray]:
    return {column: values[rows] for column, values in batch.items()}


def detections_to_arrow(
    batch: dict[str, np.ndarray], found: list[TileDetections], has_data: np.ndarray
) -> pa.Table:
    """One row per tile; boxes, scores and class ids as list columns (empty when none)."""
    lengths = np.array([len(f.scores) for f in found], dtype=np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))

    def listed(values: list[np.ndarray], dtype: pa.DataType, width: int = 1) -> pa.Array:
        flat = np.concatenate(values) if values else np.zeros(0)
        return pa.ListArray.from_arrays(pc.multiply(offsets, width), pa.array(flat, type=dtype))

    return pa.table(
        {
            "scene_id": pa.array([str(s) for s in batch["scene_id"]], pa.string()),
            "tile_index": pa.array(batch["tile_index"], pa.int32()),
            "col_off": pa.array(batch["col_off"], pa.int32()),
            "row_off": pa.array(batch["row_off"], pa.int32()),
            "has_data": pa.array(has_data, pa.bool_()),
            "boxes": listed([f.boxes.reshape(-1) for f in found], pa.float32(), width=4),
            "scores": listed([f.scores for f in found], pa.float32()),
            "class_ids": listed([f.class_ids for f in found], pa.int16()),
        }
    )
