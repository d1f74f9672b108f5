"""The scene board: the one small actor every stage tells what happened to a scene.

Plan tasks post each scene's plan (tile count, raster facts) or its pre-flight failure; read
tasks and detector actors post failures and ask, before spending a read or a GPU pass,
whether the scene has already failed or whether this chunk has already killed workers too
often. The driver drains the posts in batches. The board holds only what is in flight: posts
until drained, the ids of failed scenes, and attempt counts for the most recent chunks.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

# Attempts are remembered for this many recent chunk keys: far more than are ever in flight.
ATTEMPTS_REMEMBERED = 200_000


class SceneBoard:
    """Posts from the stages, drained by the driver; run as a Ray actor (see ``jobs.run``)."""

    def __init__(self) -> None:
        self.planned: list[tuple[str, int, Any]] = []
        self.failures: list[tuple[str, str, Any]] = []
        self.failed: set[str] = set()
        self.attempts: OrderedDict[tuple, int] = OrderedDict()

    def post_plan(self, scene_id: str, tiles: int, info: Any) -> None:
        self.planned.append((scene_id, tiles, info))

    def post_failure(self, scene_id: str, error: str, scene: Any = None) -> None:
        """``scene``: the scene's own fields, from a stage that has them (the plan stage)."""
        if scene_id not in self.failed:
            self.failed.add(scene_id)
            self.failures.append((scene_id, error, scene))

    def start(self, key: tuple, scene_ids: list[str]) -> tuple[int, list[str]]:
        """A stage starts work ``key`` for ``scene_ids``: its attempt number (1 the first
        time; more after the worker that ran it died) and which of the scenes have failed."""
        attempt = self.attempts.pop(key, 0) + 1
        self.attempts[key] = attempt
        while len(self.attempts) > ATTEMPTS_REMEMBERED:
            self.attempts.popitem(last=False)
        return attempt, [s for s in scene_ids if s in self.failed]

    def finish(self, key: tuple) -> None:
        """Work ``key`` completed: a later start of it (its batch retried for another
        scene's sake) is a first attempt again, not a sign that it kills workers."""
        self.attempts.pop(key, None)

    def drain(self) -> tuple[list[tuple[str, int, Any]], list[tuple[str, str, Any]]]:
        planned, failures = self.planned, self.failures
        self.planned, self.failures = [], []
        return planned, failures
