"""``georetina submit|status|logs|stop``: jobs on a Ray cluster's Job API. Parses, then calls
:mod:`pipeline.jobs.submit`; exit codes as for ``run`` (0 ok, 1 the job failed, 2 an invalid
job file, 3 the cluster cannot be reached or refused the job)."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, date, datetime
from pathlib import Path

ADDRESS_HELP = "Ray Job API, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS)"


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.config import load_job
    from pipeline.jobs.submit import nightly_submission_id, project_requirements, submit_job

    submission_id = args.submission_id
    if args.nightly:
        day = date.fromisoformat(args.date) if args.date else datetime.now(UTC).date()
        submission_id = nightly_submission_id(load_job(args.job).name, day)
    result = submit_job(
        Path(args.job),
        address=args.address,
        submission_id=submission_id,
        working_dir=Path(args.working_dir) if args.working_dir else None,
        pip=None if args.no_deps else project_requirements(),
        force=args.force,
    )
    if not result.created:
        print(f"{result.submission_id}: already submitted ({result.status}); not submitted again")
        return 1 if result.status in ("FAILED", "STOPPED") else 0
    print(f"submitted {result.submission_id}")
    for warning in result.warnings:
        args.console.warning(warning)
    if not args.wait:
        return 0
    from pipeline.jobs.submit import wait_for_job

    status = wait_for_job(args.address, result.submission_id)
    print(f"{result.submission_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def cmd_status(args: argparse.Namespace) -> int:
    from pipeline.jobs.submit import job_status

    info = job_status(args.address, args.job_id)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(f"{info['submission_id']}: {info['status']}")
        if info["message"]:
            print(f"  {info['message']}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from pipeline.jobs.submit import job_logs, wait_for_job

    if args.follow:
        status = wait_for_job(args.address, args.job_id)
        return 0 if status == "SUCCEEDED" else 1
    print(job_logs(args.address, args.job_id), end="")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from pipeline.jobs.submit import stop_job

    stopped = stop_job(args.address, args.job_id)
    print(f"{args.job_id}: {'stop requested' if stopped else 'had already ended'}")
    return 0


def add_job_parsers(commands: argparse._SubParsersAction) -> None:
    submit = commands.add_parser(
        "submit",
        help="submit a job file to a Ray cluster (Job API)",
        description="Ships the working directory (with the job file), this package and the "
        "pinned dependencies as the job's runtime environment, and runs `georetina run` on "
        "the cluster. Token auth: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN(_PATH), as for Ray.",
    )
    submit.add_argument("job", help="job YAML, inside the working directory")
    submit.add_argument("--address", default=None, help=ADDRESS_HELP)
    which = submit.add_mutually_exclusive_group()
    which.add_argument("--submission-id", default=None, help="job id (default: name + time)")
    which.add_argument(
        "--nightly",
        action="store_true",
        help="id <name>-nightly-<YYYYMMDD> (UTC): a second submit that night is a no-op",
    )
    submit.add_argument("--date", default=None, help="with --nightly: the night, YYYY-MM-DD")
    submit.add_argument(
        "--working-dir", default=None, help="folder shipped to the cluster (default: current)"
    )
    submit.add_argument(
        "--no-deps",
        action="store_true",
        help="ship no pip dependencies (the cluster image has them)",
    )
    submit.add_argument("--force", action="store_true", help="redo scenes already done")
    submit.add_argument("--wait", action="store_true", help="follow the logs until it ends")
    submit.set_defaults(func=cmd_submit)

    status = commands.add_parser("status", help="status of a submitted job")
    status.add_argument("job_id")
    status.add_argument("--address", default=None, help=ADDRESS_HELP)
    status.add_argument("--json", action="store_true", help="all fields, as JSON")
    status.set_defaults(func=cmd_status)

    logs = commands.add_parser("logs", help="logs of a submitted job")
    logs.add_argument("job_id")
    logs.add_argument("--address", default=None, help=ADDRESS_HELP)
    logs.add_argument("--follow", action="store_true", help="until the job ends")
    logs.set_defaults(func=cmd_logs)

    stop = commands.add_parser("stop", help="stop a submitted job")
    stop.add_argument("job_id")
    stop.add_argument("--address", default=None, help=ADDRESS_HELP)
    stop.set_defaults(func=cmd_stop)
