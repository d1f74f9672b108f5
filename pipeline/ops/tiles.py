"""Tile plan and uint8 scaling. Pure: plain integer math over the raster's shape.

The plan is the windows a scene is read in and the core each owns when merging; scaling maps
any dtype onto the model's uint8. Nothing here reads a pixel or knows of Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from rasterio.windows import Window

# --------------------------------------------------------------------------------------------
# Plan (pure)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tile:
    """One planned tile: its window in scene pixels and the core it owns when merging.

    The window is always ``tile_size`` square so batches stack. It reaches past the raster
    when the raster is smaller than one tile, or when the last tile of a row or column,
    moved inward only as far as the next multiple of ``align``, still ends past the edge (the
    read pads it, and marks the padding invalid). The cores of a plan partition the raster:
    every pixel belongs to exactly one core.
    """

    row: int
    col: int
    col_off: int
    row_off: int
    width: int
    height: int
    core_col_off: int
    core_row_off: int
    core_width: int
    core_height: int

    @property
    def window(self) -> Window:
        """The tile's read window (rasterio's value type)."""
        return Window(self.col_off, self.row_off, self.width, self.height)


def plan_alignment(stride: int, tile_size: int, overlap: int) -> int:
    """What tile offsets are multiples of: the model's largest ``stride`` when it fits in
    ``tile_size - overlap``. A tile too small to step by the coarsest cell (128 px tiles and
    a P7 model) aligns the finer grids, where small objects are found, as far as the step
    allows without more tiles: the largest power of two dividing it."""
    step = tile_size - overlap
    if stride <= step:
        return max(stride, 1)
    return max(min(stride, step & -step), 1)


def aligned_step(tile_size: int, overlap: int, align: int = 1) -> int:
    """Distance between neighbouring tiles: ``tile_size - overlap`` rounded down to ``align``.

    Rounding down only widens the overlap, so every object the overlap was chosen for is
    still whole in some tile.

    Raises:
        ValueError: if no positive multiple of ``align`` fits in ``tile_size - overlap``.
    """
    if align < 1:
        raise ValueError(f"align must be at least 1: {align}")
    step = (tile_size - overlap) // align * align
    if step <= 0:
        raise ValueError(
            f"tile_size - overlap ({tile_size} - {overlap}) must be at least the model's "
            f"largest stride ({align}): make the tiles larger or the overlap smaller"
        )
    return step


def planned_overlap(tile_size: int, overlap: int, align: int = 1) -> int:
    """The overlap neighbouring tiles really have once the step is aligned: at least
    ``overlap`` (:func:`aligned_step` only rounds the step down)."""
    return tile_size - aligned_step(tile_size, overlap, align)


def axis_offsets(size: int, tile_size: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of tiles along one axis of ``size`` pixels, each a multiple of ``align``.

    With step ``s`` (:func:`aligned_step`), ``n = ceil((size - tile_size) / s) + 1`` tiles
    cover the axis (the ceiling adds the last, partial step). The last tile is moved inward
    to ``size - tile_size`` rounded *up* to a multiple of ``align``, so it ends at or past the
    raster's edge and overlaps its neighbour by at least ``overlap``. An axis no longer than a
    tile gets one tile at 0.

    ``align`` is the model's largest stride: a tile whose offset is a multiple of it sees the
    feature grid the whole image would (every convolution samples the same pixels), so tiled
    detections equal whole-image ones away from the tile edges. With ``align=1`` the last
    tile ends exactly at the edge.

    Offsets start at 0 and step by ``s``, so when tile size and overlap are whole multiples
    of the raster's block size (512 and 0, 1024 and 512, ...) every window but the last
    starts on a block boundary: alignment comes free and no extra tiles are paid for it.
    """
    step = aligned_step(tile_size, overlap, align)
    if size <= tile_size:
        return [0]
    count = math.ceil((size - tile_size) / step) + 1
    last = math.ceil((size - tile_size) / align) * align
    return [min(index * step, last) for index in range(count)]


