"""``georetina demo``: a synthetic UTM scene with planted objects, run through the real job.

The demo job, its model preset and the model ship inside the package (``pipeline/demo_data``),
so the demo runs from any folder and from an installed wheel; it writes under
``./demo-output`` of the folder it runs in.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.resources import files
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
DEMO_FOLDER = "demo-output"


def packaged_demo_job() -> Path:
    """The demo job shipped in the package (its preset and model lie beside it)."""
    return Path(str(files("pipeline") / "demo_data" / "demo.yaml"))


def load_demo_job(job_path: Path | None = None, here: Path | None = None) -> JobSpec:
    """``job_path`` as it is, or the packaged demo job writing under ``here/demo-output``."""
    if job_path is not None:
        return load_job(job_path)
    spec = load_job(packaged_demo_job())
    folder = (here or Path.cwd()).absolute() / DEMO_FOLDER
    return spec.model_copy(
        update={
            "inputs": [str(folder / "data" / "demo_scene.tif")],
            "output": spec.output.model_copy(update={"path": str(folder / "out")}),
        }
    )


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


def run_demo(
    job_path: Path | None = None,
    size: int = 3072,
    address: str | None = None,
    run: Callable[..., RunReport] = run_job,
) -> int:
    """Make the scene (once), run the job on it with ``run`` (``run_job`` or a wrapper that
    shows progress) and print how well the planted objects were found; the exit code."""
    spec = load_demo_job(job_path)
    scene, planted = ensure_demo_scene(spec, size)
    seam_count = sum(p.on_seam for p in planted)
    print(
        f"scene: {scene} ({size}x{size} px, {len(planted)} planted objects, "
        f"{seam_count} across tile edges)"
    )

    report = run(spec, address=address, force=True)
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
