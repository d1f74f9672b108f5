"""Progress and the run report: areas, ETA, totals, the human summary, and a real run's JSON."""

import json

import pytest
from pyproj import CRS

from pipeline.config import parse_job
from pipeline.io.synthetic import plan_objects, write_scene
from pipeline.jobs.report import (
    RunProgress,
    failure_reason,
    footprint_km2,
    format_duration,
    run_totals,
    summary_lines,
)
from pipeline.jobs.run import run_job

UTM = CRS.from_epsg(32633).to_wkt()
WGS84 = CRS.from_epsg(4326).to_wkt()


def test_footprint_area_in_any_crs():
    # 1000 x 1000 px of 0.5 m on the central meridian: 0.25 km² (scale factor 0.9996).
    utm = footprint_km2(1000, 1000, (0.5, 0, 500_000, 0, -0.5, 4_650_000), UTM)
    assert utm == pytest.approx(0.25 / 0.9996**2, rel=1e-3)
    # 0.01° x 0.01° at the equator: about 1.113 km x 1.106 km.
    degrees = footprint_km2(100, 100, (1e-4, 0, 10.0, 0, -1e-4, 0.005), WGS84)
    assert degrees == pytest.approx(1.2308, rel=2e-3)
    # A grid rotated by 30° covers the same ground.
    import math

    c, s = math.cos(math.radians(30)) * 0.5, math.sin(math.radians(30)) * 0.5
    rotated = footprint_km2(1000, 1000, (c, -s, 500_000, -s, -c, 4_650_000), UTM)
    assert rotated == pytest.approx(utm, rel=1e-3)


def test_durations_and_progress_with_eta():
    assert [format_duration(v) for v in (5, 185, 3720, None)] == ["5s", "3m05s", "1h02m", "?"]
    line = RunProgress(3, 0, 0, 10, True, 120, 400, busy_s=60.0).line()
    assert line == "scenes 3/10, tiles 120/400 (30%), 2.00 tiles/s, ETA 2m20s"
    assert RunProgress(0, 0, 0, 1, True, 0, 10, busy_s=0.0).line().endswith("ETA ?")


def test_totals_group_failures_and_classes():
    scenes = [
        {"status": "done", "per_class": {"ship": 3, "boat": 1}, "area_km2": 2.0, "error": None},
        {"status": "done", "per_class": {"ship": 2}, "area_km2": 1.0, "error": None},
        {"status": "skipped", "area_km2": 0.0, "error": None},
        {"status": "failed", "error": "scene a-1: read failed: /vsis3/x: 503"},
        {"status": "failed", "error": "scene b-2: read failed: truncated"},
        {"status": "failed", "error": "scene c-3: has no CRS; georeference it"},
    ]
    totals = run_totals(scenes, busy_s=1800)
    assert totals["scenes_done"] == 2 and totals["scenes_skipped"] == 1
    assert totals["scenes_failed"] == 3
    assert totals["failures_by_reason"] == {"read failed": 2, "has no CRS; georeference it": 1}
    assert totals["detections_per_class"] == {"boat": 1, "ship": 5}
    assert totals["area_km2"] == 3.0 and totals["km2_per_hour"] == 6.0
    assert failure_reason("scene x: cannot be read as a raster (s3://b/x.tif): boom") == (
        "cannot be read as a raster"
    )


def test_summary_lines_read_like_a_report():
    report = {
        "run_id": "r1",
        "job": "nightly",
        "model_id": "m",
        "tiles": 40,
        "detections": 6,
        "tiles_per_s": 2.0,
        "wall_s": 75.0,
        "ray_start_s": 11.0,
        "output": "s3://bucket/out",
        "scenes": [{"status": "failed", "scene_id": "c-3", "error": "scene c-3: has no CRS"}],
        **run_totals(
            [
                {"status": "done", "per_class": {"ship": 5, "boat": 1}, "area_km2": 2.0},
                {"status": "failed", "error": "scene c-3: has no CRS"},
            ],
            busy_s=64.0,
        ),
    }
    text = "\n".join(summary_lines(report))
    assert "scenes: 1 done, 0 skipped, 1 failed" in text
    assert "detections: 6 (boat 1, ship 5)" in text
    assert "area: 2.00 km², 112.5 km²/h" in text
    assert "wall_s: 75.0 (of which starting Ray: 11.0), 1m15s" in text
    assert "  1 failed: has no CRS" in text and "FAILED c-3: scene c-3: has no CRS" in text


@pytest.mark.ray
def test_a_run_reports_progress_and_writes_the_totals(ray_session, tmp_path):
    objects = plan_objects(500, 128, 24, count=8, seed=9, max_side=20)
    write_scene(tmp_path / "a.tif", 500, objects, seed=9, block=128, overviews=False)
    (tmp_path / "bad.tif").write_bytes(b"not a tiff")
    job = {
        "inputs": [str(tmp_path / "a.tif"), str(tmp_path / "bad.tif")],
        "model": {"kind": "threshold", "classes": ["blob"]},
        "tiling": {"tile_size": 128, "overlap": 24, "tiles_per_read_task": 4},
        "output": {"path": str(tmp_path / "out")},
    }
    lines: list[str] = []
    report = run_job(parse_job(job), run_id="r-progress", progress=lines.append, progress_every_s=0)
    progress = [line for line in lines if "ETA" in line]
    assert progress, lines
    assert progress[-1].lstrip().startswith(f"scenes 2/2, tiles {report.tiles}/{report.tiles}")
    saved = json.loads((tmp_path / "out" / "_runs" / "r-progress.json").read_text())
    assert saved["scenes_done"] == 1 and saved["scenes_failed"] == 1
    assert saved["detections_per_class"] == {"blob": len(objects)}
    assert list(saved["failures_by_reason"]) == ["cannot be read as a raster"]
    assert saved["area_km2"] == pytest.approx(500 * 500 * 0.25 / 1e6, rel=2e-3)
    assert saved["km2_per_hour"] > 0
    (done,) = [s for s in saved["scenes"] if s["status"] == "done"]
    assert done["per_class"] == {"blob": len(objects)}
