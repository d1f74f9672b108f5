"""The scene table: one row per scene attempt, both the ledger and the dataset's index.

Every attempt (done or failed) is one row, written as its own small Parquet *fragment*
(``_ledger/_fragments/<time>-<run_id>-<hex>-<status>.parquet``, one PUT, never rewritten), so
two runs at once cannot corrupt each other and object storage, which has no append, works as
local disk does. A run that finds many fragments *compacts* them: it writes every row it read
into one ``_ledger/_compacted/<time>-<hex>.parquet`` and then deletes what that file covers
(the fragments, older compacted files, and old-format JSON records). Reading the table then
costs two listings and a few GETs, whatever the number of records ever written.

Safe with two runs at once, readers and compactors alike, because:

- a compacted file is written whole before anything it covers is deleted, and every row
  carries its ``record_id`` (the fragment's name), so rows seen twice (a fragment and a
  compacted file holding it, or two compacted files written by two compactors at once) are
  counted once;
- a reader lists the loose records *before* the compacted files: a loose record deleted after
  it was listed is in a compacted file written before the deletion, so it is either in the
  compacted listing or its read fails (not found) and the read starts again.

Old-format records (one JSON object per attempt, ``_ledger/<scene_id>/*.json``, written by
earlier versions) are read as loose records too, one GET each, until a compaction folds them in.
No Ray here.
"""

from __future__ import annotations

import io
import logging
import posixpath
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

FRAGMENTS = "_fragments"
COMPACTED = "_compacted"

# A reader that finds at least this many loose records compacts them (when it may write).
COMPACT_AT = 64
# Loose records and compacted files read at once (small GETs: object storage wants many).
READ_THREADS = 16
# A read that loses a race with a compaction (a listed record already deleted) starts again.
READ_ATTEMPTS = 5

SCHEMA = pa.schema(
    [
        ("record_id", pa.string()),  # the fragment's name: what makes a row unique
        ("scene_id", pa.string()),
        ("identity", pa.string()),
        ("model_id", pa.string()),
        ("settings_hash", pa.string()),
        ("status", pa.string()),  # "done" or "failed"
        ("run_id", pa.string()),
        ("recorded_at", pa.float64()),  # seconds since the epoch
        ("detections", pa.int64()),
        ("output", pa.string()),  # the scene file's URI as written
        ("error", pa.string()),
        # The dataset index (done records written with it; null otherwise).
        ("path", pa.string()),  # the scene file relative to the output root
        ("indexed", pa.bool_()),  # true: the columns below describe the file
        ("crs", pa.string()),  # the output CRS the bbox is in
        ("xmin", pa.float64()),
        ("ymin", pa.float64()),
        ("xmax", pa.float64()),
        ("ymax", pa.float64()),
        ("time_start", pa.timestamp("us", tz="UTC")),  # acquired_at of the file's rows
        ("time_end", pa.timestamp("us", tz="UTC")),
        ("classes", pa.list_(pa.string())),  # sorted
        ("class_counts", pa.list_(pa.int64())),  # rows per class, in ``classes`` order
        ("bytes", pa.int64()),  # the file's size
        ("footer_bytes", pa.int64()),  # its Parquet footer's length (read in one request)
        ("tiles_without_data", pa.int64()),
    ]
)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


@dataclass(frozen=True)
class Snapshot:
    """What one read found: every row (each once) and the objects it read them from."""

    table: pa.Table
    compacted: list[str]  # compacted files read
    loose: list[str]  # fragments and old-format records read one by one
    sizes: tuple[int, ...] = ()  # the bytes of each object read (compacted, then loose)

    @property
    def requests(self) -> int:
        """GETs the read made (listings not counted)."""
        return len(self.compacted) + len(self.loose)


