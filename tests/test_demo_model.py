"""The shipped demo model: small enough to ship, and it really detects, across seams too."""

from pathlib import Path

import pytest

from pipeline.config import load_job
from pipeline.io.synthetic import plan_objects, write_scene
from pipeline.jobs.demo import precision_recall
from pipeline.jobs.run import run_job

ROOT = Path(__file__).resolve().parent.parent


def test_demo_model_file_is_small_and_matches_its_config():
    spec = load_job(ROOT / "jobs" / "demo.yaml")
    checkpoint = Path(spec.model.checkpoint)
    assert checkpoint.exists(), "models/demo_r18_c4.safetensors is shipped with the repository"
    assert checkpoint.stat().st_size <= 10 * 2**20
    from pipeline.model.build import model_id_for

    assert model_id_for(spec.model, spec.tiling.tile_size).startswith("demo-r18-c4:resnet18_fpn:")


@pytest.mark.ray
def test_demo_model_finds_the_planted_objects_of_an_unseen_scene(ray_session, tmp_path):
    # Seed 7: neither the demo scene (0) nor a training scene (100-103).
    spec = load_job(ROOT / "jobs" / "demo.yaml")
    size = 1536
    objects = plan_objects(size, spec.tiling.tile_size, spec.tiling.overlap, 40, seed=7)
    write_scene(tmp_path / "unseen.tif", size, objects, seed=7)
    spec = spec.model_copy(
        update={
            "inputs": [str(tmp_path / "unseen.tif")],
            "output": spec.output.model_copy(update={"path": str(tmp_path / "out")}),
            "detect": spec.detect.model_copy(update={"num_actors": 1, "num_cpus_per_actor": 1}),
        }
    )
    report = run_job(spec, progress=lambda line: None)
    precision, recall, seam_hits = precision_recall(report, objects)
    seam_count = sum(o.on_seam for o in objects)
    assert seam_count >= 10
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)
    assert seam_hits >= 0.9 * seam_count, (seam_hits, seam_count)
