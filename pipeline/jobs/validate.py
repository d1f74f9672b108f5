"""``georetina validate``: everything a run checks before its first tile, and nothing more.

The job file, its inputs (every scene they list), the model and its checkpoint, the output's
writability, then each scene's pre-flight (the same one a run makes) for the tiles the job
would read, and an estimate of the run time from the model's speed measured here. No Ray is
started; nothing is written but the output's write probe and the VRTs of mosaic inputs
(``OUTPUT/_vrt``, as a run writes them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from pipeline.config import JobSpec
from pipeline.io.discovery import discover_scenes
from pipeline.io.ledger import Ledger
from pipeline.io.rasters import inspect_raster_within
from pipeline.io.scenes import Scene
from pipeline.io.writable import check_output_writable
from pipeline.jobs.report import format_duration
from pipeline.jobs.stages import tile_alignment
from pipeline.model.detector import Detector
from pipeline.ops.tiles import plan_tiles

# Scenes pre-flighted at once: each is a few small reads, mostly waiting on storage.
PREFLIGHT_THREADS = 8


@dataclass(frozen=True)
class SceneCheck:
    scene_id: str
    uri: str
    tiles: int = 0
    problem: str | None = None  # why a run would fail this scene
    done: bool = False  # already done with this model and settings: a run skips it


@dataclass(frozen=True)
class Estimate:
    """Model-only speed measured on this machine, scaled to the job's actors."""

    device: str
    tiles_per_s_per_actor: float
    actors: int

    @property
    def tiles_per_s(self) -> float:
        return self.tiles_per_s_per_actor * self.actors

    def seconds_for(self, tiles: int) -> float:
        return tiles / self.tiles_per_s if self.tiles_per_s > 0 else float("inf")


@dataclass(frozen=True)
class Validation:
    job: str
    model_id: str
    output: str
    scenes: list[SceneCheck]
    estimate: Estimate | None
    estimate_note: str | None = None  # why there is no estimate

    @property
    def failing(self) -> list[SceneCheck]:
        """Scenes a run would process and fail."""
        return [s for s in self.scenes if not s.done and s.problem is not None]

    @property
    def tiles(self) -> int:
        return sum(s.tiles for s in self.scenes if not s.done and s.problem is None)

    def lines(self) -> list[str]:
        todo = [s for s in self.scenes if not s.done]
        bad = self.failing
        lines = [
            f"scenes: {len(self.scenes)} found, {len(self.scenes) - len(todo)} already done, "
            f"{len(todo) - len(bad)} to process, {len(bad)} would fail",
            f"tiles: {self.tiles}",
        ]
        lines += [f"  WOULD FAIL {s.scene_id}: {s.problem}" for s in bad]
        if self.estimate is not None:
            rate = self.estimate
            lines.append(
                f"estimate: {format_duration(rate.seconds_for(self.tiles))} of inference "
                f"({rate.actors} actor(s) x {rate.tiles_per_s_per_actor:.2f} tiles/s, "
                f"model only, measured here on {rate.device}; reads, merge and starting Ray "
                "add to it)"
            )
        elif self.estimate_note:
            lines.append(f"estimate: {self.estimate_note}")
        return lines


def validate_job(
    spec: JobSpec, *, estimate: bool = True, on_line: Callable[[str], None] = print
) -> Validation:
    """Check ``spec`` as a run would before its first tile; raise what a run would raise."""
    from pipeline.model.detector import make_detector  # torch: only when validating

    check_output_writable(spec.output.path)
    on_line(f"output {spec.output.path}: writable")
    detector = make_detector(
        spec.model,
        spec.tiling.tile_size,
        device="cpu" if spec.detect.num_gpus_per_actor == 0 else None,
        torch_threads=spec.detect.threads_per_actor(),
        precision=spec.detect.precision,
    )  # loads the checkpoint: a missing or mismatched one fails here
    on_line(f"model {detector.model_id}: loaded")
    scenes = discover_scenes(spec.inputs, spec.tiling.read_timeout_s, spec.output.vrt_folder)
    on_line(f"inputs: {len(scenes)} scene(s); pre-flight of each")
    done = Ledger(spec.output.path, compact_at=None).done_keys()
    settings_hash = spec.settings_hash()
    done_here = {
        s.identity for s in scenes if (s.identity, detector.model_id, settings_hash) in done
    }
    checks = preflight_scenes(spec, scenes, done_here)
    speed, note = None, None
    if estimate:
        speed, note = measure_speed(detector, spec)
    return Validation(spec.name, detector.model_id, spec.output.path, checks, speed, note)


def preflight_scenes(spec: JobSpec, scenes: list[Scene], done: set[str]) -> list[SceneCheck]:
    """Each scene's pre-flight (size, bands, CRS, last block) and its tile count."""
    tiling = spec.tiling
    align = tile_alignment(spec)  # as the run plans

    def check(scene: Scene) -> SceneCheck:
        if scene.identity in done:
            return SceneCheck(scene.scene_id, scene.public_uri, done=True)
        if scene.problem is not None:
            return SceneCheck(scene.scene_id, scene.public_uri, problem=scene.problem)
        try:
            info = inspect_raster_within(
                scene.scene_id,
                scene.uri,
                tiling.bands,
                tiling.scale_range,
                tiling.read_timeout_s,
                tiling.allow_pixel_coordinates,
                spec.model.read_resolution(),
            )
        except Exception as error:  # noqa: BLE001 - reported per scene, as a run would
            return SceneCheck(scene.scene_id, scene.public_uri, problem=str(error))
        tiles = plan_tiles(info.width, info.height, tiling.tile_size, tiling.overlap, align)
        return SceneCheck(scene.scene_id, scene.public_uri, tiles=len(tiles))

    with ThreadPoolExecutor(PREFLIGHT_THREADS) as pool:
        return list(pool.map(check, scenes))


def measure_speed(
    detector: Detector, spec: JobSpec, batches: int = 2
) -> tuple[Estimate | None, str | None]:
    """Tiles/s of one actor's model on one batch of noise tiles, after a warm-up batch."""
    import torch

    on_gpu = spec.detect.num_gpus_per_actor > 0
    if on_gpu and not torch.cuda.is_available():
        return None, "the job's actors use GPUs and this machine has none: not measured"
    size, batch = spec.tiling.tile_size, spec.detect.batch_size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(batch, 3, size, size), dtype=np.uint8)
    detector(images)  # warm-up: first-call allocations and kernel choices
    started = time.perf_counter()
    for _ in range(batches):
        detector(images)
    per_actor = batches * batch / (time.perf_counter() - started)
    device = "cuda" if on_gpu else f"cpu, {spec.detect.threads_per_actor()} thread(s)"
    return Estimate(device, per_actor, spec.detect.num_actors), None
