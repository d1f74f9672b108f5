"""Detections table: Arrow schema, GeoParquet 1.1 metadata, spatial order, atomic write."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import shapely
from pyproj import CRS

GEOPARQUET_VERSION = "1.1.0"

# shapely type ids to GeoParquet geometry type names (2D).
_TYPE_NAMES = {
    0: "Point",
    1: "LineString",
    3: "Polygon",
    4: "MultiPoint",
    5: "MultiLineString",
    6: "MultiPolygon",
    7: "GeometryCollection",
}

BBOX_TYPE = pa.struct(
    [
        ("xmin", pa.float64()),
        ("ymin", pa.float64()),
        ("xmax", pa.float64()),
        ("ymax", pa.float64()),
    ]
)

SCHEMA = pa.schema(
    [
        ("scene_id", pa.string()),
        ("detection_id", pa.string()),
        ("class_id", pa.int16()),
        ("class_name", pa.string()),
        ("score", pa.float32()),
        ("geometry", pa.binary()),
        ("bbox", BBOX_TYPE),
        ("pixel_xmin", pa.float32()),
        ("pixel_ymin", pa.float32()),
        ("pixel_xmax", pa.float32()),
        ("pixel_ymax", pa.float32()),
        ("scene_crs", pa.string()),
        ("scene_uri", pa.string()),
        ("acquired_at", pa.timestamp("us", tz="UTC")),
        ("stac_item_id", pa.string()),
        ("model_id", pa.string()),
        ("run_id", pa.string()),
    ]
)


def hilbert_index(x: np.ndarray, y: np.ndarray, order: int = 16) -> np.ndarray:
    """Position of integer cells ``0 <= x, y < 2**order`` along a Hilbert curve."""
    side = 1 << order
    x = x.astype(np.int64).copy()
    y = y.astype(np.int64).copy()
    distance = np.zeros(len(x), dtype=np.int64)
    step = side // 2
    while step > 0:
        rx = (x & step) > 0
        ry = (y & step) > 0
        distance += step * step * ((3 * rx.astype(np.int64)) ^ ry.astype(np.int64))
        # Rotate the quadrant so the curve stays continuous.
        flip = ~ry & rx
        x = np.where(flip, side - 1 - x, x)
        y = np.where(flip, side - 1 - y, y)
        swap = ~ry
        x, y = np.where(swap, y, x), np.where(swap, x, y)
        step //= 2
    return distance


def hilbert_order(
    xmin: np.ndarray, ymin: np.ndarray, xmax: np.ndarray, ymax: np.ndarray
) -> np.ndarray:
    """Row order along a Hilbert curve through box centres, so bbox filters skip row groups."""
    if len(xmin) < 2:
        return np.arange(len(xmin))
    cx, cy = (xmin + xmax) / 2, (ymin + ymax) / 2
    span_x = max(float(cx.max() - cx.min()), 1e-12)
    span_y = max(float(cy.max() - cy.min()), 1e-12)
    cells = (1 << 16) - 1
    gx = np.round((cx - cx.min()) / span_x * cells)
    gy = np.round((cy - cy.min()) / span_y * cells)
    return np.argsort(hilbert_index(gx, gy), kind="stable")


def primary_column(geo: dict) -> dict:
    """The primary geometry column's entry of a file's ``geo`` metadata."""
    return geo["columns"][geo.get("primary_column", "geometry")]


def column_crs(column: dict) -> CRS:
    """A geometry column's CRS: its PROJJSON, or lon/lat when it has none (GeoParquet's rule)."""
    crs = column.get("crs")
    return CRS.from_user_input("OGC:CRS84") if crs is None else CRS.from_json_dict(crs)


def geo_metadata(crs_projjson: dict, bbox: list[float], geometry_types: list[str]) -> dict:
    """The ``geo`` key of a GeoParquet 1.1 file with a ``bbox`` covering column.

    An empty file has no extent, so its ``bbox`` is left out (the key is optional).
    """
    meta = {
        "version": GEOPARQUET_VERSION,
        "primary_column": "geometry",
        "columns": {
            "geometry": {
                "encoding": "WKB",
                "geometry_types": geometry_types,
                "crs": crs_projjson,
                "orientation": "counterclockwise",
                "bbox": bbox,
                "covering": {
                    "bbox": {
                        "xmin": ["bbox", "xmin"],
                        "ymin": ["bbox", "ymin"],
                        "xmax": ["bbox", "xmax"],
                        "ymax": ["bbox", "ymax"],
                    }
                },
            }
        },
    }
    if not bbox:
        del meta["columns"]["geometry"]["bbox"]
    return meta


@dataclass(frozen=True)
class SceneRows:
    """One scene's merged detections, ready to become a table (geometry in the output CRS)."""

    scene_id: str
    scene_uri: str
    scene_crs: str | None
    acquired_at: datetime | None
    model_id: str
    run_id: str
    detection_ids: list[str]
    class_ids: np.ndarray
    class_names: list[str]
    scores: np.ndarray
    pixel_boxes: np.ndarray  # (n, 4) scene pixels
    rings: np.ndarray | None  # (n, 5, 2) closed rings in the output CRS; None: pixels only
    stac_item_id: str | None = None


