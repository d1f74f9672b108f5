"""The same job gives the same rows on any layout: actors, batch size, tiles per read task
(issue 17). A real crop with the shipped demo model, on the session's local Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import parse_job
from pipeline.jobs.demo import load_demo_job
from pipeline.jobs.run import run_job

CROP = Path(__file__).parent / "data" / "neon" / "OSBS_029.tif"
# (actors, batch size, tiles per read task): each value of each knob at least once. Two
# actors take half a CPU each: on the session's 2 CPUs a layout must leave one free.
LAYOUTS = [(1, 8, 16), (2, 1, 1), (2, 8, 16), (1, 1, 1)]


def quiet(_line: str) -> None:
    pass


def rows_of(tmp_path: Path, actors: int, batch: int, per_read: int) -> dict[str, np.ndarray]:
    model = load_demo_job().model.model_copy(update={"score_threshold": 0.1})
    output = tmp_path / f"out-{actors}-{batch}-{per_read}"
    spec = parse_job(
        {
            "inputs": [str(CROP)],
            "model": model.model_dump(),
            # 36 tiles of 128 px: enough for batches and read tasks to cut them differently.
            "tiling": {"tile_size": 128, "overlap": 32, "tiles_per_read_task": per_read},
            "detect": {
                "num_actors": actors,
                "num_cpus_per_actor": 1.0 if actors == 1 else 0.5,
                "batch_size": batch,
            },
            "output": {"path": str(output), "crs": "EPSG:32617"},
        }
    )
    report = run_job(spec, progress=quiet)
    assert report.count("done") == 1, report.scenes
    assert report.tiles == 36
    table = pq.read_table(report.scenes[0].output)
    boxes = ["pixel_xmin", "pixel_ymin", "pixel_xmax", "pixel_ymax"]
    return {
        "ids": np.array(table["detection_id"].to_pylist()),
        "boxes": np.stack([table[c].to_numpy() for c in boxes], axis=1),
        "scores": table["score"].to_numpy(),
    }


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_the_same_rows_on_any_layout(ray_session, tmp_path):
    first, *others = [rows_of(tmp_path, *layout) for layout in LAYOUTS]
    assert len(first["ids"]) >= 20
    for layout, rows in zip(LAYOUTS[1:], others, strict=True):
        assert rows["ids"].tolist() == first["ids"].tolist(), layout  # same ids, same order
        np.testing.assert_allclose(rows["boxes"], first["boxes"], atol=1e-3, err_msg=str(layout))
        np.testing.assert_allclose(rows["scores"], first["scores"], atol=1e-5, err_msg=str(layout))
