"""The streaming stages Ray Data runs: plan a scene, read a chunk of its tiles, detect.

Each is a plain function or callable class handed to ``map_batches``; they call the pure
modules and the readers, and tell the scene board (:mod:`pipeline.jobs.board`) when a scene
fails, so that its other tiles are neither read nor detected.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from rasterio.windows import Window

from pipeline.config import JobSpec, TilingSettings
from pipeline.errors import SceneError
from pipeline.io.rasters import inspect_raster_within
from pipeline.io.reads import read_tiles
from pipeline.model.detector import TileDetections, detect_tiles, make_detector
from pipeline.ops.grid import Resample
from pipeline.ops.tiles import plan_alignment, plan_offsets

# A chunk or batch whose worker died this many times is not tried again: its scenes fail.
MAX_ATTEMPTS = 4


def first_line(error: BaseException, limit: int = 500) -> str:
    """The message of a (Ray-wrapped) error without its traceback."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:limit]


def tile_alignment(spec: JobSpec) -> int:
    """What the job's tile offsets are multiples of: the model's coarsest feature grid, so
    tiles see what the whole image would (:func:`pipeline.ops.tiles.plan_alignment`)."""
    from pipeline.model.build import largest_stride  # torch: only where a plan is made

    tiling = spec.tiling
    return plan_alignment(largest_stride(spec.model), tiling.tile_size, tiling.overlap)


