"""`georetina run --address`: a job run by a separate driver on a running Ray head."""

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import geopandas
import pytest
import yaml

from pipeline.synthetic import plan_objects, write_scene

pytestmark = pytest.mark.ray


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real Ray head on loopback with token authentication, stopped after the tests.

    Yields ``(address, env)``: clients need the same token (Ray 2.60 turns token auth on).
    """
    port = free_port()
    temp_dir = tmp_path_factory.mktemp("rayhead")
    token_file = temp_dir / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    ray_bin = Path(sys.executable).parent / "ray"
    head = subprocess.Popen(
        [
            str(ray_bin),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
    )
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        status = subprocess.run(
            [str(ray_bin), "status", f"--address={address}"],
            capture_output=True,
            text=True,
            env=env,
        )
        if status.returncode == 0:
            break
        time.sleep(2)
    else:
        head.terminate()
        pytest.fail("ray head did not come up")
    yield address, env
    head.terminate()
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()


def test_cli_runs_a_job_on_a_running_cluster(ray_head, tmp_path):
    address, env = ray_head
    objects = plan_objects(600, 256, 48, count=10, seed=11, max_side=30)
    write_scene(tmp_path / "scene.tif", 600, objects, seed=11, block=128, overviews=False)
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "inputs": ["scene.tif"],
                "model": {"kind": "threshold"},
                "tiling": {"tile_size": 256, "overlap": 48},
                "output": {"path": "out"},
            }
        )
    )
    result = subprocess.run(
        [str(Path(sys.executable).parent / "georetina"), "run", str(job), "--address", address],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "scenes: 1 done" in result.stdout
    (output,) = (tmp_path / "out" / "detections").glob("*.parquet")
    assert len(geopandas.read_parquet(output)) == len(objects)