def axis_cores(offsets: list[int], size: int, tile_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each tile's core along one axis: split every overlap in the middle."""
    bounds = [0]
    for left, right in zip(offsets, offsets[1:], strict=False):
        bounds.append((right + left + tile_size) // 2)
    bounds.append(size)
    return list(zip(bounds, bounds[1:], strict=False))


def _check_plan(width: int, height: int, tile_size: int, overlap: int) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"raster has no pixels: {width}x{height}")
    if not 0 <= overlap < tile_size:
        raise ValueError(f"overlap {overlap} must be in [0, tile_size={tile_size})")


def plan_tiles(width: int, height: int, tile_size: int, overlap: int, align: int = 1) -> list[Tile]:
    """Tiles covering a ``width × height`` raster, row-major, offsets multiples of ``align``.

    Raises:
        ValueError: if the raster is empty, the overlap is not below the tile size, or no
            step that is a multiple of ``align`` fits (:func:`aligned_step`).
    """
    _check_plan(width, height, tile_size, overlap)
    col_offsets = axis_offsets(width, tile_size, overlap, align)
    row_offsets = axis_offsets(height, tile_size, overlap, align)
    col_cores = axis_cores(col_offsets, width, tile_size)
    row_cores = axis_cores(row_offsets, height, tile_size)
    tiles = []
    for row, (row_off, (core_r0, core_r1)) in enumerate(zip(row_offsets, row_cores, strict=True)):
        for col, (col_off, (core_c0, core_c1)) in enumerate(
            zip(col_offsets, col_cores, strict=True)
        ):
            tiles.append(
                Tile(
                    row=row,
                    col=col,
                    col_off=col_off,
                    row_off=row_off,
                    width=tile_size,
                    height=tile_size,
                    core_col_off=core_c0,
                    core_row_off=core_r0,
                    core_width=core_c1 - core_c0,
                    core_height=core_r1 - core_r0,
                )
            )
    return tiles


def plan_offsets(
    width: int, height: int, tile_size: int, overlap: int, align: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """The windows of :func:`plan_tiles` as two int32 arrays ``(col_offs, row_offs)``, row-major.

    What travels between stages: two integers a tile, never an object a tile.
    """
    _check_plan(width, height, tile_size, overlap)
    cols = np.asarray(axis_offsets(width, tile_size, overlap, align), dtype=np.int32)
    rows = np.asarray(axis_offsets(height, tile_size, overlap, align), dtype=np.int32)
    return np.tile(cols, len(rows)), np.repeat(rows, len(cols))


def inner_edges(
    col_off: int, row_off: int, tile_size: int, width: int, height: int
) -> tuple[bool, bool, bool, bool]:
    """Which sides of a tile (left, top, right, bottom) lie inside the raster.

    A box touching an inner edge may be an object cut in half; one touching the raster's own
    border is not.
    """
    return (
        col_off > 0,
        row_off > 0,
        col_off + tile_size < width,
        row_off + tile_size < height,
    )


# --------------------------------------------------------------------------------------------
# Scaling to uint8 (pure)
# --------------------------------------------------------------------------------------------


def default_scale_range(dtype: str) -> tuple[float, float] | None:
    """The range mapped onto 0..255 when the job names none; None means 'measure it'."""
    if dtype == "uint8":
        return (0.0, 255.0)
    return None


def percentile_range(
    sample: np.ndarray, valid: np.ndarray, low: float = 2.0, high: float = 98.0
) -> tuple[float, float]:
    """Robust input range from a sample ``C×H×W`` (or ``C×N``) over its valid pixels."""
    values = sample[:, valid.astype(bool)]
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (0.0, 1.0)
    lo, hi = np.percentile(values, [low, high])
    if hi <= lo:
        hi = lo + 1.0
    return (float(lo), float(hi))


def to_uint8(data: np.ndarray, scale_range: tuple[float, float]) -> np.ndarray:
    """Map values (any layout, e.g. ``C×H×W``) linearly from ``scale_range`` onto uint8."""
    if data.dtype == np.uint8 and scale_range == (0.0, 255.0):
        return data
    lo, hi = scale_range
    scaled = (data.astype(np.float32) - lo) * (255.0 / (hi - lo))
    np.nan_to_num(scaled, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
    np.clip(scaled, 0.0, 255.0, out=scaled)
    return scaled.astype(np.uint8)
