"""Opening rasters anywhere GDAL or fsspec reaches, and the pre-flight check of a scene.

GDAL settings that matter for COGs on object storage live here, in one place.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import rasterio
from rasterio.enums import ColorInterp
from rasterio.errors import RasterioError

from pipeline.errors import SceneError
from pipeline.ops.grid import Resample, grid_transform, plan_resample
from pipeline.ops.tiles import default_scale_range, percentile_range

# Read COGs with few, large range requests.
GDAL_OPTIONS: dict[str, str | int] = {
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MULTIPLEX": "YES",
    "GDAL_HTTP_MAX_RETRY": 5,
    "GDAL_HTTP_RETRY_DELAY": 1,
    # A connection that stalls (a server that accepts and never answers) is dropped after a
    # minute instead of holding a read forever; tiling.read_timeout_s fails the scene sooner.
    "GDAL_HTTP_CONNECTTIMEOUT": 30,
    "GDAL_HTTP_LOW_SPEED_TIME": 60,
    "GDAL_HTTP_LOW_SPEED_LIMIT": 1,
    # No VSI_CACHE here: GDAL's curl handlers cache their own ranges, and on local files the
    # extra layer cost 20-25 % of the read rate (bench/tiling.py). fsspec openers get it.
    # In bytes (rasterio; a bare 256 meant 256 bytes: no cache). A read task walks its chunk
    # of tiles in rows; neighbours share a column of blocks, and on rasters up to ~8k px wide
    # the next row of tiles shares a row of blocks (4096 px, RGB: 6 MB). A row of blocks of a
    # 32k raster (48 MB) is seldom reused: the chunk below runs later, often on another worker.
    # 64 MB a worker bought no speed and cost 150 MB of the bench's 32k job.
    "GDAL_CACHEMAX": 16 * 2**20,
}

# Remote rasters only: never list a prefix (an archive's folder can hold 100k objects) nor
# probe for sidecars. Local files keep theirs: a .msk mask or .ovr overviews beside a GeoTIFF
# are part of it (EMPTY_DIR everywhere had GDAL ignore them).
REMOTE_GDAL_OPTIONS: dict[str, str | int] = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF,.vrt,.jp2",
}

# Schemes GDAL reads itself (its /vsi* handlers, range requests in C); others go through fsspec.
_GDAL_SCHEMES = {"s3", "gs", "http", "https", "az", "file"}
# fsspec's other spellings of those, which rasterio would hand GDAL as plain (unreadable) paths.
_GDAL_SPELLING = {"gcs": "gs", "azure": "az"}

# Percentiles for the default scaling of non-uint8 imagery come from a sample this large: an
# overview about this many pixels a side, or, in a raster without overviews, this many
# blocks down and across (8 x 8 blocks of 512 px: 16 M pixels).
_SAMPLE_SIDE = 1024
_SAMPLE_GRID = 8


def _scheme(uri: str) -> tuple[str, str]:
    """``(scheme, uri)``, with fsspec's other spellings of GDAL's schemes made GDAL's own."""
    scheme, _, rest = uri.partition("://") if "://" in uri else ("file", "", uri)
    if scheme in _GDAL_SPELLING:
        scheme = _GDAL_SPELLING[scheme]
        return scheme, f"{scheme}://{rest}"
    return scheme, uri


def gdal_options(uri: str) -> dict[str, str | int]:
    """The GDAL settings for reading ``uri``: every raster's, and remote ones' own."""
    local = _scheme(uri)[0] == "file"
    return GDAL_OPTIONS if local else {**GDAL_OPTIONS, **REMOTE_GDAL_OPTIONS}


@contextlib.contextmanager
def open_raster(uri: str) -> Iterator[rasterio.DatasetReader]:
    """Open a raster for reading, by GDAL's own handlers where it has them."""
    with rasterio.Env(**gdal_options(uri)), _open(uri) as dataset:
        yield dataset


def _open(uri: str) -> rasterio.DatasetReader:
    scheme, gdal_uri = _scheme(uri)
    if scheme in _GDAL_SCHEMES:
        return rasterio.open(gdal_uri)
    import fsspec

    # Every read of an opener is a Python call: VSI_CACHE (set when the handle opens) turns
    # GDAL's many small header and block reads into fewer, larger ones.
    with rasterio.Env(VSI_CACHE="TRUE"):
        return rasterio.open(uri, opener=fsspec.open)


