"""Compacting an output into one spatially partitioned GeoParquet dataset. No Ray here.

``DEST/cell=<quadkey>/part.parquet``: one file per coarse spatial cell (a Web Mercator
quadkey of the detection's box centre; ``cell=q`` is the whole world at zoom 0), its rows in
Hilbert order over the whole file, row groups of ``ROW_GROUP_ROWS`` rows, zstd, the ``bbox``
covering column and ``geo`` metadata. ``DEST/_state.parquet`` says which version of which
scene file (its index ``record_id``) went into which cells.

Incremental and idempotent: a partition is always rebuilt whole from the scene files that
the state (plus the new files) assigns to it, never appended to; only the cells touched by
new or rewritten scene files are rebuilt, each replaced atomically, and the state is written
last. A crash part-way leaves the old state, so the next compaction rebuilds the same cells
again from their sources: no row is lost or counted twice once it completes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyproj import CRS, Transformer

from pipeline.io.geoparquet import geo_metadata, hilbert_order, write_parquet_atomic
from pipeline.io.index import scene_files
from pipeline.io.ledger import Ledger

ROW_GROUP_ROWS = 100_000
STATE = "_state.parquet"
STATE_SCHEMA = pa.schema([("path", pa.string()), ("record_id", pa.string()), ("cell", pa.string())])
LONLAT = CRS.from_user_input("OGC:CRS84")
# A cell's file should land between these sizes; the zoom is chosen for it on the first run.
TARGET_BYTES = (128 << 20, 1 << 30)
MAX_ZOOM = 16


def quadkeys(lon: np.ndarray, lat: np.ndarray, zoom: int) -> np.ndarray:
    """Web Mercator quadkeys (``"q" + digits``) of points at ``zoom``."""
    lat = np.clip(lat, -85.05112878, 85.05112878)
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


def choose_zoom(total_bytes: int, lon: np.ndarray, lat: np.ndarray, weights: np.ndarray) -> int:
    """The deepest zoom at which no cell's expected file exceeds the upper target size,
    stopping before cells fall under the lower one on average."""
    zoom = 0
    for candidate in range(1, MAX_ZOOM + 1):
        keys = quadkeys(lon, lat, candidate)
        _, inverse = np.unique(keys, return_inverse=True)
        sizes = np.bincount(inverse, weights=weights) * total_bytes / max(weights.sum(), 1)
        if sizes.mean() < TARGET_BYTES[0]:
            break
        zoom = candidate
        if sizes.max() <= TARGET_BYTES[1]:
            break
    return zoom


@dataclass(frozen=True)
class Compacted:
    zoom: int
    cells_rebuilt: list[str]
    rows: int  # rows in the rebuilt cells
    files_read: int


def compact_dataset(
    source: str,
    dest: str,
    *,
    zoom: int | None = None,
    after_cell: Callable[[str], None] | None = None,
) -> Compacted:
    """Compact ``source`` (an output root with a scene table) into ``dest`` (see the module's
    docstring). ``zoom``: the cells' quadkey zoom (default: chosen on the first run, then
    kept). ``after_cell``: called with each cell once its file is replaced."""
    fs, dest_root = fsspec.core.url_to_fs(dest)
    src_fs, src_root = fsspec.core.url_to_fs(source)
    files = scene_files(Ledger(source, compact_at=None).snapshot().table)
    state, kept_zoom = _read_state(fs, dest_root)
    current = dict(zip(files["path"].to_pylist(), files["record_id"].to_pylist(), strict=True))
    known = {(p, r) for p, r in zip(state["path"], state["record_id"], strict=True)}
    dirty = {p for p, r in current.items() if (p, r) not in known}
    dirty |= {p for p, _ in known if p not in current or (p, current[p]) not in known}
    fresh = {p: _read_scene(src_fs, f"{src_root}/{p}") for p in dirty if p in current}
    if zoom is None:
        zoom = kept_zoom if kept_zoom is not None else _zoom_for(files, fresh)
    elif kept_zoom is not None and zoom != kept_zoom:
        raise ValueError(f"{dest} was compacted at zoom {kept_zoom}; compact into a new folder")
    cells_of = {p: set(_cells(t, zoom)) for p, t in fresh.items()}
    for path, _, cell in _state_rows(state):
        if path not in dirty:
            cells_of.setdefault(path, set()).add(cell)
    touched = {c for p, r, c in _state_rows(state) if p in dirty}
    touched |= {c for p in fresh for c in cells_of[p]}
    # Each source is read, and its rows' cells computed, once, however many cells it spans.
    loaded = {p: (t, _cells(t, zoom)) for p, t in fresh.items()}
    rows = 0
    for cell in sorted(touched):
        sources = sorted(p for p, cells in cells_of.items() if cell in cells)
        for path in sources:
            if path not in loaded:
                table = _read_scene(src_fs, f"{src_root}/{path}")
                loaded[path] = (table, _cells(table, zoom))
        rows += _rebuild(fs, dest_root, cell, [loaded[p] for p in sources])
        if after_cell is not None:
            after_cell(cell)
    _write_state(fs, dest_root, cells_of, current, zoom)
    return Compacted(zoom, sorted(touched), rows, len(fresh))


def _state_rows(state: dict) -> list[tuple[str, str, str]]:
    return list(zip(state["path"], state["record_id"], state["cell"], strict=True))


def _read_state(fs: fsspec.AbstractFileSystem, root: str) -> tuple[dict, int | None]:
    path = f"{root}/{STATE}"
    if not fs.exists(path):
        return {"path": [], "record_id": [], "cell": []}, None
    with fs.open(path, "rb") as handle:
        table = pq.read_table(handle)
    zoom = int(table.schema.metadata[b"zoom"])
    return table.to_pydict(), zoom


def _write_state(
    fs: fsspec.AbstractFileSystem, root: str, cells_of: dict, current: dict, zoom: int
) -> None:
    rows = [
        {"path": p, "record_id": current[p], "cell": c}
        for p in sorted(cells_of)
        if p in current
        for c in sorted(cells_of[p])
    ]
    table = pa.Table.from_pylist(rows, schema=STATE_SCHEMA)
    table = table.replace_schema_metadata({b"zoom": str(zoom).encode()})
    _put(fs, f"{root}/{STATE}", table, 100_000)


def _read_scene(fs: fsspec.AbstractFileSystem, path: str) -> pa.Table:
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle)


def _centres(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Box centres in longitude/latitude."""
    box = table.column("bbox").combine_chunks()
    x = (box.field("xmin").to_numpy(zero_copy_only=False) + box.field("xmax").to_numpy()) / 2
    y = (box.field("ymin").to_numpy(zero_copy_only=False) + box.field("ymax").to_numpy()) / 2
    crs = _crs_of(table)
    if crs != LONLAT and len(x):
        x, y = Transformer.from_crs(crs, LONLAT, always_xy=True).transform(x, y)
    return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)


