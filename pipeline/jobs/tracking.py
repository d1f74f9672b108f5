"""The run's report: counters in memory, and one line a closed scene in a file (never held)."""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.jobs.merging import (
    SceneOutcome,
)
from pipeline.jobs.report import run_totals
from pipeline.redact import redact_text


class SceneLog:
    """Scene outcomes, one JSON line each, in a local file: the report's scenes, not held.

    Only the count per status is kept in memory (progress lines need it); the report's
    totals are computed from the file when the run ends (:func:`run_totals`).
    """

    def __init__(self) -> None:
        handle, self.path = tempfile.mkstemp(prefix="georetina-scenes-", suffix=".jsonl")
        os.close(handle)
        self.counts: Counter[str] = Counter()

    def add(self, outcome: SceneOutcome) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(asdict(outcome), default=str) + "\n")
        self.counts[outcome.status] += 1

    def dicts(self) -> Iterator[dict[str, Any]]:
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                yield json.loads(line)

    def outcomes(self) -> Iterator[SceneOutcome]:
        return (SceneOutcome(**scene) for scene in self.dicts())


@dataclass
class RunReport:
    run_id: str
    job: str
    model_id: str
    output: str
    wall_s: float = 0.0
    ray_start_s: float = 0.0  # starting an embedded Ray; tiles_per_s excludes it
    tiles: int = 0
    tiles_per_s: float = 0.0
    detections: int = 0
    scenes_done: int = 0
    scenes_skipped: int = 0
    scenes_failed: int = 0
    scenes_not_started: int = 0  # the run ended early (a stall): the next run does them
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    detections_per_class: dict[str, int] = field(default_factory=dict)
    area_km2: float = 0.0
    km2_per_hour: float = 0.0
    map: str | None = None  # PNG of where this run's detections fall (None: no detections)
    log: SceneLog = field(default_factory=SceneLog, repr=False)

    @property
    def scenes(self) -> list[SceneOutcome]:
        """Every scene's outcome, read back from the scene log."""
        return list(self.log.outcomes())

    def count(self, status: str) -> int:
        return self.log.counts[status]

    def totals_from_log(self, busy_s: float) -> None:
        for key, value in run_totals(self.log.dicts(), busy_s).items():
            setattr(self, key, value)
        self.detections = sum(scene["detections"] for scene in self.log.dicts())

    def header(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "log"}

    def as_dict(self) -> dict[str, Any]:
        return {**self.header(), "scenes": list(self.log.dicts())}

    def write_json(self, handle: Any) -> None:
        """The report as JSON, its scenes streamed from the log (never all in memory)."""
        header = json.dumps(self.header(), indent=2, default=str)
        # The header object without its closing "\n}", then the scenes array, then "}".
        handle.write(redact_text(header[:-2]) + ',\n  "scenes": [')
        for index, scene in enumerate(self.log.dicts()):
            line = json.dumps(scene, default=str)
            handle.write(("," if index else "") + "\n    " + redact_text(line))
        handle.write("\n  ]\n}\n")