# Datasets kept open by this process, most recently used last. Read tasks of one scene that
# land on the same worker then share GDAL's block cache: overlapping tiles cut through the
# same blocks, and reopening would decode each shared block again (measured: 0.48 -> 0.7+
# of a bare rasterio loop's speed on a 4096^2 COG).
_OPEN_DATASETS: OrderedDict[str, rasterio.DatasetReader] = OrderedDict()
_MAX_OPEN_DATASETS = 4


@contextlib.contextmanager
def open_shared_raster(uri: str) -> Iterator[rasterio.DatasetReader]:
    """Like :func:`open_raster`, but the dataset stays open for this process's next reads."""
    with rasterio.Env(**gdal_options(uri)):
        dataset = _OPEN_DATASETS.pop(uri, None)
        if dataset is None or dataset.closed:
            dataset = _open(uri)
        _OPEN_DATASETS[uri] = dataset
        while len(_OPEN_DATASETS) > _MAX_OPEN_DATASETS:
            _OPEN_DATASETS.popitem(last=False)[1].close()
        yield dataset


def forget_shared_raster(uri: str) -> None:
    """Stop sharing ``uri``'s dataset without closing it (a timed-out read still holds it)."""
    _OPEN_DATASETS.pop(uri, None)


def close_shared_rasters() -> None:
    """Close every dataset :func:`open_shared_raster` kept open (drops their cached blocks)."""
    while _OPEN_DATASETS:
        _OPEN_DATASETS.popitem()[1].close()


@dataclass(frozen=True)
class RasterInfo:
    """What the pre-flight learns about a scene; everything later stages need from it.

    ``width``, ``height`` and ``transform`` are the grid the scene is tiled in: its own, or,
    when ``resample`` is set (``model.resolution_m``), the resampled read grid over the same
    extent. Tile plans, reads and the merge all work in that grid; ``resample`` maps boxes
    back to the scene's own pixels.
    """

    width: int
    height: int
    count: int
    dtype: str
    crs_wkt: str | None  # None: pixel coordinates only (tiling.allow_pixel_coordinates)
    crs_name: str | None
    transform: tuple[float, float, float, float, float, float]
    bands: tuple[int, ...]
    scale_range: tuple[float, float]
    acquired_at: datetime | None
    palette: tuple[int, ...] | None = None  # 256 x RGB, flattened, for palette images
    resample: Resample | None = None  # None: read at the scene's own resolution

    def palette_table(self) -> np.ndarray | None:
        if self.palette is None:
            return None
        return np.asarray(self.palette, dtype=np.uint8).reshape(256, 3)

    def scene_pixels(self, boxes: np.ndarray) -> np.ndarray:
        """Boxes in the tiled grid's pixels → the scene's own pixels."""
        if self.resample is None:
            return boxes
        return self.resample.to_scene_pixels(boxes)


def _default_bands(color_bands: list[int]) -> tuple[int, ...]:
    """The first three bands that are not alpha; a single band is repeated."""
    if len(color_bands) >= 3:
        return tuple(color_bands[:3])
    if len(color_bands) == 1:
        return (color_bands[0],) * 3
    raise ValueError(f"has {len(color_bands)} colour bands; name three in tiling.bands")


def _palette(dataset: rasterio.DatasetReader) -> tuple[int, ...]:
    table = np.zeros((256, 3), dtype=np.uint8)
    for index, rgba in dataset.colormap(1).items():
        if 0 <= index < 256:
            table[index] = rgba[:3]
    return tuple(int(v) for v in table.ravel())


def _acquired_at(tags: dict[str, str]) -> datetime | None:
    stamp = tags.get("TIFFTAG_DATETIME") or tags.get("ACQUISITION_DATETIME")
    if not stamp:
        return None
    for fmt in ("%Y:%m:%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"):
        try:
            return datetime.strptime(stamp.rstrip("Z"), fmt)
        except ValueError:
            continue
    return None


