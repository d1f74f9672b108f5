"""Querying a detections dataset: filters pushed down to the Parquet reads. No Ray here.

A dataset is ``OUTPUT/detections/*.parquet`` (or any folder, glob or single file of such
files), local or on object storage. Given an output root with a scene table
(``OUTPUT/_ledger``, :mod:`pipeline.io.index`), the query reads that first (a few requests,
whatever the number of scenes) and opens only the scene files whose bbox, time range, classes
and scene id can match; without one it lists ``detections/``. Given a compacted dataset
(``georetina compact``, :mod:`pipeline.io.partition`), it reads the layout from its state's
footer, lists its partitions and opens only those whose cell (and day) can match. Each
file opened costs one small read of its footer (exactly its length when the index knows it);
the row-group statistics of the ``bbox`` covering columns, ``score``, ``class_name``,
``scene_id`` and ``acquired_at`` then rule out row groups without reading their data; the
remaining row groups are read, only the columns needed, and filtered exactly. With a limit,
reading stops once it has that many rows (files still in flight finish; no others start).

The bbox filter keeps rows whose covering box intersects the query box (edges included), as
``geopandas.read_parquet(bbox=...)`` does.
"""

from __future__ import annotations

import io
import json
import re
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import shapely
from pyproj import CRS, Transformer

from pipeline.errors import QueryError
from pipeline.io.geoparquet import SCHEMA, column_crs, geo_metadata, primary_column
from pipeline.io.iostats import ReadCounter, counting_filesystem
from pipeline.io.partition import (
    PartitionedFiles,
    partition_fields,
    partitioned_files,
    partitions_matching,
)

FORMATS = ("table", "csv", "geojson", "parquet")

# Columns shown by the 'table' format (all columns go to csv, geojson and parquet).
TABLE_COLUMNS = ("scene_id", "detection_id", "class_name", "score", "acquired_at")

_GLOB = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class QueryFilter:
    """What to keep; every field left empty keeps everything.

    ``bbox`` is ``(xmin, ymin, xmax, ymax)`` in ``bbox_crs`` (default: the dataset's CRS);
    ``since`` is inclusive and ``until`` exclusive; rows without ``acquired_at`` never pass a
    time filter.
    """

    bbox: tuple[float, float, float, float] | None = None
    bbox_crs: str | None = None
    classes: tuple[str, ...] = ()
    min_score: float | None = None
    since: datetime | None = None
    until: datetime | None = None
    scenes: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# Parsing user input (pure)
# --------------------------------------------------------------------------------------------


def parse_bbox(text: str) -> tuple[float, float, float, float]:
    """``"xmin,ymin,xmax,ymax"`` to floats, checked for order."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise QueryError(f"bbox {text!r}: expected four numbers xmin,ymin,xmax,ymax") from None
    if len(values) != 4:
        raise QueryError(
            f"bbox {text!r}: expected four numbers xmin,ymin,xmax,ymax, got {len(values)}"
        )
    xmin, ymin, xmax, ymax = values
    if xmin > xmax or ymin > ymax:
        raise QueryError(f"bbox {text!r}: xmin must be <= xmax and ymin <= ymax")
    return (xmin, ymin, xmax, ymax)


def parse_time(text: str, field: str = "time") -> datetime:
    """ISO 8601 date or date-time; without a zone it is taken as UTC."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise QueryError(
            f"{field} {text!r}: expected an ISO 8601 date or time, e.g. 2026-06-01 or "
            "2026-06-01T10:30:00Z"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def bbox_in_crs(
    bbox: tuple[float, float, float, float], source: CRS, target: CRS
) -> tuple[float, float, float, float]:
    """The box that covers ``bbox`` once reprojected (edges densified, so curved edges fit)."""
    if source == target:
        return bbox
    transformer = Transformer.from_crs(source, target, always_xy=True)
    return tuple(float(v) for v in transformer.transform_bounds(*bbox, densify_pts=21))


def _crs(text: str, field: str) -> CRS:
    try:
        return CRS.from_user_input(text)
    except Exception as error:  # noqa: BLE001 - pyproj raises CRSError and others
        raise QueryError(f"{field} {text!r} is not a CRS pyproj knows: {error}") from None


