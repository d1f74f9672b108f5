"""Windowed reads (rasterio): a planned tile → the model's uint8 ``C×H×W`` plus a valid mask.

Nothing here knows of Ray; the read stage calls :func:`read_tiles` once per chunk.
"""

from __future__ import annotations

import math

import numpy as np
from rasterio.windows import Window

from pipeline.ops.grid import Resample
from pipeline.ops.tiles import to_uint8

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
    resample: Resample | None = None,
) -> None:
    """Read one tile's window (``Tile.window``) from an open rasterio dataset into buffers.

    ``image`` is uint8 ``C×H×W`` and ``valid`` uint8 ``H×W``: a slot of the batch, so there is
    no per-tile array and no copy into the batch; they need not be zeroed, every pixel is
    written. ``valid`` is 1 where every selected band has data (nodata values, internal masks
    and alpha bands all count); invalid pixels are 0 in ``image``, and so is the padding past
    the edge of a raster smaller than a tile. A palette image (``palette``: a 256×3 colour
    table) is expanded to RGB through it. With ``resample``, ``window`` is in the resampled
    read grid (``RasterInfo.resample``) and GDAL resamples the matching scene window on read.
    """
    from rasterio.enums import MaskFlags

    col_off, row_off = int(window.col_off), int(window.row_off)
    grid = resample or dataset  # both have the width and height that windows are in
    grid_w, grid_h = grid.width, grid.height
    read_w = min(int(window.width), grid_w - col_off)
    read_h = min(int(window.height), grid_h - row_off)
    inside = Window(col_off, row_off, read_w, read_h)
    shape = (len(bands), read_h, read_w) if resample else None  # None: as the window is
    sampling = _sampling(resample, palette)
    if resample is not None:
        inside = Window(*resample.scene_window(col_off, row_off, read_w, read_h))
    if (read_h, read_w) != valid.shape:
        image[:], valid[:] = 0, 0
    target = image[:, :read_h, :read_w]
    dtype = dataset.dtypes[bands[0] - 1]
    raw = None
    if dtype == "uint8" and palette is None and scale_range == (0.0, 255.0):
        # Band-first, as GDAL keeps its cached blocks: it copies whole rows (a pixel-
        # interleaved H×W×C buffer took a strided copy per pixel, 20 % of the read's time).
        dataset.read(bands, window=inside, out=target, **sampling)
    else:
        raw = dataset.read(bands, window=inside, out_shape=shape, **sampling)
        target[:] = palette.T[:, raw[0]] if palette is not None else to_uint8(raw, scale_range)
    inner = valid[:read_h, :read_w]
    masked = not all(dataset.mask_flag_enums[b - 1] == [MaskFlags.all_valid] for b in bands)
    floating = raw is not None and np.issubdtype(raw.dtype, np.floating)
    # No nodata, mask or alpha band: every pixel is valid, and no mask is read.
    if masked:  # nearest: a resampled pixel is valid where the scene pixel under it is
        inner[:] = np.all(dataset.read_masks(bands, window=inside, out_shape=shape) > 0, axis=0)
    else:
        inner[:] = 1
    if floating:
        inner &= np.all(np.isfinite(raw), axis=0)
    if (masked or floating) and not inner.all():
        target[:, inner == 0] = 0


def _sampling(resample: Resample | None, palette: np.ndarray | None) -> dict:
    """rasterio's ``resampling`` argument for a resampled read (none for a plain one)."""
    if resample is None:
        return {}
    from rasterio.enums import Resampling

    # Palette indexes are categories: averaging two of them is a third, unrelated colour.
    method = Resampling.nearest if palette is not None else Resampling[resample.method]
    return {"resampling": method}


def read_tile(
    dataset: object,
    window: Window,
    bands: list[int],
    scale_range: tuple[float, float],
    palette: np.ndarray | None = None,
    resample: Resample | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`read_tile_into` fresh buffers: ``(image C×H×W uint8, valid H×W uint8)``."""
    image = np.empty((3, int(window.height), int(window.width)), dtype=np.uint8)
    valid = np.empty((int(window.height), int(window.width)), dtype=np.uint8)
    read_tile_into(dataset, window, bands, scale_range, palette, image, valid, resample)
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
    resample: Resample | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read ``windows`` into ``(images N×3×H×W, valid N×H×W)`` within ``timeout_s``.

    One open dataset (kept open for the scene's next chunks on this worker) serves them all.
    ``resample``: the windows are in the scene's resampled read grid (``RasterInfo.resample``).

    Raises:
        TimeoutError: the reads took longer (``tiling.read_timeout_s``); the dataset they
            were using is dropped from this process's open datasets, still in use by the
            abandoned read.
    """
    import time

    from pipeline.io.deadline import call_with_deadline
    from pipeline.io.rasters import forget_shared_raster, open_shared_raster

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
                    dataset,
                    window,
                    bands,
                    scale_range,
                    palette,
                    images[position],
                    valid[position],
                    resample,
                )
        return images, valid

    try:
        return call_with_deadline(read_all, timeout_s, f"reading {len(windows)} tile(s)")
    except TimeoutError:
        _TIMED_OUT[uri] = time.monotonic()
        forget_shared_raster(uri)
        raise
