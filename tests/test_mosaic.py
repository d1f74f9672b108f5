"""Mosaic inputs: adjacent rasters read as one scene through a VRT the job writes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import yaml
from pyproj import CRS
from rasterio.windows import Window

from pipeline.config import MosaicInput, load_job, parse_job
from pipeline.io.discovery import discover_scenes
from pipeline.io.mosaic import Member, MosaicError, check_one_grid, mosaic_vrt
from pipeline.io.rasters import inspect_raster, open_raster
from pipeline.io.reads import read_tile
from pipeline.io.synthetic import match_planted, plan_objects, write_scene

ROOT = Path(__file__).resolve().parent.parent


def cut(scene: Path, folder: Path, parts: int = 3, skip: tuple[int, int] | None = None) -> None:
    """``scene`` cut into ``parts`` x ``parts`` GeoTIFFs, ``part_<row><col>.tif``."""
    folder.mkdir(parents=True, exist_ok=True)
    with rasterio.open(scene) as src:
        side = src.width // parts
        for row in range(parts):
            for col in range(parts):
                if (row, col) == skip:
                    continue
                window = Window(col * side, row * side, side, side)
                profile = dict(src.profile, width=side, height=side, blockxsize=128, blockysize=128)
                profile["transform"] = src.window_transform(window)
                with rasterio.open(folder / f"part_{row}{col}.tif", "w", **profile) as dst:
                    dst.write(src.read(window=window))


def mosaic_scene(folder: Path, tmp_path: Path, pattern: str = "part_*.tif"):
    spec = parse_job(
        {
            "inputs": [{"mosaic": str(folder / pattern), "name": "grid"}],
            "output": {"path": str(tmp_path / "out")},
        }
    )
    (scene,) = discover_scenes(spec.inputs, vrt_folder=spec.output.vrt_folder)
    return scene


@pytest.fixture
def whole(tmp_path: Path) -> Path:
    path = tmp_path / "whole.tif"
    write_scene(path, 384, plan_objects(384, 128, 0, 12, seed=4), seed=4, overviews=False)
    return path


def test_a_grid_of_files_reads_as_the_whole_scene(tmp_path, whole):
    cut(whole, tmp_path / "parts")
    scene = mosaic_scene(tmp_path / "parts", tmp_path)
    assert scene.problem is None
    assert scene.uri.startswith(str(tmp_path / "out" / "_vrt"))  # beside the output
    info = inspect_raster(scene.scene_id, scene.uri, None, None)
    reference = inspect_raster("whole", str(whole), None, None)
    assert (info.width, info.height, info.transform) == (384, 384, reference.transform)
    assert info.crs_wkt == reference.crs_wkt
    with open_raster(scene.uri) as mosaic, open_raster(str(whole)) as plain:
        window = Window(100, 90, 128, 128)  # across four files
        image, valid = read_tile(mosaic, window, [1, 2, 3], (0, 255))
        expected, _ = read_tile(plain, window, [1, 2, 3], (0, 255))
        np.testing.assert_array_equal(image, expected)
        assert valid.all()


def test_what_no_member_covers_is_nodata(tmp_path, whole):
    cut(whole, tmp_path / "parts", skip=(1, 1))  # the middle file is missing; no nodata
    scene = mosaic_scene(tmp_path / "parts", tmp_path)
    info = inspect_raster(scene.scene_id, scene.uri, None, None)
    assert info.bands == (1, 2, 3)  # the alpha band is the mask, not a channel
    with open_raster(scene.uri) as mosaic:
        _, valid = read_tile(mosaic, Window(64, 64, 128, 128), [1, 2, 3], (0, 255))
    assert not valid[64:, 64:].any()  # the hole at (128, 128)
    assert valid[:64, :].all() and valid[:, :64].all()


def test_members_nodata_and_gaps_are_nodata(tmp_path, whole):
    cut(whole, tmp_path / "parts", skip=(1, 1))  # the middle file is missing
    member = tmp_path / "parts" / "part_00.tif"
    with rasterio.open(member, "r+") as dst:  # its first rows are nodata
        dst.nodata = 0
        dst.write(np.zeros((3, 10, 128), np.uint8), window=Window(0, 0, 128, 10))
    scene = mosaic_scene(tmp_path / "parts", tmp_path)
    with open_raster(scene.uri) as mosaic:
        assert (mosaic.width, mosaic.height) == (384, 384)
        _, valid = read_tile(mosaic, Window(64, 64, 128, 128), [1, 2, 3], (0, 255))
        _, corner = read_tile(mosaic, Window(0, 0, 128, 128), [1, 2, 3], (0, 255))
    assert not valid[64:, 64:].any()  # the hole at (128, 128)
    assert valid[:64, :].all() and valid[:, :64].all()
    assert not corner[:10].any() and corner[10:].all()


def _rewrite(path: Path, **changes: object) -> None:
    with rasterio.open(path) as src:
        profile, pixels = src.profile, src.read()
    profile.update(changes)
    path.unlink()
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"crs": "EPSG:32632"}, "its CRS is EPSG:32632"),
        ({"transform": None}, "its pixel is 1 x -1"),  # filled in below
        ({"transform": "off-grid"}, "off the pixel grid"),
    ],
)
def test_members_that_are_not_one_grid_fail_the_scene_naming_the_odd_file(
    tmp_path, whole, change, message
):
    cut(whole, tmp_path / "parts")
    odd = tmp_path / "parts" / "part_12.tif"
    with rasterio.open(odd) as src:
        a, _, c, _, e, f = tuple(src.transform)[:6]
    if "transform" in change:
        offset = 0.3 * a if change["transform"] == "off-grid" else 0.0
        size = a if change["transform"] == "off-grid" else 1.0
        change = {"transform": rasterio.Affine(size, 0, c + offset, 0, -size, f)}
    _rewrite(odd, **change)
    scene = mosaic_scene(tmp_path / "parts", tmp_path)
    assert scene.problem is not None
    assert str(odd) in scene.problem and message in scene.problem, scene.problem


def test_the_identity_changes_with_any_member_and_the_id_does_not(tmp_path, whole):
    cut(whole, tmp_path / "parts")
    before = mosaic_scene(tmp_path / "parts", tmp_path)
    member = tmp_path / "parts" / "part_21.tif"
    with rasterio.open(member, "r+") as dst:
        dst.write(np.zeros((3, 8, 8), np.uint8), window=Window(0, 0, 8, 8))
    os.utime(member, (1e9, 1e9))
    after = mosaic_scene(tmp_path / "parts", tmp_path)
    assert after.scene_id == before.scene_id
    assert after.identity != before.identity
    assert after.uri != before.uri  # a new VRT: a run still reading the old one is unharmed


def test_mosaic_inputs_in_a_job_file_are_relative_to_it(tmp_path):
    job = tmp_path / "jobs" / "grid.yaml"
    job.parent.mkdir()
    job.write_text(
        yaml.safe_dump(
            {
                "inputs": [
                    {"mosaic": "../tiles/*.tif", "name": "neon"},
                    {"mosaic": ["../a.tif", "s3://bucket/b.tif"]},
                ],
                "output": {"path": "../out"},
            }
        )
    )
    first, second = load_job(job).inputs
    assert first == MosaicInput(mosaic=str(tmp_path / "tiles" / "*.tif"), name="neon")
    assert second.mosaic == [str(tmp_path / "a.tif"), "s3://bucket/b.tif"]


def _rows(path: str) -> np.ndarray:
    table = pq.read_table(path)
    columns = ["pixel_xmin", "pixel_ymin", "pixel_xmax", "pixel_ymax", "score"]
    rows = np.stack([table.column(c).to_numpy() for c in columns], axis=1).astype(np.float64)
    return rows[np.lexsort(rows[:, :4].T[::-1])]


@pytest.mark.ray
def test_a_scene_cut_into_nine_files_gives_the_uncut_scenes_detections(ray_session, tmp_path):
    from pipeline.jobs.run import run_job

    size = 768
    # Seams every 256 px: the files' boundaries; about half the objects lie across one.
    planted = plan_objects(size, 256, 0, 24, seed=9)
    write_scene(tmp_path / "whole.tif", size, planted, seed=9, overviews=False)
    cut(tmp_path / "whole.tif", tmp_path / "parts")
    across = [p for p in planted if p.on_seam]
    assert len(across) >= 8

    spec = load_job(ROOT / "jobs" / "demo.yaml")
    outputs = {}
    for name, source in (
        ("whole", str(tmp_path / "whole.tif")),
        ("mosaic", {"mosaic": str(tmp_path / "parts" / "part_*.tif"), "name": "grid"}),
    ):
        job = spec.model_copy(
            update={
                "inputs": parse_job({"inputs": [source], "output": {"path": "x"}}).inputs,
                "output": spec.output.model_copy(update={"path": str(tmp_path / name)}),
                "detect": spec.detect.model_copy(update={"num_actors": 1}),
            }
        )
        report = run_job(job, progress=lambda line: None)
        (done,) = [s for s in report.scenes if s.status == "done"]
        outputs[name] = _rows(done.output)

    whole, mosaic = outputs["whole"], outputs["mosaic"]
    assert match_planted(planted, whole[:, :4])[0] >= 0.9 * len(planted)
    assert len(mosaic) == len(whole)
    np.testing.assert_allclose(mosaic[:, :4], whole[:, :4], atol=1e-3)
    np.testing.assert_allclose(mosaic[:, 4], whole[:, 4], atol=1e-5)
    found_across, _ = match_planted(across, mosaic[:, :4])
    assert found_across >= 0.9 * len(across), (found_across, len(across))


def _member(name: str, col: int, nodata: float | None) -> Member:
    """A 100 x 100 member at ``col`` pixels east on one 1 m grid (no file needed)."""
    return Member(
        name, 100, 100, 3, "float32", CRS.from_epsg(32633).to_wkt(),
        (1.0, 0.0, col, 0.0, -1.0, 0.0), (100, 100), nodata,
        ("Red", "Green", "Blue"),
    )  # fmt: skip


def test_members_whose_nodata_is_nan_are_one_grid():
    check_one_grid([_member("a.tif", 0, float("nan")), _member("b.tif", 100, float("nan"))])
    with pytest.raises(MosaicError, match=r"b.tif: its nodata is 0, a.tif's nan"):
        check_one_grid([_member("a.tif", 0, float("nan")), _member("b.tif", 100, 0.0)])


def test_overlapping_members_without_nodata_get_an_alpha_band_for_their_gaps():
    # Three 100 px members over 300 px: as many pixels as the area, a 50 px gap all the same.
    members = [_member("a.tif", 0, None), _member("b.tif", 50, None), _member("c.tif", 200, None)]
    assert "<ColorInterp>Alpha</ColorInterp>" in mosaic_vrt(members)
    assert "<ColorInterp>Alpha</ColorInterp>" not in mosaic_vrt(members[:1])
