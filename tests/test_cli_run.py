"""`georetina run` on the session's Ray: exit code 1 when some scenes failed, and `-v`
(Ray's own log lines let through, the progress as plain lines)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import write_raster
from faults import threshold_job

from pipeline.cli.main import main


def write_job(folder: Path, inputs: list[Path]) -> Path:
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(threshold_job(inputs, str(folder / "out"))))
    return path


@pytest.mark.ray
def test_some_scenes_failed_is_1_and_the_others_are_done(ray_session, tmp_path, capsys):
    good = write_raster(tmp_path / "good.tif")
    bad = tmp_path / "bad.tif"
    bad.write_text("not a GeoTIFF")
    assert main(["run", str(write_job(tmp_path, [good, bad]))]) == 1
    out = capsys.readouterr().out
    assert "scenes: 1 done, 0 skipped, 1 failed" in out, out
    assert len(list((tmp_path / "out" / "detections").glob("*.parquet"))) == 1


@pytest.mark.ray
def test_verbose_runs_the_job_with_plain_progress_lines(ray_session, tmp_path, capsys):
    job = write_job(tmp_path, [write_raster(tmp_path / "a.tif")])
    assert main(["run", "-v", str(job)]) == 0
    out = capsys.readouterr().out
    assert "scenes: 1 done, 0 skipped, 0 failed" in out, out
    assert "  scenes 1/1, tiles " in out, out
