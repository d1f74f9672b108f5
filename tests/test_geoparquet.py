"""GeoParquet 1.1 output: schema-valid metadata, and readable by geopandas, DuckDB and GDAL."""

import json
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import geopandas
import jsonschema
import numpy as np
import pyarrow.parquet as pq
import pytest
import referencing
from pyproj import CRS

from pipeline.io.geoparquet import hilbert_index
from pipeline.io.rasters import RasterInfo
from pipeline.merge.scene import SceneContext, finalize_scene
from pipeline.model.detector import TileDetections
from pipeline.ops.boxes import MergeOptions

SCHEMA_DIR = Path(__file__).parent / "data" / "geoparquet"


def geo_validator() -> jsonschema.Draft7Validator:
    schema = json.loads((SCHEMA_DIR / "schema.json").read_text())
    import pyproj

    projjson_path = (
        Path(pyproj.__file__).parent / "proj_dir" / "share" / "proj" / "projjson.schema.json"
    )
    projjson = json.loads(projjson_path.read_text())
    resource = referencing.Resource.from_contents(projjson)
    registry = referencing.Registry().with_resource(
        "https://proj.org/schemas/v0.7/projjson.schema.json", resource
    )
    return jsonschema.Draft7Validator(schema, registry=registry)


INFO = RasterInfo(
    width=1000,
    height=1000,
    count=3,
    dtype="uint8",
    crs_wkt=CRS.from_epsg(32633).to_wkt(),
    crs_name="EPSG:32633",
    transform=(0.5, 0.0, 500000.0, 0.0, -0.5, 4650000.0),
    bands=(1, 2, 3),
    scale_range=(0.0, 255.0),
    acquired_at=datetime(2026, 6, 1, 10, 30),
)


def write_scene(
    tmp_path: Path, crs: str = "OGC:CRS84", count: int = 500, info: RasterInfo = INFO
) -> Path:
    """Write one scene of ``count`` random boxes through the real merge and write path."""
    rng = np.random.default_rng(0)
    x0 = rng.uniform(0, 900, count)
    y0 = rng.uniform(0, 900, count)
    boxes = np.stack([x0, y0, x0 + 20, y0 + 20], axis=1).astype(np.float32)
    found = TileDetections(
        boxes,
        rng.uniform(0.1, 1, count).astype(np.float32),
        rng.integers(0, 2, count).astype(np.int16),
    )
    output = tmp_path / "out" / "detections" / "s1.parquet"
    context = SceneContext(
        scene_id="s1",
        scene_uri="/data/s1.tif",
        info=info,
        tile_size=1000,
        edge_tolerance=2.0,
        merge=MergeOptions(),
        class_names=("ship", "boat"),
        model_id="m:1",
        settings_hash="abc",
        run_id="r1",
        output_crs=crs,
        output_uri=str(output),
        row_group_size=100,
    )
    finalize_scene(context, [(0, 0)], [found])
    return output


@pytest.fixture
def written(tmp_path) -> Path:
    return write_scene(tmp_path)


def test_geo_metadata_validates_against_the_geoparquet_schema(written):
    meta = json.loads(pq.read_schema(written).metadata[b"geo"])
    geo_validator().validate(meta)
    column = meta["columns"]["geometry"]
    assert meta["version"] == "1.1.0"
    assert column["encoding"] == "WKB"
    assert column["geometry_types"] == ["Polygon"]
    assert column["covering"]["bbox"]["xmin"] == ["bbox", "xmin"]
    xmin, ymin, xmax, ymax = column["bbox"]
    assert 14.9 < xmin < xmax < 15.1 and 41.9 < ymin < ymax < 42.1  # lon/lat order


def test_an_empty_scene_is_valid_geoparquet(tmp_path):
    path = write_scene(tmp_path, count=0)
    meta = json.loads(pq.read_schema(path).metadata[b"geo"])
    geo_validator().validate(meta)
    assert meta["columns"]["geometry"]["geometry_types"] == []
    assert len(geopandas.read_parquet(path)) == 0


