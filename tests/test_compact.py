"""`georetina compact` and `output.compact`: the command end to end, its exit codes, and a
job that compacts its output after the run."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from detections_data import scene_rows, write_indexed

from pipeline.cli.main import main
from pipeline.config import load_job, parse_job
from pipeline.io.query import QueryFilter, query_detections

SUMMARY = re.compile(
    r"compacted \S+ -> \S+: (\d+) partition\(s\) rewritten, (\d+) row\(s\) in them, "
    r"(\d+) scene file\(s\) read, zoom (\d+)"
)


def compact(capsys, *args: str) -> tuple[int, ...]:
    """Run `georetina compact ARGS`; its summary line's numbers."""
    assert main(["compact", *args]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    return tuple(int(n) for n in SUMMARY.fullmatch(out[0]).groups())


def parts(dest: Path) -> dict[str, int]:
    """Each partition's file and when it was last written."""
    return {
        str(p.parent.relative_to(dest)): p.stat().st_mtime_ns
        for p in dest.glob("cell=*/part.parquet")
    }


def ids(source: Path) -> list[str]:
    table = query_detections(str(source), QueryFilter(), columns=["detection_id"])
    return sorted(table["detection_id"].to_pylist())


@pytest.mark.timeout(120)
def test_compact_end_to_end_then_only_the_touched_partitions_again(tmp_path, capsys):
    out, dest = tmp_path / "out", tmp_path / "compacted"
    for k in range(3):
        write_indexed(out, scene_rows(k, 200))
    rewritten, rows, read, zoom = compact(capsys, str(out), str(dest), "--zoom", "15")
    first = parts(dest)
    assert (rewritten, rows, read, zoom) == (len(first), 600, 3, 15) and len(first) > 3
    assert ids(dest) == ids(out)
    # A new scene: only the partitions its rows fall in are written again.
    write_indexed(out, scene_rows(3, 200))
    new = query_detections(str(out), QueryFilter(scenes=("s3",)), columns=["bbox"])
    rewritten, rows, read, zoom = compact(capsys, str(out), str(dest))  # zoom kept
    second = parts(dest)
    touched = {k for k in second if first.get(k) != second[k]}
    assert zoom == 15 and rewritten == len(touched) and 0 < len(touched) < len(second)
    assert rows == sum(pq.read_metadata(dest / k / "part.parquet").num_rows for k in touched)
    # One new scene file read (neighbours sharing its cells are re-read to rebuild them).
    assert read == 1 and rows >= new.num_rows == 200
    assert ids(dest) == ids(out)
    assert compact(capsys, str(out), str(dest))[:3] == (0, 0, 0)  # nothing new, nothing done


@pytest.mark.timeout(120)
def test_compact_exit_codes(tmp_path, capsys):
    out, dest = tmp_path / "out", tmp_path / "compacted"
    write_indexed(out, scene_rows(0, 20))
    assert main(["compact", str(tmp_path / "nowhere"), str(dest)]) == 3
    assert "no such folder" in capsys.readouterr().err
    assert main(["compact", str(out / "detections"), str(dest)]) == 3  # not an output root
    assert "no scene table" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["compact", str(out), str(blocker / "dest")]) == 3
    assert "is not writable" in capsys.readouterr().err
    assert main(["compact", str(out), str(out)]) == 2
    assert main(["compact", str(out), str(dest), "--zoom", "40"]) == 2
    assert "zoom 40" in capsys.readouterr().err
    assert main(["compact", str(out), str(dest), "--zoom", "9"]) == 0
    assert main(["compact", str(out), str(dest), "--zoom", "10"]) == 2
    assert "compacted with zoom 9, not 10" in capsys.readouterr().err
    assert main(["compact", str(out), str(dest), "--by-date"]) == 2  # made without dates


def test_output_compact_is_relative_to_the_job_file(tmp_path):
    job = {"inputs": ["a.tif"], "model": {"kind": "threshold"}}
    job["output"] = {"path": "out", "compact": "compacted"}
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "job.yaml").write_text(yaml.safe_dump(job))
    spec = load_job(tmp_path / "jobs" / "job.yaml")
    assert spec.output.compact == str(tmp_path / "jobs" / "compacted")
    assert parse_job({**job, "output": {"path": "out"}}).output.compact is None


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_job_with_output_compact_writes_the_dataset_and_survives_a_failed_one(
    ray_session, tmp_path
):
    from pipeline.io.synthetic import plan_objects, write_scene
    from pipeline.jobs.run import run_job

    size, tile, overlap = 512, 256, 48
    scene = tmp_path / "scene.tif"
    objects = plan_objects(size, tile, overlap, count=8, seed=5, max_side=overlap - 8)
    write_scene(scene, size, objects, seed=5, block=128, overviews=False)
    job = {
        "inputs": [str(scene)],
        "model": {"kind": "threshold"},
        "tiling": {"tile_size": tile, "overlap": overlap, "tiles_per_read_task": 4},
        "output": {"path": str(tmp_path / "out"), "compact": str(tmp_path / "compacted")},
    }
    lines: list[str] = []
    report = run_job(parse_job(job), progress=lines.append)
    assert report.count("done") == 1
    assert any(
        re.fullmatch(r"compact \S+: \d+ partition\(s\) rewritten, 8 row.*", s) for s in lines
    )
    assert ids(tmp_path / "compacted") == ids(tmp_path / "out") and len(ids(tmp_path / "out")) == 8
    # A compaction that cannot be written is reported; the run's scenes stand.
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    job["output"]["compact"] = str(blocker / "compacted")
    lines.clear()
    report = run_job(parse_job(job), progress=lines.append, force=True)
    assert report.count("done") == 1 and report.count("failed") == 0
    assert any(line.startswith(f"compact {blocker / 'compacted'}: failed (") for line in lines)
