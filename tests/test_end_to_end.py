"""End-to-end runs on a real embedded Ray: the whole flow, from job spec to GeoParquet."""

import json
from pathlib import Path

import duckdb
import geopandas
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from pyproj import Transformer
from rasterio.transform import Affine

from pipeline.cli.main import main
from pipeline.config import parse_job
from pipeline.io.ledger import Ledger
from pipeline.io.synthetic import match_planted, plan_objects, write_scene
from pipeline.jobs.ray_session import RAY_SYSTEM_CONFIG
from pipeline.jobs.run import run_job
from pipeline.ops.tiles import plan_tiles

pytestmark = pytest.mark.ray

SIZE, TILE, OVERLAP = 1100, 256, 48


def threshold_job(inputs, output, crs="OGC:CRS84", **extra) -> dict:
    return {
        "inputs": [str(p) for p in inputs],
        "model": {"kind": "threshold"},
        "tiling": {"tile_size": TILE, "overlap": OVERLAP, "tiles_per_read_task": 4},
        "detect": {"batch_size": 4},
        "output": {"path": str(output), "crs": crs},
        **extra,
    }


@pytest.fixture(scope="module")
def planted_scene(tmp_path_factory):
    folder = tmp_path_factory.mktemp("planted")
    objects = plan_objects(SIZE, TILE, OVERLAP, count=40, seed=3, max_side=OVERLAP - 8)
    transform = write_scene(
        folder / "planted.tif", SIZE, objects, seed=3, block=128, overviews=False
    )
    return folder / "planted.tif", objects, transform


def quiet(_line: str) -> None:
    pass


def test_embedded_ray_frees_dead_tiles_promptly(ray_session):
    # What the cluster's GCS hands every raylet: dead objects deleted every 100 ms, not every
    # second (a second of tiles held the 32k bench scene's store at 290 MB; README, Benchmarks).
    from ray._private.state import state

    config = state.get_system_config()
    assert config["free_objects_period_milliseconds"] == 100
    assert RAY_SYSTEM_CONFIG.items() <= config.items()


def test_planted_objects_come_back_once_each_at_their_crs_place(
    ray_session, planted_scene, tmp_path
):
    path, objects, transform = planted_scene
    assert sum(o.on_seam for o in objects) >= 10  # the seams are really exercised
    spec = parse_job(threshold_job([path], tmp_path / "out", crs="EPSG:32633"))
    report = run_job(spec, progress=quiet)
    assert report.count("done") == 1 and report.tiles == len(plan_tiles(SIZE, SIZE, TILE, OVERLAP))

    frame = geopandas.read_parquet(report.scenes[0].output)
    assert frame.crs.to_epsg() == 32633
    assert len(frame) == len(objects)
    boxes = frame[["pixel_xmin", "pixel_ymin", "pixel_xmax", "pixel_ymax"]].to_numpy()
    hits, found = match_planted(objects, boxes, iou_threshold=0.99)
    assert hits == found == len(objects)
    # Geometry is the planted box through the raster's affine, to the millimetre.
    for obj in objects:
        x0, y0 = transform * (obj.x0, obj.y1)
        x1, y1 = transform * (obj.x1, obj.y0)
        near = frame.cx[x0 - 0.01 : x1 + 0.01, y0 - 0.01 : y1 + 0.01]
        assert len(near) == 1
        assert np.allclose(near.geometry.iloc[0].bounds, (x0, y0, x1, y1), atol=1e-3)


def test_default_output_is_lon_lat_and_duckdb_agrees(ray_session, planted_scene, tmp_path):
    path, objects, transform = planted_scene
    report = run_job(parse_job(threshold_job([path], tmp_path / "out")), progress=quiet)
    output = report.scenes[0].output
    frame = geopandas.read_parquet(output)
    assert frame.crs.to_string() == "OGC:CRS84"
    assert len(frame) == len(objects)
    to_lonlat = Transformer.from_crs("EPSG:32633", "OGC:CRS84", always_xy=True)
    first = objects[0]
    lon, lat = to_lonlat.transform(
        *(transform * ((first.x0 + first.x1) / 2, (first.y0 + first.y1) / 2))
    )
    centres = frame.geometry.centroid
    assert np.min(np.hypot(centres.x - lon, centres.y - lat)) < 1e-7

    # The detections, not the scene table beside them (_ledger/ holds Parquet too).
    pattern = str(tmp_path / "out" / "detections" / "*.parquet")
    ((count, crs, scene_crs),) = duckdb.execute(
        f"select count(*), any_value(ST_CRS(geometry)), any_value(scene_crs) "
        f"from read_parquet('{pattern}') where class_name = 'object' and score > 0"
    ).fetchall()
    assert (count, crs, scene_crs) == (len(objects), "OGC:CRS84", "EPSG:32633")