def test_a_scene_in_pixel_coordinates_only_is_valid_geoparquet_with_null_geometry(tmp_path):
    from dataclasses import replace

    pixels_only = replace(INFO, crs_wkt=None, crs_name=None, transform=(1, 0, 0, 0, 1, 0))
    path = write_scene(tmp_path, count=500, info=pixels_only)  # row groups of 100
    meta = json.loads(pq.read_schema(path).metadata[b"geo"])
    geo_validator().validate(meta)
    assert "bbox" not in meta["columns"]["geometry"]
    table = pq.read_table(path)
    assert table.num_rows > 400 and pq.ParquetFile(path).num_row_groups > 1
    for name in ("geometry", "bbox", "scene_crs"):
        assert table.column(name).null_count == table.num_rows
    assert table.column("pixel_xmin").null_count == 0
    frame = geopandas.read_parquet(path)
    assert frame.geometry.isna().all() and frame.crs == "OGC:CRS84"


def test_the_shipped_example_validates_so_the_validator_is_real():
    example = json.loads((SCHEMA_DIR / "example_metadata.json").read_text())["geo"]
    geo_validator().validate(example)
    with pytest.raises(jsonschema.ValidationError):
        geo_validator().validate({**example, "version": "banana"})


def test_geopandas_reads_crs_rows_and_geometry(written):
    frame = geopandas.read_parquet(written)
    table = pq.read_table(written)
    assert frame.crs == CRS.from_user_input("OGC:CRS84")
    assert len(frame) == table.num_rows > 0
    assert set(frame.class_name) <= {"ship", "boat"}
    assert frame.geometry.is_valid.all()
    # The covering bbox equals each geometry's bounds.
    bounds = frame.geometry.bounds
    covering = table.column("bbox").combine_chunks()
    assert np.allclose(bounds.minx, covering.field("xmin").to_numpy())
    assert np.allclose(bounds.maxy, covering.field("ymax").to_numpy())
    assert (frame.scene_crs == "EPSG:32633").all()
    assert str(frame.acquired_at.iloc[0]).startswith("2026-06-01 10:30:00")


def test_native_crs_output(tmp_path):
    path = write_scene(tmp_path, crs="EPSG:32633")
    frame = geopandas.read_parquet(path)
    assert frame.crs.to_epsg() == 32633
    # Pixel boxes map back through the affine: x = 500000 + 0.5 * col.
    row = frame.iloc[0]
    assert row.geometry.bounds[0] == pytest.approx(500000 + 0.5 * row.pixel_xmin, abs=1e-6)


def test_duckdb_reads_native_geometry_with_crs(written):
    con = duckdb.connect()
    (rows,) = con.execute(
        f"select count(*), min(ST_CRS(geometry)), min(score) from read_parquet('{written}') "
        "where score > 0.5 and bbox.xmin > 14.0"
    ).fetchall()
    scores = pq.read_table(written)["score"].to_numpy()
    total = int((scores > 0.5).sum())
    assert rows[0] == total
    assert rows[1] == "OGC:CRS84"
    described = con.execute(f"describe select * from read_parquet('{written}')").fetchall()
    types = {name: kind for name, kind, *_ in described}
    assert types["geometry"] == "GEOMETRY('OGC:CRS84')"


def test_rows_are_in_hilbert_order_with_modest_row_groups(written):
    meta = pq.read_metadata(written)
    assert meta.num_row_groups > 1
    assert meta.row_group(0).column(0).compression == "ZSTD"
    # Spatial order: consecutive rows are close, so row groups cover small boxes.
    frame = geopandas.read_parquet(written)
    centres = frame.geometry.centroid
    steps = np.hypot(np.diff(centres.x), np.diff(centres.y))
    rng = np.random.default_rng(0)
    shuffled = centres.iloc[rng.permutation(len(centres))]
    random_steps = np.hypot(np.diff(shuffled.x), np.diff(shuffled.y))
    assert np.median(steps) < np.median(random_steps) / 3


def test_hilbert_index_is_a_bijection_on_a_small_grid():
    side = 8
    xs, ys = np.meshgrid(np.arange(side), np.arange(side))
    index = hilbert_index(xs.ravel(), ys.ravel(), order=3)
    assert sorted(index.tolist()) == list(range(side * side))
    # Consecutive curve positions are neighbouring cells.
    order = np.argsort(index)
    steps = np.abs(np.diff(xs.ravel()[order])) + np.abs(np.diff(ys.ravel()[order]))
    assert (steps == 1).all()


