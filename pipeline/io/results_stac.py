"""A STAC catalog of the results: one Collection for the output, one Item per scene file.

Read from the dataset index (:mod:`pipeline.io.index`), so it costs a few requests however
many scenes there are, and written with pystac under ``OUTPUT/stac/``: ``collection.json``
and ``items/<scene_id>.json``, every link relative, so the output can be moved or copied. An
Item's asset is its GeoParquet file (``application/vnd.apache.parquet``) with the ``table``
extension's columns and row count; the Collection's extent covers every file (in longitude /
latitude, as STAC requires, whatever ``output.crs`` is) and its summaries list the classes
(``classification`` extension) and the model ids. No Ray here.
"""

from __future__ import annotations

import posixpath
from datetime import UTC, datetime

import pystac
from pyproj import CRS, Transformer

from pipeline.io.geoparquet import SCHEMA
from pipeline.io.index import scene_files
from pipeline.io.ledger import Ledger

PARQUET = "application/vnd.apache.parquet"
TABLE = "https://stac-extensions.github.io/table/v1.2.0/schema.json"
CLASSIFICATION = "https://stac-extensions.github.io/classification/v2.0.0/schema.json"
LONLAT = CRS.from_user_input("OGC:CRS84")


def table_columns() -> list[dict]:
    """The detections table's columns as the ``table`` extension spells them."""
    return [{"name": f.name, "type": str(f.type)} for f in SCHEMA]


def lonlat_bbox(entry: dict) -> list[float] | None:
    """An index entry's bbox in longitude/latitude (None when it has none)."""
    if entry.get("xmin") is None:
        return None
    box = (entry["xmin"], entry["ymin"], entry["xmax"], entry["ymax"])
    crs = CRS.from_user_input(entry["crs"] or "OGC:CRS84")
    if crs != LONLAT:
        transformer = Transformer.from_crs(crs, LONLAT, always_xy=True)
        box = transformer.transform_bounds(*box, densify_pts=21)
    return [float(v) for v in box]


def scene_item(entry: dict) -> pystac.Item:
    """One scene file as an Item: its bbox, its rows' time range and a GeoParquet asset."""
    bbox = lonlat_bbox(entry)
    geometry = None
    if bbox is not None:
        x0, y0, x1, y1 = bbox
        geometry = {
            "type": "Polygon",
            "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]],
        }
    start, end = entry.get("time_start"), entry.get("time_end")
    recorded = datetime.fromtimestamp(entry["recorded_at"], UTC)
    properties: dict = {
        "georetina:model_id": entry["model_id"],
        "georetina:run_id": entry["run_id"],
        "georetina:detections": entry["detections"],
    }
    if entry.get("classes") is not None:
        properties["georetina:class_counts"] = dict(
            zip(entry["classes"], entry["class_counts"], strict=True)
        )
    if start is not None and start != end:
        properties |= {"start_datetime": _iso(start), "end_datetime": _iso(end)}
    item = pystac.Item(
        id=entry["scene_id"],
        geometry=geometry,
        bbox=bbox,
        # Without acquisition times (a plain raster without tags) the file's record time.
        datetime=None if start is not None and start != end else (start or recorded),
        properties=properties,
        stac_extensions=[TABLE],
    )
    item.add_asset(
        "data",
        pystac.Asset(
            href=entry["path"],  # made relative to the item's own file when written
            media_type=PARQUET,
            roles=["data"],
            title="detections (GeoParquet 1.1)",
            extra_fields={
                "table:columns": table_columns(),
                "table:primary_geometry": "geometry",
                "table:row_count": entry["detections"],
            },
        ),
    )
    return item


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def write_results_catalog(output_root: str, *, title: str | None = None) -> str:
    """``OUTPUT/stac/collection.json`` and an Item per scene file; returns the collection's
    path. Rewritten whole each time (the index is the source of truth)."""
    root = output_root.rstrip("/")
    files = scene_files(Ledger(root, compact_at=None).snapshot().table).sort_by("path")
    entries = files.to_pylist()
    collection = results_collection(entries, posixpath.basename(root) or "detections", title)
    for entry in entries:
        item = scene_item(entry)
        data = item.assets["data"]
        if "://" not in data.href and not data.href.startswith("/"):
            data.href = f"{root}/{data.href}"  # absolute for now; relative once saved
        collection.add_item(item)
    collection.normalize_hrefs(f"{root}/stac", strategy=_Layout())
    collection.make_all_asset_hrefs_relative()
    collection.save(catalog_type=pystac.CatalogType.SELF_CONTAINED, stac_io=_FsspecIO())
    return f"{root}/stac/collection.json"


def results_collection(entries: list[dict], name: str, title: str | None) -> pystac.Collection:
    """The Collection: the spatial and temporal extent of every file, classes and models."""
    boxes = [b for b in map(lonlat_bbox, entries) if b is not None]
    spatial = (
        [[min(b[0] for b in boxes), min(b[1] for b in boxes)]
         + [max(b[2] for b in boxes), max(b[3] for b in boxes)]]
        if boxes
        else [[-180.0, -90.0, 180.0, 90.0]]
    )  # fmt: skip
    starts = [e["time_start"] for e in entries if e.get("time_start") is not None]
    ends = [e["time_end"] for e in entries if e.get("time_end") is not None]
    interval = [[min(starts) if starts else None, max(ends) if ends else None]]
    if interval == [[None, None]]:
        now = datetime.now(UTC)
        interval = [[now, now]]
    classes = sorted({c for e in entries for c in (e.get("classes") or [])})
    collection = pystac.Collection(
        id=name,
        title=title or f"georetina detections: {name}",
        description="Objects detected by georetina (RetinaNet), one GeoParquet file per scene.",
        extent=pystac.Extent(pystac.SpatialExtent(spatial), pystac.TemporalExtent(interval)),
        license="other",
        stac_extensions=[CLASSIFICATION, TABLE],
        summaries=pystac.Summaries(
            {
                "georetina:model_id": sorted({e["model_id"] for e in entries}),
                "classification:classes": [
                    {"value": i, "name": name} for i, name in enumerate(classes)
                ],
            }
        ),
    )
    collection.extra_fields["table:columns"] = table_columns()
    collection.extra_fields["table:primary_geometry"] = "geometry"
    return collection


class _Layout(pystac.layout.HrefLayoutStrategy):
    """``collection.json`` and ``items/<id>.json`` beside it."""

    def get_catalog_href(self, cat: pystac.Catalog, parent_dir: str, is_root: bool) -> str:
        return f"{parent_dir}/catalog.json"

    def get_collection_href(self, col: pystac.Collection, parent_dir: str, is_root: bool) -> str:
        return f"{parent_dir}/collection.json"

    def get_item_href(self, item: pystac.Item, parent_dir: str) -> str:
        return f"{parent_dir}/items/{item.id}.json"


class _FsspecIO(pystac.StacIO):
    """pystac's reads and writes through fsspec: local disk and object storage alike."""

    def read_text(self, source: pystac.link.HREF, *args: object, **kwargs: object) -> str:
        import fsspec

        with fsspec.open(str(source), "r") as handle:
            return handle.read()

    def write_text(self, dest: pystac.link.HREF, txt: str, *args: object, **kw: object) -> None:
        import fsspec

        with fsspec.open(str(dest), "w", auto_mkdir=True) as handle:
            handle.write(txt)
