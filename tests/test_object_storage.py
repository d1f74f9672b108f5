"""Object storage for real: a COG read through s3:// and GeoParquet written to s3://, on an
S3-compatible server (moto) on loopback."""

import io

import geopandas
import pyarrow.parquet as pq
import pytest
import s3fs

from pipeline.config import parse_job
from pipeline.ledger import Ledger
from pipeline.rasters import inspect_raster
from pipeline.runner import run_job
from pipeline.synthetic import plan_objects, write_scene

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def bucket(s3_endpoint, tmp_path_factory):
    fs = s3fs.S3FileSystem()
    fs.mkdir("georetina-test")
    folder = tmp_path_factory.mktemp("s3scene")
    objects = plan_objects(700, 256, 48, count=15, seed=21, max_side=30)
    write_scene(folder / "scene.tif", 700, objects, seed=21, block=256)
    fs.put(str(folder / "scene.tif"), "georetina-test/archive/2026/scene.tif")
    return fs, objects


def test_preflight_reads_a_cog_through_gdal_vsis3(bucket):
    info = inspect_raster("s", "s3://georetina-test/archive/2026/scene.tif", None, None)
    assert (info.width, info.height) == (700, 700)


def test_job_reads_and_writes_object_storage(ray_session, bucket):
    fs, objects = bucket
    spec = parse_job(
        {
            "inputs": ["s3://georetina-test/archive/**/*.tif"],
            "model": {"kind": "threshold"},
            "tiling": {"tile_size": 256, "overlap": 48},
            "output": {"path": "s3://georetina-test/out"},
        }
    )
    report = run_job(spec, progress=lambda line: None)
    assert report.count("done") == 1, report.scenes
    (key,) = fs.glob("georetina-test/out/detections/*.parquet")
    frame = geopandas.read_parquet(io.BytesIO(fs.cat(key)))
    assert len(frame) == len(objects)
    assert [r.status for r in Ledger("s3://georetina-test/out").records()] == ["done"]

    # A forced re-run replaces the object under the same key: no duplicate rows or files.
    forced = run_job(spec, force=True, progress=lambda line: None)
    assert forced.count("done") == 1
    assert fs.glob("georetina-test/out/detections/*.parquet") == [key]
    fs.invalidate_cache()
    table = pq.read_table(io.BytesIO(fs.cat(key)))
    assert table.num_rows == len(objects)
    assert set(table["run_id"].to_pylist()) == {forced.run_id}
