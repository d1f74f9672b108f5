"""One root exception; subclasses also inherit ValueError/OSError so callers can catch either."""

from __future__ import annotations

from pipeline.redact import redact_text


class GeoRetinaError(Exception):
    """Root of every error this package raises on purpose."""


class JobSpecError(GeoRetinaError, ValueError):
    """A job file that does not validate; lists every bad field with its path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        body = "\n".join(f"  - {line}" for line in problems)
        super().__init__(f"invalid job {source}: {len(problems)} problem(s)\n{body}")

    def __reduce__(self) -> tuple:
        return (type(self), (self.source, self.problems))


class SceneError(GeoRetinaError, ValueError):
    """A scene that cannot be processed: the message names the scene and what is wrong."""

    def __init__(self, scene: str, problem: str) -> None:
        self.scene = scene
        self.problem = redact_text(problem)  # GDAL's messages quote the URL, query and all
        super().__init__(f"scene {scene}: {self.problem}")

    def __reduce__(self) -> tuple:
        # Raised in Ray tasks: rebuilt on the driver from its own arguments, not the message.
        return (type(self), (self.scene, self.problem))


class CheckpointError(GeoRetinaError, ValueError):
    """A checkpoint that cannot be loaded safely or does not match the model settings."""


class QueryError(GeoRetinaError, ValueError):
    """A query that cannot run: the message names the file, field or value that is wrong."""


class QuicklookError(GeoRetinaError, ValueError):
    """A picture that cannot be drawn: the message names the file and what is missing."""
