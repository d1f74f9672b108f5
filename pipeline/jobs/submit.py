"""Jobs on a running Ray cluster through its Job Submission API (the dashboard, port 8265).

``submit`` ships this package (``py_modules``), the working directory holding the job file
(``working_dir``) and the project's pinned dependencies (``pip``) as the job's runtime
environment; the entrypoint is ``georetina run`` on that job file, with the submission id as
the run id, so a Ray job and its ``_runs/<run_id>.json`` report carry the same name.

Token authentication (Ray 2.60's default) uses Ray's own settings: ``RAY_AUTH_MODE=token``
and the token in ``RAY_AUTH_TOKEN`` or the file ``RAY_AUTH_TOKEN_PATH``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import re
import shlex
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import pipeline
from pipeline.config import JobSpec, load_job
from pipeline.errors import ClusterUnreachableError, GeoRetinaError

# Never re-ship these: big, local, or what the cluster image already has.
WORKING_DIR_EXCLUDES = [".git", ".venv", "**/__pycache__", "demo-output", "*.parquet", "_runs"]

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(GeoRetinaError, RuntimeError):
    """The Job API refused a request; the message says which and why. (One that cannot be
    reached at all raises :class:`~pipeline.errors.ClusterUnreachableError`.)"""


@dataclass(frozen=True)
class Submission:
    submission_id: str
    created: bool  # False: a job with this id already existed (nightly re-submit)
    status: str
    warnings: tuple[str, ...] = ()


def shipped_path_warnings(spec: JobSpec, working_dir: Path) -> list[str]:
    """Local paths of the job that land inside the shipped working directory.

    The cluster unpacks it under a new folder per upload: inputs there get a new URI (so a new
    scene id, and the ledger cannot tell them from last night's), and an output there is lost
    with the folder.
    """
    root = working_dir.resolve()

    def inside(path: str) -> bool:
        return "://" not in path and Path(path).resolve().is_relative_to(root)

    found = []
    shipped = [i for i in spec.inputs if isinstance(i, str) and inside(i)]
    if shipped:
        found.append(
            f"input(s) {', '.join(shipped)} are shipped with the working directory: each "
            "upload gets a new path, so later runs cannot skip them; use object storage or a "
            "path every node shares for incremental jobs"
        )
    if inside(spec.output.path):
        found.append(
            f"output {spec.output.path} is inside the working directory: it would be written "
            "to the cluster's copy and lost; use object storage or a shared path"
        )
    return found


def nightly_submission_id(job_name: str, day: date) -> str:
    """One id per job and night: a second submission the same night finds the first."""
    return f"{job_name}-nightly-{day:%Y%m%d}"


def project_requirements() -> list[str]:
    """The installed project's pinned runtime dependencies, less Ray (the cluster's own)."""
    try:
        requires = importlib.metadata.requires("georetina") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    pins = [r for r in requires if "extra ==" not in r]
    return [r for r in pins if re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0].lower() != "ray"]


def build_runtime_env(
    working_dir: Path, pip: list[str] | None, env_vars: dict[str, str] | None = None
) -> dict[str, Any]:
    """Runtime environment for the job: working directory, this package, dependencies."""
    runtime_env: dict[str, Any] = {
        "working_dir": str(working_dir),
        "excludes": list(WORKING_DIR_EXCLUDES),
        "py_modules": [str(Path(pipeline.__file__).parent)],
        "env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", **(env_vars or {})},
    }
    if pip:
        runtime_env["pip"] = list(pip)
    return runtime_env


def entrypoint_for(job_in_working_dir: str, run_id: str, force: bool = False) -> str:
    """``georetina run`` on the shipped job file (through the shipped package)."""
    command = ["python", "-m", "pipeline.cli.main", "run", job_in_working_dir, "--run-id", run_id]
    if force:
        command.append("--force")
    return shlex.join(command)


def job_path_in(working_dir: Path, job: Path) -> str:
    """The job file's path inside the working directory, which is what the cluster gets."""
    try:
        return job.resolve().relative_to(working_dir.resolve()).as_posix()
    except ValueError:
        raise SubmitError(
            f"job file {job} is not inside the working directory {working_dir}; "
            "run from the folder that holds it or pass --working-dir"
        ) from None


