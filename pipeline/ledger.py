"""What is done: one small JSON record per scene attempt, next to the output.

Records are never appended to or rewritten: each attempt writes its own object
(``_ledger/<scene_id>/<time>-<run_id>-<status>.json``), so two runs at once cannot corrupt
each other, and object storage (which has no append) works the same as local disk. A scene
counts as done for a model and settings when its latest record for them says so.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import fsspec


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
        with self.fs.open(path, "w") as handle:
            handle.write(json.dumps(asdict(record), sort_keys=True))

    def records(self) -> list[LedgerRecord]:
        if not self.fs.exists(self.root):
            return []
        found = []
        for path in sorted(self.fs.find(self.root)):
            if not path.endswith(".json"):
                continue
            with self.fs.open(path, "r") as handle:
                found.append(LedgerRecord(**json.loads(handle.read())))
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


def now() -> float:
    return time.time()