def inspect_raster(
    scene_id: str,
    uri: str,
    bands: list[int] | None,
    scale_range: tuple[float, float] | None,
    allow_pixel_coordinates: bool = False,
    resolution: tuple[float, float] | None = None,
) -> RasterInfo:
    """Open a scene, check it can be processed, and read its last block.

    Reading the last block makes a truncated file fail here, in seconds, not hours later.
    A scene with no CRS or geotransform fails, unless ``allow_pixel_coordinates``.
    ``resolution``: ``(metres per pixel, tolerance)`` to read the scene at
    (``model.resolution_m``); a scene in pixel coordinates only is read as it is.

    Raises:
        SceneError: naming the scene and what is wrong with it.
    """
    try:
        with open_raster(uri) as dataset:
            if dataset.transform.is_identity and (dataset.gcps[0] or dataset.rpcs):
                raise SceneError(
                    scene_id,
                    "is georeferenced only by GCPs or RPCs; warp it to a regular grid "
                    "first (e.g. gdalwarp -t_srs EPSG:32633 in.tif out.tif)",
                )
            missing = _missing_georeference(dataset)
            if missing and not allow_pixel_coordinates:
                raise SceneError(
                    scene_id,
                    f"{missing}; georeference it, or set tiling.allow_pixel_coordinates "
                    "to detect in pixel coordinates only",
                )
            interp = dataset.colorinterp
            alpha = [i + 1 for i, c in enumerate(interp) if c == ColorInterp.alpha]
            if interp[0] == ColorInterp.palette:
                return _info(dataset, (1, 1, 1), (0.0, 255.0), _palette(dataset), resolution)
            color_bands = [b for b in range(1, dataset.count + 1) if b not in alpha]
            try:
                chosen = tuple(bands) if bands else _default_bands(color_bands)
            except ValueError as error:
                raise SceneError(scene_id, str(error)) from None
            bad = [band for band in chosen if not 1 <= band <= dataset.count]
            if bad:
                raise SceneError(
                    scene_id, f"has {dataset.count} band(s); tiling.bands asks for {bad}"
                )
            if any(band in alpha for band in chosen):
                raise SceneError(
                    scene_id, f"band(s) {alpha} are alpha: used as the mask, not as a channel"
                )
            if len(chosen) != 3:
                raise SceneError(scene_id, f"the model takes 3 bands, got {len(chosen)}")
            scale = scale_range or default_scale_range(dataset.dtypes[0])
            if scale is None:
                scale = _sample_range(dataset, list(chosen))
            return _info(dataset, chosen, scale, None, resolution)
    except SceneError:
        raise
    except GroundSizeError as error:
        raise SceneError(scene_id, str(error)) from None
    except (RasterioError, OSError) as error:
        raise SceneError(scene_id, f"cannot be read as a raster ({uri}): {error}") from None


def inspect_raster_within(
    scene_id: str,
    uri: str,
    bands: list[int] | None,
    scale_range: tuple[float, float] | None,
    timeout_s: float,
    allow_pixel_coordinates: bool = False,
    resolution: tuple[float, float] | None = None,
) -> RasterInfo:
    """:func:`inspect_raster`, failing the scene when it takes longer than ``timeout_s``."""
    from pipeline.io.deadline import call_with_deadline

    def inspect() -> RasterInfo:
        return inspect_raster(
            scene_id, uri, bands, scale_range, allow_pixel_coordinates, resolution
        )

    try:
        return call_with_deadline(inspect, timeout_s, "pre-flight")
    except TimeoutError as error:
        raise SceneError(
            scene_id,
            f"read timed out: {error} ({uri}); the storage does not answer "
            "(raise tiling.read_timeout_s if it is only slow)",
        ) from None


def _info(
    dataset: rasterio.DatasetReader,
    bands: tuple[int, ...],
    scale: tuple[float, float],
    palette: tuple[int, ...] | None,
    resolution: tuple[float, float] | None,
) -> RasterInfo:
    _read_last_block(dataset)
    georeferenced = _missing_georeference(dataset) is None
    transform = tuple(dataset.transform)[:6]
    resample = None
    if resolution is not None and georeferenced:
        size = ground_pixel_size(dataset.crs.to_wkt(), transform, dataset.width, dataset.height)
        resample = plan_resample(dataset.width, dataset.height, size, *resolution)
    return RasterInfo(
        width=resample.width if resample else dataset.width,
        height=resample.height if resample else dataset.height,
        count=dataset.count,
        dtype=dataset.dtypes[0],
        crs_wkt=dataset.crs.to_wkt() if georeferenced else None,
        crs_name=dataset.crs.to_string() if georeferenced else None,
        transform=grid_transform(transform, resample) if resample else transform,
        bands=bands,
        scale_range=(float(scale[0]), float(scale[1])),
        acquired_at=_acquired_at(dataset.tags()),
        palette=palette,
        resample=resample,
    )