@contextlib.contextmanager
def _job_api(what: str, error_type: type[GeoRetinaError] = SubmitError) -> Iterator[None]:
    """Errors of the Job API (HTTP, refused, unknown id, missing or wrong token) named."""
    from ray.exceptions import RayError

    try:
        yield
    except (ConnectionError, RuntimeError, ValueError, RayError) as error:
        raise error_type(f"{what}: {error}") from None


def client(address: str | None) -> Any:
    """A Job Submission client; ``address`` None means ``RAY_ADDRESS``."""
    from ray.job_submission import JobSubmissionClient

    where = f"cannot reach the Ray Job API at {address or '$RAY_ADDRESS'}"
    with _job_api(where, ClusterUnreachableError):
        return JobSubmissionClient(address)


def submit_job(
    job: Path,
    *,
    address: str | None,
    submission_id: str | None = None,
    working_dir: Path | None = None,
    pip: list[str] | None = None,
    force: bool = False,
) -> Submission:
    """Validate the job file here, then submit it; an id that exists already is not re-run."""
    spec = load_job(job)  # a bad job file fails on the laptop, not on the cluster
    working_dir = working_dir or Path.cwd()
    relative = job_path_in(working_dir, job)
    api = client(address)
    submission_id = submission_id or f"{spec.name}-{time.strftime('%Y%m%dT%H%M%S')}"
    with _job_api(f"submission {submission_id} refused"):
        try:
            created = _submit_when_ready(
                api,
                entrypoint=entrypoint_for(relative, submission_id, force),
                submission_id=submission_id,
                runtime_env=build_runtime_env(working_dir, pip),
                metadata={"georetina_job": spec.name, "job_file": relative},
            )
        except RuntimeError:
            # The server refuses an id it has seen: the same night's nightly run, not a new one.
            existing = _status_or_none(api, submission_id)
            if existing is None:
                raise
            return Submission(submission_id, False, existing)
        warnings = tuple(shipped_path_warnings(spec, working_dir))
        return Submission(created, True, _status_or_none(api, created) or "PENDING", warnings)


# A head that has just started answers "No available agent to submit job, please try again
# later" until its job agent registers (seconds; longer on a busy head).
AGENT_RETRY_DELAYS_S = (1, 2, 4, 8, 15, 15, 15)


def _submit_when_ready(api: Any, **submission: Any) -> str:
    """``submit_job``, retried with backoff while the head says to try again later."""
    for delay in (*AGENT_RETRY_DELAYS_S, None):
        try:
            return api.submit_job(**submission)
        except RuntimeError as error:
            if delay is None or "try again later" not in str(error):
                raise
            time.sleep(delay)
    raise AssertionError("unreachable")


def _status_or_none(api: Any, submission_id: str) -> str | None:
    try:
        return str(api.get_job_status(submission_id).value)
    except RuntimeError:  # not found
        return None


def job_status(address: str | None, submission_id: str) -> dict[str, Any]:
    """Status, message, start/end times and entrypoint of one job."""
    api = client(address)
    with _job_api(f"job {submission_id}"):
        info = api.get_job_info(submission_id)
    return {
        "submission_id": submission_id,
        "status": str(info.status.value),
        "message": info.message,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "entrypoint": info.entrypoint,
        "metadata": info.metadata,
    }


def job_logs(address: str | None, submission_id: str) -> str:
    api = client(address)
    with _job_api(f"job {submission_id}"):
        return api.get_job_logs(submission_id)


def stop_job(address: str | None, submission_id: str) -> bool:
    """Ask the job to stop; False when it had already ended."""
    api = client(address)
    with _job_api(f"job {submission_id}"):
        return bool(api.stop_job(submission_id))


def wait_for_job(
    address: str | None,
    submission_id: str,
    on_logs: Callable[[str], None] = print,
    poll_s: float = 2.0,
) -> str:
    """Follow a job's new log lines until it ends; returns its final status."""
    api = client(address)
    shown = 0
    while True:
        with _job_api(f"job {submission_id}"):
            status = str(api.get_job_status(submission_id).value)
            logs = api.get_job_logs(submission_id)
        if len(logs) > shown:
            on_logs(logs[shown:].rstrip("\n"))
            shown = len(logs)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)
