"""What a command prints and what its exit code means.

By default a command prints only georetina's own lines: Python warnings, the log records of
Ray, GDAL and PyTorch, and what C/C++ libraries write to the process's stderr (Ray's core
worker, GDAL) go to a log file instead. ``--verbose`` turns all of that back on.

Exit codes (documented in the README):

=====  ====================================================================================
0      every scene done or skipped (or the command did what it was asked)
1      some scenes failed (the run went on and recorded them), or a submitted job failed
2      the job or training file is invalid (or a command's arguments are)
3      the run could not start: output not writable, inputs or STAC unreachable, checkpoint
       missing or mismatched, cluster unreachable or too small; ``compact``: the output
       missing or unreadable, the destination not writable
70     a bug: a one-line summary, and the full traceback in the log file it names
130    interrupted (Ctrl-C)
=====  ====================================================================================
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pipeline.errors import GeoRetinaError, InvalidInputError

EXIT_OK = 0
EXIT_SCENES_FAILED = 1
EXIT_INVALID = 2
EXIT_CANNOT_START = 3
EXIT_BUG = 70  # EX_SOFTWARE in sysexits.h
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


def exit_code_for(error: BaseException) -> int:
    """The exit code an error that ends a command means (see the module's table)."""
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, InvalidInputError):
        return EXIT_INVALID
    if isinstance(error, GeoRetinaError):
        return EXIT_CANNOT_START  # CannotStartError, or raised before any scene is processed
    if isinstance(error, ConnectionError):
        return EXIT_CANNOT_START  # ray.init of an address that does not answer
    return EXIT_BUG


def log_dir() -> Path:
    """Where the log files go: ``GEORETINA_LOG_DIR``, else ``<tmp>/georetina-logs``."""
    configured = os.environ.get("GEORETINA_LOG_DIR")
    return Path(configured) if configured else Path(tempfile.gettempdir()) / "georetina-logs"


def new_log_path(command: str) -> Path:
    folder = log_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{command}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"


@dataclass
class Console:
    """Where a command's own lines go (``out``, ``err``) and where everything else went."""

    out: IO[str]
    err: IO[str]
    log_path: Path | None = None
    verbose: bool = False  # -v: also Ray's, GDAL's and PyTorch's own output and progress
    _restore: list[Callable[[], None]] = field(default_factory=list)

    def error(self, message: str) -> None:
        print(f"georetina: error: {message}", file=self.err, flush=True)

    def warning(self, message: str) -> None:
        print(f"georetina: warning: {message}", file=self.err, flush=True)

    def crash_report(self, command: str, error: BaseException) -> Path:
        """Append the traceback to the log file (a new one when there is none); its path."""
        path = self.log_path or new_log_path(command)
        with open(path, "a") as handle:
            handle.write(f"\n--- georetina {command}: unexpected error ---\n")
            traceback.print_exception(error, file=handle)
        return path


def _fd_stderr_is_ours() -> bool:
    """True when ``sys.stderr`` is the process's fd 2 (not a test's capture buffer)."""
    try:
        return sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False


def _quiet_loggers(log_stream: IO[str], err: IO[str]) -> list[Callable[[], None]]:
    """Our own ``pipeline.*`` warnings still reach the user; the rest is left to the log."""
    ours = logging.getLogger("pipeline")
    handler = logging.StreamHandler(err)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("georetina: %(levelname)s: %(message)s"))
    ours.addHandler(handler)
    ours.propagate = False
    # GDAL's messages come through rasterio's loggers; keep them out of the way.
    noisy = [logging.getLogger(name) for name in ("rasterio", "fiona", "pyogrio", "urllib3")]
    levels = [(logger, logger.level) for logger in noisy]
    for logger in noisy:
        logger.setLevel(logging.ERROR)
    root_handler = logging.StreamHandler(log_stream)
    logging.getLogger().addHandler(root_handler)

    def restore() -> None:
        ours.removeHandler(handler)
        ours.propagate = True
        logging.getLogger().removeHandler(root_handler)
        for logger, level in levels:
            logger.setLevel(level)

    return [restore]


def _to_log(log_stream: IO[str]) -> Callable[..., None]:
    """``warnings.showwarning`` writing to the log file."""

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: IO[str] | None = None,
        line: str | None = None,
    ) -> None:
        log_stream.write(warnings.formatwarning(message, category, filename, lineno, line))

    return show


@contextlib.contextmanager
def open_console(command: str, verbose: bool) -> Iterator[Console]:
    """The console a command prints to; quiet unless ``verbose`` (see the module's doc).

    Quiet, and when stderr is this process's fd 2: fd 2 itself is pointed at the log file
    (so Ray's C++ core worker and GDAL write there too), ``sys.stderr`` writes to the log,
    and the command's own error lines go to a copy of the original stderr.
    """
    if verbose:
        yield Console(out=sys.stdout, err=sys.stderr, verbose=True)
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    log_path = new_log_path(command)
    log_stream = open(log_path, "a", buffering=1)  # noqa: SIM115 - closed on exit below
    restore: list[Callable[[], None]] = []
    original_stderr = sys.stderr
    err: IO[str] = original_stderr
    if _fd_stderr_is_ours():
        sys.stderr.flush()
        saved_fd = os.dup(2)
        err = os.fdopen(os.dup(saved_fd), "w", buffering=1)
        os.dup2(log_stream.fileno(), 2)

        def restore_fd() -> None:
            sys.stderr.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            err.close()

        restore.append(restore_fd)
    sys.stderr = log_stream
    restore.append(lambda: setattr(sys, "stderr", original_stderr))
    restore.extend(_quiet_loggers(log_stream, err))
    # Python's warnings go to the log file; they are not ignored, so that a test session's
    # filters (Ray's deprecations as errors) still apply to the commands.
    with warnings.catch_warnings():
        warnings.showwarning = _to_log(log_stream)
        try:
            yield Console(out=sys.stdout, err=err, log_path=log_path)
        finally:
            for undo in reversed(restore):
                undo()
            log_stream.close()
