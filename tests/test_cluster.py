"""Jobs on a running Ray head: `georetina run --address` (a separate driver) and the Job API
(`georetina submit|status|logs|stop`), against one real token-authenticated head on loopback."""

import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

import geopandas
import pytest
import yaml

from pipeline.io.synthetic import plan_objects, write_scene

pytestmark = pytest.mark.ray


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RayHead(NamedTuple):
    address: str  # GCS, for `georetina run --address`
    env: dict  # the token settings every client needs (Ray 2.60 turns token auth on)
    job_api: str  # dashboard / Job Submission API


def wait_for_http(url: str, deadline: float) -> None:
    """Until the server answers at all (401 without a token counts: it is up)."""
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(1)
    pytest.fail(f"{url} did not come up")


def wait_for_job_agent(job_api: str, env: dict, deadline: float) -> None:
    """Until the head takes a job: its job agent registers some seconds after the dashboard."""
    code = (
        "import sys, time\n"
        "from ray.job_submission import JobSubmissionClient\n"
        "client = JobSubmissionClient(sys.argv[1])\n"
        "while True:\n"
        "    try:\n"
        "        job = client.submit_job(entrypoint='true')\n"
        "        break\n"
        "    except RuntimeError as error:\n"
        "        if 'try again later' not in str(error): raise\n"
        "        time.sleep(1)\n"
        "while not client.get_job_status(job).is_terminal(): time.sleep(0.5)\n"
    )
    timeout = max(1.0, deadline - time.time())
    subprocess.run([sys.executable, "-c", code, job_api], env=env, check=True, timeout=timeout)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real Ray head on loopback with token authentication and its Job API, stopped after
    the tests. Its PATH starts with this venv, as a cluster image's would with Python."""
    port, dashboard_port = free_port(), free_port()
    temp_dir = tmp_path_factory.mktemp("rayhead")
    token_file = temp_dir / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
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
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            # Every agent port free too: the tests' embedded Ray already holds the defaults
            # (52365 for the dashboard agent), and a head whose agent cannot bind it has no
            # Job API ("No available agent to submit job").
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
    )
    address = f"127.0.0.1:{port}"
    try:
        wait_for_head(ray_bin, address, env, dashboard_port)
    except BaseException:
        _stop(head)  # a head that never came up must not outlive the test session
        raise
    yield RayHead(address, env, f"http://127.0.0.1:{dashboard_port}")
    _stop(head)


def _stop(head: subprocess.Popen) -> None:
    head.terminate()
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()


def wait_for_head(ray_bin: Path, address: str, env: dict, dashboard_port: int) -> None:
    """Until the head answers `ray status`, its dashboard and its job agent."""
    # Generous: on a loaded 2-core machine the head's job agent can take a minute or more.
    deadline = time.time() + 240
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
        pytest.fail("ray head did not come up")
    wait_for_http(f"http://127.0.0.1:{dashboard_port}/api/version", deadline)
    wait_for_job_agent(f"http://127.0.0.1:{dashboard_port}", env, deadline)


def test_cli_runs_a_job_on_a_running_cluster(ray_head, tmp_path):
    address, env, _ = ray_head
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


def georetina(*args, env, cwd=None, timeout=300):
    return subprocess.run(
        [str(Path(sys.executable).parent / "georetina"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )


def small_job(
    folder: Path, name: str, seed: int, scene_dir: Path | None = None
) -> tuple[Path, int]:
    """A job file beside its scene (shipped with the working directory), or with its scene in
    ``scene_dir`` (a path every node shares, as an archive is); the output outside."""
    objects = plan_objects(400, 256, 48, count=6, seed=seed, max_side=30)
    scene = (scene_dir or folder) / "scene.tif"
    write_scene(scene, 400, objects, seed=seed, block=128, overviews=False)
    job = folder / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "inputs": [str(scene) if scene_dir else "scene.tif"],
                "model": {"kind": "threshold"},
                "tiling": {"tile_size": 256, "overlap": 48},
                "output": {"path": str(folder.parent / f"{name}-out")},
            }
        )
    )
    return job, len(objects)


