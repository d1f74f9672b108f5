"""Compacting an output into one spatially partitioned GeoParquet dataset, and telling which of
its partitions a query can skip. No Ray here.

``DEST/cell=<quadkey>/part.parquet``: one file per partition, a coarse spatial cell (the Web
Mercator quadkey of the detection's box centre; ``cell=q`` is the whole world at zoom 0); with
date partitions, ``DEST/cell=<quadkey>/date=<YYYY-MM-DD>/part.parquet``, the UTC day of the
scene's acquisition (``date=__HIVE_DEFAULT_PARTITION__``, Hive's null: rows without one). Each
file's rows are in Hilbert order over the whole file, in row groups of ``ROW_GROUP_ROWS``
rows, zstd, with the ``bbox`` covering column and ``geo`` metadata. ``DEST/_state.parquet``
says which version of which scene file (its index ``record_id``) went into which partitions;
its metadata holds the layout (:class:`Layout`), fixed by the first compaction.

Incremental and idempotent: a partition is always rebuilt whole from the scene files that
the state (plus the new files) assigns to it, never appended to; only the partitions touched
by new or rewritten scene files are rebuilt, each replaced atomically, and the state is
written last. A crash part-way leaves the old state, so the next compaction rebuilds the same
partitions again from their sources: no row is lost or counted twice once it completes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyproj import CRS, Transformer
from pyproj.exceptions import ProjError

from pipeline.errors import CompactionError, OutputNotWritableError, OutputUnreadableError
from pipeline.io.geoparquet import (
    column_crs,
    geo_metadata,
    hilbert_order,
    primary_column,
    write_parquet_atomic,
)
from pipeline.io.index import scene_files
from pipeline.io.ledger import Ledger
from pipeline.io.writable import check_output_writable

ROW_GROUP_ROWS = 100_000
STATE = "_state.parquet"
STATE_SCHEMA = pa.schema(
    [("path", pa.string()), ("record_id", pa.string()), ("partition", pa.string())]
)
NO_DATE = "__HIVE_DEFAULT_PARTITION__"  # what Hive, DuckDB, polars and pyarrow read as null
LONLAT = CRS.from_user_input("OGC:CRS84")
MERCATOR_LAT = 85.05112878  # Web Mercator's tiles end here; quadkeys clip to it
# A cell's file should land between these sizes; the zoom is chosen for it on the first run.
TARGET_BYTES = (128 << 20, 1 << 30)
MAX_ZOOM = 16
ZOOM_LIMIT = 24  # deepest zoom asked for by hand (cells of ~2 m)


def quadkeys(lon: np.ndarray, lat: np.ndarray, zoom: int) -> np.ndarray:
    """Web Mercator quadkeys (``"q" + digits``) of points at ``zoom``."""
    lat = np.clip(lat, -MERCATOR_LAT, MERCATOR_LAT)
    n = 1 << zoom
    x = np.clip(((lon + 180.0) / 360.0 * n).astype(np.int64), 0, n - 1)
    sin = np.sin(np.radians(lat))
    y = (0.5 - np.log((1 + sin) / (1 - sin)) / (4 * math.pi)) * n
    y = np.clip(y.astype(np.int64), 0, n - 1)
    digits = np.zeros(len(lon), dtype=np.int64)
    keys = np.full(len(lon), "q", dtype=object)
    for level in range(zoom, 0, -1):
        mask = 1 << (level - 1)
        digits = ((x & mask) > 0).astype(np.int64) + 2 * ((y & mask) > 0).astype(np.int64)
        keys = keys + digits.astype(str).astype(object)
    return keys


def cell_bounds(keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """West, south, east and north (degrees) of each quadkey's tile (the inverse of
    :func:`quadkeys`: digit = x bit + 2 y bit, most significant first)."""
    x, y, n = (np.zeros(len(keys)) for _ in range(3))
    for i, key in enumerate(keys):
        tx = ty = 0
        for digit in map(int, key.removeprefix("q")):
            tx, ty = 2 * tx + (digit & 1), 2 * ty + (digit >> 1)
        x[i], y[i], n[i] = tx, ty, 1 << (len(key) - 1)

    def lat(row: np.ndarray) -> np.ndarray:
        return np.degrees(np.arctan(np.sinh(np.pi * (1 - 2 * row / n))))

    return x / n * 360 - 180, lat(y + 1), (x + 1) / n * 360 - 180, lat(y)


def choose_zoom(
    total_bytes: int,
    lon: np.ndarray,
    lat: np.ndarray,
    weights: np.ndarray,
    days: np.ndarray | None = None,
) -> int:
    """The deepest zoom at which no partition's expected file exceeds the upper target size,
    stopping before files fall under the lower one on average. ``days``: each point's date
    partition, when the dataset has them (they split each cell's file further)."""
    zoom = 0
    for candidate in range(1, MAX_ZOOM + 1):
        keys = quadkeys(lon, lat, candidate)
        if days is not None:
            keys = keys + "/" + days
        _, inverse = np.unique(keys, return_inverse=True)
        sizes = np.bincount(inverse, weights=weights) * total_bytes / max(weights.sum(), 1)
        if sizes.mean() < TARGET_BYTES[0]:
            break
        zoom = candidate
        if sizes.max() <= TARGET_BYTES[1]:
            break
    return zoom


@dataclass(frozen=True)
class Layout:
    """How a compacted dataset is cut: the cells' quadkey zoom, whether by date too, and
    ``margin``, the largest half side of any box it holds (output CRS units): how far a box
    reaches past its centre, and so past its cell, which a bbox query must allow for."""

    zoom: int
    by_date: bool = False
    margin: float = 0.0

    def metadata(self) -> dict[bytes, bytes]:
        fields = {"zoom": self.zoom, "by_date": self.by_date, "margin": self.margin}
        return {key.encode(): json.dumps(value).encode() for key, value in fields.items()}

    @classmethod
    def from_metadata(cls, metadata: dict[bytes, bytes]) -> Layout:
        return cls(*(json.loads(metadata[key]) for key in (b"zoom", b"by_date", b"margin")))


@dataclass(frozen=True)
class Compacted:
    """What one compaction did."""

    layout: Layout
    partitions_rebuilt: list[str]
    rows: int  # rows in the rebuilt partitions
    files_read: int  # scene files read

    @property
    def zoom(self) -> int:
        return self.layout.zoom

    def line(self) -> str:
        """One line for a person: what was rewritten, how much, and the layout."""
        dates = ", by date" if self.layout.by_date else ""
        return (
            f"{len(self.partitions_rebuilt)} partition(s) rewritten, {self.rows} row(s) in "
            f"them, {self.files_read} scene file(s) read, zoom {self.zoom}{dates}"
        )


def compact_dataset(
    source: str,
    dest: str,
    *,
    zoom: int | None = None,
    by_date: bool | None = None,
    after_partition: Callable[[str], None] | None = None,
) -> Compacted:
    """Compact ``source`` (an output root with a scene table) into ``dest`` (see the module's
    docstring). ``zoom`` and ``by_date``: the layout (default: the one ``dest`` has, else a
    zoom chosen for the file sizes, no date partitions). ``after_partition``: called with
    each partition (``cell=<quadkey>[/date=<day>]``) once its file is replaced.

    Raises:
        OutputUnreadableError: ``source`` is not an output, or a file it lists cannot be read.
        OutputNotWritableError: ``dest`` cannot be written.
        CompactionError: the layout asked for is not ``dest``'s, the zoom is out of range, or
            ``dest`` is the output itself.
    """
    src_fs, src_root = _source_fs(source)
    fs, dest_root = fsspec.core.url_to_fs(dest)
    dest_root = dest_root.rstrip("/")
    if fs.protocol == src_fs.protocol and dest_root in (src_root, f"{src_root}/detections"):
        # Its _state.parquet would make the output read as a compacted dataset.
        raise CompactionError(f"{dest}: give a folder of its own, not the output or its scenes")
    check_output_writable(dest)
    files = scene_files(Ledger(source, compact_at=None).snapshot().table)
    state, kept = _read_state(fs, dest_root)
    current = dict(zip(files["path"].to_pylist(), files["record_id"].to_pylist(), strict=True))
    known = {(p, r) for p, r, _ in state}
    dirty = {p for p, r in current.items() if (p, r) not in known}
    dirty |= {p for p, _ in known if p not in current or (p, current[p]) not in known}
    fresh = {p: _read_scene(src_fs, src_root, p) for p in dirty if p in current}
    layout = _layout(dest, kept, zoom, by_date, files, fresh)
    # Each source is read, and its rows' partitions computed, once, however many it spans.
    loaded = {p: (t, _partitions(t, layout)) for p, t in fresh.items()}
    keys_of = {p: set(keys) for p, (_, keys) in loaded.items()}
    for path, _, key in state:
        if path not in dirty:
            keys_of.setdefault(path, set()).add(key)
    touched = {k for p, _, k in state if p in dirty} | {k for p in fresh for k in keys_of[p]}
    rows = 0
    for key in sorted(touched):
        sources = sorted(p for p, keys in keys_of.items() if key in keys)
        for path in sources:
            if path not in loaded:
                table = _read_scene(src_fs, src_root, path)
                loaded[path] = (table, _partitions(table, layout))
        rows += _rebuild(fs, dest_root, key, [loaded[p] for p in sources])
        if after_partition is not None:
            after_partition(key)
    _write_state(fs, dest_root, keys_of, current, layout)
    return Compacted(layout, sorted(touched), rows, len(fresh))


def _source_fs(source: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The output's filesystem and root, once it is known to be an output (it has a ledger)."""
    try:
        fs, root = fsspec.core.url_to_fs(source)
        root = root.rstrip("/")
        is_output = fs.isdir(f"{root}/_ledger")
        found = is_output or fs.exists(root)
    except (OSError, ValueError) as error:
        raise OutputUnreadableError(f"output {source} cannot be read: {error}") from None
    if not found:
        raise OutputUnreadableError(f"output {source}: no such folder")
    if not is_output:
        raise OutputUnreadableError(
            f"output {source}: no scene table (_ledger); give the job's output.path"
        )
    return fs, root


def _layout(
    dest: str,
    kept: Layout | None,
    zoom: int | None,
    by_date: bool | None,
    files: pa.Table,
    fresh: dict[str, pa.Table],
) -> Layout:
    """The layout asked for, or the one ``dest`` was first compacted with; its margin grown
    to cover the new rows' boxes."""
    if zoom is not None and not 0 <= zoom <= ZOOM_LIMIT:
        raise CompactionError(f"zoom {zoom}: give 0 to {ZOOM_LIMIT}")
    margin = max([0.0, *map(_margin, fresh.values())])
    if kept is None:
        by_date = bool(by_date)
        zoom = _zoom_for(files, fresh, by_date) if zoom is None else zoom
        return Layout(zoom, by_date, margin)
    for name, asked, have in (("zoom", zoom, kept.zoom), ("by_date", by_date, kept.by_date)):
        if asked is not None and asked != have:
            raise CompactionError(
                f"{dest} was compacted with {name} {have}, not {asked}: compact into a new "
                "folder to change it, or leave it out to keep it"
            )
    return replace(kept, margin=max(kept.margin, margin))


def _read_state(
    fs: fsspec.AbstractFileSystem, root: str
) -> tuple[list[tuple[str, str, str]], Layout | None]:
    """The state's rows (path, record_id, partition) and the layout; none before a first run."""
    path = f"{root}/{STATE}"
    if not fs.exists(path):
        return [], None
    with fs.open(path, "rb") as handle:
        table = pq.read_table(handle)
    columns = [table[name].to_pylist() for name in STATE_SCHEMA.names]
    return list(zip(*columns, strict=True)), Layout.from_metadata(table.schema.metadata)


def _write_state(
    fs: fsspec.AbstractFileSystem, root: str, keys_of: dict, current: dict, layout: Layout
) -> None:
    rows = [
        {"path": p, "record_id": current[p], "partition": key}
        for p in sorted(keys_of)
        if p in current
        for key in sorted(keys_of[p])
    ]
    table = pa.Table.from_pylist(rows, schema=STATE_SCHEMA)
    _put(fs, f"{root}/{STATE}", table.replace_schema_metadata(layout.metadata()), 100_000)


def _read_scene(fs: fsspec.AbstractFileSystem, root: str, path: str) -> pa.Table:
    try:
        with fs.open(f"{root}/{path}", "rb") as handle:
            return pq.read_table(handle)
    except (OSError, pa.ArrowInvalid) as error:
        raise OutputUnreadableError(f"scene file {root}/{path} cannot be read: {error}") from None


def _centres(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Box centres in longitude/latitude."""
    box = table.column("bbox").combine_chunks()
    x = (box.field("xmin").to_numpy(zero_copy_only=False) + box.field("xmax").to_numpy()) / 2
    y = (box.field("ymin").to_numpy(zero_copy_only=False) + box.field("ymax").to_numpy()) / 2
    crs = _crs_of(table)
    if crs != LONLAT and len(x):
        x, y = Transformer.from_crs(crs, LONLAT, always_xy=True).transform(x, y)
    return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)


def _margin(table: pa.Table) -> float:
    """The largest half side of the table's boxes (nulls, pixel-only rows, left out)."""
    box = table.column("bbox")
    sides = [
        pc.max(pc.subtract(pc.struct_field(box, hi), pc.struct_field(box, lo))).as_py()
        for lo, hi in (("xmin", "xmax"), ("ymin", "ymax"))
    ]
    return max([0.0, *(side / 2 for side in sides if side is not None)])


def _days(table: pa.Table) -> np.ndarray:
    """Each row's acquisition day (UTC), ``NO_DATE`` where it has none."""
    if "acquired_at" not in table.column_names:
        return np.full(table.num_rows, NO_DATE, dtype=object)
    stamps = pc.cast(table.column("acquired_at"), pa.timestamp("us", tz="UTC"))
    days = pc.fill_null(pc.strftime(stamps, format="%Y-%m-%d"), NO_DATE)
    return np.asarray(days.to_pylist(), dtype=object)


def _partitions(table: pa.Table, layout: Layout) -> np.ndarray:
    """Each row's partition: ``cell=<quadkey>``, or ``cell=<quadkey>/date=<day>``."""
    lon, lat = _centres(table)
    keys = "cell=" + quadkeys(lon, lat, layout.zoom)
    return keys + "/date=" + _days(table) if layout.by_date else keys


def _geometry_column(table: pa.Table) -> dict:
    """The table's ``geo`` entry for its geometry column (empty without ``geo`` metadata)."""
    geo = json.loads((table.schema.metadata or {}).get(b"geo", b"{}") or b"{}")
    return primary_column(geo) if geo.get("columns") else {}


def _crs_of(table: pa.Table) -> CRS:
    return column_crs(_geometry_column(table))


def _types(table: pa.Table) -> set[str]:
    return set(_geometry_column(table).get("geometry_types", []))


def _zoom_for(files: pa.Table, fresh: dict[str, pa.Table], by_date: bool) -> int:
    """The zoom for the first run, from each new scene's centre, size and (by date) day."""
    scenes = [t for t in fresh.values() if t.num_rows]
    if not scenes:
        return 0
    centres = [_centres(t) for t in scenes]  # one transform a scene
    lon = np.array([float(np.mean(x)) for x, _ in centres])
    lat = np.array([float(np.mean(y)) for _, y in centres])
    weights = np.array([t.nbytes for t in scenes], dtype=np.float64)
    days = np.array([_days(t)[0] for t in scenes], dtype=object) if by_date else None
    total = int(pc.sum(files["bytes"]).as_py() or 0)
    return choose_zoom(total, lon, lat, weights, days)


def _rebuild(
    fs: fsspec.AbstractFileSystem,
    root: str,
    key: str,
    sources: list[tuple[pa.Table, np.ndarray]],
) -> int:
    """Write one partition's file whole from its sources' rows in it (none: remove the file);
    ``sources``: each source table with its rows' partitions."""
    parts = [table.filter(pa.array(keys == key)) for table, keys in sources]
    target = f"{root}/{key}/part.parquet"
    parts = [p for p in parts if p.num_rows]
    if not parts:
        if fs.exists(target):
            fs.rm_file(target)
        return 0
    crs = _crs_of(parts[0])  # one dataset, one CRS (output.crs)
    table = pa.concat_tables([p.replace_schema_metadata(None) for p in parts])
    box = table.column("bbox").combine_chunks()
    corners = [
        box.field(k).to_numpy(zero_copy_only=False) for k in ("xmin", "ymin", "xmax", "ymax")
    ]
    table = table.take(pa.array(hilbert_order(*corners)))
    extent = [float(corners[0].min()), float(corners[1].min())]
    extent += [float(corners[2].max()), float(corners[3].max())]
    meta = geo_metadata(crs.to_json_dict(), extent, sorted(set().union(*map(_types, parts))))
    table = table.replace_schema_metadata({b"geo": json.dumps(meta).encode()})
    _put(fs, target, table, ROW_GROUP_ROWS)
    return table.num_rows


def _put(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table, row_group_size: int) -> None:
    """Whole or not at all (:func:`write_parquet_atomic`, which takes a URI)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    local = protocol in ("file", "local")
    try:
        write_parquet_atomic(table, path if local else fs.unstrip_protocol(path), row_group_size)
    except OSError as error:
        raise OutputNotWritableError(f"{path} cannot be written: {error}") from None


# --------------------------------------------------------------------------------------------
# Reading: which partitions a query needs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartitionedFiles:
    """A compacted dataset's files as they are now, each with its partition, and its layout."""

    files: list[str]  # filesystem paths, sorted
    partitions: list[str]  # per file: ``cell=<quadkey>[/date=<day>]``
    layout: Layout


def partitioned_files(fs: fsspec.AbstractFileSystem, root: str) -> PartitionedFiles | None:
    """The files of the compacted dataset at ``root`` (None: there is none), from its state's
    footer (the layout) and one listing: what a crashed compaction left is read as it is."""
    root = root.rstrip("/")
    state = f"{root}/{STATE}"
    if not fs.isfile(state):
        return None
    with fs.open(state, "rb") as handle:
        layout = Layout.from_metadata(pq.read_schema(handle).metadata)
    # 'part.parquet' leaves out files still being written ('part.parquet.tmp-<hex>').
    pattern = "cell=*/date=*/part.parquet" if layout.by_date else "cell=*/part.parquet"
    files = sorted(fs.glob(f"{root}/{pattern}"))
    partitions = [f.removeprefix(f"{root}/").removesuffix("/part.parquet") for f in files]
    return PartitionedFiles(files, partitions, layout)


def partition_fields(key: str) -> dict[str, str]:
    """A partition's hive fields: ``cell=q12/date=2026-06-01`` -> ``{"cell": "q12", ...}``."""
    return dict(part.split("=", 1) for part in key.split("/"))


def partitions_matching(
    partitions: Sequence[str],
    layout: Layout,
    crs: CRS,
    *,
    bbox: tuple[float, float, float, float] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> np.ndarray:
    """Per partition: whether it may hold a row whose box meets ``bbox`` (in ``crs``, the
    dataset's; edges included) and that was acquired in [``since``, ``until``)."""
    fields = [partition_fields(key) for key in partitions]
    keep = np.ones(len(fields), dtype=bool)
    reach = None if bbox is None else _centre_reach(bbox, layout.margin, crs)
    if reach is not None and fields:
        west, south, east, north = cell_bounds([f["cell"] for f in fields])
        keep &= (west <= reach[2]) & (east >= reach[0]) & (south <= reach[3]) & (north >= reach[1])
    if layout.by_date and (since is not None or until is not None):
        keep &= np.array([_day_may_match(f["date"], since, until) for f in fields], dtype=bool)
    return keep


def _centre_reach(
    bbox: tuple[float, float, float, float], margin: float, crs: CRS
) -> tuple[float, float, float, float] | None:
    """Where (lon/lat) the centre of a box that meets ``bbox`` can lie: the box grown by the
    margin, in lon/lat, clipped as :func:`quadkeys` clips. None: anywhere (the antimeridian,
    or beyond the CRS's domain)."""
    grown = (bbox[0] - margin, bbox[1] - margin, bbox[2] + margin, bbox[3] + margin)
    if crs != LONLAT:
        try:
            transformer = Transformer.from_crs(crs, LONLAT, always_xy=True)
            grown = transformer.transform_bounds(*grown, densify_pts=21)
        except ProjError:
            return None
    west, south, east, north = grown
    if not np.all(np.isfinite(grown)) or west > east:
        return None
    eps = 1e-9  # a centre on a tile's edge: float rounding must not put it outside
    lon = np.clip([west - eps, east + eps], -180.0, 180.0)
    lat = np.clip([south - eps, north + eps], -MERCATOR_LAT, MERCATOR_LAT)
    return float(lon[0]), float(lat[0]), float(lon[1]), float(lat[1])


def _day_may_match(day: str, since: datetime | None, until: datetime | None) -> bool:
    if day == NO_DATE:
        return False  # rows without acquired_at never pass a time filter
    start = datetime.fromisoformat(day).replace(tzinfo=UTC)
    since = since.replace(tzinfo=UTC) if since and since.tzinfo is None else since
    until = until.replace(tzinfo=UTC) if until and until.tzinfo is None else until
    return (since is None or start + timedelta(days=1) > since) and (until is None or start < until)
