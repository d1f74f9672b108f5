"""A scene: one raster to process, its stable id and its identity (what changes with the file)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import fsspec

from pipeline.redact import redact_uri

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class Scene:
    """One raster to process.

    ``scene_id`` is stable for a URI and safe as a file name; ``identity`` also changes when
    the file does (size, mtime or etag), so a re-run can tell a replaced file from a done one.
    """

    scene_id: str
    uri: str
    identity: str
    acquired_at: datetime | None = None  # from the source (STAC); else the raster's tags
    stac_item_id: str | None = None
    problem: str | None = None  # known bad at discovery (e.g. a STAC item without the asset)

    @property
    def public_uri(self) -> str:
        """The URI as recorded (reports, ledger, ``scene_uri``): credentials redacted."""
        return redact_uri(self.uri)


def scene_id_for(uri: str, name: str | None = None) -> str:
    """Readable and unique: ``name`` (default: the file's stem) plus a short hash of the URI.

    The URI's credentials (a presigned URL's signature) are left out: the id is stable when
    the same object is presigned again, and no hash of a secret is published.
    """
    public = redact_uri(uri)
    path = public.split("?", 1)[0].split("#", 1)[0]
    stem = _UNSAFE.sub("_", name or Path(path.rstrip("/")).stem)[:64] or "scene"
    return f"{stem}-{hashlib.sha256(public.encode()).hexdigest()[:8]}"


# How long discovery waits for one file's size and stamp (a server that never answers).
IDENTITY_TIMEOUT_S = 60.0


def identity_of(
    fs: fsspec.AbstractFileSystem, path: str, uri: str, timeout_s: float = IDENTITY_TIMEOUT_S
) -> str:
    from pipeline.io.deadline import call_with_deadline

    try:
        info = call_with_deadline(lambda: fs.info(path), timeout_s, f"stat of {uri}")
    except (OSError, ValueError):  # TimeoutError too: the scene's pre-flight will say more
        return f"{redact_uri(uri)}|unknown"
    return identity_from_info(uri, info)


def identity_from_info(uri: str, info: dict) -> str:
    """A file's identity from what a stat or a detailed listing says of it."""
    stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    return f"{redact_uri(uri)}|{info.get('size')}|{stamp}"
