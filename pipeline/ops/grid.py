"""The read grid: a scene resampled to the model's ground sample distance. Pure numpy.

A model trained at 0.5 m sees objects at twice their trained size in 0.25 m imagery. With
``model.resolution_m`` the scene is read onto a coarser (or finer) grid over the same extent,
tiled and detected there, and its boxes mapped back to the scene's own pixels by the scale.

The read grid covers the scene exactly: ``width = round(scene_width / factor)``, so a grid
pixel is ``scene_width / width`` scene pixels wide (the target resolution to within one pixel
over the scene), and the grid's transform is the scene's scaled by that (``grid_transform``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Method = Literal["average", "bilinear"]


@dataclass(frozen=True)
class Resample:
    """How a scene of ``scene_width × scene_height`` px is read as ``width × height``.

    ``method``: 'average' when the grid is coarser on either axis (GDAL then reads from an
    overview where one matches), 'bilinear' when it is finer on both.
    """

    scene_width: int
    scene_height: int
    width: int
    height: int
    method: Method

    @property
    def scale_x(self) -> float:
        """Scene pixels per grid pixel along a row."""
        return self.scene_width / self.width

    @property
    def scale_y(self) -> float:
        return self.scene_height / self.height

    def scene_window(
        self, col_off: int, row_off: int, width: int, height: int
    ) -> tuple[float, float, float, float]:
        """A grid window as a (fractional) scene-pixel window ``(col, row, width, height)``."""
        sx, sy = self.scale_x, self.scale_y
        return col_off * sx, row_off * sy, width * sx, height * sy

    def to_scene_pixels(self, boxes: np.ndarray) -> np.ndarray:
        """``(n, 4)`` boxes in grid pixels → scene pixels (float64)."""
        scale = np.array([self.scale_x, self.scale_y, self.scale_x, self.scale_y])
        return np.asarray(boxes, dtype=np.float64) * scale

    def to_text(self) -> str:
        """A compact form for a chunk's row: ``average:3072x3072:1536x1536``."""
        return f"{self.method}:{self.scene_width}x{self.scene_height}:{self.width}x{self.height}"

    @classmethod
    def from_text(cls, text: str) -> Resample | None:
        """:meth:`to_text` read back; an empty string is no resampling."""
        if not text:
            return None
        method, scene, grid = text.split(":")
        scene_w, scene_h = (int(v) for v in scene.split("x"))
        width, height = (int(v) for v in grid.split("x"))
        if method not in ("average", "bilinear"):
            raise ValueError(f"unknown resampling {method!r}")
        return cls(scene_w, scene_h, width, height, method)  # type: ignore[arg-type]


def plan_resample(
    scene_width: int,
    scene_height: int,
    pixel_size_m: tuple[float, float],
    target_m: float,
    tolerance: float,
) -> Resample | None:
    """The read grid that brings ``pixel_size_m`` (x, y ground metres per pixel) to ``target_m``.

    None when both axes are within ``tolerance`` (a fraction: 0.1 = ±10 %) of the target:
    such a scene is read as it is.
    """
    factors = [target_m / size for size in pixel_size_m]
    if all(abs(f - 1.0) <= tolerance for f in factors):
        return None
    width = max(1, round(scene_width / factors[0]))
    height = max(1, round(scene_height / factors[1]))
    coarser = width < scene_width or height < scene_height
    return Resample(scene_width, scene_height, width, height, "average" if coarser else "bilinear")


def grid_transform(
    transform: tuple[float, float, float, float, float, float], resample: Resample
) -> tuple[float, float, float, float, float, float]:
    """The grid's affine (``a, b, c, d, e, f``): the scene's, times a scale of its pixels.

    Rotation and south-up carry over: only the columns (a, d) and rows (b, e) are scaled.
    """
    a, b, c, d, e, f = transform
    sx, sy = resample.scale_x, resample.scale_y
    return (a * sx, b * sy, c, d * sx, e * sy, f)
