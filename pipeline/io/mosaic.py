"""Mosaic inputs: adjacent rasters in one CRS and resolution read as one scene.

A GDAL VRT is the scene: an XML file naming each member and where it lies in the whole, so
tiles span file boundaries and nothing is copied. Members are read by GDAL through the VRT
(lazily: each one only when a window touches it), so they must be where GDAL reads itself:
local files, ``s3://``, ``gs://``, ``http(s)://``, ``az://``.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from rasterio.enums import ColorInterp
from rasterio.errors import RasterioError

# Members' headers are read this many at a time (each is a request on object storage).
HEADER_CONCURRENCY = 32
# Members whose origins are off the first member's pixel grid by more than this (in pixels),
# or whose pixel size differs by more than this fraction, are not on one grid.
GRID_TOLERANCE = 1e-3

_VSI = {"s3": "/vsis3/", "gs": "/vsigs/", "gcs": "/vsigs/", "az": "/vsiaz/", "azure": "/vsiaz/"}
_GDAL_TYPES = {
    "uint8": "Byte",
    "int8": "Int8",
    "uint16": "UInt16",
    "int16": "Int16",
    "uint32": "UInt32",
    "int32": "Int32",
    "float32": "Float32",
    "float64": "Float64",
}


class MosaicError(ValueError):
    """The members cannot be one scene; the message names the odd file and why."""


@dataclass(frozen=True)
class Member:
    """What the VRT needs of one member raster."""

    uri: str
    width: int
    height: int
    count: int
    dtype: str
    crs_wkt: str | None
    transform: tuple[float, float, float, float, float, float]
    block: tuple[int, int]  # (height, width)
    nodata: float | None
    colors: tuple[str, ...]


def gdal_path(uri: str) -> str:
    """The path GDAL opens ``uri`` by inside a VRT (its /vsi* handlers for object storage)."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme == "file":
        import os

        return os.path.abspath(rest if sep else uri)
    if scheme in ("http", "https"):
        return f"/vsicurl/{uri}"
    if scheme in _VSI:
        return _VSI[scheme] + rest
    raise MosaicError(
        f"{uri}: a mosaic's members must be where GDAL reads them itself (local, s3://, "
        "gs://, http(s)://, az://)"
    )


def read_member(uri: str) -> Member:
    from pipeline.io.rasters import open_raster

    try:
        with open_raster(uri) as dataset:
            return Member(
                uri=uri,
                width=dataset.width,
                height=dataset.height,
                count=dataset.count,
                dtype=dataset.dtypes[0],
                crs_wkt=dataset.crs.to_wkt() if dataset.crs else None,
                transform=tuple(dataset.transform)[:6],
                block=tuple(dataset.block_shapes[0]),
                nodata=dataset.nodata,
                colors=tuple(c.name for c in dataset.colorinterp),
            )
    except (RasterioError, OSError) as error:
        raise MosaicError(f"{uri}: cannot be read as a raster: {error}") from None


def read_members(uris: list[str]) -> list[Member]:
    with ThreadPoolExecutor(HEADER_CONCURRENCY, thread_name_prefix="georetina mosaic") as pool:
        return list(pool.map(read_member, uris))


def check_one_grid(members: list[Member]) -> None:
    """Raise :class:`MosaicError` naming the first member not in the first one's CRS, pixel
    size, band count and dtype, or off its pixel grid."""
    from pyproj import CRS

    first = members[0]
    if first.crs_wkt is None:
        raise MosaicError(f"{first.uri}: has no CRS; a mosaic's members must be georeferenced")
    a, b, _, d, e, _ = first.transform
    if b or d:
        raise MosaicError(f"{first.uri}: is rotated; a mosaic's members must be north-up")
    crs = CRS.from_wkt(first.crs_wkt)
    for member in members[1:]:
        if member.crs_wkt is None or CRS.from_wkt(member.crs_wkt) != crs:
            theirs = CRS.from_wkt(member.crs_wkt).to_string() if member.crs_wkt else "no CRS"
            raise MosaicError(
                f"{member.uri}: its CRS is {theirs}, the mosaic's ({first.uri}) "
                f"{crs.to_string()}; warp it to one CRS first"
            )
        ma, mb, mc, md, me, mf = member.transform
        if mb or md or not (_close(ma, a) and _close(me, e)):
            raise MosaicError(
                f"{member.uri}: its pixel is {ma:g} x {me:g}, the mosaic's ({first.uri}) "
                f"{a:g} x {e:g}"
            )
        col, row = (mc - first.transform[2]) / a, (mf - first.transform[5]) / e
        if abs(col - round(col)) > GRID_TOLERANCE or abs(row - round(row)) > GRID_TOLERANCE:
            raise MosaicError(
                f"{member.uri}: lies off the pixel grid of {first.uri} (by {col % 1:.3f}, "
                f"{row % 1:.3f} px)"
            )
        if (member.count, member.dtype) != (first.count, first.dtype):
            raise MosaicError(
                f"{member.uri}: has {member.count} band(s) of {member.dtype}, the mosaic's "
                f"({first.uri}) {first.count} of {first.dtype}"
            )
    by_nodata: dict[object, Member] = {}
    for member in members:
        if member.nodata is not None:
            # NaN is one nodata value however many members have it (NaN != NaN).
            by_nodata.setdefault("nan" if math.isnan(member.nodata) else member.nodata, member)
    if len(by_nodata) > 1:
        seen, odd = list(by_nodata.values())[:2]
        raise MosaicError(f"{odd.uri}: its nodata is {odd.nodata:g}, {seen.uri}'s {seen.nodata:g}")


