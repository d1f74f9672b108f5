"""STAC sources: a static catalog walked with pystac, or an API searched with pystac-client.

Each item becomes one scene: the chosen asset's href, the item's id and its acquisition time.
Catalog JSON is read through fsspec, so a catalog on object storage works like a local one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

import fsspec
import pystac
from pystac.stac_io import DefaultStacIO

from pipeline.config import StacSearch
from pipeline.errors import GeoRetinaError, InputsUnreachableError
from pipeline.io.scenes import Scene, scene_id_for
from pipeline.redact import redact_uri


class FsspecStacIO(DefaultStacIO):
    """pystac I/O through fsspec (s3://, gs://, ...); http(s) keeps pystac's own reader."""

    def read_text(self, source: Any, *args: Any, **kwargs: Any) -> str:
        href = str(source)
        if href.startswith(("http://", "https://")):
            return super().read_text(source, *args, **kwargs)
        with fsspec.open(href, "r") as handle:
            return handle.read()


def stac_scenes(search: StacSearch, now: datetime | None = None) -> list[Scene]:
    """The scenes of a STAC source, in the order the catalog or API gives its items."""
    if search.catalog is not None:
        items: Iterable[pystac.Item] = catalog_items(search, now)
        where = search.catalog
    else:
        items = api_items(search, now)
        where = str(search.api)
    try:
        return [item_scene(item, search.asset) for item in items]
    except GeoRetinaError:
        raise
    except Exception as error:  # noqa: BLE001 - pystac/pystac-client/HTTP errors, named here
        raise InputsUnreachableError(f"STAC source {where} cannot be read: {error}") from None


def item_scene(item: pystac.Item, asset_key: str) -> Scene:
    """One item's scene; an item without the asset is a scene that fails with the reason."""
    acquired = item.datetime or _start_datetime(item)
    asset = item.assets.get(asset_key)
    if asset is None:
        uri = f"stac:{item.id}#{asset_key}"
        return Scene(
            scene_id_for(uri, item.id),
            uri,
            uri,
            acquired_at=acquired,
            stac_item_id=item.id,
            problem=f"STAC item {item.id} has no asset {asset_key!r} "
            f"(it has: {', '.join(sorted(item.assets)) or 'none'})",
        )
    uri = asset.get_absolute_href() or asset.href
    return Scene(
        scene_id_for(uri, item.id),
        uri,
        item_identity(item, asset, uri),
        acquired_at=acquired,
        stac_item_id=item.id,
    )


def item_identity(item: pystac.Item, asset: pystac.Asset, uri: str) -> str:
    """What tells a re-published item from a done one, without a request per item.

    The asset's ``file:checksum`` or ``file:size`` and the item's ``updated`` time, where the
    catalog has them; a catalog without them is trusted to change the href when the file does.
    """
    fields = asset.extra_fields
    updated = asset.extra_fields.get("updated") or item.properties.get("updated") or ""
    content = fields.get("file:checksum") or fields.get("file:size") or ""
    return f"{redact_uri(uri)}|stac:{item.id}|{updated}|{content}"  # SAS-signed hrefs


def catalog_items(search: StacSearch, now: datetime | None = None) -> Iterator[pystac.Item]:
    """Walk a static catalog (or collection) and yield the items that pass the filters."""
    try:
        root = pystac.read_file(str(search.catalog), stac_io=FsspecStacIO())
    except Exception as error:  # noqa: BLE001 - named with the catalog
        raise InputsUnreachableError(
            f"STAC catalog {search.catalog} cannot be read: {error}"
        ) from None
    if isinstance(root, pystac.Item):
        candidates: Iterable[pystac.Item] = [root]
    elif isinstance(root, pystac.Catalog):
        candidates = root.get_items(recursive=True)
    else:
        raise GeoRetinaError(f"STAC catalog {search.catalog} is a {type(root).__name__}")
    start, end = search.window(now)
    count = 0
    for item in candidates:
        if search.max_items is not None and count >= search.max_items:
            return
        if item_matches(item, search.collections, search.bbox, start, end):
            count += 1
            yield item


def item_matches(
    item: pystac.Item,
    collections: list[str] | None,
    bbox: tuple[float, float, float, float] | None,
    start: datetime | None,
    end: datetime | None,
) -> bool:
    """The STAC API's item-search semantics, for items of a static catalog."""
    if collections is not None and item.collection_id not in collections:
        return False
    if bbox is not None and item.bbox is not None:
        b = item.bbox  # 2D [w, s, e, n] or 3D [w, s, low, e, n, high]
        west, south, east, north = (b[0], b[1], b[3], b[4]) if len(b) == 6 else b[:4]
        if west > bbox[2] or east < bbox[0] or south > bbox[3] or north < bbox[1]:
            return False
    if start is None and end is None:
        return True
    first = item.datetime or _start_datetime(item)
    last = item.datetime or _end_datetime(item) or first
    if first is None or last is None:
        return False
    return (end is None or first <= end) and (start is None or last >= start)


def api_items(search: StacSearch, now: datetime | None = None) -> Iterator[pystac.Item]:
    """Items of a STAC API item search (paged by pystac-client)."""
    from pystac_client import Client

    start, end = search.window(now)
    window = None
    if start is not None or end is not None:
        window = f"{_rfc3339(start)}/{_rfc3339(end)}"
    try:
        client = Client.open(str(search.api))
    except Exception as error:  # noqa: BLE001 - named with the API
        raise InputsUnreachableError(f"STAC API {search.api} cannot be opened: {error}") from None
    result = client.search(
        collections=search.collections,
        bbox=list(search.bbox) if search.bbox else None,
        datetime=window,
        max_items=search.max_items,
    )
    yield from result.items()


def _rfc3339(moment: datetime | None) -> str:
    return ".." if moment is None else moment.isoformat().replace("+00:00", "Z")


def _start_datetime(item: pystac.Item) -> datetime | None:
    return _property_time(item, "start_datetime")


def _end_datetime(item: pystac.Item) -> datetime | None:
    return _property_time(item, "end_datetime")


def _property_time(item: pystac.Item, key: str) -> datetime | None:
    value = item.properties.get(key)
    if not value:
        return None
    from pystac.utils import str_to_datetime

    return str_to_datetime(value)
