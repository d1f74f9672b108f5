"""model.resolution_m: scenes read at the model's ground sample distance, boxes mapped back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window

from pipeline.config import load_job
from pipeline.errors import SceneError
from pipeline.io.rasters import ground_pixel_size, inspect_raster, open_raster
from pipeline.io.reads import read_tile
from pipeline.io.synthetic import Planted, match_planted, plan_objects, write_scene
from pipeline.ops.grid import Resample, grid_transform, plan_resample

ROOT = Path(__file__).resolve().parent.parent
UTM = "EPSG:32633"
ORIGIN = (500_000.0, 4_650_000.0)


# --------------------------------------------------------------------------------------------
# The read grid (pure)
# --------------------------------------------------------------------------------------------


def test_scenes_within_the_tolerance_are_read_as_they_are():
    assert plan_resample(1000, 800, (0.5, 0.5), 0.5, 0.1) is None
    assert plan_resample(1000, 800, (0.46, 0.54), 0.5, 0.1) is None
    assert plan_resample(1000, 800, (0.44, 0.5), 0.5, 0.1) is not None
    assert plan_resample(1000, 800, (0.44, 0.5), 0.5, 0.15) is None


def test_a_finer_scene_is_averaged_onto_a_coarser_grid_over_the_same_extent():
    resample = plan_resample(1001, 600, (0.25, 0.25), 0.5, 0.1)
    assert resample == Resample(1001, 600, 500, 300, "average")
    # The grid covers the scene exactly: its last pixel ends at the scene's last pixel.
    assert resample.scene_window(499, 299, 1, 1)[0] + resample.scale_x == pytest.approx(1001)
    assert Resample.from_text(resample.to_text()) == resample
    assert Resample.from_text("") is None


def test_a_coarser_scene_is_upsampled_bilinearly():
    resample = plan_resample(300, 200, (1.0, 1.0), 0.5, 0.1)
    assert resample == Resample(300, 200, 600, 400, "bilinear")
    boxes = resample.to_scene_pixels(np.array([[10.0, 20.0, 30.0, 40.0]]))
    np.testing.assert_allclose(boxes, [[5.0, 10.0, 15.0, 20.0]])


@pytest.mark.parametrize(
    "transform",
    [
        (0.25, 0.0, 500_000.0, 0.0, -0.25, 4_650_000.0),  # north-up
        (0.25, 0.0, 500_000.0, 0.0, 0.25, 4_640_000.0),  # south-up
        tuple(Affine(0.25, 0, 500_000.0, 0, -0.25, 4_650_000.0) @ Affine.rotation(30))[:6],
    ],
)
def test_grid_boxes_land_where_scene_boxes_do(transform):
    resample = plan_resample(1000, 1000, (0.25, 0.25), 0.5, 0.1)
    grid_box = np.array([[12.5, 40.0, 30.0, 61.0]])
    scene_box = resample.to_scene_pixels(grid_box)
    on_grid = Affine(*grid_transform(transform, resample))
    on_scene = Affine(*transform)
    for (gx, gy), (sx, sy) in zip(
        [(grid_box[0, 0], grid_box[0, 1]), (grid_box[0, 2], grid_box[0, 3])],
        [(scene_box[0, 0], scene_box[0, 1]), (scene_box[0, 2], scene_box[0, 3])],
        strict=True,
    ):
        np.testing.assert_allclose(on_grid @ (gx, gy), on_scene @ (sx, sy), atol=1e-6)


# --------------------------------------------------------------------------------------------
# Ground pixel size and the pre-flight
# --------------------------------------------------------------------------------------------


def test_lon_lat_rasters_use_metres_per_pixel_at_the_scene_centre():
    wkt = rasterio.crs.CRS.from_epsg(4326).to_wkt()
    # 1e-5 degrees at 60 N: about 0.56 m along a parallel, 1.11 m along a meridian.
    along, down = ground_pixel_size(wkt, (1e-5, 0, 10.0, 0, -1e-5, 60.005), 1000, 1000)
    assert along == pytest.approx(0.558, abs=0.002)
    assert down == pytest.approx(1.114, abs=0.002)
    feet = rasterio.crs.CRS.from_epsg(2263).to_wkt()  # New York, US survey feet
    assert ground_pixel_size(feet, (1, 0, 1e6, 0, -1, 2e5), 10, 10)[0] == pytest.approx(
        0.3048, 1e-3
    )


def _same_content_finer(coarse: Path, fine: Path, factor: int = 2) -> None:
    """``coarse`` at 1/``factor`` of its pixel size: each pixel repeated, the same ground."""
    with rasterio.open(coarse) as src:
        pixels, profile = src.read(), src.profile
    a, _, c, _, e, f = tuple(src.transform)[:6]
    profile.update(
        width=src.width * factor,
        height=src.height * factor,
        transform=Affine(a / factor, 0, c, 0, e / factor, f),
    )
    with rasterio.open(fine, "w", **profile) as dst:
        dst.write(pixels.repeat(factor, axis=1).repeat(factor, axis=2))


def test_a_finer_scene_is_read_as_the_coarser_one(tmp_path):
    coarse, fine = tmp_path / "coarse.tif", tmp_path / "fine.tif"
    write_scene(coarse, 300, plan_objects(300, 128, 16, 6, seed=3), overviews=False)
    _same_content_finer(coarse, fine)
    info = inspect_raster("fine", str(fine), None, None, resolution=(0.5, 0.1))
    plain = inspect_raster("coarse", str(coarse), None, None, resolution=(0.5, 0.1))
    assert plain.resample is None
    assert (info.width, info.height) == (300, 300)
    np.testing.assert_allclose(info.transform, plain.transform)
    with open_raster(str(fine)) as fine_ds, open_raster(str(coarse)) as coarse_ds:
        for window in (Window(0, 0, 128, 128), Window(250, 200, 128, 128)):  # one past the edge
            image, valid = read_tile(fine_ds, window, [1, 2, 3], (0, 255), None, info.resample)
            expected, expected_valid = read_tile(coarse_ds, window, [1, 2, 3], (0, 255))
            np.testing.assert_array_equal(valid, expected_valid)
            np.testing.assert_array_equal(image, expected)


# --------------------------------------------------------------------------------------------
# End to end, with the shipped demo model (trained at 0.5 m)
# --------------------------------------------------------------------------------------------


def _run(tmp_path: Path, scene: Path, name: str, resolution: float | None) -> pa.Table:
    from pipeline.jobs.run import run_job

    spec = load_job(ROOT / "jobs" / "demo.yaml")
    spec = spec.model_copy(
        update={
            "inputs": [str(scene)],
            "model": spec.model.model_copy(update={"resolution_m": resolution}),
            "output": spec.output.model_copy(
                update={"path": str(tmp_path / f"out-{name}"), "crs": UTM}
            ),
            "detect": spec.detect.model_copy(update={"num_actors": 1, "num_cpus_per_actor": 1}),
        }
    )
    report = run_job(spec, progress=lambda line: None)
    (done,) = [s for s in report.scenes if s.status == "done"]
    return pq.read_table(done.output)


def _pixels(table: pa.Table) -> np.ndarray:
    names = ["pixel_xmin", "pixel_ymin", "pixel_xmax", "pixel_ymax"]
    return np.stack([table.column(n).to_numpy() for n in names], axis=1).astype(np.float64)


def _crs_boxes(table: pa.Table) -> np.ndarray:
    """The rows' bbox struct (in the output CRS, here the scenes' UTM zone) as (n, 4)."""
    bbox = table.column("bbox").combine_chunks()
    names = ["xmin", "ymin", "xmax", "ymax"]
    return np.stack([bbox.field(n).to_numpy() for n in names], axis=1).astype(np.float64)


def _best_iou(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    ix = np.clip(
        np.minimum(boxes[:, None, 2], others[None, :, 2])
        - np.maximum(boxes[:, None, 0], others[None, :, 0]),
        0,
        None,
    )
    iy = np.clip(
        np.minimum(boxes[:, None, 3], others[None, :, 3])
        - np.maximum(boxes[:, None, 1], others[None, :, 1]),
        0,
        None,
    )
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    other = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    inter = ix * iy
    return (inter / (area[:, None] + other[None, :] - inter)).max(axis=1)


def _scaled(planted: list[Planted], factor: int) -> list[Planted]:
    return [
        Planted(p.x0 * factor, p.y0 * factor, p.x1 * factor, p.y1 * factor, p.on_seam)
        for p in planted
    ]


@pytest.mark.ray
def test_finer_scenes_give_the_half_metre_objects_with_resolution_m(ray_session, tmp_path):
    # The demo model was trained at 0.5 m on objects of 12-40 px.
    size = 384
    planted = plan_objects(size, 512, 64, 10, seed=21)
    half, quarter, eighth = (tmp_path / f"{n}.tif" for n in ("half", "quarter", "eighth"))
    write_scene(half, size, planted, seed=21, overviews=False)
    _same_content_finer(half, quarter, 2)
    _same_content_finer(half, eighth, 4)

    at_half = _run(tmp_path, half, "half", None)
    found_half, _ = match_planted(planted, _pixels(at_half))
    assert found_half >= 0.9 * len(planted), (found_half, len(planted))
    for scene, factor in ((quarter, 2), (eighth, 4)):
        resampled = _run(tmp_path, scene, f"{scene.stem}-resampled", 0.5)
        # The same objects at the same places on the ground (IoU in the scenes' UTM) ...
        assert len(resampled) == len(at_half), scene.stem
        assert _best_iou(_crs_boxes(at_half), _crs_boxes(resampled)).min() >= 0.8
        # ... reported in the finer scene's own pixels.
        assert match_planted(_scaled(planted, factor), _pixels(resampled))[0] == found_half

    # Without the setting, the objects come out at twice the size in pixels at 0.25 m (matched
    # to the planted boxes doubled): the demo model still finds most of them there ...
    as_is = _run(tmp_path, quarter, "quarter-as-is", None)
    found_as_is = match_planted(_scaled(planted, 2), _pixels(as_is))[0]
    assert found_as_is >= 0.7 * len(planted), (found_as_is, len(planted), len(as_is))
    # ... but at 0.125 m (four times the size: 2.5 cm drone imagery on a 10 cm tree model)
    # it misses most of them.
    as_is = _run(tmp_path, eighth, "eighth-as-is", None)
    found_as_is = match_planted(_scaled(planted, 4), _pixels(as_is))[0]
    assert found_as_is <= 0.3 * len(planted), (found_as_is, len(planted), len(as_is))


def test_training_records_its_rasters_resolution(make_raster):
    from pipeline.jobs.train import training_resolution

    quarter = make_raster("quarter.tif", transform=Affine(0.25, 0, 500_000.0, 0, -0.25, 4.65e6))
    infos = [inspect_raster("q", str(quarter), None, None)]
    # UTM's scale factor at the central meridian: 0.25 m on the grid is 0.2501 m on the ground.
    assert training_resolution(infos) == pytest.approx(0.25, abs=2e-4)
    photo = make_raster("photo.tif", crs=None, transform=None)
    assert training_resolution([inspect_raster("p", str(photo), None, None, True)]) is None


def test_the_settings_hash_of_jobs_without_resolution_m_is_unchanged():
    from pipeline.config import parse_job

    spec = parse_job({"inputs": ["x.tif"], "output": {"path": "out"}})
    # The hash before resolution_m existed: ledgers keep their done scenes.
    assert spec.settings_hash() == "a90989c2a9dda847"
    with_it = spec.model_copy(update={"model": spec.model.model_copy(update={"resolution_m": 0.5})})
    assert with_it.settings_hash() != spec.settings_hash()


def test_a_crs_without_an_ellipsoid_fails_its_scene_by_name_when_resolution_m_is_set(tmp_path):
    local = (
        'LOCAL_CS["site grid",LOCAL_DATUM["site",0],UNIT["metre",1],AXIS["X",EAST],AXIS["Y",NORTH]]'
    )
    path = tmp_path / "site.tif"
    profile = {"driver": "GTiff", "width": 64, "height": 64, "count": 3, "dtype": "uint8"}
    with rasterio.open(
        path, "w", **profile, crs=local, transform=Affine(0.25, 0, 0, 0, -0.25, 16)
    ) as dataset:
        dataset.write(np.zeros((3, 64, 64), np.uint8))
    assert inspect_raster("site", str(path), None, None).width == 64  # read as it is
    with pytest.raises(SceneError, match=r"scene site: .*cannot be measured in its CRS"):
        inspect_raster("site", str(path), None, None, resolution=(0.5, 0.1))