def split_at_antimeridian(polygons: np.ndarray, rings: np.ndarray) -> np.ndarray:
    """Longitude/latitude boxes that straddle ±180° as two-part MultiPolygons.

    A ring with corners at 179.99° and -179.99° would otherwise be read as a polygon around
    the whole globe. Split at the antimeridian (RFC 7946's rule), each part stays small; the
    row's covering bbox becomes [-180, ymin, 180, ymax], so bbox filters still find it.
    """
    lons = rings[..., 0]
    crossing = np.flatnonzero(lons.max(axis=1) - lons.min(axis=1) > 180.0)
    if len(crossing) == 0:
        return polygons
    polygons = polygons.copy()
    west, east = shapely.box(-180.0, -90.0, 180.0, 90.0), shapely.box(180.0, -90.0, 540.0, 90.0)
    for i in crossing:
        ring = rings[i].copy()
        ring[ring[:, 0] < 0, 0] += 360.0  # one continuous ring across 180°
        whole = shapely.Polygon(ring)
        beyond = shapely.transform(shapely.intersection(whole, east), lambda xy: xy - [360.0, 0])
        polygons[i] = shapely.MultiPolygon([shapely.intersection(whole, west), beyond])
    return polygons


def detections_table(rows: SceneRows, crs_projjson: dict, row_group_hint: int = 0) -> pa.Table:
    """Arrow table in Hilbert order with GeoParquet metadata; ``geo.bbox`` from the data.

    A scene in pixel coordinates only (``rows.rings`` None) gets null geometries and bboxes,
    in Hilbert order of its pixel boxes.
    """
    count = len(rows.scores)
    if rows.rings is None:
        order = hilbert_order(*rows.pixel_boxes.reshape(count, 4).T)
        geometry, bbox = pa.nulls(count, pa.binary()), pa.nulls(count, BBOX_TYPE)
        extent, types = [], []
    else:
        polygons = shapely.polygons(rows.rings)
        if crs_projjson.get("type") == "GeographicCRS":
            polygons = split_at_antimeridian(polygons, rows.rings)
        polygons = shapely.orient_polygons(polygons, exterior_cw=False)
        bounds = shapely.bounds(polygons).reshape(count, 4)
        order = hilbert_order(bounds[:, 0], bounds[:, 1], bounds[:, 2], bounds[:, 3])
        polygons, bounds = polygons[order], bounds[order]
        geometry = pa.array(shapely.to_wkb(polygons, output_dimension=2), pa.binary())
        bbox = pa.StructArray.from_arrays(
            [pa.array(bounds[:, i], pa.float64()) for i in range(4)], fields=list(BBOX_TYPE)
        )
        extent, types = _extent_and_types(polygons, bounds)
    pixel = rows.pixel_boxes[order].astype(np.float32)
    acquired = rows.acquired_at
    if acquired is not None and acquired.tzinfo is None:
        acquired = acquired.replace(tzinfo=UTC)
    columns = {
        "scene_id": pa.array([rows.scene_id] * count, pa.string()),
        "detection_id": pa.array([rows.detection_ids[i] for i in order], pa.string()),
        "class_id": pa.array(rows.class_ids[order].astype(np.int16)),
        "class_name": pa.array([rows.class_names[i] for i in order], pa.string()),
        "score": pa.array(rows.scores[order].astype(np.float32)),
        "geometry": geometry,
        "bbox": bbox,
        "pixel_xmin": pa.array(pixel[:, 0]),
        "pixel_ymin": pa.array(pixel[:, 1]),
        "pixel_xmax": pa.array(pixel[:, 2]),
        "pixel_ymax": pa.array(pixel[:, 3]),
        "scene_crs": pa.array([rows.scene_crs] * count, pa.string()),
        "scene_uri": pa.array([rows.scene_uri] * count, pa.string()),
        "acquired_at": pa.array([acquired] * count, pa.timestamp("us", tz="UTC")),
        "stac_item_id": pa.array([rows.stac_item_id] * count, pa.string()),
        "model_id": pa.array([rows.model_id] * count, pa.string()),
        "run_id": pa.array([rows.run_id] * count, pa.string()),
    }
    table = pa.table(columns, schema=SCHEMA)
    meta = geo_metadata(crs_projjson, extent, types)
    return table.replace_schema_metadata({b"geo": json.dumps(meta).encode()})


