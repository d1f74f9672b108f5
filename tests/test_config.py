from pathlib import Path

import pytest
import yaml

from pipeline.config import CPU_INFLIGHT_MB, GPU_INFLIGHT_MB, load_job, parse_job
from pipeline.errors import JobSpecError

MINIMAL = {"inputs": ["scenes/*.tif"], "output": {"path": "out"}}


def test_minimal_job_gets_paper_defaults():
    spec = parse_job(MINIMAL)
    assert spec.model.score_threshold == 0.05
    assert spec.model.nms_threshold == 0.5
    assert spec.model.topk_candidates == 1000
    assert spec.model.detections_per_tile > 300
    assert spec.output.crs == "OGC:CRS84"


def test_misspelt_key_names_its_path():
    job = {**MINIMAL, "tiling": {"tile_sise": 512}}
    with pytest.raises(JobSpecError) as caught:
        parse_job(job)
    assert "tiling.tile_sise" in str(caught.value)


def test_every_error_is_reported_at_once():
    job = {
        "inputs": "not-a-list",
        "tiling": {"tile_size": "big"},
        "detect": {"batch_size": 0},
        "output": {},
    }
    with pytest.raises(JobSpecError) as caught:
        parse_job(job)
    text = str(caught.value)
    for path in ("inputs", "tiling.tile_size", "detect.batch_size", "output.path"):
        assert path in text
    assert len(caught.value.problems) == 4


def test_overlap_must_stay_below_half_a_tile():
    with pytest.raises(JobSpecError, match="overlap"):
        parse_job({**MINIMAL, "tiling": {"tile_size": 256, "overlap": 200}})


def test_read_ahead_defaults_to_where_the_actors_run():
    def read_ahead(detect: dict) -> int:
        return parse_job({**MINIMAL, "detect": detect}).detect.inflight_mb_per_actor

    assert read_ahead({}) == CPU_INFLIGHT_MB < GPU_INFLIGHT_MB
    assert read_ahead({"num_gpus_per_actor": 0.5}) == GPU_INFLIGHT_MB
    assert read_ahead({"inflight_mb_per_actor": None}) == CPU_INFLIGHT_MB
    assert read_ahead({"num_gpus_per_actor": 1, "inflight_mb_per_actor": 32}) == 32
    # A 1024 px tile's default read task (16 tiles) still fits the CPU default.
    parse_job({**MINIMAL, "tiling": {"tile_size": 1024}})
    with pytest.raises(JobSpecError, match="detect.num_gpus_per_actor"):
        parse_job({**MINIMAL, "detect": {"num_gpus_per_actor": "many"}})


def test_relative_paths_are_relative_to_the_job_file(tmp_path: Path):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "m.yaml").write_text(yaml.safe_dump({"classes": ["ship", "boat"]}))
    job = tmp_path / "jobs" / "j.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "inputs": ["../data/a.tif", "s3://bucket/b.tif"],
                "model": "../configs/m.yaml",
                "output": {"path": "../out"},
            }
        )
    )
    spec = load_job(job)
    assert spec.inputs == [str(tmp_path / "data" / "a.tif"), "s3://bucket/b.tif"]
    assert spec.output.path == str(tmp_path / "out")
    assert spec.model.classes == ["ship", "boat"]


def test_yaml_tags_are_not_executed(tmp_path: Path):
    job = tmp_path / "evil.yaml"
    job.write_text("inputs: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(JobSpecError, match="yaml"):
        load_job(job)


def test_settings_hash_ignores_speed_knobs_but_not_results():
    base = parse_job(MINIMAL)
    faster = parse_job({**MINIMAL, "detect": {"batch_size": 16}})
    other = parse_job({**MINIMAL, "merge": {"iou_threshold": 0.3}})
    assert base.settings_hash() == faster.settings_hash()
    assert base.settings_hash() != other.settings_hash()


def test_shipped_job_files_validate():
    from pipeline.config import load_train_spec

    root = Path(__file__).parents[1]
    for job in sorted((root / "jobs").glob("*.yaml")):
        # Training files (georetina train) have `data:`; job files (georetina run) `inputs:`.
        if "data" in yaml.safe_load(job.read_text()):
            load_train_spec(job)
        else:
            load_job(job)


def test_an_unwritable_output_fails_before_any_work(tmp_path, capsys):
    """Checked first: no Ray started, no scene opened, no model loaded (a GPU never waits)."""
    from pipeline.cli.main import main

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "inputs": [str(tmp_path / "missing.tif")],
                "model": {"kind": "threshold"},
                "output": {"path": str(blocker / "out")},
            }
        )
    )
    assert main(["run", str(job)]) == 3  # the run could not start
    assert f"output {blocker / 'out'} is not writable" in capsys.readouterr().err
    assert not (blocker.parent / "out").exists()