def _crs_of(table: pa.Table) -> CRS:
    geo = json.loads((table.schema.metadata or {}).get(b"geo", b"{}") or b"{}")
    column = geo.get("columns", {}).get("geometry", {})
    return CRS.from_json_dict(column["crs"]) if column.get("crs") else LONLAT


def _types(table: pa.Table) -> set[str]:
    geo = json.loads((table.schema.metadata or {}).get(b"geo", b"{}") or b"{}")
    return set(geo.get("columns", {}).get("geometry", {}).get("geometry_types", []))


def _cells(table: pa.Table, zoom: int) -> np.ndarray:
    lon, lat = _centres(table)
    return quadkeys(lon, lat, zoom)


def _zoom_for(files: pa.Table, fresh: dict[str, pa.Table]) -> int:
    lon = [float(np.mean(_centres(t)[0])) for t in fresh.values() if t.num_rows]
    lat = [float(np.mean(_centres(t)[1])) for t in fresh.values() if t.num_rows]
    weights = np.array([t.nbytes for t in fresh.values() if t.num_rows], dtype=np.float64)
    total = int(pc.sum(files["bytes"]).as_py() or 0)
    return choose_zoom(total, np.array(lon), np.array(lat), weights) if lon else 0


def _rebuild(
    fs: fsspec.AbstractFileSystem,
    root: str,
    cell: str,
    sources: list[tuple[pa.Table, np.ndarray]],
) -> int:
    """Write one cell's file whole from its sources' rows in it (none: remove the file);
    ``sources``: each source table with its rows' cells."""
    parts = [table.filter(pa.array(cells == cell)) for table, cells in sources]
    target = f"{root}/cell={cell}/part.parquet"
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
    write_parquet_atomic(table, path if local else fs.unstrip_protocol(path), row_group_size)
