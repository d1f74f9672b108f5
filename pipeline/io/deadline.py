"""A deadline for blocking I/O that Python cannot interrupt. Pure: no Ray.

A read stuck inside GDAL (a server that accepts and never answers, a hung mount) cannot be
interrupted from Python: signals wait for the C call to return. So the call runs in a daemon
thread and the caller stops waiting at the deadline; the thread is abandoned (GDAL's own
HTTP low-speed limit ends it later, see ``pipeline.io.rasters.GDAL_OPTIONS``).

Each calling thread keeps one such helper thread for all its calls and gets a new one only
when a call is abandoned: a fresh thread per call made GDAL tile reads 8-10 % slower
(bench/tiling.py), and a read task makes one call per chunk of tiles.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class _Helper:
    """A daemon thread running the calls handed to it, one at a time."""

    def __init__(self) -> None:
        self.calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="deadline helper", daemon=True).start()

    def _serve(self) -> None:
        while True:
            call, outcome, done = self.calls.get()
            try:
                outcome["value"] = call()
            except BaseException as error:  # noqa: BLE001 - handed to the caller as is
                outcome["error"] = error
            done.set()
            del call, outcome, done  # hold nothing (a chunk of tiles) until the next call


_local = threading.local()


def call_with_deadline(call: Callable[[], T], timeout_s: float, what: str) -> T:
    """``call()``'s result or exception; ``TimeoutError`` naming ``what`` past ``timeout_s``."""
    helper = getattr(_local, "helper", None)
    if helper is None:
        helper = _local.helper = _Helper()
    outcome: dict[str, object] = {}
    done = threading.Event()
    helper.calls.put((call, outcome, done))
    if not done.wait(timeout_s):
        _local.helper = None  # still inside the call: later calls get a fresh helper
        raise TimeoutError(f"{what} took longer than {timeout_s:g} s")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