def ground_pixel_size(
    crs_wkt: str, transform: tuple[float, ...], width: int, height: int
) -> tuple[float, float]:
    """Metres on the ground (geodesic, on the CRS's ellipsoid) that one pixel spans along a
    row and down a column, at the scene's centre: right for lon/lat rasters, for projected
    ones in feet, and for projections that stretch (Web Mercator away from the equator)."""
    from affine import Affine
    from pyproj import CRS, Transformer

    crs = CRS.from_wkt(crs_wkt)
    unmeasurable = GroundSizeError(
        f"model.resolution_m is set, but a pixel's size on the ground cannot be measured in "
        f"its CRS ({crs.name}): leave resolution_m out for such scenes"
    )
    if crs.geodetic_crs is None:  # an engineering or local CRS: no ellipsoid to measure on
        raise unmeasurable
    affine = Affine(*transform)
    cx, cy = width / 2, height / 2
    points = [affine @ (cx, cy), affine @ (cx + 1, cy), affine @ (cx, cy + 1)]
    to_lonlat = Transformer.from_crs(crs, crs.geodetic_crs, always_xy=True)
    lons, lats = to_lonlat.transform([p[0] for p in points], [p[1] for p in points])
    geod = crs.get_geod()
    _, _, along = geod.inv(lons[0], lats[0], lons[1], lats[1])
    _, _, down = geod.inv(lons[0], lats[0], lons[2], lats[2])
    if not (math.isfinite(along) and math.isfinite(down) and along > 0 and down > 0):
        raise unmeasurable  # the centre lies outside the projection's domain
    return float(along), float(down)


class GroundSizeError(ValueError):
    """A pixel's ground size cannot be measured (no ellipsoid, or outside the projection)."""


def _missing_georeference(dataset: rasterio.DatasetReader) -> str | None:
    """What keeps the scene's pixels off the map, or None when it is georeferenced."""
    if dataset.crs is None:
        return "has no CRS"
    if dataset.transform.is_identity:
        return "has no geotransform (pixel coordinates only)"
    return None


def _read_last_block(dataset: rasterio.DatasetReader) -> None:
    from rasterio.windows import Window

    block_h, block_w = dataset.block_shapes[0]
    col = (dataset.width - 1) // block_w * block_w
    row = (dataset.height - 1) // block_h * block_h
    window = Window(col, row, min(block_w, dataset.width - col), min(block_h, dataset.height - row))
    dataset.read(1, window=window)


def _sample_range(dataset: rasterio.DatasetReader, bands: list[int]) -> tuple[float, float]:
    """2–98 % range of the scene's valid pixels, never from a read of the full raster.

    With overviews, a decimated read (GDAL serves it from the overview nearest
    ``_SAMPLE_SIDE`` px a side). Without, a decimated read would decode every block, so a
    grid of blocks spread over the scene stands in for it.
    """
    factor = max(1, max(dataset.width, dataset.height) // _SAMPLE_SIDE)
    if factor > 1 and not dataset.overviews(bands[0]):
        return _sample_blocks(dataset, bands)
    shape = (len(bands), max(1, dataset.height // factor), max(1, dataset.width // factor))
    sample = dataset.read(bands, out_shape=shape)
    valid = np.all(dataset.read_masks(bands, out_shape=shape) > 0, axis=0)
    return percentile_range(sample, valid)


def _sample_blocks(dataset: rasterio.DatasetReader, bands: list[int]) -> tuple[float, float]:
    """2–98 % range from up to ``_SAMPLE_GRID``² internal blocks, evenly spread."""
    block_h, block_w = dataset.block_shapes[0]
    rows = np.unique(np.linspace(0, (dataset.height - 1) // block_h, _SAMPLE_GRID).round())
    cols = np.unique(np.linspace(0, (dataset.width - 1) // block_w, _SAMPLE_GRID).round())
    samples, valid = [], []
    for row in rows.astype(int):
        for col in cols.astype(int):
            window = dataset.block_window(bands[0], row, col)  # clipped at the edges
            samples.append(dataset.read(bands, window=window).reshape(len(bands), -1))
            masks = dataset.read_masks(bands, window=window)
            valid.append(np.all(masks > 0, axis=0).reshape(-1))
    return percentile_range(np.concatenate(samples, axis=1), np.concatenate(valid))
