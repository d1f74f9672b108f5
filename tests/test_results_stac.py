"""The STAC catalog of the results: written with pystac from the index, validated by pystac."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas
import pyarrow.parquet as pq
import pystac
import pystac.validation
from detections_data import write_indexed_dataset

from pipeline.io.results_stac import CLASSIFICATION, PARQUET, TABLE, write_results_catalog


def test_a_collection_with_an_item_per_scene_file_that_pystac_validates(tmp_path):
    root = tmp_path / "out"
    write_indexed_dataset(root, scenes=3, count=40)
    path = write_results_catalog(str(root))
    collection = pystac.Collection.from_file(path)
    items = sorted(collection.get_items(), key=lambda item: item.id)
    assert [item.id for item in items] == ["s0", "s1", "s2"]
    # pystac validates against the core STAC schemas it bundles; the extensions' schemas
    # live on the web, which tests do not reach: their fields are checked by hand below.
    for written in [Path(path), *sorted((root / "stac" / "items").glob("*.json"))]:
        document = json.loads(written.read_text())
        assert set(document["stac_extensions"]) <= {TABLE, CLASSIFICATION}
        pystac.validation.validate_dict({**document, "stac_extensions": []})
    ((west, south, east, north),) = collection.extent.spatial.bboxes
    assert (round(west, 2), round(east, 2)) == (15.0, 15.03) and 42.0 <= south < north <= 42.01
    classes = collection.summaries.lists["classification:classes"]
    assert {c["name"] for c in classes} <= {"ship", "boat", "plane"}
    for item in items:
        asset = item.assets["data"]
        assert asset.media_type == PARQUET
        frame = geopandas.read_parquet(asset.get_absolute_href())
        assert len(frame) == asset.extra_fields["table:row_count"] == 40
        names = [c["name"] for c in asset.extra_fields["table:columns"]]
        assert names == pq.read_schema(asset.get_absolute_href()).names
        assert item.bbox[0] <= frame.total_bounds[0] and frame.total_bounds[2] <= item.bbox[2]
        assert item.datetime is not None
    # Every link is relative: the output can be moved.
    text = json.loads(Path(path).read_text())
    assert all("://" not in link["href"] and not link["href"].startswith("/")
               for link in text["links"])  # fmt: skip