def _any_overlap(places: list[tuple[int, int]], members: list[Member]) -> bool:
    """Whether any two members' pixel rectangles (at ``places``) share a pixel."""
    boxes = [(c, r, c + m.width, r + m.height) for (c, r), m in zip(places, members, strict=True)]
    return any(
        a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
        for i, a in enumerate(boxes)
        for b in boxes[i + 1 :]
    )


def _close(x: float, y: float) -> bool:
    return math.isclose(x, y, rel_tol=GRID_TOLERANCE)


def mosaic_vrt(members: list[Member]) -> str:
    """The VRT XML of the members on one grid (:func:`check_one_grid` first).

    What no member covers is nodata, never black pixels the model would see as ground: the
    members' nodata value where they have one (the VRT fills its gaps with it), else an
    alpha band that is opaque where a member lies (as ``gdalbuildvrt -addalpha`` makes it).
    Members' internal masks (``.msk``, per-dataset masks) are not carried.
    """
    first = members[0]
    a, _, c0, _, e, f0 = first.transform
    places = [(round((m.transform[2] - c0) / a), round((m.transform[5] - f0) / e)) for m in members]
    left, top = min(p[0] for p in places), min(p[1] for p in places)
    places = [(col - left, row - top) for col, row in places]
    width = max(col + m.width for (col, _), m in zip(places, members, strict=True))
    height = max(row + m.height for (_, row), m in zip(places, members, strict=True))
    covered = sum(m.width * m.height for m in members)
    nodata = next((m.nodata for m in members if m.nodata is not None), None)
    # Overlapping members (buffered tiles) can cover the area's size and still leave gaps.
    alpha = nodata is None and (covered < width * height or _any_overlap(places, members))
    origin = (c0 + left * a, f0 + top * e)
    gdal_type = _GDAL_TYPES.get(first.dtype)
    if gdal_type is None:
        raise MosaicError(f"{first.uri}: a mosaic of {first.dtype} pixels is not supported")
    lines = [
        f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">',
        f'  <SRS dataAxisToSRSAxisMapping="1,2">{escape(first.crs_wkt or "")}</SRS>',
        f"  <GeoTransform>{origin[0]!r}, {a!r}, 0.0, {origin[1]!r}, 0.0, {e!r}</GeoTransform>",
    ]
    for band in range(1, first.count + 1):
        lines.append(f'  <VRTRasterBand dataType="{gdal_type}" band="{band}">')
        lines.append(f"    <ColorInterp>{_color(first.colors[band - 1])}</ColorInterp>")
        if nodata is not None:
            lines.append(f"    <NoDataValue>{nodata!r}</NoDataValue>")
        lines += [_source(m, band, gdal_type, p) for m, p in zip(members, places, strict=True)]
        lines.append("  </VRTRasterBand>")
    if alpha:  # 255 where a member lies: its band 1 scaled by 0, offset by 255
        lines.append(f'  <VRTRasterBand dataType="Byte" band="{first.count + 1}">')
        lines.append("    <ColorInterp>Alpha</ColorInterp>")
        lines += [
            _source(m, 1, gdal_type, p, opaque=True) for m, p in zip(members, places, strict=True)
        ]
        lines.append("  </VRTRasterBand>")
    lines.append("</VRTDataset>")
    return "\n".join(lines) + "\n"


def _color(name: str) -> str:
    """rasterio's colour name (``red``) as a VRT spells it (``Red``)."""
    return name.capitalize() if name in ColorInterp.__members__ else "Undefined"


def _source(
    member: Member, band: int, gdal_type: str, place: tuple[int, int], opaque: bool = False
) -> str:
    """One member's source; its properties let GDAL open it only when a read needs it.
    ``opaque``: every pixel 255 (an alpha band's source)."""
    block_h, block_w = member.block
    size = f'xSize="{member.width}" ySize="{member.height}"'
    kind = "ComplexSource" if opaque else "SimpleSource"
    scale = "<ScaleOffset>255</ScaleOffset><ScaleRatio>0</ScaleRatio>" if opaque else ""
    return (
        f"    <{kind}>"
        f'<SourceFilename relativeToVRT="0">{escape(gdal_path(member.uri))}</SourceFilename>'
        f"<SourceBand>{band}</SourceBand>"
        f'<SourceProperties RasterXSize="{member.width}" RasterYSize="{member.height}" '
        f'DataType={quoteattr(gdal_type)} BlockXSize="{block_w}" BlockYSize="{block_h}"/>'
        f'<SrcRect xOff="0" yOff="0" {size}/>'
        f'<DstRect xOff="{place[0]}" yOff="{place[1]}" {size}/>'
        f"{scale}</{kind}>"
    )


def build_mosaic(uris: list[str]) -> str:
    """Read the members' headers, check they make one grid, and return the VRT's XML."""
    if not uris:
        raise MosaicError("matches no raster")
    members = read_members(uris)
    check_one_grid(members)
    return mosaic_vrt(members)