def _extent_and_types(polygons: np.ndarray, bounds: np.ndarray) -> tuple[list, list]:
    if len(polygons) == 0:
        return [], []
    extent = [
        float(bounds[:, 0].min()),
        float(bounds[:, 1].min()),
        float(bounds[:, 2].max()),
        float(bounds[:, 3].max()),
    ]
    types = sorted({_TYPE_NAMES[int(t)] for t in np.unique(shapely.get_type_id(polygons))})
    return extent, types


def write_parquet_atomic(table: pa.Table, uri: str, row_group_size: int) -> None:
    """Write so that readers see the old file or the whole new one, never a part.

    Local disk: write a temporary file beside the target and rename it over. Object
    storage has no rename, but an object appears only when its single PUT (or multipart
    upload) completes, so writing straight to the deterministic key is atomic there.
    """
    options = {"compression": "zstd", "row_group_size": row_group_size, "write_statistics": True}
    if "://" not in uri or uri.startswith("file://"):
        path = uri.removeprefix("file://")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        temporary = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            pq.write_table(table, temporary, **options)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
        return
    import fsspec

    with fsspec.open(uri, "wb") as handle:
        pq.write_table(table, handle, **options)


@dataclass(frozen=True)
class FileWritten:
    """What a scene file holds, for the dataset index: known once the file is closed."""

    rows: int
    extent: tuple[float, float, float, float] | None  # in the file's CRS; None: no boxes
    time_start: datetime | None  # the rows' acquisition times (None: none has one)
    time_end: datetime | None
    bytes: int | None  # the file's size
    footer_bytes: int | None  # its Parquet footer's length (without the 8-byte tail)


def footer_length(metadata: pq.FileMetaData, size: int) -> int | None:
    """The footer's length in a file of ``size`` bytes: what follows the last column chunk."""
    end = 4  # the leading magic
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        for position in range(row_group.num_columns):
            column = row_group.column(position)
            start = column.data_page_offset
            if column.has_dictionary_page and column.dictionary_page_offset:
                start = min(start, column.dictionary_page_offset)
            end = max(end, start + column.total_compressed_size)
    length = size - 8 - end
    return length if length > 0 else None


