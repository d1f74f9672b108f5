"""Discovery: paths, fsspec globs, list files, STAC sources and mosaics expanded into scenes."""

from __future__ import annotations

import functools
import posixpath
import re
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec

from pipeline.config import InputItem, ListInput, MosaicInput, StacInput
from pipeline.errors import InputsUnreachableError
from pipeline.io.scenes import (
    IDENTITY_TIMEOUT_S,
    Scene,
    identity_from_info,
    identity_of,
    scene_id_for,
)
from pipeline.redact import redact_uri

_GLOB_CHARS = re.compile(r"[*?\[]")
# Listed files are statted this many at a time: on object storage each stat is a request
# (~30 ms), so 100,000 listed scenes one after another would take most of an hour.
STAT_CONCURRENCY = 64
# Listed paths are statted in windows of this many: the order stays the list's, and
# discovery never holds more pending stats than this.
STAT_WINDOW = 4096


def _unstrip(fs: fsspec.AbstractFileSystem, protocol: str, path: str) -> str:
    """Give a path returned by ``fs.glob`` its scheme back (fsspec strips it)."""
    if protocol in ("file", "local"):
        return path
    return fs.unstrip_protocol(path)


def discover_scenes(
    inputs: Sequence[InputItem],
    timeout_s: float = IDENTITY_TIMEOUT_S,
    vrt_folder: str | None = None,
) -> list[Scene]:
    """Every scene of :func:`iter_scenes`, as a list."""
    return list(iter_scenes(inputs, timeout_s, vrt_folder))


def iter_scenes(
    inputs: Sequence[InputItem],
    timeout_s: float = IDENTITY_TIMEOUT_S,
    vrt_folder: str | None = None,
) -> Iterator[Scene]:
    """Expand paths, globs, list files and STAC sources into scenes, in input order, once each,
    as they are found.

    A plain path is kept even if it does not exist (the scene then fails with a clear error,
    and the others go on); a glob that matches nothing yields nothing. A list file or STAC
    source that cannot be read fails the whole discovery with an error naming it. An
    http(s) URL is never a glob (its ``?`` starts a query: a presigned URL's signature), and
    a file whose size and stamp do not come within ``timeout_s`` gets an unknown identity.
    A mosaic is one scene: its VRT is written to ``vrt_folder`` (where every node's read
    tasks can open it: the job's output, ``OUTPUT/_vrt``; default a local temporary folder).
    """
    seen: set[str] = set()  # public URIs: what grows is one short string a scene
    for item in inputs:
        if isinstance(item, ListInput):
            found: Iterable[Scene] = _expand_patterns(read_uri_list(item.uris), timeout_s)
        elif isinstance(item, StacInput):
            from pipeline.io.stac import stac_scenes  # pystac: only for jobs that use STAC

            found = stac_scenes(item.stac)
        elif isinstance(item, MosaicInput):
            found = [mosaic_scene(item, timeout_s, vrt_folder)]
        else:
            found = _expand_patterns([item], timeout_s)
        for scene in found:
            if scene.public_uri not in seen:  # presigned twice: one scene
                seen.add(scene.public_uri)
                yield scene


def _is_glob(pattern: str) -> bool:
    if pattern.split("://", 1)[0].lower() in ("http", "https"):
        return False
    return bool(_GLOB_CHARS.search(pattern))


def _expand_patterns(patterns: Iterable[str], timeout_s: float) -> Iterator[Scene]:
    """Scenes in the patterns' order: globs from one detailed listing (no stat per match),
    plain paths statted ``STAT_CONCURRENCY`` at a time."""
    pending: list[str] = []
    stat = functools.partial(_stat_scene, timeout_s=timeout_s)
    with ThreadPoolExecutor(STAT_CONCURRENCY, thread_name_prefix="georetina stat") as pool:
        for pattern in patterns:
            if not _is_glob(pattern):
                pending.append(pattern)
                if len(pending) >= STAT_WINDOW:
                    yield from pool.map(stat, pending)
                    pending = []
                continue
            yield from pool.map(stat, pending)
            pending = []
            yield from _glob_scenes(pattern)
        yield from pool.map(stat, pending)


def _stat_scene(pattern: str, timeout_s: float) -> Scene:
    fs, path = fsspec.core.url_to_fs(pattern)
    uri = pattern if "://" in pattern else str(Path(pattern))
    return Scene(scene_id_for(uri), uri, identity_of(fs, path, uri, timeout_s))


def _glob_scenes(pattern: str) -> Iterator[Scene]:
    fs, path = fsspec.core.url_to_fs(pattern)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    matches = fs.glob(path, detail=True)
    for match in sorted(matches):
        uri = _unstrip(fs, protocol, match)
        yield Scene(scene_id_for(uri), uri, identity_from_info(uri, matches[match]))


def mosaic_scene(item: MosaicInput, timeout_s: float, vrt_folder: str | None) -> Scene:
    """One scene of the mosaic's members, its VRT written to ``vrt_folder``.

    The id comes from the name and the members' patterns, so it stays when a member is
    added or replaced; the identity comes from every member's, so the scene is then redone.
    Members that cannot be one scene (another CRS or resolution, off the grid) make a scene
    known bad, whose error names the odd file: it fails alone.
    """
    import hashlib

    from pipeline.io.mosaic import MosaicError, build_mosaic

    patterns = [item.mosaic] if isinstance(item.mosaic, str) else list(item.mosaic)
    # Each pattern redacted on its own: a presigned member keeps the scene's id, and no
    # credential reaches ids, the ledger or reports ('mosaic:' + all is not one URI).
    key = "mosaic:" + "|".join(redact_uri(pattern) for pattern in patterns)
    scene_id = scene_id_for(key, item.name or "mosaic")
    # Once each: a file matched by two patterns is one member.
    members = list({m.uri: m for m in _expand_patterns(patterns, timeout_s)}.values())
    digest = hashlib.sha256("\n".join(m.identity for m in members).encode()).hexdigest()[:16]
    identity = f"{key}|{len(members)} members|{digest}"
    try:
        xml = build_mosaic([m.uri for m in members])
    except MosaicError as error:
        return Scene(scene_id, key, identity, problem=f"mosaic: {error}")
    uri = f"{(vrt_folder or _local_vrt_folder()).rstrip('/')}/{scene_id}-{digest}.vrt"
    with fsspec.open(uri, "w", auto_mkdir=True) as handle:
        handle.write(xml)
    return Scene(scene_id, uri, identity)


def _local_vrt_folder() -> str:
    import tempfile

    return str(Path(tempfile.gettempdir()) / "georetina-vrt")


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
        raise InputsUnreachableError(f"input list {uri} cannot be read: {error}") from None
    base = uri.rsplit("/", 1)[0] if "://" in uri else str(Path(uri).parent)
    return parse_uri_list(text, base)
