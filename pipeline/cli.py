"""``georetina`` command line: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.errors import GeoRetinaError


def _print_report(report: object) -> None:
    from pipeline.runner import RunReport

    assert isinstance(report, RunReport)
    print(
        f"scenes: {report.count('done')} done, {report.count('skipped')} skipped, "
        f"{report.count('failed')} failed"
    )
    print(f"tiles: {report.tiles}")
    print(f"detections: {report.detections}")
    print(f"tiles_per_s: {report.tiles_per_s:.2f}")
    print(f"wall_s: {report.wall_s:.1f} (of which starting Ray: {report.ray_start_s:.1f})")
    print(f"output: {report.output}")
    for scene in report.scenes:
        if scene.status == "failed":
            print(f"  FAILED {scene.scene_id}: {scene.error}")


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import load_job
    from pipeline.runner import run_job

    spec = load_job(args.job)
    report = run_job(spec, address=args.address, run_id=args.run_id, force=args.force)
    _print_report(report)
    return 1 if report.count("failed") else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    return run_demo(Path(args.job), size=args.size, address=args.address)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="georetina", description="RetinaNet object detection over geo-raster archives."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a job file on local Ray or a cluster")
    run.add_argument("job", help="job YAML")
    run.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: RAY_ADDRESS, else embedded Ray)",
    )
    run.add_argument("--run-id", default=None, help="run id (default: time + random)")
    run.add_argument("--force", action="store_true", help="redo scenes already done")
    run.set_defaults(func=cmd_run)

    demo = commands.add_parser("demo", help="make a synthetic scene and run the demo job on it")
    demo.add_argument("--job", default="jobs/demo.yaml", help="demo job file")
    demo.add_argument("--size", type=int, default=3072, help="scene side in pixels")
    demo.add_argument("--address", default=None, help="Ray cluster address")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except GeoRetinaError as error:
        print(f"georetina: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
