"""Quicklook PNGs and run maps: opened and checked pixel by pixel."""

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from detections_data import rows_from_pixels, write_dataset, write_rows
from PIL import Image

from pipeline.cli.main import main
from pipeline.errors import QuicklookError
from pipeline.io.quicklook import (
    MAP_BACKGROUND,
    PALETTE,
    default_destination,
    picture_shape,
    render_quicklook,
    render_run_map,
)

GREY = 100
# Scene pixels (x0, y0, x1, y1), class id, score: on a 400 x 300 scene drawn at half size.
BOXES = np.array([[40, 60, 120, 140], [200, 100, 300, 220]], dtype=np.float64)
CLASS_IDS = np.array([0, 1])
SCORES = np.array([0.9, 0.8])


@pytest.fixture
def scene(make_raster, tmp_path) -> tuple[Path, str]:
    raster = make_raster(width=400, height=300, data=np.full((3, 300, 400), GREY, np.uint8))
    rows = rows_from_pixels(
        0,
        BOXES,
        np.random.default_rng(0),
        scene_uri=str(raster),
        class_ids=CLASS_IDS,
        scores=SCORES,
    )
    return raster, write_rows(tmp_path / "out", rows)


def rgb(image: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    return image.getpixel((x, y))[:3]


def test_boxes_are_drawn_at_their_pixels_in_their_class_colour(scene, tmp_path):
    raster, output = scene
    written = render_quicklook(output, max_size=200)
    assert written == str(tmp_path / "out" / "quicklook" / "s0.png")
    image = Image.open(written)
    assert image.format == "PNG" and image.size == (200, 150)  # 400 x 300 at half size
    ship, boat = PALETTE[0], PALETTE[1]
    assert ship != boat
    # Box 0 at (20, 30)-(60, 70) on the picture: its edges in the ship colour, inside grey.
    assert rgb(image, 20, 50) == ship  # left edge
    assert rgb(image, 59, 50) == ship  # right edge
    assert rgb(image, 40, 69) == ship  # bottom edge
    assert rgb(image, 40, 50) == (GREY, GREY, GREY)
    # Box 1 at (100, 50)-(150, 110) in the boat colour.
    assert rgb(image, 100, 80) == boat
    assert rgb(image, 125, 109) == boat
    assert rgb(image, 125, 80) == (GREY, GREY, GREY)
    # Each box is labelled just above it, on a band of its colour.
    assert rgb(image, 20, 27) == ship
    assert rgb(image, 100, 47) == boat
    assert rgb(image, 180, 140) == (GREY, GREY, GREY)  # nowhere near a box


def test_min_score_leaves_weaker_boxes_out(scene, tmp_path):
    _, output = scene
    image = Image.open(
        render_quicklook(output, str(tmp_path / "q.png"), max_size=200, min_score=0.85)
    )
    assert rgb(image, 20, 50) == PALETTE[0]
    assert rgb(image, 100, 80) == (GREY, GREY, GREY)


def test_the_picture_comes_from_the_overview(tmp_path, make_raster):
    """Overviews built from a bright image, then the full resolution made dark: a quicklook
    that reads the overview (as it should, cheaply) is bright."""
    raster = make_raster(
        width=2048, height=2048, data=np.full((3, 2048, 2048), 200, np.uint8), name="big.tif"
    )
    with rasterio.open(raster, "r+") as dataset:
        dataset.build_overviews([2, 4, 8])
        dataset.write(np.full((3, 2048, 2048), 10, np.uint8))
    rows = rows_from_pixels(
        0, BOXES, np.random.default_rng(0), scene_uri=str(raster), class_ids=CLASS_IDS
    )
    output = write_rows(tmp_path / "out", rows)
    image = Image.open(render_quicklook(output, max_size=256))
    assert image.size == (256, 256)
    assert rgb(image, 200, 200) == (200, 200, 200)


def test_an_empty_scene_needs_its_raster_named(tmp_path, make_raster):
    rows = rows_from_pixels(0, np.zeros((0, 4)), np.random.default_rng(0))
    output = write_rows(tmp_path / "out", rows)
    with pytest.raises(QuicklookError, match="s0.parquet: no detections"):
        render_quicklook(output)
    raster = make_raster(width=64, height=32)
    image = Image.open(render_quicklook(output, raster=str(raster)))
    assert image.size == (64, 32)  # never enlarged


def test_cli_quicklook(scene, tmp_path, capsys):
    _, output = scene
    target = tmp_path / "look.png"
    assert main(["quicklook", output, "-o", str(target), "--max-size", "100"]) == 0
    assert capsys.readouterr().out.strip() == str(target)
    assert Image.open(target).size == (100, 75)
    assert main(["quicklook", str(tmp_path / "nothing.parquet")]) == 2


def test_picture_shape_and_default_destination():
    assert picture_shape(400, 300, 200) == (200, 150)
    assert picture_shape(300, 40000, 1024) == (8, 1024)
    assert picture_shape(100, 50, 1024) == (100, 50)
    assert default_destination("s3://b/out/detections/x.parquet") == "s3://b/out/quicklook/x.png"
    assert default_destination("/tmp/one.parquet") == "/tmp/one.png"


def test_run_map_shows_where_detections_fall(tmp_path):
    outputs = write_dataset(tmp_path / "out", scenes=2, count=200)
    target = tmp_path / "out" / "_runs" / "r1.png"
    assert render_run_map(outputs, str(target)) == str(target)
    image = Image.open(target)
    width, height = image.size
    assert width == 512 and 64 <= height <= 1024
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    background = (pixels == MAP_BACKGROUND).all(axis=1)
    reddish = (pixels[:, 0] > 130) & (pixels[:, 1] < 180) & (pixels[:, 2] < 70)
    assert reddish.sum() > 200  # detections binned into many cells
    assert background.sum() > reddish.sum()  # but not everywhere
    # Two scenes side by side, 0.02 x 0.01 degrees: the map is about twice as wide as high.
    assert abs(width / height - 2 * np.cos(np.radians(42))) < 0.3


def test_run_map_of_scenes_without_detections_is_none(tmp_path):
    rows = rows_from_pixels(0, np.zeros((0, 4)), np.random.default_rng(0))
    output = write_rows(tmp_path / "out", rows)
    assert render_run_map([output], str(tmp_path / "map.png")) is None
    assert not (tmp_path / "map.png").exists()


# --------------------------------------------------------------------------------------------
# A real run: `georetina run --quicklook` and the run report's map
# --------------------------------------------------------------------------------------------


@pytest.mark.ray
def test_run_with_quicklook_draws_the_planted_objects(ray_session, tmp_path, capsys):
    from pipeline.io.synthetic import plan_objects, write_scene

    size = 600
    objects = plan_objects(size, 256, 48, count=10, seed=7, max_side=40)
    write_scene(tmp_path / "scene.tif", size, objects, seed=7, block=128, overviews=True)
    job = {
        "inputs": [str(tmp_path / "scene.tif")],
        "model": {"kind": "threshold"},
        "tiling": {"tile_size": 256, "overlap": 48},
        "output": {"path": str(tmp_path / "out")},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["run", str(tmp_path / "job.yaml"), "--quicklook"]) == 0
    out = capsys.readouterr().out
    (line,) = [x for x in out.splitlines() if x.startswith("quicklook: ")]
    image = Image.open(line.removeprefix("quicklook: "))
    assert image.size == (600, 600)  # smaller than max_size: drawn 1:1
    colour = PALETTE[0]  # the threshold detector's one class
    for obj in objects:
        middle_y = int((obj.y0 + obj.y1) / 2)
        assert rgb(image, int(obj.x0), middle_y) == colour, obj

    (report_path,) = (tmp_path / "out" / "_runs").glob("*.json")
    report = json.loads(report_path.read_text())
    assert report["map"] == str(report_path.with_suffix(".png"))
    assert Image.open(report["map"]).size[0] == 512