@pytest.mark.parametrize(
    "rotated",
    [
        Affine.translation(500_000, 4_650_000) @ Affine.rotation(25) @ Affine.scale(0.5, -0.5),
        Affine.translation(500_000, 4_650_000) @ Affine.scale(0.5, 0.5),  # south-up: rows go north
    ],
    ids=["rotated 25 degrees", "south-up"],
)
def test_rotated_raster_maps_through_the_full_affine(ray_session, tmp_path, rotated):
    objects = plan_objects(600, TILE, OVERLAP, count=12, seed=5, max_side=30)
    path = tmp_path / "rotated.tif"
    write_scene(path, 600, objects, seed=5, block=128, overviews=False)
    import rasterio

    with rasterio.open(path, "r+") as dst:
        dst.transform = rotated
    report = run_job(
        parse_job(threshold_job([path], tmp_path / "out", crs="EPSG:32633")), progress=quiet
    )
    frame = geopandas.read_parquet(report.scenes[0].output)
    assert len(frame) == len(objects)
    assert frame.geometry.is_valid.all() and (frame.geometry.area > 0).all()
    boxes = frame[["pixel_xmin", "pixel_ymin", "pixel_xmax", "pixel_ymax"]].to_numpy()
    assert match_planted(objects, boxes, iou_threshold=0.99) == (len(objects), len(objects))
    for geometry, row in zip(frame.geometry, frame.itertuples(), strict=True):
        corner = rotated * (row.pixel_xmin, row.pixel_ymin)
        assert (
            min(np.hypot(x - corner[0], y - corner[1]) for x, y in geometry.exterior.coords) < 1e-6
        )


def test_a_scene_without_georeferencing_keeps_pixel_boxes_when_the_job_allows_it(
    ray_session, planted_scene, tmp_path
):
    import rasterio

    path, objects, _ = planted_scene
    photo = tmp_path / "photo.tif"  # the same pixels, no CRS and no geotransform: a drone photo
    with rasterio.open(path) as source:
        profile = {k: source.profile[k] for k in ("width", "height", "count", "dtype")}
        with rasterio.open(photo, "w", driver="GTiff", tiled=True, **profile) as target:
            target.write(source.read())
    job = threshold_job([path, photo], tmp_path / "out", crs="EPSG:32633")
    refused = run_job(parse_job(job), progress=quiet)
    status = {Path(s.uri).name: (s.status, s.error) for s in refused.scenes}
    assert status["planted.tif"][0] == "done" and status["photo.tif"][0] == "failed"
    assert (
        "has no CRS; georeference it, or set tiling.allow_pixel_coordinates"
        in status["photo.tif"][1]
    )

    job["tiling"] = {**job["tiling"], "allow_pixel_coordinates": True}
    report = run_job(parse_job(job), force=True, progress=quiet)
    assert report.count("done") == 2, report.scenes
    frame = geopandas.read_parquet(tmp_path / "out" / "detections")
    in_pixels = frame[frame.scene_uri.str.endswith("photo.tif")]
    located = frame[frame.scene_uri.str.endswith("planted.tif")]
    assert len(in_pixels) == len(located) == len(objects)
    assert in_pixels.geometry.isna().all() and in_pixels.scene_crs.isna().all()
    assert located.geometry.notna().all() and (located.scene_crs == "EPSG:32633").all()
    boxes = in_pixels[["pixel_xmin", "pixel_ymin", "pixel_xmax", "pixel_ymax"]].to_numpy()
    assert match_planted(objects, boxes, iou_threshold=0.99) == (len(objects), len(objects))

    pattern = str(tmp_path / "out" / "detections" / "*.parquet")
    ((unlocated, no_bbox, total),) = duckdb.execute(
        "select count(*) filter (where geometry is null), count(*) filter (where bbox.xmin is "
        f"null), count(*) from read_parquet('{pattern}')"
    ).fetchall()
    assert (unlocated, no_bbox, total) == (len(objects), len(objects), 2 * len(objects))


