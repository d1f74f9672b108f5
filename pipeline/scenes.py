"""Discovery of scenes (paths, fsspec globs, list files, STAC) and their identity."""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import fsspec

from pipeline.config import InputItem, ListInput, StacInput
from pipeline.errors import GeoRetinaError
from pipeline.redact import redact_uri

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


def _identity(
    fs: fsspec.AbstractFileSystem, path: str, uri: str, timeout_s: float = IDENTITY_TIMEOUT_S
) -> str:
    from pipeline.deadline import call_with_deadline

    try:
        info = call_with_deadline(lambda: fs.info(path), timeout_s, f"stat of {uri}")
    except (OSError, ValueError):  # TimeoutError too: the scene's pre-flight will say more
        return f"{redact_uri(uri)}|unknown"
    stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    return f"{redact_uri(uri)}|{info.get('size')}|{stamp}"


def _unstrip(fs: fsspec.AbstractFileSystem, protocol: str, path: str) -> str:
    """Give a path returned by ``fs.glob`` its scheme back (fsspec strips it)."""
    if protocol in ("file", "local"):
        return path
    return fs.unstrip_protocol(path)


def discover_scenes(
    inputs: Sequence[InputItem], timeout_s: float = IDENTITY_TIMEOUT_S
) -> list[Scene]:
    """Expand paths, globs, list files and STAC sources into scenes, in input order, once each.

    A plain path is kept even if it does not exist (the scene then fails with a clear error,
    and the others go on); a glob that matches nothing yields nothing. A list file or STAC
    source that cannot be read fails the whole discovery with an error naming it. An
    http(s) URL is never a glob (its ``?`` starts a query: a presigned URL's signature), and
    a file whose size and stamp do not come within ``timeout_s`` gets an unknown identity.
    """
    scenes: dict[str, Scene] = {}
    for item in inputs:
        if isinstance(item, ListInput):
            found: Iterable[Scene] = _expand_patterns(read_uri_list(item.uris), timeout_s)
        elif isinstance(item, StacInput):
            from pipeline.stac import stac_scenes  # pystac: only for jobs that use STAC

            found = stac_scenes(item.stac)
        else:
            found = _expand_patterns([item], timeout_s)
        for scene in found:
            scenes.setdefault(scene.public_uri, scene)  # presigned twice: one scene
    return list(scenes.values())


def _is_glob(pattern: str) -> bool:
    if pattern.split("://", 1)[0].lower() in ("http", "https"):
        return False
    return bool(_GLOB_CHARS.search(pattern))


def _expand_patterns(patterns: Iterable[str], timeout_s: float) -> Iterable[Scene]:
    for pattern in patterns:
        fs, path = fsspec.core.url_to_fs(pattern)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        if _is_glob(pattern):
            uris = [_unstrip(fs, protocol, match) for match in sorted(fs.glob(path))]
        else:
            uris = [pattern if "://" in pattern else str(Path(pattern))]
        for uri in uris:
            local = uri if "://" in uri else path
            yield Scene(scene_id_for(uri), uri, _identity(fs, local, uri, timeout_s))


def parse_uri_list(text: str, base: str) -> list[str]:
    """Lines of a list file: blanks and ``#`` comments skipped, relative lines joined to base."""
    uris = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "://" not in line and not posixpath.isabs(line) and not Path(line).is_absolute():
            line = posixpath.join(base, line) if "://" in base else str(Path(base) / line)
        uris.append(line)
    return uris


def read_uri_list(uri: str) -> list[str]:
    """Read a list file from anywhere fsspec reaches."""
    try:
        with fsspec.open(uri, "r") as handle:
            text = handle.read()
    except (OSError, ValueError) as error:
        raise GeoRetinaError(f"input list {uri} cannot be read: {error}") from None
    base = uri.rsplit("/", 1)[0] if "://" in uri else str(Path(uri).parent)
    return parse_uri_list(text, base)