def test_rewrite_replaces_never_duplicates(tmp_path):
    first = write_scene(tmp_path)
    rows = pq.read_metadata(first).num_rows
    second = write_scene(tmp_path)
    assert first == second
    assert pq.read_metadata(second).num_rows == rows
    assert [p.name for p in second.parent.iterdir()] == ["s1.parquet"]  # no temp leftovers


GDAL_READ = """
import json, sys
import pyogrio
info = pyogrio.read_info(sys.argv[1])
frame = pyogrio.read_dataframe(sys.argv[1])
print(json.dumps({
    "driver": info["driver"], "features": int(info["features"]),
    "geometry_type": info["geometry_type"], "crs": frame.crs.to_string(),
    "wkt": [g.wkt for g in frame.geometry[:5]], "scores": frame.score[:5].tolist(),
}))
"""


def test_gdal_reads_the_files_through_pyogrio(written, tmp_path):
    """GDAL (pyogrio's own build, 3.12) has no Parquet driver in any wheel on PyPI; its ADBC
    driver reads Parquet through DuckDB's engine, which the duckdb wheel carries. GDAL finds
    it as ``libduckdb.so``, so the test points the loader at it, in a fresh process."""
    import os
    import subprocess
    import sys

    import _duckdb  # the compiled engine inside the duckdb wheel; it exports duckdb_adbc_init

    libs = tmp_path / "lib"
    libs.mkdir()
    (libs / "libduckdb.so").symlink_to(_duckdb.__file__)
    done = subprocess.run(
        [sys.executable, "-c", GDAL_READ, str(written)],
        env={**os.environ, "LD_LIBRARY_PATH": str(libs)},
        capture_output=True,
        text=True,
        check=True,
    )
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    frame = geopandas.read_parquet(written)
    assert seen["driver"] == "ADBC"
    assert seen["features"] == len(frame)
    assert seen["geometry_type"] == "Polygon"
    assert CRS.from_user_input(seen["crs"]) == CRS.from_user_input("OGC:CRS84")
    assert seen["wkt"] == [g.wkt for g in frame.geometry[:5]]
    assert seen["scores"] == pytest.approx(frame.score[:5].tolist())


def _tiles_of_a_scene(rng: np.random.Generator, tile: int = 256, step: int = 200, side: int = 4):
    """A grid of overlapping tiles with boxes, some seen by two tiles (as overlap makes)."""
    offsets, found = [], []
    objects = rng.uniform(0, step * (side - 1) + tile - 30, size=(400, 2))
    for row in range(side):
        for col in range(side):
            col_off, row_off = col * step, row * step
            inside = (
                (objects[:, 0] >= col_off)
                & (objects[:, 0] + 25 <= col_off + tile)
                & (objects[:, 1] >= row_off)
                & (objects[:, 1] + 25 <= row_off + tile)
            )
            xy = objects[inside] - [col_off, row_off] + rng.normal(0, 0.5, (inside.sum(), 2))
            xy = np.clip(xy, 0, tile - 25)
            boxes = np.concatenate([xy, xy + 25], axis=1).astype(np.float32)
            scores = rng.uniform(0.1, 1, len(boxes)).astype(np.float32)
            offsets.append((col_off, row_off))
            found.append(TileDetections(boxes, scores, np.zeros(len(boxes), np.int16)))
    return offsets, found


