"""`georetina train` as a user runs it: its printed lines, and its exit codes.

The end-to-end test runs the installed command in a subprocess on a real embedded Ray Train,
so what it sees is what a terminal would: one line per epoch (loss, chips/s), the summary, and
nothing of Ray Train's own ("Failed to query Ray Train Controller actor state", the workers'
prints), nothing twice.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_train import TINY_MODEL  # the same tiny network as the training tests

from pipeline.cli.main import main
from pipeline.errors import CheckpointError
from pipeline.io.synthetic import write_training_set

GEORETINA = Path(sys.executable).parent / "georetina"

EPOCH = re.compile(
    r"^epoch (\d+)/2: loss \d+\.\d{4} \(classification \d+\.\d{4}, box \d+\.\d{4}\), "
    r"lr [0-9.e-]+, \d+\.\d chips/s$"
)


def write_train_file(folder: Path, **fields: object) -> Path:
    """Two 384-px scenes with labels, 128-px chips, two short epochs on one CPU worker."""
    pairs = write_training_set(folder / "data", scenes=2, size=384, objects=10)
    body = {
        "name": "tiny",
        "model": TINY_MODEL,
        "data": [{"raster": str(r), "labels": str(labels)} for r, labels in pairs],
        "chips": {"size": 128, "per_epoch": 16},
        "optim": {"epochs": 2, "batch_size": 4, "warmup_steps": 2},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "output": "model/tiny.safetensors",
    }
    body.update(fields)
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_train_prints_one_line_per_epoch_and_only_our_lines(tmp_path):
    train_file = write_train_file(tmp_path)
    env = {**os.environ, "GEORETINA_LOG_DIR": str(tmp_path / "logs")}
    env.pop("RAY_ADDRESS", None)  # embedded Ray, as on a laptop
    done = subprocess.run(
        [str(GEORETINA), "train", str(train_file)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == "", done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(set(lines)), "a line printed twice:\n" + done.stdout
    epochs = [EPOCH.match(line) for line in lines[:2]]
    assert all(epochs), "\n".join(lines)
    assert [int(m.group(1)) for m in epochs if m] == [1, 2]
    checkpoint = tmp_path / "model" / "tiny.safetensors"
    summary = [line.split(":", 1)[0] for line in lines[2:]]
    assert summary == ["checkpoint", "sha256", "loss", "wall_s"], "\n".join(lines)
    assert lines[2] == f"checkpoint: {checkpoint}"
    assert checkpoint.exists()
    assert "Failed to query Ray Train Controller" not in done.stdout
    # Ray's own lines went to the log file, not to the user.
    assert len(list((tmp_path / "logs").glob("train-*.log"))) == 1


def test_a_bad_training_file_is_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"data": [{"labels": "a.parquet"}], "output": "m.pt"}))
    assert main(["train", str(bad)]) == 2
    assert "data.0" in capsys.readouterr().err


def test_a_missing_start_checkpoint_or_an_unwritable_output_is_3_at_once(tmp_path, capsys):
    """Found before Ray starts (not by a worker, nor after training, as exit 70)."""
    train_file = write_train_file(tmp_path, init_checkpoint="gone.safetensors")
    assert main(["train", str(train_file)]) == 3
    assert "gone.safetensors: cannot be read" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    train_file = write_train_file(tmp_path, output=str(blocker / "m.safetensors"))
    assert main(["train", str(train_file)]) == 3
    assert f"output {blocker} is not writable" in capsys.readouterr().err


def test_a_georetina_error_on_a_worker_keeps_its_exit_code():
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    from pipeline.cli.console import exit_code_for
    from pipeline.jobs.train import _our_error

    try:
        raise CheckpointError("checkpoint s3://m/x.pt: cannot be read")
    except CheckpointError as error:
        on_worker = RayTaskError("train_loop", "Traceback ...", error).as_instanceof_cause()
    wrapped = WorkerGroupError("[Rank 0 Error Snippet]: ...", {0: on_worker})
    found = _our_error(wrapped)
    assert type(found) is CheckpointError and str(found).startswith("checkpoint s3://m/x.pt")
    assert exit_code_for(found) == 3
    assert _our_error(WorkerGroupError("...", {0: ValueError("a bug")})) is None  # exit 70
