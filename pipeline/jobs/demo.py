"""``georetina demo``: a synthetic UTM scene with planted objects, run through the real job."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import JobSpec, load_job
from pipeline.io.synthetic import (
    Planted,
    match_planted,
    plan_objects,
    read_truth,
    write_labels,
    write_scene,
    write_truth,
)
from pipeline.jobs.run import RunReport, run_job

DEMO_OBJECTS = 80


def ensure_demo_scene(spec: JobSpec, size: int) -> tuple[Path, list[Planted]]:
    """Create the scene the demo job names (once), with its planted objects beside it."""
    scene = Path(spec.inputs[0])
    truth = scene.with_suffix(".truth.json")
    if not scene.exists() or not truth.exists() or not labels_path(scene).exists():
        objects = plan_objects(size, spec.tiling.tile_size, spec.tiling.overlap, DEMO_OBJECTS)
        transform = write_scene(scene, size, objects)
        write_truth(truth, objects)
        write_labels(labels_path(scene), objects, transform, "EPSG:32633")
    return scene, read_truth(truth)


def labels_path(scene: Path) -> Path:
    """The planted objects as GeoParquet labels, for ``georetina evaluate``."""
    return scene.with_suffix(".labels.parquet")


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
    precision, recall, seam_hits = precision_recall(report, planted)
    print(f"model: {report.model_id}")
    if spec.model.checkpoint is None:
        print("note: this model is UNTRAINED (no checkpoint): its detections are noise")
    print(f"scenes: {report.count('done')} done, {report.count('failed')} failed")
    print(f"tiles: {report.tiles}")
    print(
        f"tiles_per_s: {report.tiles_per_s:.2f} (after Ray's own start, {report.ray_start_s:.0f} s)"
    )
    print(f"detections: {report.detections}")
    print(f"precision: {precision:.2f}")
    print(f"recall: {recall:.2f}")
    print(f"seam_objects_found: {seam_hits}/{seam_count}")
    print(f"output: {report.output}")
    if report.scenes and report.scenes[0].output:
        from pipeline.model.evaluate import evaluate_files

        coco = evaluate_files(report.scenes[0].output, str(labels_path(scene)))
        print(f"AP50: {coco.overall.ap50:.3f}  mAP@[.5:.95]: {coco.overall.ap:.3f}")
        print(f"evaluate it: georetina evaluate {report.scenes[0].output} {labels_path(scene)}")
        print(
            'query it: python -c "import geopandas; '
            f"print(geopandas.read_parquet('{report.scenes[0].output}').head())\""
        )
    return 1 if report.count("failed") else 0