def test_a_scene_streamed_band_by_band_equals_one_written_at_once(tmp_path):
    from pipeline.merge.scene import SceneStream

    offsets, found = _tiles_of_a_scene(np.random.default_rng(5))
    base = dict(
        scene_id="s1", scene_uri="/data/s1.tif", info=INFO, tile_size=256, edge_tolerance=2.0,
        merge=MergeOptions(), class_names=("ship",), model_id="m:1", settings_hash="abc",
        run_id="r1", output_crs="EPSG:32633", row_group_size=50,
    )  # fmt: skip
    whole = SceneContext(**base, output_uri=str(tmp_path / "whole.parquet"))
    written_whole = finalize_scene(whole, offsets, found)

    banded = SceneContext(**base, output_uri=str(tmp_path / "banded.parquet"))
    stream = SceneStream(banded)
    tops = sorted({row_off for _, row_off in offsets})
    for i, top in enumerate(tops):
        band = [k for k, (_, row_off) in enumerate(offsets) if row_off == top]
        next_top = tops[i + 1] if i + 1 < len(tops) else None
        stream.add_band([offsets[k] for k in band], [found[k] for k in band], next_top)
        # Boxes of bands already final were written; those of the last band still wait.
        assert len(stream.merger.pending) < sum(len(f.boxes) for f in found) / 2
    written_banded = stream.close()

    # The same rows, classes, extent and times (the files' bytes differ with their row order).
    same = ("rows", "per_class", "bbox", "time_start", "time_end")
    assert [getattr(written_banded, k) for k in same] == [getattr(written_whole, k) for k in same]
    assert written_whole.rows > 100
    a = geopandas.read_parquet(whole.output_uri).sort_values("detection_id")
    b = geopandas.read_parquet(banded.output_uri).sort_values("detection_id")
    assert a.detection_id.tolist() == b.detection_id.tolist()
    assert a.geometry.reset_index(drop=True).equals(b.geometry.reset_index(drop=True))
    meta = pq.read_metadata(banded.output_uri)
    assert meta.num_row_groups == -(-written_banded.rows // 50)  # full row groups of 50
    geo_validator().validate(json.loads(pq.read_schema(banded.output_uri).metadata[b"geo"]))


def test_an_aborted_stream_leaves_the_previous_file_untouched(tmp_path):
    from pipeline.merge.scene import SceneStream

    path = write_scene(tmp_path)
    before = path.read_bytes()
    offsets, found = _tiles_of_a_scene(np.random.default_rng(6))
    context = SceneContext(
        scene_id="s1", scene_uri="/data/s1.tif", info=INFO, tile_size=256, edge_tolerance=2.0,
        merge=MergeOptions(), class_names=("ship",), model_id="m:1", settings_hash="abc",
        run_id="r2", output_crs="OGC:CRS84", output_uri=str(path), row_group_size=10,
    )  # fmt: skip
    stream = SceneStream(context)
    stream.add_band(offsets[:4], found[:4], 200)  # some row groups are written...
    stream.abort()  # ...then the scene fails
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["s1.parquet"]  # no temp left


def test_a_done_record_carries_the_files_index_entry(tmp_path):
    """bbox (the geo metadata's), time range, classes, bytes and the exact footer length."""
    from pipeline.merge.scene import SceneStream, done_record

    offsets, found = _tiles_of_a_scene(np.random.default_rng(7))
    context = SceneContext(
        scene_id="s1", scene_uri="/data/s1.tif", info=INFO, tile_size=256, edge_tolerance=2.0,
        merge=MergeOptions(), class_names=("ship",), model_id="m:1", settings_hash="abc",
        run_id="r1", output_crs="OGC:CRS84", output_uri=str(tmp_path / "s1.parquet"),
        row_group_size=50,
    )  # fmt: skip
    stream = SceneStream(context)
    stream.add_band(offsets, found, None)
    written = stream.close()
    record = done_record(context, "/data/s1.tif|1|2", written, tiles_without_data=3)
    path = Path(context.output_uri)
    blob = path.read_bytes()
    geo = json.loads(pq.read_schema(path).metadata[b"geo"])["columns"]["geometry"]
    assert record.status == "done" and record.detections == written.rows > 0
    assert record.bbox == tuple(geo["bbox"]) and record.crs == "OGC:CRS84"
    assert record.time_start == record.time_end == datetime(2026, 6, 1, 10, 30, tzinfo=UTC)
    assert record.per_class == {"ship": written.rows}
    assert record.bytes == len(blob)
    assert record.footer_bytes == int.from_bytes(blob[-8:-4], "little")
    assert (record.output, record.tiles_without_data) == (context.output_uri, 3)