def test_submit_ships_the_working_dir_and_runs_the_job(ray_head, tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    job, planted = small_job(folder, "shipped", seed=21)
    started = time.perf_counter()
    result = georetina(
        "submit", "job.yaml", "--address", ray_head.job_api, "--submission-id", "shipped-1",
        "--no-deps", "--wait", env=ray_head.env, cwd=folder,
    )  # fmt: skip
    print(f"submit-to-finish: {time.perf_counter() - started:.1f} s")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "submitted shipped-1" in result.stdout
    assert "are shipped with the working directory" in result.stderr  # fine once, not nightly
    assert "scenes: 1 done" in result.stdout  # the job's own summary, followed from its logs
    assert result.stdout.rstrip().endswith("shipped-1: SUCCEEDED")
    (output,) = (tmp_path / "shipped-out" / "detections").glob("*.parquet")
    assert len(geopandas.read_parquet(output)) == planted
    assert (tmp_path / "shipped-out" / "_runs" / "shipped-1.json").exists()  # run id = job id

    status = georetina("status", "shipped-1", "--address", ray_head.job_api, env=ray_head.env)
    assert status.returncode == 0 and "shipped-1: SUCCEEDED" in status.stdout
    logs = georetina("logs", "shipped-1", "--address", ray_head.job_api, env=ray_head.env)
    assert "scenes: 1 done" in logs.stdout
    assert (
        "python -m pipeline.cli.main run job.yaml --run-id shipped-1"
        in georetina(
            "status", "shipped-1", "--json", "--address", ray_head.job_api, env=ray_head.env
        ).stdout
    )


def test_nightly_submission_runs_once_per_night(ray_head, tmp_path):
    folder, archive = tmp_path / "project", tmp_path / "archive"
    folder.mkdir()
    archive.mkdir()
    small_job(folder, "archive", seed=22, scene_dir=archive)
    args = ["submit", "job.yaml", "--address", ray_head.job_api, "--nightly", "--no-deps"]
    first = georetina(*args, "--date", "2026-06-01", env=ray_head.env, cwd=folder)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "submitted archive-nightly-20260601" in first.stdout
    assert "warning" not in first.stderr
    again = georetina(*args, "--date", "2026-06-01", env=ray_head.env, cwd=folder)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "archive-nightly-20260601: already submitted" in again.stdout
    follow = georetina(
        "logs", "archive-nightly-20260601", "--follow", "--address", ray_head.job_api,
        env=ray_head.env,
    )  # fmt: skip
    assert follow.returncode == 0, follow.stdout + follow.stderr
    assert follow.stdout.count("scenes: 1 done") == 1
    runs = list((tmp_path / "archive-out" / "_runs").glob("*.json"))
    assert [r.name for r in runs] == ["archive-nightly-20260601.json"]

    # The next night: a new submission, and only what is new is processed (nothing here).
    night2 = georetina(*args, "--date", "2026-06-02", "--wait", env=ray_head.env, cwd=folder)
    assert night2.returncode == 0, night2.stdout + night2.stderr
    assert "scenes: 0 done, 1 skipped, 0 failed" in night2.stdout, night2.stdout


def test_stop_ends_a_running_job(ray_head, tmp_path):
    sleeper = subprocess.run(
        [
            sys.executable,
            "-c",
            "from ray.job_submission import JobSubmissionClient as C; import sys; "
            "print(C(sys.argv[1]).submit_job(entrypoint='sleep 600', submission_id='sleeper'))",
            ray_head.job_api,
        ],
        capture_output=True,
        text=True,
        env=ray_head.env,
        timeout=60,
    )
    assert sleeper.returncode == 0, sleeper.stderr
    stop = georetina("stop", "sleeper", "--address", ray_head.job_api, env=ray_head.env)
    assert stop.returncode == 0 and "sleeper: stop requested" in stop.stdout
    follow = georetina(
        "logs", "sleeper", "--follow", "--address", ray_head.job_api, env=ray_head.env
    )
    assert follow.returncode == 1  # STOPPED is not success
    status = georetina("status", "sleeper", "--address", ray_head.job_api, env=ray_head.env)
    assert "sleeper: STOPPED" in status.stdout


def test_job_api_without_the_token_is_a_clear_error(ray_head):
    env = {k: v for k, v in ray_head.env.items() if not k.startswith("RAY_AUTH")}
    env["RAY_AUTH_MODE"] = "disabled"
    env["HOME"] = "/nonexistent"  # no ~/.ray/auth_token either
    result = georetina("status", "anything", "--address", ray_head.job_api, env=env)
    assert result.returncode == 3  # the cluster cannot be used: exit 3, not a bad job file
    assert "georetina: error:" in result.stderr
    assert "token" in result.stderr.lower() or "auth" in result.stderr.lower(), result.stderr


def test_unknown_job_is_a_clear_error(ray_head):
    result = georetina("status", "no-such-job", "--address", ray_head.job_api, env=ray_head.env)
    assert result.returncode == 3
    assert "no-such-job" in result.stderr
