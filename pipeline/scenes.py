"""Discovery of scenes (paths and fsspec globs) and their identity."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import fsspec

_GLOB_CHARS = re.compile(r"[*?\[]")
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


def scene_id_for(uri: str) -> str:
    """Readable and unique: the file's stem plus a short hash of the full URI."""
    stem = _UNSAFE.sub("_", Path(uri.rstrip("/")).stem)[:64] or "scene"
    return f"{stem}-{hashlib.sha256(uri.encode()).hexdigest()[:8]}"


def _identity(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> str:
    try:
        info = fs.info(path)
    except (OSError, ValueError):
        return f"{uri}|unknown"
    stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    return f"{uri}|{info.get('size')}|{stamp}"


def _unstrip(fs: fsspec.AbstractFileSystem, protocol: str, path: str) -> str:
    """Give a path returned by ``fs.glob`` its scheme back (fsspec strips it)."""
    if protocol in ("file", "local"):
        return path
    return fs.unstrip_protocol(path)


def discover_scenes(inputs: list[str]) -> list[Scene]:
    """Expand paths and globs into scenes, in input order, without duplicates.

    A plain path is kept even if it does not exist (the scene then fails with a clear error,
    and the others go on); a glob that matches nothing yields nothing.
    """
    scenes: dict[str, Scene] = {}
    for pattern in inputs:
        fs, _, (path,) = fsspec.get_fs_token_paths(pattern)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        if _GLOB_CHARS.search(pattern):
            uris = [_unstrip(fs, protocol, match) for match in sorted(fs.glob(path))]
        else:
            uris = [pattern if "://" in pattern else str(Path(pattern))]
        for uri in uris:
            if uri not in scenes:
                local = uri if "://" in uri else path
                scenes[uri] = Scene(scene_id_for(uri), uri, _identity(fs, local, uri))
    return list(scenes.values())