def in_dataset_crs(where: QueryFilter, dataset_crs: CRS) -> QueryFilter:
    """The same filter with its bbox in the dataset's CRS (the only one the files know)."""
    if where.bbox is None or not where.bbox_crs:
        return replace(where, bbox_crs=None)
    bbox = bbox_in_crs(where.bbox, _crs(where.bbox_crs, "crs"), dataset_crs)
    return replace(where, bbox=bbox, bbox_crs=None)


def filter_expression(where: QueryFilter) -> ds.Expression | None:
    """Every filter as one Arrow expression over the rows (bbox in the dataset's CRS)."""
    terms: list[ds.Expression] = []
    if where.bbox is not None:
        xmin, ymin, xmax, ymax = where.bbox
        terms += [
            pc.field("bbox", "xmin") <= xmax,
            pc.field("bbox", "xmax") >= xmin,
            pc.field("bbox", "ymin") <= ymax,
            pc.field("bbox", "ymax") >= ymin,
        ]
    if where.classes:
        terms.append(pc.field("class_name").isin(list(where.classes)))
    if where.scenes:
        terms.append(pc.field("scene_id").isin(list(where.scenes)))
    if where.min_score is not None:
        terms.append(pc.field("score") >= pa.scalar(where.min_score, pa.float32()))
    stamp = pa.timestamp("us", tz="UTC")
    if where.since is not None:
        terms.append(pc.field("acquired_at") >= pa.scalar(where.since, stamp))
    if where.until is not None:
        terms.append(pc.field("acquired_at") < pa.scalar(where.until, stamp))
    if not terms:
        return None
    expression = terms[0]
    for term in terms[1:]:
        expression = expression & term
    return expression


# Columns a filter needs, by QueryFilter field.
_FILTER_COLUMNS = {
    "bbox": ["bbox"],
    "classes": ["class_name"],
    "scenes": ["scene_id"],
    "min_score": ["score"],
    "since": ["acquired_at"],
    "until": ["acquired_at"],
}


def filter_columns(where: QueryFilter) -> list[str]:
    """The top-level columns the filter reads."""
    needed: list[str] = []
    for name, columns in _FILTER_COLUMNS.items():
        if getattr(where, name) not in (None, ()):
            needed += [c for c in columns if c not in needed]
    return needed


Stats = dict[str, tuple[object, object]]  # leaf column path -> (min, max)


def may_match(stats: Stats, where: QueryFilter) -> bool:
    """Whether a row group with these min/max statistics can hold a row that passes.

    A column without statistics can hold anything. Rows are only ever dropped here when the
    statistics prove that none passes; the row filter afterwards is exact.
    """

    def below(column: str, bound: object) -> bool:  # every value < bound
        return column in stats and stats[column][1] < bound

    def above(column: str, bound: object) -> bool:  # every value > bound
        return column in stats and stats[column][0] > bound

    if where.bbox is not None:
        xmin, ymin, xmax, ymax = where.bbox
        if (
            above("bbox.xmin", xmax)
            or above("bbox.ymin", ymax)
            or below("bbox.xmax", xmin)
            or below("bbox.ymax", ymin)
        ):
            return False
    for column, wanted in (("class_name", where.classes), ("scene_id", where.scenes)):
        if wanted and column in stats:
            low, high = stats[column]
            if not any(low <= value <= high for value in wanted):
                return False
    if where.min_score is not None and below("score", float(np.float32(where.min_score))):
        return False
    if where.since is not None and below("acquired_at", where.since):
        return False
    return not (
        where.until is not None
        and "acquired_at" in stats
        and stats["acquired_at"][0] >= where.until
    )


def row_group_stats(metadata: pq.FileMetaData, index: int) -> Stats:
    """Min/max per leaf column of one row group, where the file has them."""
    group = metadata.row_group(index)
    stats: Stats = {}
    for position in range(group.num_columns):
        column = group.column(position)
        found = column.statistics
        if found is not None and found.has_min_max:
            stats[column.path_in_schema] = (found.min, found.max)
    return stats


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------

