"""`georetina submit` without a cluster: ids, runtime environment, entrypoint, early errors.

The submissions themselves run against a real Ray head in tests/test_cluster.py.
"""

import shlex
from datetime import date
from pathlib import Path

import pytest
import yaml

import pipeline
from pipeline.cli.main import main
from pipeline.jobs.submit import (
    SubmitError,
    build_runtime_env,
    entrypoint_for,
    job_path_in,
    nightly_submission_id,
    project_requirements,
)


def test_nightly_id_is_one_per_job_and_night():
    assert nightly_submission_id("archive", date(2026, 6, 1)) == "archive-nightly-20260601"
    assert nightly_submission_id("archive", date(2026, 6, 2)) != nightly_submission_id(
        "archive", date(2026, 6, 1)
    )


def test_requirements_are_the_pins_without_ray_or_test_tools():
    pins = project_requirements()
    names = {p.split("==")[0].split("[")[0].split(">")[0] for p in pins}
    assert "torch" in names and "rasterio" in names and "pystac" in names
    assert "ray" not in names  # the cluster's Ray must stay the cluster's
    assert "pytest" not in names and not any("extra ==" in p for p in pins)
    assert all("==" in p or ">=" in p for p in pins)


def test_runtime_env_ships_working_dir_package_and_deps(tmp_path):
    env = build_runtime_env(tmp_path, ["rasterio==1.4.4"])
    assert env["working_dir"] == str(tmp_path)
    assert env["py_modules"] == [str(Path(pipeline.__file__).parent)]
    assert env["pip"] == ["rasterio==1.4.4"]
    assert ".venv" in env["excludes"] and ".git" in env["excludes"]
    assert "pip" not in build_runtime_env(tmp_path, None)


def test_entrypoint_runs_the_shipped_job_with_the_submission_as_run_id():
    command = shlex.split(entrypoint_for("jobs/night ly.yaml", "n-20260601", force=True))
    assert command == [
        "python", "-m", "pipeline.cli.main", "run", "jobs/night ly.yaml",
        "--run-id", "n-20260601", "--force",
    ]  # fmt: skip


def test_job_outside_the_working_dir_is_refused(tmp_path):
    (tmp_path / "wd").mkdir()
    (tmp_path / "jobs").mkdir()
    assert job_path_in(tmp_path, tmp_path / "jobs" / "j.yaml") == "jobs/j.yaml"
    with pytest.raises(SubmitError, match="not inside the working directory"):
        job_path_in(tmp_path / "wd", tmp_path / "jobs" / "j.yaml")


def test_bad_job_file_fails_before_any_request(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"inputs": [{"stac": {"asset": "x"}}], "output": {}}))
    # Nothing listens on port 9: the job file is checked first.
    code = main(["submit", str(job), "--address", "http://127.0.0.1:9", "--working-dir", "/"])
    assert code == 2
    err = capsys.readouterr().err
    assert "inputs.0.stac" in err and "output.path" in err


def test_paths_inside_the_shipped_folder_are_warned_about(tmp_path):
    from pipeline.config import parse_job
    from pipeline.jobs.submit import shipped_path_warnings

    shipped = parse_job(
        {"inputs": [str(tmp_path / "a.tif"), "s3://b/x.tif"], "output": {"path": str(tmp_path)}}
    )
    inputs, output = shipped_path_warnings(shipped, tmp_path)
    assert "a.tif" in inputs and "x.tif" not in inputs and "new path" in inputs
    assert "lost" in output
    remote = parse_job({"inputs": ["/archive/*.tif"], "output": {"path": "s3://b/out"}})
    assert shipped_path_warnings(remote, tmp_path) == []
