"""What is done: one small JSON record per scene attempt, next to the output.

Records are never appended to or rewritten: each attempt writes its own object
(``_ledger/<scene_id>/<time>-<run_id>-<status>.json``), so two runs at once cannot corrupt
each other, and object storage (which has no append) works the same as local disk. A scene
counts as done for a model and settings when its latest record for them says so.

A record is written whole or not at all (local disk: a temporary name renamed over; object
storage: one PUT), and one that cannot be parsed anyway (a disk filled mid-write, a hand
edit) is skipped with a warning: its scene is simply not done, and is processed again.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, fields

import fsspec

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

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.identity, self.model_id, self.settings_hash)


class Ledger:
    def __init__(self, output_root: str) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(f"{output_root.rstrip('/')}/_ledger")

    def record(self, record: LedgerRecord) -> None:
        stamp = f"{record.recorded_at:.6f}".replace(".", "")
        path = f"{self.root}/{record.scene_id}/{stamp}-{record.run_id}-{record.status}.json"
        self.fs.makedirs(f"{self.root}/{record.scene_id}", exist_ok=True)
        body = redact_text(json.dumps(asdict(record), sort_keys=True))
        if _is_local(self.fs):
            temporary = f"{path}.tmp-{uuid.uuid4().hex}"  # not *.json: never read as a record
            with self.fs.open(temporary, "w") as handle:
                handle.write(body)
            self.fs.mv(temporary, path)
        else:
            with self.fs.open(path, "w") as handle:  # an object appears when its PUT completes
                handle.write(body)

    def records(self) -> list[LedgerRecord]:
        if not self.fs.exists(self.root):
            return []
        found = []
        for path in sorted(self.fs.find(self.root)):
            if not path.endswith(".json"):
                continue
            with self.fs.open(path, "r") as handle:
                text = handle.read()
            record = parse_record(text)
            if record is None:
                log.warning("ledger record %s cannot be read; its scene counts as not done", path)
                continue
            found.append(record)
        return found

    def latest(self) -> dict[tuple[str, str, str], LedgerRecord]:
        """Latest record per (scene identity, model id, settings hash)."""
        latest: dict[tuple[str, str, str], LedgerRecord] = {}
        for record in self.records():
            current = latest.get(record.key)
            if current is None or record.recorded_at >= current.recorded_at:
                latest[record.key] = record
        return latest

    def done_keys(self) -> set[tuple[str, str, str]]:
        return {key for key, record in self.latest().items() if record.status == "done"}


_FIELDS = {f.name for f in fields(LedgerRecord)}


def parse_record(text: str) -> LedgerRecord | None:
    """A ledger record from its JSON, or None when it is not one (truncated, edited)."""
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


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def now() -> float:
    return time.time()