# Bytes read from a file's end in one request: the footer (schema, row-group statistics, geo
# metadata) of a scene file fits, so a file whose row groups all fail the filter costs one
# small read. Arrow's own default (64 KiB) alone is ~6 % of a 1 MB scene file.
FOOTER_READ = 16 * 1024

# Files read at once: footers and row groups are small requests; object storage wants many
# in flight, local disk does not mind.
READ_THREADS = 16


def read_footer(
    filesystem: pafs.FileSystem, path: str, hint: tuple[int, int] | None = None
) -> pq.FileMetaData:
    """A Parquet file's metadata, read with one request (two if the footer is large).

    ``hint``: the file's size and footer length (from the index): the one request is then
    exactly the footer.
    """
    try:
        with filesystem.open_input_file(path) as handle:
            return _footer_of(handle, path, hint)
    except (pa.ArrowInvalid, OSError) as error:
        raise QueryError(f"{path}: cannot be read as Parquet: {error}") from None


def _footer_of(handle: pa.NativeFile, path: str, hint: tuple[int, int] | None) -> pq.FileMetaData:
    size, want = hint if hint else (handle.size(), FOOTER_READ - 8)
    tail = handle.read_at(min(size, want + 8), max(0, size - want - 8))
    if size < 12 or tail[-4:] != b"PAR1":
        raise QueryError(f"{path}: is not a Parquet file (no PAR1 magic at its end)")
    length = int.from_bytes(tail[-8:-4], "little")
    if length + 8 > size:
        raise QueryError(f"{path}: Parquet footer longer than the file")
    missing = length + 8 - len(tail)
    if missing > 0:  # a footer longer than the first read: fetch only the rest
        tail = handle.read_at(missing, size - length - 8) + tail
    # Parquet's parser wants the footer as the end of a file that starts with the magic.
    return pq.read_metadata(pa.BufferReader(b"PAR1" + tail[-(length + 8) :]))


class _ExactReads(pafs.FSSpecHandler):
    """fsspec files without read-ahead: a range asked for is the range fetched.

    fsspec's buffered files (s3fs, gcsfs, ...) otherwise read whole blocks of megabytes
    ahead, so a footer or a row group would cost most of a scene file.
    """

    def open_input_file(self, path: str) -> pa.NativeFile:
        return pa.PythonFile(self.fs.open(path, mode="rb", cache_type="none"), mode="r")


@dataclass(frozen=True)
class Detections:
    """The files of a detections dataset, how to read them, and its CRS."""

    source: str
    files: list[str]
    filesystem: pafs.FileSystem
    crs: CRS
    schema: pa.Schema  # the first file's (the writer's SCHEMA when there are no files)
    geo: dict | None  # the first file's ``geo`` metadata
    reads: ReadCounter | None = None  # what was read from storage, when counted
    index: pa.Table | None = None  # per file in ``files`` (same order): its index entry
    partitions: PartitionedFiles | None = None  # a compacted dataset's (same files)

    def total_bytes(self) -> int:
        """The size of every file of the dataset (from the index, else a listing)."""
        if self.index is not None and self.index.column("bytes").null_count == 0:
            return int(pc.sum(self.index.column("bytes")).as_py() or 0)
        return sum(info.size for info in self.filesystem.get_file_info(self.files))


