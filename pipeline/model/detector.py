"""Batched inference on a device. The Ray actor (runner.py) is a thin wrapper over this.

A detector takes a uint8 batch ``N×C×H×W`` and returns, per tile, boxes in tile pixels
``(x0, y0, x1, y1)`` (float32), scores (float32) and class ids (int16).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from pipeline.config import ModelSettings
from pipeline.ops.boxes import valid_fraction

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TileDetections:
    boxes: np.ndarray  # (k, 4) float32, tile pixels
    scores: np.ndarray  # (k,) float32
    class_ids: np.ndarray  # (k,) int16

    @staticmethod
    def empty() -> TileDetections:
        return TileDetections(
            np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int16)
        )

    def select(self, keep: np.ndarray) -> TileDetections:
        return TileDetections(self.boxes[keep], self.scores[keep], self.class_ids[keep])


class Detector(Protocol):
    """``images`` uint8 ``N×C×H×W``; ``valid`` (optional) the ``N×H×W`` 0/1 mask of pixels
    inside the raster and with data: a model sees the others as it sees its own padding."""

    model_id: str

    def __call__(
        self, images: np.ndarray, valid: np.ndarray | None = None
    ) -> list[TileDetections]: ...


def pick_device(requested: str | None = None) -> str:
    """``cuda`` when a GPU is visible, else ``cpu`` with a warning if one was expected."""
    import torch

    if requested:
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        log.warning("CUDA_VISIBLE_DEVICES is set but no GPU is usable: running on the CPU")
    return "cpu"


class RetinaNetDetector:
    """torchvision RetinaNet, built and loaded once; batches normalised on the device."""

    def __init__(
        self,
        settings: ModelSettings,
        tile_size: int,
        device: str | None = None,
        torch_threads: int | None = None,
        precision: str = "bf16",
    ) -> None:
        import torch

        from pipeline.model.build import load_model

        self.device = torch.device(pick_device(device))
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        if self.device.type == "cpu":
            torch.set_num_threads(torch_threads or os.cpu_count() or 1)
        model, self.model_id = load_model(settings, tile_size)
        self.model = model.to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)

    def __call__(self, images: np.ndarray, valid: np.ndarray | None = None) -> list[TileDetections]:
        import torch

        from pipeline.model.postprocess import retinanet_detect

        if len(images) == 0:
            return []
        if not images.flags.writeable:  # Ray hands out read-only views of its object store
            images = images.copy()
        batch = torch.from_numpy(np.ascontiguousarray(images))
        on_gpu = self.device.type == "cuda"
        if on_gpu:
            batch = batch.pin_memory()
        with torch.inference_mode():
            # uint8 crosses the bus (4x fewer bytes than float); scaling happens on the device,
            # and so does the channels-last copy the GPU's convolutions prefer.
            x = batch.to(self.device, non_blocking=True)
            if on_gpu:
                x = x.contiguous(memory_format=torch.channels_last)
            x = x.float().div_(255.0)
            if valid is not None and not valid.all():
                x = self._mean_where_invalid(x, valid)
            mixed = on_gpu and self.autocast_dtype is not None
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=mixed):
                # torchvision's network, then our batched postprocessing (model/postprocess.py)
                outputs = retinanet_detect(self.model, x)
        return [
            TileDetections(
                out["boxes"].float().cpu().numpy(),
                out["scores"].float().cpu().numpy(),
                out["labels"].cpu().numpy().astype(np.int16),
            )
            for out in outputs
        ]

    def _mean_where_invalid(self, x: torch.Tensor, valid: np.ndarray) -> torch.Tensor:
        """Pixels past the raster's edge or without data become the normalisation's mean.

        Normalised, that is 0: what torchvision pads a batch with, and what the first
        convolution's zero padding stands for. So the model sees one thing outside the data
        wherever it is: past the edge of a padded tile, at a tile edge that is the raster's
        border, and beyond the whole image.
        """
        import torch

        mask = torch.from_numpy(np.ascontiguousarray(valid, dtype=np.bool_)).to(self.device)
        mean = torch.as_tensor(self.model.transform.image_mean, device=x.device)
        return torch.where(mask[:, None], x, mean.view(1, -1, 1, 1).to(x.dtype))


class ThresholdDetector:
    """Deterministic reference detector: one box per bright blob (class 0).

    Not a model: it exists so tests and the demo can check tiling, merging and
    georeferencing exactly, through the same interface as RetinaNet.
    """

    def __init__(self, settings: ModelSettings) -> None:
        self.level = settings.threshold_level
        self.min_pixels = settings.threshold_min_pixels
        self.model_id = settings.model_id()

    def __call__(self, images: np.ndarray, valid: np.ndarray | None = None) -> list[TileDetections]:
        # Invalid pixels are 0 in the read tiles: below any level, so ``valid`` is not needed.
        from scipy import ndimage

        results = []
        for image in images:
            bright = image.min(axis=0) >= self.level
            if not bright.any():
                results.append(TileDetections.empty())
                continue
            labels, _ = ndimage.label(bright)
            boxes, scores = [], []
            for index, found in enumerate(ndimage.find_objects(labels), start=1):
                if found is None:
                    continue
                rows, cols = found
                blob = labels[found] == index
                if blob.sum() < self.min_pixels:
                    continue
                boxes.append((cols.start, rows.start, cols.stop, rows.stop))
                scores.append(float(image[:, rows, cols][:, blob].mean()) / 255.0)
            results.append(
                TileDetections(
                    np.asarray(boxes, np.float32).reshape(-1, 4),
                    np.asarray(scores, np.float32),
                    np.zeros(len(boxes), np.int16),
                )
            )
        return results


def make_detector(
    settings: ModelSettings,
    tile_size: int,
    device: str | None = None,
    torch_threads: int | None = None,
    precision: str = "bf16",
) -> Detector:
    if settings.kind == "threshold":
        return ThresholdDetector(settings)
    return RetinaNetDetector(settings, tile_size, device, torch_threads, precision)


def detect_tiles(
    detector: Detector,
    images: np.ndarray,
    valid: np.ndarray,
    runnable: np.ndarray,
    min_valid_fraction: float,
) -> list[TileDetections]:
    """Run the detector on the runnable tiles that have any valid pixel.

    All-nodata tiles never reach the device. Boxes lying mostly on nodata are dropped here,
    where the tile's mask is at hand, so the mask never travels further.
    """
    results = [TileDetections.empty() for _ in range(len(images))]
    todo = np.flatnonzero(runnable & valid.reshape(len(valid), -1).any(axis=1))
    if len(todo) == 0:
        return results
    for index, found in zip(todo, detector(images[todo], valid[todo]), strict=True):
        if len(found.boxes) and not valid[index].all():
            found = within_data(found, valid[index], min_valid_fraction)
        results[index] = found
    return results


def within_data(
    found: TileDetections, valid: np.ndarray, min_valid_fraction: float
) -> TileDetections:
    """Boxes clipped to the extent of the tile's data, then those mostly on nodata dropped.

    Clipped first, so a box reaching past the raster's edge is judged by the part on the
    raster, whether the tile ended at that edge (the network clipped it there) or was padded
    past it (the padding is invalid): a tiled run and a whole-image run decide alike.
    """
    rows, cols = np.flatnonzero(valid.any(axis=1)), np.flatnonzero(valid.any(axis=0))
    low = np.array([cols[0], rows[0], cols[0], rows[0]], dtype=np.float32)
    high = np.array([cols[-1] + 1, rows[-1] + 1, cols[-1] + 1, rows[-1] + 1], dtype=np.float32)
    boxes = np.clip(found.boxes, low, high)
    found = TileDetections(boxes, found.scores, found.class_ids)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if min_valid_fraction > 0:
        keep &= valid_fraction(boxes, valid) >= min_valid_fraction
    return found.select(keep)
