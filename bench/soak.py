"""Soak: hundreds of tiny scenes through the whole flow on a local Ray.

Every scene must end up in the ledger (done, once), and the driver's memory must not creep:
its peak RSS at the end of the run is compared with its peak RSS when half of the scenes
were through (``peak_rss_end_over_mid``, must be <= 1.10). A driver that kept every scene's
tiles or detections would grow with the number of scenes.

Run: .venv/bin/python bench/soak.py [--scenes 400] [--workdir DIR]
Prints ``name: value`` lines; exits 1 when a scene is missing or memory crept.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

SIZE, TILE, OVERLAP = 96, 64, 8  # 2 x 2 tiles a scene


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_scenes(folder: Path, count: int) -> list[Path]:
    from pipeline.io.synthetic import plan_objects, write_scene

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"tiny_{index:04d}.tif"
        if not path.exists():
            objects = plan_objects(SIZE, TILE, OVERLAP, count=2, seed=index, max_side=16)
            write_scene(path, SIZE, objects, seed=index, block=32, overviews=False)
        paths.append(path)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenes", type=int, default=400)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args()

    import ray

    from pipeline.config import parse_job
    from pipeline.io.ledger import Ledger
    from pipeline.jobs.ray_session import start_embedded_ray
    from pipeline.jobs.run import run_job

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="soak-"))
    paths = make_scenes(workdir / "scenes", args.scenes)
    output = workdir / f"out-{time.strftime('%H%M%S')}"
    spec = parse_job(
        {
            "inputs": [str(p) for p in paths],
            "model": {"kind": "threshold", "threshold_min_pixels": 4},
            "tiling": {"tile_size": TILE, "overlap": OVERLAP, "tiles_per_read_task": 4},
            "detect": {"batch_size": 16},
            "output": {"path": str(output)},
        }
    )
    start_embedded_ray(num_cpus=args.num_cpus)
    samples: list[tuple[int, float, float]] = []  # (scenes through, rss, peak rss)

    def sample(line: str) -> None:
        text = line.strip()
        if text.startswith("scenes "):
            through = int(text.split()[1].split("/")[0])
            samples.append((through, rss_mb(), peak_rss_mb()))

    started = time.perf_counter()
    report = run_job(spec, progress=sample, progress_every_s=0.5)
    wall = time.perf_counter() - started
    end_rss, end_peak = rss_mb(), peak_rss_mb()
    ray.shutdown()

    latest = {}
    for record in Ledger(str(output)).records():
        latest[record.scene_id] = record.status
    done_in_ledger = sum(status == "done" for status in latest.values())
    middle = next(
        (s for s in samples if s[0] >= args.scenes // 2), samples[-1] if samples else None
    )
    mid_rss, mid_peak = (middle[1], middle[2]) if middle else (end_rss, end_peak)
    ratio = end_peak / mid_peak
    print(f"scenes: {args.scenes}")
    print(f"scenes_done: {report.count('done')}")
    print(f"scenes_failed: {report.count('failed')}")
    print(f"ledger_scenes_done: {done_in_ledger}")
    print(f"ledger_scenes_recorded: {len(latest)}")
    print(f"tiles: {report.tiles}")
    print(f"detections: {report.detections}")
    print(f"wall_s: {wall:.1f}")
    print(f"scenes_per_s: {args.scenes / max(wall - report.ray_start_s, 1e-9):.2f}")
    print(f"progress_samples: {len(samples)}")
    print(f"rss_mid_mb: {mid_rss:.0f}")
    print(f"rss_end_mb: {end_rss:.0f}")
    print(f"peak_rss_mid_mb: {mid_peak:.0f}")
    print(f"peak_rss_end_mb: {end_peak:.0f}")
    print(f"peak_rss_end_over_mid: {ratio:.3f}")
    ok = done_in_ledger == args.scenes == report.count("done") and ratio <= 1.10
    print(f"ok: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