def open_detections(
    source: str,
    filesystem: pafs.FileSystem | None = None,
    *,
    count_reads: bool = False,
    use_index: bool = True,
) -> Detections:
    """A dataset's files: an output root, its ``detections`` folder, a compacted dataset, a
    glob or one file.

    An output root with a scene table is read through it (``use_index=False``: list the
    folder instead); a compacted dataset through its layout and partitions. ``filesystem``
    (a pyarrow filesystem over the same paths) replaces the one the URI implies.
    ``count_reads`` counts every byte read from storage from here on (``Detections.reads``),
    the index and the first file's footer included.

    Raises:
        QueryError: when nothing is there, or the first file is not GeoParquet.
    """
    import fsspec

    fs, root = fsspec.core.url_to_fs(source)
    root = root.rstrip("/") or "/"
    index, index_sizes, partitions = None, (), None
    if _GLOB.search(root):
        files = sorted(fs.glob(root))
    elif fs.isfile(root):
        files = [root]
    elif fs.isdir(root) and (partitions := partitioned_files(fs, root)) is not None:
        files = partitions.files
    elif fs.isdir(root):
        if use_index:
            index, index_sizes = read_index(source, root)
        if index is not None:
            files = index.column("file").to_pylist()
        else:
            folder = f"{root}/detections" if fs.isdir(f"{root}/detections") else root
            # '*.parquet' leaves out files still being written ('<name>.parquet.tmp-<hex>').
            files = sorted(fs.glob(f"{folder}/*.parquet"))
    else:
        raise QueryError(f"{source}: no such file or folder")
    if filesystem is None:
        local = isinstance(fs, fsspec.implementations.local.LocalFileSystem)
        filesystem = pafs.LocalFileSystem() if local else pafs.PyFileSystem(_ExactReads(fs))
    reads = None
    if count_reads:
        filesystem, reads = counting_filesystem(filesystem)
        for size in index_sizes:
            reads.add(size)
    crs, schema, geo = CRS.from_user_input("OGC:CRS84"), SCHEMA, None
    indexed_crs = _index_crs(index)
    if indexed_crs is not None:  # no footer needed: the writer's schema, the index's CRS
        crs = CRS.from_user_input(indexed_crs)
    elif files:
        first = read_footer(filesystem, files[0])
        geo, schema = geo_of(first, files[0]), first.schema.to_arrow_schema()
        crs = column_crs(primary_column(geo))
    return Detections(source, files, filesystem, crs, schema, geo, reads, index, partitions)


def read_index(source: str, root: str) -> tuple[pa.Table | None, tuple[int, ...]]:
    """The scene files an output's scene table lists (with a ``file`` column: the path to
    open), and the sizes of the objects read for it; None when the output has no table.

    A file counts once its done record is written; the latest done record describes it.
    """
    from pipeline.io.index import scene_files
    from pipeline.io.ledger import Ledger

    found = Ledger(source, compact_at=None).snapshot()
    if found.table.num_rows == 0:
        return None, found.sizes
    files = scene_files(found.table).sort_by("path")
    paths = [_resolve(root, path) for path in files.column("path").to_pylist()]
    return files.append_column("file", pa.array(paths, pa.string())), found.sizes


def _resolve(root: str, path: str) -> str:
    """An index path (relative to the output root, or a whole URI) as a filesystem path."""
    if "://" in path or path.startswith("/"):
        import fsspec

        return fsspec.core.url_to_fs(path)[1]
    return f"{root}/{path}"


def _index_crs(index: pa.Table | None) -> str | None:
    if index is None:
        return None
    known = pc.drop_null(index.filter(pc.fill_null(index.column("indexed"), False))["crs"])
    return known[0].as_py() if len(known) else None


def geo_of(metadata: pq.FileMetaData, path: str) -> dict:
    """The ``geo`` metadata of a file, or an error naming the file."""
    geo = (metadata.metadata or {}).get(b"geo")
    if geo is None:
        raise QueryError(f"{path}: has no GeoParquet 'geo' metadata; is it georetina output?")
    return json.loads(geo)


def candidates(found: Detections, where: QueryFilter) -> list[tuple[str, tuple | None]]:
    """The files that may hold a passing row, each with its footer hint (size, length).

    Only the index rules files out: one whose entry proves that no row can pass (no rows; a
    bbox, time range, class set or scene id that misses). A file without an entry (written
    by an older version) may hold anything. A compacted dataset's partitions are ruled out
    by their cell (and day).
    """
    if found.partitions is not None:
        parts = found.partitions
        keep = partitions_matching(
            parts.partitions,
            parts.layout,
            found.crs,
            bbox=where.bbox,
            since=where.since,
            until=where.until,
        )
        return [(path, None) for path, kept in zip(found.files, keep, strict=True) if kept]
    if found.index is None:
        return [(path, None) for path in found.files]
    index = found.index
    keep = np.asarray(_index_may_match(index, where, found.crs), dtype=bool)
    sizes, footers = index.column("bytes").to_pylist(), index.column("footer_bytes").to_pylist()
    return [
        (path, (size, footer) if size and footer else None)
        for path, size, footer, kept in zip(found.files, sizes, footers, keep, strict=True)
        if kept
    ]


