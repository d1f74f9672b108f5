"""Shared fixtures: a GeoTIFF factory and one local Ray for the whole session."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from affine import Affine  # rasterio's; imported alone so the GPU machine needs no GDAL

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

UTM_33N = "EPSG:32633"
NORTH_UP = Affine(0.5, 0.0, 500_000.0, 0.0, -0.5, 4_650_000.0)


def write_raster(
    path: Path,
    width: int = 256,
    height: int = 256,
    count: int = 3,
    dtype: str = "uint8",
    crs: str | None = UTM_33N,
    transform: Affine | None = NORTH_UP,
    nodata: float | None = None,
    data: np.ndarray | None = None,
    seed: int = 0,
    colormap: dict | None = None,
    **creation: str,
) -> Path:
    """Write a small GeoTIFF: any size, bands, dtype, transform, CRS, nodata, pixels, colour
    map, and GTiff creation options (``photometric="palette"``, ``alpha="YES"``, ...)."""
    if data is None:
        rng = np.random.default_rng(seed)
        data = rng.integers(0, 120, size=(count, height, width)).astype(dtype)
    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": count,
        "dtype": dtype,
        "tiled": True,
        "blockxsize": 128,
        "blockysize": 128,
    }
    if crs is not None:
        profile["crs"] = crs
    if transform is not None:
        profile["transform"] = transform
    if nodata is not None:
        profile["nodata"] = nodata
    import rasterio

    with rasterio.open(path, "w", **profile, **creation) as dst:
        dst.write(data)
        if colormap:
            dst.write_colormap(1, colormap)
    return path


@pytest.fixture
def make_raster(tmp_path: Path) -> Callable[..., Path]:
    """:func:`write_raster` into the test's folder: ``make_raster("name.tif", ...)``."""

    def make(name: str = "scene.tif", **options: object) -> Path:
        return write_raster(tmp_path / name, **options)

    return make


@contextlib.contextmanager
def environment(settings: dict[str, str]) -> Iterator[None]:
    """Set environment variables for a block, then put back what was there."""
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3-compatible server (moto) on loopback, configured for GDAL and fsspec alike.

    The environment is set before Ray starts, so Ray's workers inherit it too.
    """
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    settings = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",  # botocore / s3fs
        "AWS_S3_ENDPOINT": f"127.0.0.1:{port}",  # GDAL's /vsis3/
        "AWS_HTTPS": "NO",
        "AWS_VIRTUAL_HOSTING": "FALSE",
    }
    with environment(settings):
        yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def gcs_endpoint():
    """A GCS-compatible server (fake-gcs-server) on loopback, for GDAL's ``/vsigs/`` (its XML
    API, unsigned) and gcsfs (its JSON API) alike; set before Ray starts, as for S3."""
    from servers import fake_gcs_server

    with fake_gcs_server() as url:
        settings = {
            "STORAGE_EMULATOR_HOST": url,  # gcsfs
            "CPL_GS_ENDPOINT": f"{url}/",  # GDAL's /vsigs/
            "GS_NO_SIGN_REQUEST": "YES",
        }
        with environment(settings):
            yield url


@pytest.fixture(scope="session")
def ray_session(s3_endpoint, gcs_endpoint):
    """One embedded Ray for every end-to-end test (it takes ~11 s to start here)."""
    import ray

    from pipeline.jobs.ray_session import start_embedded_ray

    # Always a fresh embedded Ray (address="local"), never a cluster that happens to run on
    # this machine (a test's own `ray start --head`, or a developer's).
    start_embedded_ray(num_cpus=2)
    yield ray
    ray.shutdown()
