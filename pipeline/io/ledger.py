"""What is done: one record per scene attempt, in the scene table next to the output.

Each attempt is one row of the scene table (:mod:`pipeline.io.index`): written as its own
fragment, never rewritten, so two runs at once cannot corrupt each other; compacted by the run
that finds many, so finding what is done costs a few reads whatever the archive's size. A
scene counts as done for a model and settings when its latest record for them says so. Done
records written by :func:`pipeline.merge.scene.done_record` also carry the scene file's index
entry (bbox in the output CRS, time range, classes, bytes), which queries read before any file.

A record is written whole or not at all, and one that cannot be parsed anyway (a disk filled
mid-write, a hand edit) is skipped with a warning: its scene is simply not done, and is
processed again. Old-format records (one JSON object per attempt under
``_ledger/<scene_id>/``) are read as they are, and folded in by the next compaction.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, fields
from datetime import datetime

from pipeline.io.index import COMPACT_AT, SceneTable, Snapshot, latest_per
from pipeline.redact import redact_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LedgerRecord:
    scene_id: str
    identity: str
    model_id: str
    settings_hash: str
    status: str  # "done" or "failed"
    run_id: str
    recorded_at: float
    detections: int | None = None
    output: str | None = None
    error: str | None = None
    # The scene file's index entry (done records from ``done_record``; None: not known).
    bbox: tuple[float, float, float, float] | None = None  # in ``crs``; None: no rows
    crs: str | None = None  # the output CRS
    time_start: datetime | None = None  # acquisition times of the file's rows
    time_end: datetime | None = None
    per_class: dict[str, int] | None = None  # rows per class name; None: not indexed
    bytes: int | None = None  # the file's size
    footer_bytes: int | None = None  # its Parquet footer's length
    tiles_without_data: int | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.identity, self.model_id, self.settings_hash)


class Ledger:
    """Records scene attempts and answers what is done.

    ``compact_at``: a read that finds at least this many loose records (fragments not yet
    compacted, old-format JSON records) compacts them; None never compacts (read-only use).
    """

    def __init__(self, output_root: str, compact_at: int | None = COMPACT_AT) -> None:
        self.table = SceneTable(
            output_root, parse_legacy=lambda text: _legacy_row(text, output_root)
        )
        self.fs, self.root = self.table.fs, self.table.root
        self.compact_at = compact_at

    def record(self, record: LedgerRecord) -> None:
        self.table.append(to_row(record, self.table.output_root))

    def snapshot(self) -> Snapshot:
        """Every row, compacting first when the read found many loose records."""
        found = self.table.read()
        loose = len(found.loose) + max(0, len(found.compacted) - 1)
        if self.compact_at is not None and loose >= self.compact_at:
            try:
                return self.table.compact(found)
            except OSError as error:  # read-only storage: the read stands, uncompacted
                log.warning("ledger: cannot compact %s (%s)", self.root, error)
        return found

    def compact(self) -> Snapshot:
        return self.table.compact()

    def records(self) -> list[LedgerRecord]:
        """Every record, by scene and then time."""
        table = self.snapshot().table
        table = table.sort_by([("scene_id", "ascending"), ("recorded_at", "ascending")])
        return [from_row(row) for row in table.to_pylist()]

    def latest(self) -> dict[tuple[str, str, str], LedgerRecord]:
        """Latest record per (scene identity, model id, settings hash)."""
        table = latest_per(self.snapshot().table, ["identity", "model_id", "settings_hash"])
        return {record.key: record for record in map(from_row, table.to_pylist())}

    def done_keys(self) -> set[tuple[str, str, str]]:
        return {key for key, record in self.latest().items() if record.status == "done"}


_FIELDS = {f.name for f in fields(LedgerRecord)}
_TEXT = ("identity", "output", "error")  # fields that may quote a URL (redacted)


def to_row(record: LedgerRecord, output_root: str) -> dict:
    """A record as a scene-table row (credentials in URLs redacted)."""
    row = {f: getattr(record, f) for f in _FIELDS - {"bbox", "per_class"}}
    for name in _TEXT:
        if row[name] is not None:
            row[name] = redact_text(row[name])
    done = record.status == "done"
    row["path"] = relative_path(record, output_root) if done else None
    row["indexed"] = record.status == "done" and record.per_class is not None
    if record.bbox is not None:
        row.update(zip(("xmin", "ymin", "xmax", "ymax"), record.bbox, strict=True))
    if record.per_class is not None:
        row["classes"] = sorted(record.per_class)
        row["class_counts"] = [record.per_class[name] for name in row["classes"]]
    return row


def from_row(row: dict) -> LedgerRecord:
    values = {k: v for k, v in row.items() if k in _FIELDS}
    if row.get("xmin") is not None:
        values["bbox"] = (row["xmin"], row["ymin"], row["xmax"], row["ymax"])
    if row.get("classes") is not None:
        values["per_class"] = dict(
            zip(row["classes"] or [], row["class_counts"] or [], strict=True)
        )
    return LedgerRecord(**values)


def relative_path(record: LedgerRecord, output_root: str) -> str | None:
    """The scene file's path under the output root (so a copied output stays valid)."""
    output = record.output
    if output is None:
        return None
    root = output_root.rstrip("/") + "/"
    if output.startswith(root):
        return output[len(root) :]
    usual = f"detections/{record.scene_id}.parquet"  # where every scene file is written
    return usual if output.endswith(f"/{usual}") else output


def parse_record(text: str) -> LedgerRecord | None:
    """An old-format ledger record from its JSON, or None when it is not one."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or not {"scene_id", "status", "recorded_at"} <= set(data):
        return None
    try:
        return LedgerRecord(**{k: v for k, v in data.items() if k in _FIELDS})
    except TypeError:
        return None


def _legacy_row(text: str, output_root: str) -> dict | None:
    record = parse_record(text)
    return None if record is None else to_row(record, output_root)


def now() -> float:
    return time.time()
