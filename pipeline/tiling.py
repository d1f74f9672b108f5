"""Tile plan (pure) and windowed reading (rasterio).

The plan is plain integer math over the raster's shape; reading turns a planned tile into the
model's uint8 ``C×H×W`` input plus a valid-pixel mask. Neither knows anything of Ray.
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

    The window is always ``tile_size`` square so batches stack; it reaches past the raster
    only when the raster is smaller than one tile (the read pads it). The cores of a plan
    partition the raster: every pixel belongs to exactly one core.
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


def axis_offsets(size: int, tile_size: int, overlap: int) -> list[int]:
    """Start offsets of tiles along one axis of ``size`` pixels.

    With stride ``s = tile_size - overlap``, ``n = ceil((size - tile_size) / s) + 1`` tiles
    cover the axis (the ceiling adds the last, partial step). The last tile is moved inward
    to ``size - tile_size`` instead of hanging over the edge, so it overlaps its neighbour by
    more than ``overlap`` but stays full size. An axis shorter than a tile gets one tile at 0.

    Offsets start at 0 and step by the stride, so when tile size and overlap are whole
    multiples of the raster's block size (512 and 0, 1024 and 512, ...) every window but the
    last starts on a block boundary: alignment comes free and no extra tiles are paid for it.
    """
    if size <= tile_size:
        return [0]
    stride = tile_size - overlap
    count = math.ceil((size - tile_size) / stride) + 1
    return [min(index * stride, size - tile_size) for index in range(count)]


def axis_cores(offsets: list[int], size: int, tile_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each tile's core along one axis: split every overlap in the middle."""
    bounds = [0]
    for left, right in zip(offsets, offsets[1:], strict=False):
        bounds.append((right + left + tile_size) // 2)
    bounds.append(size)
    return list(zip(bounds, bounds[1:], strict=False))


def plan_tiles(width: int, height: int, tile_size: int, overlap: int) -> list[Tile]:
    """Tiles covering a ``width × height`` raster, row-major.

    Raises:
        ValueError: if the raster is empty or the overlap is not below the tile size.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"raster has no pixels: {width}x{height}")
    if not 0 <= overlap < tile_size:
        raise ValueError(f"overlap {overlap} must be in [0, tile_size={tile_size})")
    col_offsets = axis_offsets(width, tile_size, overlap)
    row_offsets = axis_offsets(height, tile_size, overlap)
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


# --------------------------------------------------------------------------------------------
# Reading (rasterio)
# --------------------------------------------------------------------------------------------


def read_tile_into(
    dataset: object,
    window: Window,
    bands: list[int],
    scale_range: tuple[float, float],
    palette: np.ndarray | None,
    image: np.ndarray,
    valid: np.ndarray,
) -> None:
    """Read one tile's window (``Tile.window``) from an open rasterio dataset into buffers.

    ``image`` is uint8 ``C×H×W`` and ``valid`` uint8 ``H×W``: a slot of the batch, so there is
    no per-tile array and no copy into the batch; they need not be zeroed, every pixel is
    written. ``valid`` is 1 where every selected band has data (nodata values, internal masks
    and alpha bands all count); invalid pixels are 0 in ``image``, and so is the padding past
    the edge of a raster smaller than a tile. A palette image (``palette``: a 256×3 colour
    table) is expanded to RGB through it.
    """
    from rasterio.enums import MaskFlags

    col_off, row_off = int(window.col_off), int(window.row_off)
    read_w = min(int(window.width), dataset.width - col_off)
    read_h = min(int(window.height), dataset.height - row_off)
    inside = Window(col_off, row_off, read_w, read_h)
    if (read_h, read_w) != valid.shape:
        image[:], valid[:] = 0, 0
    target = image[:, :read_h, :read_w]
    dtype = dataset.dtypes[bands[0] - 1]
    raw = None
    if dtype == "uint8" and palette is None and scale_range == (0.0, 255.0):
        # Band-first, as GDAL keeps its cached blocks: it copies whole rows (a pixel-
        # interleaved H×W×C buffer took a strided copy per pixel, 20 % of the read's time).
        dataset.read(bands, window=inside, out=target)
    else:
        raw = dataset.read(bands, window=inside)
        target[:] = palette.T[:, raw[0]] if palette is not None else to_uint8(raw, scale_range)
    inner = valid[:read_h, :read_w]
    masked = not all(dataset.mask_flag_enums[b - 1] == [MaskFlags.all_valid] for b in bands)
    floating = raw is not None and np.issubdtype(raw.dtype, np.floating)
    # No nodata, mask or alpha band: every pixel is valid, and no mask is read.
    inner[:] = np.all(dataset.read_masks(bands, window=inside) > 0, axis=0) if masked else 1
    if floating:
        inner &= np.all(np.isfinite(raw), axis=0)
    if (masked or floating) and not inner.all():
        target[:, inner == 0] = 0


def read_tile(
    dataset: object,
    window: Window,
    bands: list[int],
    scale_range: tuple[float, float],
    palette: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`read_tile_into` fresh buffers: ``(image C×H×W uint8, valid H×W uint8)``."""
    image = np.empty((3, int(window.height), int(window.width)), dtype=np.uint8)
    valid = np.empty((int(window.height), int(window.width)), dtype=np.uint8)
    read_tile_into(dataset, window, bands, scale_range, palette, image, valid)
    return image, valid


# Scenes whose read timed out in this process (URI -> when): their next chunks fail at once
# instead of each waiting out the timeout again on the same hung server. Forgotten after
# _TIMED_OUT_MEMORY_S, so a worker that lives on (the same session) tries again later.
_TIMED_OUT: dict[str, float] = {}
_TIMED_OUT_MEMORY_S = 600.0


def read_tiles(
    uri: str,
    windows: list[Window],
    bands: list[int],
    scale_range: tuple[float, float],
    palette: np.ndarray | None,
    tile_size: int,
    timeout_s: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Read ``windows`` into ``(images N×3×H×W, valid N×H×W)`` within ``timeout_s``.

    One open dataset (kept open for the scene's next chunks on this worker) serves them all.

    Raises:
        TimeoutError: the reads took longer (``tiling.read_timeout_s``); the dataset they
            were using is dropped from this process's open datasets, still in use by the
            abandoned read.
    """
    import time

    from pipeline.deadline import call_with_deadline
    from pipeline.rasters import forget_shared_raster, open_shared_raster

    if time.monotonic() - _TIMED_OUT.get(uri, -math.inf) < _TIMED_OUT_MEMORY_S:
        raise TimeoutError(f"an earlier read of this scene took longer than {timeout_s:g} s")

    # Allocated here, not in the reading thread: a fresh thread's malloc arena hands out fresh
    # pages, and faulting in 16 MB a chunk cost 8 % of the read rate. Not zeroed either: every
    # pixel is written.
    images = np.empty((len(windows), 3, tile_size, tile_size), dtype=np.uint8)
    valid = np.empty((len(windows), tile_size, tile_size), dtype=np.uint8)

    def read_all() -> tuple[np.ndarray, np.ndarray]:
        with open_shared_raster(uri) as dataset:
            for position, window in enumerate(windows):
                read_tile_into(
                    dataset, window, bands, scale_range, palette, images[position], valid[position]
                )
        return images, valid

    try:
        return call_with_deadline(read_all, timeout_s, f"reading {len(windows)} tile(s)")
    except TimeoutError:
        _TIMED_OUT[uri] = time.monotonic()
        forget_shared_raster(uri)
        raise