def matching_files(source: str, where: QueryFilter = QueryFilter()) -> list[str]:
    """The scene files (or a compacted dataset's partition files) of ``source`` that may hold
    a row passing ``where``, as URIs (or local paths): what another reader (DuckDB, polars,
    geopandas) needs to open, and no more."""
    found = open_detections(source)
    where = in_dataset_crs(where, found.crs)
    protocol = _protocol(source)
    paths = [path for path, _ in candidates(found, where)]
    return paths if protocol is None else [f"{protocol}://{path}" for path in paths]


def matching_cells(source: str, where: QueryFilter = QueryFilter()) -> list[str]:
    """The cells of the compacted dataset ``source`` whose files may hold a row passing
    ``where`` (its bbox and, with date partitions, its time range), sorted: for a reader's
    filter on the ``cell`` hive partition (``where cell in (...)``)."""
    found = open_detections(source)
    if found.partitions is None:
        raise QueryError(f"{source}: not a compacted dataset (no {source}/_state.parquet)")
    kept = {path for path, _ in candidates(found, in_dataset_crs(where, found.crs))}
    pairs = zip(found.files, found.partitions.partitions, strict=True)
    return sorted({partition_fields(key)["cell"] for path, key in pairs if path in kept})


def _protocol(source: str) -> str | None:
    """The URI scheme of ``source``; None for local paths."""
    scheme, _, rest = source.partition("://")
    return None if not rest or scheme in ("file", "local") else scheme


def _index_may_match(index: pa.Table, where: QueryFilter, crs: CRS) -> pa.Array:
    """Per index entry: whether its file may hold a row that passes ``where``."""
    indexed = pc.fill_null(index.column("indexed"), False)
    keep = pc.invert(pc.equal(pc.fill_null(index.column("detections"), 1), 0))
    if where.scenes:
        keep = pc.and_(keep, pc.is_in(index.column("scene_id"), pa.array(where.scenes)))
    if where.bbox is not None:
        xmin, ymin, xmax, ymax = where.bbox
        hit = pc.and_(
            pc.and_(pc.less_equal(index["xmin"], xmax), pc.greater_equal(index["xmax"], xmin)),
            pc.and_(pc.less_equal(index["ymin"], ymax), pc.greater_equal(index["ymax"], ymin)),
        )
        # An entry in another CRS than the dataset's cannot be compared: it may match.
        other = pc.invert(pc.equal(pc.fill_null(index["crs"], ""), _crs_text(index, crs)))
        keep = pc.and_(keep, pc.or_(pc.invert(indexed), pc.or_(pc.fill_null(hit, False), other)))
    stamp = pa.timestamp("us", tz="UTC")
    if where.since is not None:
        late = pc.greater_equal(index["time_end"], pa.scalar(where.since, stamp))
        keep = pc.and_(keep, pc.or_(pc.invert(indexed), pc.fill_null(late, False)))
    if where.until is not None:
        early = pc.less(index["time_start"], pa.scalar(where.until, stamp))
        keep = pc.and_(keep, pc.or_(pc.invert(indexed), pc.fill_null(early, False)))
    if where.classes:
        keep = pc.and_(keep, pc.or_(pc.invert(indexed), _has_any(index["classes"], where.classes)))
    return keep


def _crs_text(index: pa.Table, crs: CRS) -> str:
    """The CRS spelling the index uses for the dataset's CRS."""
    return _index_crs(index) or crs.to_string()


def _has_any(classes: pa.ChunkedArray, wanted: tuple[str, ...]) -> pa.Array:
    """Per list of class names: whether it holds any of ``wanted``."""
    lists = classes.combine_chunks()
    flat = pc.is_in(pc.list_flatten(lists), pa.array(wanted))
    hits = np.zeros(len(lists), dtype=bool)
    parents = pc.list_parent_indices(lists).to_numpy()
    hits[parents[flat.to_numpy(zero_copy_only=False)]] = True
    return pa.array(hits)


