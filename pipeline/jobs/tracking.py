"""The driver's share of a run: which scenes are in flight, and the run's report.

The driver holds only scenes in flight (their tiles' tables are in Ray's object store, it
holds references) and counters: every closed scene leaves one line in the report's scene
log, on disk, and nothing in memory. Work on a batch of tile results is column-wise Arrow:
a filter per scene in the batch and one ``ray.put`` of each part.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.io.ledger import Ledger
from pipeline.jobs.merging import (
    SceneJob,
    SceneOutcome,
    failed_record,
    merge_scene,
    scene_context,
)
from pipeline.jobs.report import RunProgress, progress_line, run_totals
from pipeline.redact import redact_text, redact_uri


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


@dataclass
class _InFlight:
    """A planned scene whose tiles are still coming back."""

    job: SceneJob
    received: int = 0
    parts: list[ray.ObjectRef] = field(default_factory=list)


class SceneTracker:
    """Routes tile results to their scene; launches a scene's merge task when all are in.

    Scenes become known when their plan is drained from the board; their tiles can come
    back before that (the board is drained in batches), and then wait in ``early``.
    """

    def __init__(
        self,
        board: Any,
        common: dict,
        output_root: str,
        report: RunReport,
        progress: Callable[[str], None],
    ) -> None:
        self.board, self.common, self.output_root = board, common, output_root
        self.report, self.progress = report, progress
        self.ledger = Ledger(output_root)
        self.in_flight: dict[str, _InFlight] = {}
        self.early: dict[str, list[tuple[ray.ObjectRef, int]]] = {}
        self.failed: set[str] = set()  # failed this run: their late tiles are dropped
        self.merging: dict[ray.ObjectRef, str] = {}
        self.tiles_seen = 0
        self.tiles_planned = 0
        self.last_drain = 0.0

    # -- tile results --------------------------------------------------------------------

    def add_batch(self, table: pa.Table) -> None:
        """One batch of tile results, split by scene, column-wise."""
        if table.num_rows == 0:
            return
        self.tiles_seen += table.num_rows
        ids = table["scene_id"]
        names = pc.unique(ids).to_pylist()
        if len(names) == 1:
            self._add(names[0], table)
        else:
            for name in names:
                self._add(name, table.filter(pc.equal(ids, name)))
        self.collect(block=False)

    def _add(self, scene_id: str, part: pa.Table) -> None:
        if scene_id in self.failed:
            return
        if scene_id not in self.in_flight:
            self.drain(force=True)
        state = self.in_flight.get(scene_id)
        if state is None:
            if scene_id not in self.failed:
                self.early.setdefault(scene_id, []).append((ray.put(part), part.num_rows))
            return
        state.parts.append(ray.put(part))
        state.received += part.num_rows
        self._launch_if_complete(scene_id, state)

    def _launch_if_complete(self, scene_id: str, state: _InFlight) -> None:
        if state.received < state.job.expected:
            return
        del self.in_flight[scene_id]
        self.merging[merge_scene.remote(state.job, *state.parts)] = scene_id

    # -- the board -----------------------------------------------------------------------

    def drain(self, force: bool = False, every_s: float = 0.2) -> None:
        """Take the board's plans and failures (at most every ``every_s`` unless forced)."""
        if not force and time.monotonic() - self.last_drain < every_s:
            return
        self.last_drain = time.monotonic()
        planned, failures = ray.get(self.board.drain.remote())
        for scene_id, tiles, (scene, info) in planned:
            self._planned(scene_id, tiles, scene, info)
        for scene_id, error, scene in failures:
            self.fail(scene_id, error, scene)

    def _planned(self, scene_id: str, tiles: int, scene: dict, info: Any) -> None:
        context = scene_context(self.common, self.output_root, scene, info)
        state = _InFlight(SceneJob(context, scene["identity"], tiles, self.output_root))
        self.in_flight[scene_id] = state
        self.tiles_planned += tiles
        for ref, rows in self.early.pop(scene_id, []):
            state.parts.append(ref)
            state.received += rows
        self._launch_if_complete(scene_id, state)

    def fail(self, scene_id: str, error: str, scene: dict | None = None) -> None:
        """Close a scene as failed: a ledger record, an outcome; its late tiles are dropped."""
        error = redact_text(error)
        state = self.in_flight.pop(scene_id, None)
        self.early.pop(scene_id, None)
        self.failed.add(scene_id)
        if state is None and scene is None:
            return  # closed already (merging or merged): a late post changes nothing
        if state is not None:
            identity, uri, tiles = (
                state.job.identity,
                state.job.context.scene_uri,
                state.job.expected,
            )
        else:
            assert scene is not None
            identity, uri, tiles = scene["identity"], redact_uri(scene["uri"]), 0
        record = failed_record(scene_id, identity, self.common, error)
        outcome = SceneOutcome(scene_id, uri, "failed", tiles, error=error)
        self.ledger.record(record)
        self.close(outcome)

    def close(self, outcome: SceneOutcome) -> None:
        self.report.log.add(outcome)
        if outcome.status == "failed":
            self.progress(f"  failed {outcome.scene_id}: {outcome.error}")
        elif outcome.status == "done":
            self.progress(
                f"  done {outcome.scene_id}: {outcome.tiles} tiles "
                f"({outcome.tiles_without_data} without data), {outcome.detections} detections"
            )

    # -- merges --------------------------------------------------------------------------

    def collect(self, block: bool) -> None:
        """Record the merges that have finished (all of them, when ``block``)."""
        if not self.merging:
            return
        refs = list(self.merging)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=None if block else 0)
        for ref in ready:
            scene_id = self.merging.pop(ref)
            try:
                outcome = ray.get(ref)
            except Exception as error:  # noqa: BLE001 - the task died past its retries
                self.failed.add(scene_id)
                outcome = SceneOutcome(scene_id, "", "failed", error=f"merge/write lost: {error}")
            self.close(outcome)

    def finish(self, stage_error: str | None) -> None:
        """The stream has ended: last posts, every merge, and the scenes left incomplete."""
        self.drain(force=True)
        self.collect(block=True)
        for scene_id, state in list(self.in_flight.items()):
            lost = f"only {state.received} of {state.job.expected} tiles came back"
            self.fail(scene_id, f"{lost}: {stage_error}" if stage_error else lost)

    def snapshot(self, scenes_to_run: int, busy_s: float) -> RunProgress:
        """Where the run stands; discovery is over before the stream starts."""
        counts = self.report.log.counts
        return RunProgress(
            scenes_done=counts["done"],
            scenes_failed=counts["failed"],
            scenes_skipped=counts["skipped"],
            scenes_known=scenes_to_run + counts["skipped"],
            discovery_finished=True,
            tiles_done=self.tiles_seen,
            tiles_planned=self.tiles_planned,
            busy_s=busy_s,
        )

    def progress_line(self, scenes_to_run: int, busy_s: float) -> str:
        """The plain line: scenes of this run through (done or failed), skips left out."""
        through = self.report.count("done") + self.report.count("failed")
        return progress_line(through, scenes_to_run, self.tiles_seen, self.tiles_planned, busy_s)
