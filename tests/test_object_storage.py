"""Object storage for real: a COG read through s3:// and gs://, and GeoParquet written back,
on loopback servers that speak each protocol (moto for S3, fake-gcs-server for GCS)."""

import io

import geopandas
import pyarrow.parquet as pq
import pytest

from pipeline.config import parse_job
from pipeline.io.ledger import Ledger
from pipeline.io.rasters import inspect_raster, open_raster
from pipeline.io.synthetic import plan_objects, write_scene
from pipeline.jobs.run import run_job

pytestmark = pytest.mark.ray

BUCKET = "georetina-test"
KEY = "archive/2026/scene.tif"


@pytest.fixture(scope="module")
def scene_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scene")
    objects = plan_objects(700, 256, 48, count=15, seed=21, max_side=30)
    write_scene(folder / "scene.tif", 700, objects, seed=21, block=256)
    return folder / "scene.tif", objects


@pytest.fixture(scope="module", params=["s3", "gs"])
def store(request, scene_file):
    """``(scheme, filesystem, objects)``: a bucket on the scheme's loopback server holding the
    scene under ``KEY``."""
    path, objects = scene_file
    if request.param == "s3":
        import s3fs

        request.getfixturevalue("s3_endpoint")
        fs = s3fs.S3FileSystem()
    else:
        import gcsfs

        request.getfixturevalue("gcs_endpoint")
        fs = gcsfs.GCSFileSystem()
    fs.mkdir(BUCKET)
    fs.put(str(path), f"{BUCKET}/{KEY}")
    return request.param, fs, objects


# fsspec spells GCS both ways; rasterio maps only gs:// to GDAL's handler by itself.
SPELLINGS = {"s3": ["s3"], "gs": ["gs", "gcs"]}


def test_preflight_reads_a_cog_through_gdal_itself(store):
    scheme, _, _ = store
    for spelling in SPELLINGS[scheme]:
        uri = f"{spelling}://{BUCKET}/{KEY}"
        info = inspect_raster("s", uri, None, None)
        assert (info.width, info.height) == (700, 700)
        with open_raster(uri) as dataset:  # GDAL's /vsis3/ or /vsigs/ handler, not fsspec
            assert dataset.files[0] == f"/vsi{scheme}/{BUCKET}/{KEY}"


def test_job_reads_and_writes_object_storage(ray_session, store):
    scheme, fs, objects = store
    spec = parse_job(
        {
            "inputs": [f"{scheme}://{BUCKET}/archive/**/*.tif"],
            "model": {"kind": "threshold"},
            "tiling": {"tile_size": 256, "overlap": 48},
            "output": {"path": f"{scheme}://{BUCKET}/out"},
        }
    )
    report = run_job(spec, progress=lambda line: None)
    assert report.count("done") == 1, report.scenes
    (key,) = fs.glob(f"{BUCKET}/out/detections/*.parquet")
    frame = geopandas.read_parquet(io.BytesIO(fs.cat(key)))
    assert len(frame) == len(objects)
    assert [r.status for r in Ledger(f"{scheme}://{BUCKET}/out").records()] == ["done"]

    # A forced re-run replaces the object under the same key: no duplicate rows or files.
    forced = run_job(spec, force=True, progress=lambda line: None)
    assert forced.count("done") == 1
    fs.invalidate_cache()
    assert fs.glob(f"{BUCKET}/out/detections/*.parquet") == [key]
    table = pq.read_table(io.BytesIO(fs.cat(key)))
    assert table.num_rows == len(objects)
    assert set(table["run_id"].to_pylist()) == {forced.run_id}
