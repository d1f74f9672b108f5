"""``georetina`` command line: parses arguments and calls the library, nothing more.

What it prints and what its exit codes mean: :mod:`pipeline.cli.console`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipeline.cli.console import (
    EXIT_BUG,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SCENES_FAILED,
    Console,
    exit_code_for,
    open_console,
)
from pipeline.cli.jobs import add_job_parsers
from pipeline.errors import GeoRetinaError, QueryError

# Ctrl-C during a run: every scene written so far is in the ledger; the rest are redone.
RESUME_HINT = (
    "interrupted: scenes finished so far are recorded as done; run the same command again "
    "to resume (they are skipped, the others are processed)"
)


def _print_report(report: object) -> None:
    from pipeline.jobs.report import summary_lines
    from pipeline.jobs.run import RunReport

    assert isinstance(report, RunReport)
    print("\n".join(summary_lines(report.as_dict())))


def run_with_display(spec: Any, console: Console, **options: Any) -> Any:
    """``run_job`` with the run's progress shown: a live bar on a terminal, lines elsewhere
    (and with ``-v``, whose log lines would break a bar)."""
    from pipeline.cli.progress import PlainProgress, open_display
    from pipeline.jobs.run import run_job

    display = open_display(console.out, plain=True if console.verbose else None)
    try:
        return run_job(
            spec,
            progress=display.line,
            on_progress=display.update,
            **options,
        )
    finally:
        display.close()
        if not isinstance(display, PlainProgress):
            console.out.flush()


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import load_job

    spec = load_job(args.job)
    report = run_with_display(
        spec, args.console, address=args.address, run_id=args.run_id, force=args.force
    )
    _print_report(report)
    if args.quicklook:
        _quicklooks(report, args.console)
    return EXIT_SCENES_FAILED if report.count("failed") else EXIT_OK


def _quicklooks(report: Any, console: Console) -> None:
    """One PNG per scene done in this run, drawn on the driver after the run."""
    from pipeline.io.quicklook import render_quicklook

    for scene in report.scenes:
        if scene.status == "done" and scene.output:
            try:
                written = render_quicklook(scene.output, raster=scene.uri)
            except GeoRetinaError as error:  # one picture failing is not a failed run
                console.warning(f"quicklook {scene.scene_id}: {error}")
                continue
            print(f"quicklook: {written}")


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.jobs.demo import run_demo

    def run(spec: Any, **options: Any) -> Any:
        return run_with_display(spec, args.console, **options)

    job = Path(args.job) if args.job else None
    return run_demo(job, size=args.size, address=args.address, run=run)


def cmd_schema(args: argparse.Namespace) -> int:
    from pipeline.config import job_schema, train_schema

    schema = job_schema() if args.kind == "job" else train_schema()
    print(json.dumps(schema, indent=2))
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.config import load_job
    from pipeline.jobs.validate import validate_job

    spec = load_job(args.job)
    print(f"job {args.job}: valid")
    result = validate_job(spec, estimate=not args.no_estimate, on_line=print)
    print("\n".join(result.lines()))
    return EXIT_SCENES_FAILED if result.failing else EXIT_OK


def cmd_query(args: argparse.Namespace) -> int:
    from pipeline.io.query import (
        QueryFilter,
        count_detections,
        open_detections,
        parse_bbox,
        parse_time,
        query_detections,
        write_result,
    )

    if args.crs and not args.bbox:
        raise QueryError("--crs is the CRS of --bbox; give --bbox too")
    where = QueryFilter(
        bbox=parse_bbox(args.bbox) if args.bbox else None,
        bbox_crs=args.crs,
        classes=tuple(args.classes or ()),
        min_score=args.min_score,
        since=parse_time(args.since, "--since") if args.since else None,
        until=parse_time(args.until, "--until") if args.until else None,
        scenes=tuple(args.scenes or ()),
    )
    found = open_detections(args.output, count_reads=args.stats)
    if args.count:
        table = count_detections(found, where)
    else:
        table = query_detections(found, where, limit=args.limit)
    write_result(table, args.format, found, args.out, sys.stdout)
    if args.out:
        print(f"{table.num_rows} row(s) -> {args.out}", file=args.console.err)
    if found.reads is not None:
        total = found.total_bytes()
        print(
            f"read {found.reads.bytes} of {total} bytes "
            f"({found.reads.bytes / max(total, 1):.2%}) in {found.reads.requests} requests, "
            f"{len(found.files)} file(s)",
            file=args.console.err,
        )
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    from pipeline.io.partition import compact_dataset

    by_date = True if args.by_date else None  # None: keep DEST's layout
    done = compact_dataset(args.output, args.dest, zoom=args.zoom, by_date=by_date)
    print(f"compacted {args.output} -> {args.dest}: {done.line()}")
    return EXIT_OK


def cmd_quicklook(args: argparse.Namespace) -> int:
    from pipeline.io.quicklook import render_quicklook

    written = render_quicklook(
        args.scene_output,
        args.out,
        raster=args.raster,
        max_size=args.max_size,
        min_score=args.min_score,
    )
    print(written)
    return 0


def _add_query_parsers(commands: argparse._SubParsersAction) -> None:
    query = commands.add_parser(
        "query",
        help="filter detections of an output dataset (bbox, class, score, time, scene)",
        description="Filters are pushed down to the Parquet reads: row groups (and files) "
        "whose statistics rule them out are never read.",
    )
    query.add_argument(
        "output",
        help="output root, its detections/ folder, a compacted dataset, a glob or a file",
    )
    query.add_argument("--bbox", help="xmin,ymin,xmax,ymax: rows whose box intersects it")
    query.add_argument("--crs", help="CRS of --bbox, e.g. EPSG:32633 (default: the dataset's)")
    query.add_argument(
        "--class", dest="classes", nargs="+", action="extend", metavar="NAME", help="class names"
    )
    query.add_argument("--min-score", type=float, default=None, help="keep score >= S")
    query.add_argument("--since", help="acquired at or after (ISO 8601; UTC unless a zone)")
    query.add_argument("--until", help="acquired before (ISO 8601; UTC unless a zone)")
    query.add_argument(
        "--scene", dest="scenes", nargs="+", action="extend", metavar="ID", help="scene ids"
    )
    query.add_argument("--format", default="table", choices=["table", "csv", "geojson", "parquet"])
    query.add_argument("-o", "--out", default=None, help="write to FILE (local or URI)")
    query.add_argument("--count", action="store_true", help="counts per scene and class")
    query.add_argument("--limit", type=int, default=None, help="at most N rows")
    query.add_argument("--stats", action="store_true", help="print the bytes read (stderr)")
    query.set_defaults(func=cmd_query)

    compact = commands.add_parser(
        "compact",
        help="write an output's detections as one spatially partitioned GeoParquet dataset",
        description="DEST/cell=<quadkey>[/date=<YYYY-MM-DD>]/part.parquet, Hilbert-ordered, "
        "100k-row row groups. Incremental: run again after new scenes and only the "
        "partitions they touch are rewritten, each atomically.",
    )
    compact.add_argument("output", help="output root (the job's output.path)")
    compact.add_argument("dest", help="dataset folder or URI (created; kept apart from OUTPUT)")
    compact.add_argument(
        "--zoom", type=int, default=None, help="cells' quadkey zoom (default: DEST's, else chosen)"
    )
    compact.add_argument(
        "--by-date",
        action="store_true",
        help="also partition by acquisition day (UTC); fixed by DEST's first compaction",
    )
    compact.set_defaults(func=cmd_compact)

    look = commands.add_parser(
        "quicklook", help="PNG of a scene with its detections drawn, from the raster's overview"
    )
    look.add_argument("scene_output", help="a scene's file, OUTPUT/detections/<scene_id>.parquet")
    look.add_argument(
        "-o", "--out", default=None, help="PNG (default: OUTPUT/quicklook/<scene_id>.png)"
    )
    look.add_argument("--raster", default=None, help="the scene's raster (default: scene_uri)")
    look.add_argument("--max-size", type=int, default=1024, help="long side of the PNG, px")
    look.add_argument("--min-score", type=float, default=None, help="draw boxes with score >= S")
    look.set_defaults(func=cmd_quicklook)


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.config import load_train_spec
    from pipeline.jobs.train import epoch_line, run_training

    spec = load_train_spec(args.train)
    report = run_training(
        spec,
        address=args.address,
        on_epoch=lambda metrics: print(epoch_line(metrics, spec), flush=True),
        show_worker_logs=args.verbose,
    )
    print(f"checkpoint: {report.output}")
    print(f"sha256: {report.sha256}")
    print(
        f"loss: {report.first_loss:.4f} (epoch 1) -> "
        f"{report.final_loss:.4f} (epoch {report.epochs})"
    )
    print(f"wall_s: {report.wall_s:.1f}")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from pipeline.model.evaluate import evaluate_files

    result = evaluate_files(
        args.detections, args.labels, args.iou, args.score, class_column=args.class_column
    )
    print(f"matched in {result.crs} at IoU {result.iou} and score >= {result.score}")
    print("\n".join(result.lines()))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(result), indent=2))
    return 0


def _add_train_parsers(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="train RetinaNet on labelled rasters (Ray Train)")
    train.add_argument("train", help="training YAML")
    train.add_argument("--address", default=None, help="Ray cluster address")
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser(
        "evaluate", help="COCO mAP, AP50 and precision/recall of detections against labels"
    )
    evaluate.add_argument("detections", help="a scene's GeoParquet, or an output's detections/")
    evaluate.add_argument("labels", help="GeoParquet / GeoJSON / GeoPackage boxes, any CRS")
    evaluate.add_argument("--iou", type=float, default=0.5, help="IoU for precision/recall")
    evaluate.add_argument("--score", type=float, default=0.5, help="score for precision/recall")
    evaluate.add_argument("--class-column", default="label", help="labels' class column")
    evaluate.add_argument("--json", default=None, help="also write the results here")
    evaluate.set_defaults(func=cmd_evaluate)


def _add_run_parsers(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser("run", help="run a job file on local Ray or a cluster")
    run.add_argument("job", help="job YAML")
    run.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: RAY_ADDRESS, else embedded Ray)",
    )
    run.add_argument("--run-id", default=None, help="run id (default: time + random)")
    run.add_argument("--force", action="store_true", help="redo scenes already done")
    run.add_argument(
        "--quicklook", action="store_true", help="write OUTPUT/quicklook/<scene_id>.png per scene"
    )
    run.set_defaults(func=cmd_run)

    demo = commands.add_parser(
        "demo",
        help="make a synthetic scene and run the demo job on it (under ./demo-output)",
    )
    demo.add_argument(
        "--job", default=None, help="demo job file (default: the one shipped in the package)"
    )
    demo.add_argument("--size", type=int, default=3072, help="scene side in pixels")
    demo.add_argument("--address", default=None, help="Ray cluster address")
    demo.set_defaults(func=cmd_demo)

    validate = commands.add_parser(
        "validate",
        help="check a job without running it: file, inputs, model, output, tiles, run time",
    )
    validate.add_argument("job", help="job YAML")
    validate.add_argument(
        "--no-estimate", action="store_true", help="skip timing the model for the estimate"
    )
    validate.set_defaults(func=cmd_validate)

    schema = commands.add_parser(
        "schema", help="print the JSON Schema of job or training files (for editors)"
    )
    schema.add_argument("kind", choices=["job", "train"])
    schema.set_defaults(func=cmd_schema)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="georetina",
        description="RetinaNet object detection over geo-raster archives.",
        epilog="Exit codes: 0 ok, 1 some scenes failed, 2 invalid job or training file, "
        "3 the run could not start, 70 a bug (the traceback's file is named), "
        "130 interrupted.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_run_parsers(commands)
    add_job_parsers(commands)  # submit, status, logs, stop
    _add_query_parsers(commands)
    _add_train_parsers(commands)
    for command in commands.choices.values():
        command.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            help="also show Ray's, GDAL's and PyTorch's own warnings, logs and progress",
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with open_console(args.command, args.verbose) as console:
        args.console = console
        try:
            return args.func(args)
        except KeyboardInterrupt:
            resumable = args.command == "run"
            print(f"georetina: {RESUME_HINT if resumable else 'interrupted'}", file=console.err)
            return EXIT_INTERRUPTED
        except (GeoRetinaError, ConnectionError) as error:
            console.error(str(error))
            return exit_code_for(error)
        except Exception as error:  # noqa: BLE001 - a bug: one line here, the rest in a file
            where = console.crash_report(args.command, error)
            summary = (str(error).strip().splitlines() or [""])[0][:300]
            console.error(
                f"unexpected {type(error).__name__}: {summary} (a bug in georetina; "
                f"the full traceback is in {where})"
            )
            return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
