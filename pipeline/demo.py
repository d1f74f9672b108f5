"""``georetina demo``: a synthetic UTM scene with planted objects, run through the real job."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import JobSpec, load_job
from pipeline.runner import RunReport, run_job
from pipeline.synthetic import (
    Planted,
    match_planted,
    plan_objects,
    read_truth,
    write_scene,
    write_truth,
)

DEMO_OBJECTS = 80


def ensure_demo_scene(spec: JobSpec, size: int) -> tuple[Path, list[Planted]]:
    """Create the scene the demo job names (once), with its planted objects beside it."""
    scene = Path(spec.inputs[0])
    truth = scene.with_suffix(".truth.json")
    if not scene.exists() or not truth.exists():
        objects = plan_objects(size, spec.tiling.tile_size, spec.tiling.overlap, DEMO_OBJECTS)
        write_scene(scene, size, objects)
        write_truth(truth, objects)
    return scene, read_truth(truth)


def precision_recall(report: RunReport, planted: list[Planted]) -> tuple[float, float, int]:
    """Against the planted objects (IoU >= 0.5); also how many seam objects were found."""
    import geopandas

    done = [s for s in report.scenes if s.status == "done" and s.output]
    if not done:
        return 0.0, 0.0, 0
    frame = geopandas.read_parquet(done[0].output)
    boxes = frame[["pixel_xmin", "pixel_ymin", "pixel_xmax", "pixel_ymax"]].to_numpy(np.float64)
    hits, found = match_planted(planted, boxes)
    seam = [p for p in planted if p.on_seam]
    seam_hits, _ = match_planted(seam, boxes)
    precision = hits / found if found else 0.0
    return precision, hits / len(planted), seam_hits


def run_demo(job_path: Path, size: int = 3072, address: str | None = None) -> int:
    spec = load_job(job_path)
    scene, planted = ensure_demo_scene(spec, size)
    seam_count = sum(p.on_seam for p in planted)
    print(
        f"scene: {scene} ({size}x{size} px, {len(planted)} planted objects, "
        f"{seam_count} across tile edges)"
    )

    report = run_job(spec, address=address, force=True, progress=lambda line: None)
    precision, recall, _ = precision_recall(report, planted)
    print(f"model: {report.model_id}")
    if spec.model.checkpoint is None:
        print(
            "note: this model is UNTRAINED (no demo checkpoint yet): its detections are "
            "noise; the reference detector below checks tiling, merging and georeferencing"
        )
    print(f"scenes: {report.count('done')} done, {report.count('failed')} failed")
    print(f"tiles: {report.tiles}")
    print(
        f"tiles_per_s: {report.tiles_per_s:.2f} (after Ray's own start, {report.ray_start_s:.0f} s)"
    )
    print(f"detections: {report.detections}")
    print(f"precision: {precision:.2f}")
    print(f"recall: {recall:.2f}")
    print(f"output: {report.output}")

    reference = spec.model_copy(
        update={
            "model": spec.model.model_copy(update={"kind": "threshold"}),
            "output": spec.output.model_copy(update={"path": spec.output.path + "-reference"}),
        }
    )
    ref_report = run_job(reference, address=address, force=True, progress=lambda line: None)
    ref_precision, ref_recall, seam_hits = precision_recall(ref_report, planted)
    print(
        f"reference detector (bright-blob threshold, same tiles and merge): "
        f"{ref_report.detections} detections, precision {ref_precision:.2f}, "
        f"recall {ref_recall:.2f}, seam objects found {seam_hits}/{seam_count}"
    )
    print(f"reference output: {ref_report.output}")
    print(
        'query it: python -c "import geopandas; '
        f"print(geopandas.read_parquet('{ref_report.scenes[0].output}').head())\""
    )
    failed = report.count("failed") + ref_report.count("failed")
    return 1 if failed else 0