def _read_file(
    found: Detections,
    path: str,
    where: QueryFilter,
    columns: list[str],
    hint: tuple[int, int] | None = None,
) -> pa.Table | None:
    """One file's passing rows: its footer, then only the row groups the statistics allow
    (the file opened once)."""
    try:
        with found.filesystem.open_input_file(path) as handle:
            metadata = _footer_of(handle, path, hint)
            groups = [
                i
                for i in range(metadata.num_row_groups)
                if may_match(row_group_stats(metadata, i), where)
            ]
            if not groups:
                return None
            needed = columns + [c for c in filter_columns(where) if c not in columns]
            reader = pq.ParquetFile(handle, metadata=metadata, pre_buffer=True)
            table = reader.read_row_groups(groups, columns=needed)
    except (pa.ArrowInvalid, OSError) as error:
        raise QueryError(f"{path}: cannot be read: {error}") from None
    expression = filter_expression(where)
    if expression is not None:
        table = table.filter(expression)
    return table.select(columns)


def query_detections(
    source: str | Detections,
    where: QueryFilter = QueryFilter(),
    *,
    columns: list[str] | None = None,
    limit: int | None = None,
    filesystem: pafs.FileSystem | None = None,
) -> pa.Table:
    """The rows that pass ``where``, in file order and each file's (spatial) row order.

    Each file costs one small read of its footer; of its data, only the row groups whose
    statistics may pass are read, and only the columns asked for plus those filtered on.
    """
    found = source if isinstance(source, Detections) else open_detections(source, filesystem)
    where = in_dataset_crs(where, found.crs)
    columns = list(columns or found.schema.names)
    unknown = [c for c in columns if c not in found.schema.names]
    if unknown:
        raise QueryError(f"columns {unknown}: not in {found.source} ({found.schema.names})")
    parts: list[pa.Table] = []
    rows = 0
    for table in _file_tables(found, candidates(found, where), where, columns):
        if table is None or table.num_rows == 0:
            continue
        parts.append(table)
        rows += table.num_rows
        if limit is not None and rows >= limit:
            break
    schema = pa.schema([found.schema.field(c) for c in columns])
    result = pa.concat_tables(parts) if parts else schema.empty_table()
    return result.slice(0, limit) if limit is not None else result


def _file_tables(
    found: Detections,
    files: list[tuple[str, tuple | None]],
    where: QueryFilter,
    columns: list[str],
) -> Iterator[pa.Table | None]:
    """Each file's passing rows, in file order, at most ``READ_THREADS`` files in flight:
    a consumer that stops early (a limit) leaves the other files unread."""
    queue = iter(files)
    in_flight: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:

        def submit() -> None:
            for path, hint in queue:
                in_flight.append(pool.submit(_read_file, found, path, where, columns, hint))
                return

        try:
            for _ in range(READ_THREADS):
                submit()
            while in_flight:
                table = in_flight.popleft().result()
                submit()
                yield table
        finally:
            for future in in_flight:
                future.cancel()


def count_detections(
    source: str | Detections,
    where: QueryFilter = QueryFilter(),
    *,
    filesystem: pafs.FileSystem | None = None,
) -> pa.Table:
    """Detections per scene and class (``scene_id, class_name, count``), sorted."""
    table = query_detections(
        source, where, columns=["scene_id", "class_name"], filesystem=filesystem
    )
    counts = table.group_by(["scene_id", "class_name"]).aggregate([([], "count_all")])
    counts = counts.select(["scene_id", "class_name", "count_all"])
    counts = counts.rename_columns(["scene_id", "class_name", "count"])
    return counts.sort_by([("scene_id", "ascending"), ("class_name", "ascending")])


# --------------------------------------------------------------------------------------------
# Writing results
# --------------------------------------------------------------------------------------------


