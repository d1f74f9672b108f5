"""A deadline for blocking I/O that Python cannot interrupt. Pure: no Ray.

A read stuck inside GDAL (a server that accepts and never answers, a hung mount) cannot be
interrupted from Python: signals wait for the C call to return. So the call runs in a daemon
thread and the caller stops waiting at the deadline; the thread is abandoned (GDAL's own
HTTP low-speed limit ends it later, see ``pipeline.rasters.GDAL_OPTIONS``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def call_with_deadline(call: Callable[[], T], timeout_s: float, what: str) -> T:
    """``call()``'s result or exception; ``TimeoutError`` naming ``what`` past ``timeout_s``."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as error:  # noqa: BLE001 - handed to the caller as is
            outcome["error"] = error

    worker = threading.Thread(target=target, name=f"deadline: {what}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise TimeoutError(f"{what} took longer than {timeout_s:g} s")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