class SceneFileWriter:
    """One scene's GeoParquet file, written a row group at a time; it appears whole at
    :meth:`close`, never in part (same rule as :func:`write_parquet_atomic`).

    Chunks (tables from :func:`detections_table`) are buffered up to ``row_group_size`` rows,
    put in Hilbert order and written as a row group, so memory holds one row group, not the
    scene. The ``geo`` metadata (extent, geometry types) covers every chunk; it is added to
    the footer at the end.
    """

    def __init__(self, uri: str, crs_projjson: dict, row_group_size: int) -> None:
        self.uri, self.crs_projjson, self.row_group_size = uri, crs_projjson, row_group_size
        self.rows = 0
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._extent: list[float] = []
        self._times: list[datetime] = []  # earliest and latest acquired_at seen
        self._types: set[str] = set()
        self.written: FileWritten | None = None  # set by close()
        self._temporary: str | None = None
        self._handle = None
        if "://" not in uri or uri.startswith("file://"):
            path = uri.removeprefix("file://")
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self._temporary = f"{path}.tmp-{uuid.uuid4().hex}"
            sink = self._temporary
        else:  # an object appears only when its (multipart) upload completes
            import fsspec

            self._handle = fsspec.open(uri, "wb").open()
            sink = self._handle
        # store_schema=False: readers then take the schema's metadata from the footer's
        # key-value pairs, where close() puts `geo`; an embedded Arrow schema (written at
        # the start, before the extent is known) would hide it. SCHEMA round-trips as is.
        self._writer = pq.ParquetWriter(
            sink, SCHEMA, compression="zstd", write_statistics=True, store_schema=False
        )

    def write(self, chunk: pa.Table) -> None:
        if chunk.num_rows == 0:
            return
        geo = json.loads(chunk.schema.metadata[b"geo"])["columns"]["geometry"]
        self._types.update(geo["geometry_types"])
        box = geo.get("bbox")  # none for a scene in pixel coordinates only
        if box and self._extent:
            low, high = np.minimum(self._extent[:2], box[:2]), np.maximum(self._extent[2:], box[2:])
            self._extent = [float(v) for v in (*low, *high)]
        elif box:
            self._extent = box
        times = pc.min_max(chunk.column("acquired_at")).as_py()
        if times["min"] is not None:
            self._times = [min([times["min"], *self._times]), max([times["max"], *self._times])]
        self._buffer.append(chunk.replace_schema_metadata(None))
        self._buffered += chunk.num_rows
        while self._buffered >= self.row_group_size:
            self._flush(self.row_group_size)

    def _flush(self, rows: int) -> None:
        table = pa.concat_tables(self._buffer)
        group, rest = table.slice(0, rows), table.slice(rows)
        corners = ("xmin", "ymin", "xmax", "ymax")
        bbox = group.column("bbox").combine_chunks()
        if bbox.null_count:  # a scene in pixel coordinates only: no bbox, order by pixels
            order = hilbert_order(*(group.column(f"pixel_{k}").to_numpy() for k in corners))
        else:
            order = hilbert_order(*(bbox.field(k).to_numpy() for k in corners))
        self._writer.write_table(group.take(order), row_group_size=rows)
        self.rows += group.num_rows
        self._buffer, self._buffered = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> int:
        """Write what is buffered and the metadata; make the file appear. Returns its rows."""
        if self._buffered:
            self._flush(self._buffered)
        meta = geo_metadata(self.crs_projjson, self._extent, sorted(self._types))
        self._writer.add_key_value_metadata({"geo": json.dumps(meta)})
        self._writer.close()
        if self._temporary is not None:
            size = os.path.getsize(self._temporary)
            os.replace(self._temporary, self.uri.removeprefix("file://"))
        else:
            size = self._handle.tell()
            self._handle.close()
        self.written = FileWritten(
            self.rows,
            tuple(self._extent) if self._extent else None,
            *(self._times or [None, None]),
            size,
            footer_length(self._writer.writer.metadata, size),
        )
        return self.rows

    def abort(self) -> None:
        """Give up: nothing appears (a file from an earlier run stays as it was)."""
        try:
            self._writer.close()
        finally:
            if self._temporary is not None and os.path.exists(self._temporary):
                os.remove(self._temporary)
            elif self._handle is not None and hasattr(self._handle, "discard"):
                self._handle.discard()  # s3fs: aborts the multipart upload