def with_geo_metadata(table: pa.Table, found: Detections) -> pa.Table:
    """The table with the dataset's ``geo`` metadata, its extent that of these rows."""
    geometries = shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False))
    geometries = geometries[~shapely.is_missing(geometries)]  # scenes in pixel coordinates
    extent = [float(v) for v in shapely.total_bounds(geometries)] if len(geometries) else []
    column = (found.geo or {}).get("columns", {}).get("geometry", {})
    meta = geo_metadata(found.crs.to_json_dict(), extent, column.get("geometry_types", []))
    return table.replace_schema_metadata({b"geo": json.dumps(meta).encode()})


def _flat(table: pa.Table) -> pa.Table:
    """Scalars only: the bbox struct as four columns, geometry as WKT."""
    if "bbox" in table.column_names:
        box = table.column("bbox").combine_chunks()
        index = table.column_names.index("bbox")
        table = table.remove_column(index)
        for offset, name in enumerate(("xmin", "ymin", "xmax", "ymax")):
            table = table.add_column(index + offset, f"bbox_{name}", box.field(name))
    if "geometry" in table.column_names:
        wkb = table.column("geometry").to_numpy(zero_copy_only=False)
        wkt = shapely.to_wkt(shapely.from_wkb(wkb), rounding_precision=-1)
        index = table.column_names.index("geometry")
        table = table.set_column(index, "geometry", pa.array(wkt, pa.string()))
    return table


def render_table(table: pa.Table) -> str:
    """A fixed-width text table of the columns worth reading on a terminal."""
    names = table.column_names
    # Detections: the readable columns; anything else (counts): all of them.
    shown = [c for c in TABLE_COLUMNS if c in names] if "geometry" in names else names
    frame = table.select(shown).to_pandas()
    if "score" in frame:
        frame["score"] = frame["score"].map(lambda s: f"{s:.3f}")
    text = frame.to_string(index=False) if len(frame) else "(no rows)"
    return f"{text}\n{table.num_rows} row(s)\n"


def render_csv(table: pa.Table) -> bytes:
    import pyarrow.csv

    sink = io.BytesIO()
    pyarrow.csv.write_csv(_flat(table), sink)
    return sink.getvalue()


def render_geojson(table: pa.Table, crs: CRS) -> bytes:
    """A FeatureCollection in lon/lat (RFC 7946), whatever the dataset's CRS."""
    geometries = shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False))
    lonlat = CRS.from_user_input("OGC:CRS84")
    if len(geometries) and crs != lonlat:
        transformer = Transformer.from_crs(crs, lonlat, always_xy=True)
        geometries = shapely.transform(
            geometries, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1]))
        )
    properties = _flat(table.drop_columns(["geometry"])).to_pylist()
    features = [
        {
            "type": "Feature",
            # null for a scene in pixel coordinates only (RFC 7946 allows an unlocated feature)
            "geometry": None if geometry is None else json.loads(shapely.to_geojson(geometry)),
            "properties": {k: _jsonable(v) for k, v in props.items()},
        }
        for geometry, props in zip(geometries, properties, strict=True)
    ]
    return json.dumps({"type": "FeatureCollection", "features": features}).encode()


def _jsonable(value: object) -> object:
    return value.isoformat() if isinstance(value, datetime) else value


def write_result(
    table: pa.Table, fmt: str, found: Detections, destination: str | None, stdout: io.TextIOBase
) -> None:
    """Write ``table`` as ``fmt`` to ``destination`` (a path or URI), or to ``stdout``."""
    if fmt not in FORMATS:
        raise QueryError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "parquet":
        if destination is None:
            raise QueryError("format 'parquet' needs an output file (-o FILE)")
        from pipeline.io.geoparquet import write_parquet_atomic

        if "geometry" in table.column_names:
            table = with_geo_metadata(table, found)
        write_parquet_atomic(table, destination, row_group_size=10_000)
        return
    if fmt == "table":
        data = render_table(table).encode()
    elif fmt == "csv":
        data = render_csv(table)
    elif "geometry" in table.column_names:
        data = render_geojson(table, found.crs)
    else:
        raise QueryError("format 'geojson' needs detections; counts are table, csv or parquet")
    if destination is None:
        stdout.write(data.decode())
        return
    import fsspec

    with fsspec.open(destination, "wb", auto_mkdir=True) as handle:
        handle.write(data)