class SceneTable:
    """The table under ``<output_root>/_ledger``: append a row, read them all, compact."""

    def __init__(self, output_root: str, parse_legacy: Callable[[str], dict | None]) -> None:
        self.output_root = output_root.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(f"{self.output_root}/_ledger")
        self.parse_legacy = parse_legacy

    # -- writing -----------------------------------------------------------------------------

    def append(self, row: dict) -> str:
        """Write one row as its own fragment; returns the fragment's record id."""
        stamp = f"{row['recorded_at']:.6f}".replace(".", "")
        record_id = f"{stamp}-{row['run_id']}-{uuid.uuid4().hex[:8]}-{row['status']}"
        table = pa.Table.from_pylist([{**row, "record_id": record_id}], schema=SCHEMA)
        self._write(f"{self.root}/{FRAGMENTS}/{record_id}.parquet", table)
        return record_id

    def _write(self, path: str, table: pa.Table) -> None:
        """Whole or not at all: local disk renames a temporary file over; object storage
        shows an object only once its PUT has completed."""
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd", row_group_size=100_000)
        if _is_local(self.fs):
            temporary = f"{path}.tmp-{uuid.uuid4().hex}"  # not *.parquet: never read
            self.fs.pipe_file(temporary, sink.getvalue())
            self.fs.mv(temporary, path)
        else:
            self.fs.pipe_file(path, sink.getvalue())

    # -- reading -----------------------------------------------------------------------------

    def read(self) -> Snapshot:
        """Every row, each once (in no particular order)."""
        for _ in range(READ_ATTEMPTS - 1):
            try:
                return self._read_once()
            except FileNotFoundError:  # a compaction deleted a listed record: read again
                continue
        return self._read_once()

    def _read_once(self) -> Snapshot:
        self.fs.invalidate_cache()  # fsspec caches listings; another run may have written
        listed = self._find(self.root)
        loose = self._loose(listed)  # first: see the module's docstring
        then = self._find(f"{self.root}/{COMPACTED}")
        compacted = sorted(p for p in then if self._is_compacted(p))
        listed.update(then)
        with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
            parts = list(pool.map(self._read_parquet, compacted))
            covered = set()
            for part in parts:
                covered.update(part.column("record_id").to_pylist())
            todo = [p for p in loose if self.record_id(p) not in covered]
            parts += [t for t in pool.map(self._read_loose, todo) if t is not None]
        table = pa.concat_tables(parts) if parts else SCHEMA.empty_table()
        sizes = tuple(int(listed[p]) for p in [*compacted, *todo])
        return Snapshot(_unique(table), compacted, todo, sizes)

    def _find(self, folder: str) -> dict[str, int]:
        """Every object under ``folder`` and its size (one paginated listing)."""
        try:
            found = self.fs.find(folder, detail=True)
        except FileNotFoundError:  # nothing recorded yet
            return {}
        return {path: info.get("size") or 0 for path, info in found.items()}

    def _is_compacted(self, path: str) -> bool:
        relative = path[len(self.root) + 1 :]
        return relative.startswith(f"{COMPACTED}/") and path.endswith(".parquet")

    def _loose(self, listed: dict[str, int]) -> list[str]:
        found = []
        for path in sorted(listed):
            relative = path[len(self.root) + 1 :]
            if relative.startswith(f"{FRAGMENTS}/") and path.endswith(".parquet"):
                found.append(path)
            elif not relative.startswith(f"{COMPACTED}/") and path.endswith(".json"):
                found.append(path)  # an old-format record: _ledger/<scene_id>/<name>.json
        return found

    def record_id(self, path: str) -> str:
        if path.endswith(".json"):
            return f"json:{path[len(self.root) + 1 :]}"
        return posixpath.basename(path).removesuffix(".parquet")

    def _read_parquet(self, path: str) -> pa.Table:
        with self.fs.open(path, "rb") as handle:
            table = pq.read_table(handle)
        return table.select(SCHEMA.names).cast(SCHEMA)

    def _read_loose(self, path: str) -> pa.Table | None:
        if path.endswith(".parquet"):
            try:
                return self._read_parquet(path)
            except (pa.ArrowInvalid, KeyError) as error:
                log.warning("ledger record %s cannot be read (%s); skipped", path, error)
                return None
        with self.fs.open(path, "r") as handle:
            text = handle.read()
        row = self.parse_legacy(text)
        if row is None:
            log.warning("ledger record %s cannot be read; its scene counts as not done", path)
            return None
        return pa.Table.from_pylist([{**row, "record_id": self.record_id(path)}], schema=SCHEMA)

    # -- compacting --------------------------------------------------------------------------

    def compact(self, snapshot: Snapshot | None = None) -> Snapshot:
        """Fold every row into one compacted file, then delete what it covers.

        Safe while other runs record, read or compact (see the module's docstring).
        """
        snapshot = snapshot or self.read()
        if not snapshot.loose and len(snapshot.compacted) <= 1:
            return snapshot
        table = snapshot.table.sort_by([("scene_id", "ascending"), ("recorded_at", "ascending")])
        stamp = f"{time.time():.6f}".replace(".", "")
        path = f"{self.root}/{COMPACTED}/{stamp}-{uuid.uuid4().hex[:8]}.parquet"
        self._write(path, table)
        self._delete([*snapshot.compacted, *snapshot.loose])
        log.info("ledger: %d record(s) compacted into %s", table.num_rows, path)
        return Snapshot(table, [path], [])

    def _delete(self, paths: Iterable[str]) -> None:
        paths = list(paths)
        if not paths:
            return
        try:
            self.fs.rm(paths)
        except FileNotFoundError:  # another compactor got there first: one by one
            for path in paths:
                try:
                    self.fs.rm_file(path)
                except FileNotFoundError:
                    pass
        self.fs.invalidate_cache()


def _unique(table: pa.Table) -> pa.Table:
    """One row per record id (the first seen)."""
    if table.num_rows == 0:
        return table
    first: dict[str, int] = {}
    for position, record_id in enumerate(table.column("record_id").to_pylist()):
        first.setdefault(record_id, position)
    if len(first) == table.num_rows:
        return table
    return table.take(pa.array(sorted(first.values()), pa.int64()))


def latest_per(table: pa.Table, keys: list[str]) -> pa.Table:
    """The latest row (by ``recorded_at``, then ``record_id``) for each value of ``keys``."""
    if table.num_rows == 0:
        return table
    ordered = table.sort_by(
        [
            *((k, "ascending") for k in keys),
            ("recorded_at", "descending"),
            ("record_id", "descending"),
        ]
    )
    # A row is its key's latest when its key differs from the previous row's.
    first = np.zeros(ordered.num_rows, dtype=bool)
    first[0] = True
    for key in keys:
        column = ordered.column(key).combine_chunks()
        changed = pc.fill_null(pc.not_equal(column[1:], column[:-1]), True)
        if column.null_count:  # null == null is the same key; null != value is not
            both = pc.and_(pc.is_null(column[1:]), pc.is_null(column[:-1]))
            changed = pc.and_(changed, pc.invert(both))
        first[1:] |= changed.to_numpy(zero_copy_only=False)
    return ordered.filter(pa.array(first))


def scene_files(table: pa.Table) -> pa.Table:
    """The dataset index: per scene file (``path``), its latest done record."""
    done = table.filter(
        pc.and_(pc.equal(table.column("status"), "done"), pc.is_valid(table.column("path")))
    )
    return latest_per(done, ["path"])