def plan_scene(
    batch: dict[str, np.ndarray],
    tiling: TilingSettings,
    board: Any,
    align: int = 1,
    resolution: tuple[float, float] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data stage: pre-flight one scene, post its plan, yield its read chunks.

    The plan is two arrays of offsets (multiples of ``align``, the model's largest stride),
    cut into chunks of ``tiling.tiles_per_read_task``; a scene whose pre-flight fails is
    posted as failed and yields nothing. With ``resolution`` (``model.resolution_m`` and its
    tolerance) the plan is in the scene's resampled read grid, which the chunks carry.
    """
    scene = {key: str(values[0]) for key, values in batch.items()}
    try:
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
    except Exception as error:  # noqa: BLE001 - this scene fails, the others go on
        ray.get(board.post_failure.remote(scene["scene_id"], str(error), scene))
        return
    ray.get(board.post_plan.remote(scene["scene_id"], len(cols), (scene, info)))
    step = tiling.tiles_per_read_task
    for start in range(0, len(cols), step):
        stop = min(start + step, len(cols))
        yield {
            "scene_id": np.array([scene["scene_id"]], dtype=object),
            "uri": np.array([scene["uri"]], dtype=object),
            "first_tile": np.array([start], dtype=np.int32),
            "col_off": _one_row(cols[start:stop]),
            "row_off": _one_row(rows[start:stop]),
            "bands": _one_row(np.asarray(info.bands, dtype=np.int32)),
            "scale": _one_row(np.asarray(info.scale_range, dtype=np.float64)),
            "palette": _one_row(np.asarray(info.palette or (), dtype=np.uint8)),
            "resample": np.array([info.resample.to_text() if info.resample else ""], dtype=object),
        }


def _one_row(values: np.ndarray) -> np.ndarray:
    """A one-row object column holding ``values``: a list cell of a chunk's row."""
    cell = np.empty(1, dtype=object)
    cell[0] = values
    return cell


def _no_tiles(tile_size: int) -> dict[str, np.ndarray]:
    return {
        "scene_id": np.zeros(0, dtype=object),
        "tile_index": np.zeros(0, np.int32),
        "col_off": np.zeros(0, np.int32),
        "row_off": np.zeros(0, np.int32),
        "image": np.zeros((0, 3, tile_size, tile_size), np.uint8),
        "valid_bits": np.zeros((0, tile_size, (tile_size + 7) // 8), np.uint8),
    }


def read_chunk(
    batch: dict[str, np.ndarray], tile_size: int, read_timeout_s: float, board: Any
) -> dict[str, np.ndarray]:
    """Ray Data stage: read one chunk of one scene's tiles through one open dataset.

    A failure is posted to the board and ships no pixels; a chunk of a scene that has
    already failed, or one that has killed its worker ``MAX_ATTEMPTS`` times, is not read.
    """
    scene_id, uri = str(batch["scene_id"][0]), str(batch["uri"][0])
    first = int(batch["first_tile"][0])
    attempt, failed = ray.get(board.start.remote(("read", scene_id, first), [scene_id]))
    if failed:
        return _no_tiles(tile_size)
    if attempt > MAX_ATTEMPTS:
        error = f"read failed: its worker died {MAX_ATTEMPTS} times reading tiles from {first}"
        ray.get(board.post_failure.remote(scene_id, str(SceneError(scene_id, error))))
        return _no_tiles(tile_size)
    col_offs = np.asarray(batch["col_off"][0], dtype=np.int32)
    row_offs = np.asarray(batch["row_off"][0], dtype=np.int32)
    lo, hi = (float(v) for v in batch["scale"][0])
    flat_palette = np.asarray(batch["palette"][0], dtype=np.uint8)
    palette = flat_palette.reshape(256, 3) if flat_palette.size else None
    windows = [
        Window(int(c), int(r), tile_size, tile_size)
        for c, r in zip(col_offs, row_offs, strict=False)
    ]
    bands = [int(b) for b in batch["bands"][0]]
    try:
        resample = Resample.from_text(str(batch["resample"][0]))
        images, valid = read_tiles(
            uri, windows, bands, (lo, hi), palette, tile_size, read_timeout_s, resample
        )
    except Exception as failure:  # noqa: BLE001 - any read failure fails this scene only
        what = "read timed out" if isinstance(failure, TimeoutError) else "read failed"
        error = str(SceneError(scene_id, f"{what}: {failure}"))
        ray.get(board.post_failure.remote(scene_id, error))
        return _no_tiles(tile_size)
    count = len(windows)
    return {
        "scene_id": np.full(count, scene_id, dtype=object),
        "tile_index": np.arange(first, first + count, dtype=np.int32),
        "col_off": col_offs,
        "row_off": row_offs,
        "image": images,
        # One bit a pixel through the object store: 8x fewer bytes than the 0/1 mask.
        "valid_bits": np.packbits(valid, axis=-1),
    }


class DetectorActor:
    """Ray Data actor: the detector is built once per actor; each call is one batch.

    A batch that raises is run again scene by scene, and a batch whose actor died is run
    scene by scene from its second attempt: only the scenes whose own tiles fail (or kill
    the actor ``MAX_ATTEMPTS`` times) are posted as failed; their rows are dropped.
    Without a board (a benchmark calling the class directly) errors simply raise.
    """

    def __init__(self, spec_json: str, board: Any = None) -> None:
        spec = JobSpec.model_validate_json(spec_json)
        self.detector = make_detector(
            spec.model,
            spec.tiling.tile_size,
            torch_threads=spec.detect.threads_per_actor(),
            precision=spec.detect.precision,
        )
        self.min_valid_fraction = spec.merge.min_valid_fraction
        self.tile_size = spec.tiling.tile_size
        self.board = board

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        if len(batch["scene_id"]) == 0:
            return self._no_detections(batch)
        if self.board is None:
            return self._detect(batch)
        scene_ids = batch["scene_id"]
        names = list(dict.fromkeys(str(s) for s in scene_ids))
        key = ("detect", names[0], int(batch["tile_index"][0]), len(scene_ids))
        attempt, failed = ray.get(self.board.start.remote(key, names))
        if attempt == 1 and not failed:
            try:
                return self._detect(batch)
            except Exception:  # noqa: BLE001 - found out scene by scene below
                pass
        return pa.concat_tables(
            [self._detect_scene(batch, scene_ids == name, name) for name in names]
        )

    def _detect_scene(self, batch: dict[str, np.ndarray], rows: np.ndarray, name: str) -> pa.Table:
        part = _take(batch, rows)
        key = ("detect-scene", name, int(part["tile_index"][0]), len(part["tile_index"]))
        attempt, failed = ray.get(self.board.start.remote(key, [name]))
        if failed:
            return self._no_detections(part)
        error = None
        if attempt > MAX_ATTEMPTS:
            error = f"detector failed: its actor died {MAX_ATTEMPTS} times on this scene's tiles"
        else:
            try:
                found = self._detect(part)
                self.board.finish.remote(key)  # in order: the board sees it before a retry
                return found
            except Exception as failure:  # noqa: BLE001 - this scene fails, the others go on
                error = f"detector failed: {first_line(failure)}"
        ray.get(self.board.post_failure.remote(name, str(SceneError(name, error))))
        return self._no_detections(part)

    def _no_detections(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """The detection table's columns with no rows: what a failed scene's part gives."""
        none = _take(batch, np.zeros(len(batch["tile_index"]), bool))
        return detections_to_arrow(none, [], np.zeros(0, bool))

    def _detect(self, batch: dict[str, np.ndarray]) -> pa.Table:
        count = len(batch["scene_id"])
        valid = np.unpackbits(batch["valid_bits"], axis=-1, count=self.tile_size)
        found = detect_tiles(
            self.detector, batch["image"], valid, np.ones(count, bool), self.min_valid_fraction
        )
        has_data = batch["valid_bits"].reshape(count, -1).any(axis=1)
        return detections_to_arrow(batch, found, has_data)


def _take(batch: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
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