def test_bad_scenes_fail_by_name_and_the_rest_is_done(
    ray_session, planted_scene, make_raster, tmp_path
):
    good, objects, _ = planted_scene
    no_crs = make_raster("no_crs.tif", crs=None)
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(good.read_bytes()[:5000])
    missing = tmp_path / "missing.tif"
    spec = parse_job(threshold_job([good, no_crs, corrupt, missing], tmp_path / "out"))
    report = run_job(spec, progress=quiet)
    by_uri = {Path(s.uri).name: s for s in report.scenes}
    assert by_uri["planted.tif"].status == "done"
    assert by_uri["planted.tif"].detections == len(objects)
    for name, message in [
        ("no_crs.tif", "no CRS"),
        ("corrupt.tif", "cannot be read"),
        ("missing.tif", "cannot be read"),
    ]:
        assert by_uri[name].status == "failed"
        assert by_uri[name].scene_id in by_uri[name].error and message in by_uri[name].error
    # The ledger and the run report say the same.
    statuses = sorted(r.status for r in Ledger(str(tmp_path / "out")).records())
    assert statuses == ["done", "failed", "failed", "failed"]
    saved = json.loads((tmp_path / "out" / "_runs" / f"{report.run_id}.json").read_text())
    assert [s["status"] for s in saved["scenes"]].count("failed") == 3


def test_rerun_skips_done_scenes_and_force_replaces_without_duplicates(
    ray_session, planted_scene, tmp_path
):
    path, objects, _ = planted_scene
    spec = parse_job(threshold_job([path], tmp_path / "out"))
    first = run_job(spec, progress=quiet)
    again = run_job(spec, progress=quiet)
    assert again.count("skipped") == 1 and again.tiles == 0
    forced = run_job(spec, force=True, progress=quiet)
    assert forced.count("done") == 1
    files = list((tmp_path / "out" / "detections").glob("*"))
    assert len(files) == 1
    table = pq.read_table(files[0])
    assert table.num_rows == len(objects)
    assert set(table["run_id"].to_pylist()) == {forced.run_id} != {first.run_id}


def test_retinanet_path_end_to_end_with_stable_ids(ray_session, make_raster, tmp_path):
    path = make_raster("rgb.tif", width=300, height=200)
    job = {
        "inputs": [str(path)],
        "model": {
            "backbone": "resnet18_fpn",
            "classes": ["ship", "boat"],
            "score_threshold": 0.001,
            "detections_per_tile": 20,
        },
        "tiling": {"tile_size": 128, "overlap": 16},
        "detect": {"batch_size": 3},
        "output": {"path": str(tmp_path / "out")},
    }
    spec = parse_job(job)
    first = run_job(spec, progress=quiet)
    assert first.count("done") == 1 and first.tiles == 6
    table = pq.read_table(first.scenes[0].output)
    assert table.num_rows > 0
    assert set(table["class_name"].to_pylist()) <= {"ship", "boat"}
    assert table["model_id"][0].as_py() == "retinanet:resnet18_fpn:untrained"
    second = run_job(spec, force=True, progress=quiet)
    again = pq.read_table(second.scenes[0].output)
    assert sorted(again["detection_id"].to_pylist()) == sorted(table["detection_id"].to_pylist())


def test_cli_run(ray_session, planted_scene, tmp_path, capsys):
    path, objects, _ = planted_scene
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(threshold_job([path], "out")))
    assert main(["run", str(job)]) == 0
    printed = capsys.readouterr().out
    assert "scenes: 1 done, 0 skipped, 0 failed" in printed
    assert f"detections: {len(objects)}" in printed
    assert (tmp_path / "out" / "detections").is_dir()  # relative to the job file


def test_cli_reports_every_job_error(tmp_path, capsys):
    job = tmp_path / "bad.yaml"
    job.write_text("inputs: [a.tif]\ntiling: {tile_size: big, overlapp: 3}\noutput: {}\n")
    assert main(["run", str(job)]) == 2
    err = capsys.readouterr().err
    for path in ("tiling.tile_size", "tiling.overlapp", "output.path"):
        assert path in err


def test_all_nodata_scene_is_done_without_touching_the_detector(ray_session, make_raster, tmp_path):
    empty = make_raster(
        "empty.tif", width=300, height=300, nodata=0, data=np.zeros((3, 300, 300), np.uint8)
    )
    report = run_job(parse_job(threshold_job([empty], tmp_path / "out")), progress=quiet)
    (scene,) = report.scenes
    assert scene.status == "done" and scene.detections == 0
    assert scene.tiles == scene.tiles_without_data == 4
    assert len(geopandas.read_parquet(scene.output)) == 0
