"""Exit codes that mean one thing each (README: "Exit codes"), and what each prints."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from pipeline.cli.console import exit_code_for
from pipeline.cli.main import main
from pipeline.errors import (
    CheckpointError,
    ClusterUnreachableError,
    CompactionError,
    InputsUnreachableError,
    JobSpecError,
    OutputNotWritableError,
    OutputUnreadableError,
    QueryError,
)

GEORETINA = Path(sys.executable).parent / "georetina"


def write_job(folder: Path, **fields) -> Path:
    job = {"inputs": [str(folder / "missing.tif")], "model": {"kind": "threshold"}}
    job["output"] = {"path": str(folder / "out")}
    job.update(fields)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (JobSpecError("job.yaml", ["tiling.tile_size: bad"]), 2),
        (QueryError("--bbox: bad"), 2),
        (CompactionError("dest was compacted with zoom 9, not 10"), 2),
        (OutputUnreadableError("output out: no such folder"), 3),
        (OutputNotWritableError("output s3://x: denied"), 3),
        (InputsUnreachableError("STAC API http://x cannot be opened"), 3),
        (CheckpointError("checkpoint m.pt: cannot be read"), 3),
        (ClusterUnreachableError("cannot reach the Ray Job API"), 3),
        (ConnectionError("ray.init: no cluster at that address"), 3),
        (KeyboardInterrupt(), 130),
        (ZeroDivisionError("a bug"), 70),
    ],
)
def test_each_cause_has_its_code(error, code):
    assert exit_code_for(error) == code


def test_an_invalid_job_file_is_2(tmp_path, capsys):
    job = write_job(tmp_path, tiling={"tile_sise": 256})
    assert main(["run", str(job)]) == 2
    assert "tiling.tile_sise" in capsys.readouterr().err
    (tmp_path / "broken.yaml").write_text("name: [unclosed")
    assert main(["validate", str(tmp_path / "broken.yaml")]) == 2


def test_validate_an_unwritable_output_or_a_missing_checkpoint_is_3(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    job = write_job(tmp_path, output={"path": str(blocker / "out")})
    assert main(["validate", str(job), "--no-estimate"]) == 3
    assert f"output {blocker / 'out'} is not writable" in capsys.readouterr().err
    model = {"kind": "retinanet", "checkpoint": str(tmp_path / "gone.safetensors")}
    assert main(["validate", str(write_job(tmp_path, model=model)), "--no-estimate"]) == 3
    assert "gone.safetensors: cannot be read" in capsys.readouterr().err


def test_an_unreadable_input_list_is_3(tmp_path, capsys):
    job = write_job(tmp_path, inputs=[{"list": str(tmp_path / "no-list.txt")}])
    assert main(["validate", str(job), "--no-estimate"]) == 3
    assert "input list" in capsys.readouterr().err


def test_a_bug_prints_one_line_and_where_the_traceback_is(tmp_path, capsys, monkeypatch):
    import pipeline.config

    def broken() -> dict:
        return {}["no such key"]

    monkeypatch.setattr(pipeline.config, "job_schema", broken)
    monkeypatch.setenv("GEORETINA_LOG_DIR", str(tmp_path / "logs"))
    assert main(["schema", "job"]) == 70
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("georetina: error: unexpected KeyError: 'no such key' (a bug")
    log = Path(err[0].rsplit(" ", 1)[1].rstrip(")"))
    assert log.parent == tmp_path / "logs"
    assert "Traceback (most recent call last)" in log.read_text()
    assert "in broken" in log.read_text()


@pytest.fixture
def silent_server():
    """A loopback HTTP server that accepts connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted = threading.Event()
    held = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)
            accepted.set()

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", accepted
    server.close()
    for conn in held:
        conn.close()


# The run under Ctrl-C as from a terminal: a suite started in the background of a script
# inherits SIGINT ignored (POSIX shells do that to background jobs), and a Python started
# with SIGINT ignored keeps ignoring it; reset it before the command starts.
WITH_CTRL_C = [
    sys.executable,
    "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])",
]


def test_ctrl_c_is_130_and_says_how_to_resume(tmp_path, silent_server):
    url, accepted = silent_server
    job = write_job(tmp_path, inputs=[{"stac": {"api": url, "asset": "visual"}}])
    process = subprocess.Popen(
        [*WITH_CTRL_C, str(GEORETINA), "run", str(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "GEORETINA_LOG_DIR": str(tmp_path / "logs")},
    )
    try:
        assert accepted.wait(120), "the run never asked the STAC API"
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "interrupted" in err and "run the same command again to resume" in err
    assert "Traceback" not in err


def test_a_commands_warnings_go_to_the_log_and_the_suites_filters_still_apply(
    tmp_path, capsys, monkeypatch
):
    """Quiet, a library's warning is written to the log file, not the terminal; and it is
    not ignored, so the suite's 'Ray deprecations are errors' reaches every command."""
    import warnings

    from ray.util.annotations import RayDeprecationWarning

    import pipeline.config

    category = UserWarning

    def warns() -> dict:
        warnings.warn("a library's noisy warning", category, stacklevel=1)
        return {}

    monkeypatch.setattr(pipeline.config, "job_schema", warns)
    monkeypatch.setenv("GEORETINA_LOG_DIR", str(tmp_path / "logs"))
    assert main(["schema", "job"]) == 0
    printed = capsys.readouterr()
    assert "noisy" not in printed.out + printed.err
    (log,) = (tmp_path / "logs").glob("schema-*.log")
    assert "a library's noisy warning" in log.read_text()
    category = RayDeprecationWarning  # pyproject: error::...RayDeprecationWarning
    assert main(["schema", "job"]) == 70
    assert "unexpected RayDeprecationWarning" in capsys.readouterr().err
