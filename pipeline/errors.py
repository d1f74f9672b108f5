"""One root exception; subclasses also inherit ValueError/OSError so callers can catch either.

Two families tell the command line which exit code an error means: :class:`InvalidInputError`
(2: what a command was given is invalid, above all the job or training file) and
:class:`CannotStartError` (3, a valid job that cannot start: output not writable, inputs
unreachable, checkpoint missing or mismatched, cluster unreachable or too small; for other
commands, what they read cannot be read or what they write cannot be written).
"""

from __future__ import annotations

from pipeline.redact import redact_text


class GeoRetinaError(Exception):
    """Root of every error this package raises on purpose."""


class InvalidInputError(GeoRetinaError, ValueError):
    """What a command was given is invalid (a file, a field, a value); exit code 2."""


class JobFileError(InvalidInputError):
    """The job or training file is invalid: it cannot be read, parsed or validated."""


class JobSpecError(JobFileError):
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


class CannotStartError(GeoRetinaError):
    """A valid job that cannot start; the message names what is missing or unreachable."""


class OutputNotWritableError(CannotStartError, OSError):
    """The output location cannot be written (checked before any scene is read)."""


class OutputUnreadableError(CannotStartError, OSError):
    """An output to read (to compact it) is missing, is not an output, or a file it lists
    cannot be read."""


class InputsUnreachableError(CannotStartError, OSError):
    """An input list file, STAC catalog or STAC API cannot be read."""


class ClusterUnreachableError(CannotStartError, ConnectionError):
    """The Ray cluster or its Job API cannot be reached."""


class ClusterTooSmallError(CannotStartError, ValueError):
    """The job's actors or in-flight tiles cannot fit the cluster as it is."""


class CheckpointError(CannotStartError, ValueError):
    """A checkpoint that is missing, cannot be loaded safely or does not match the model."""


class QueryError(InvalidInputError):
    """A query that cannot run: the message names the file, field or value that is wrong."""


class QuicklookError(InvalidInputError):
    """A picture that cannot be drawn: the message names the file and what is missing."""


class CompactionError(InvalidInputError):
    """A compaction asked for in a layout (zoom, date partitions) its destination does not
    have, or a zoom out of range: the message names the setting and how to change it."""
