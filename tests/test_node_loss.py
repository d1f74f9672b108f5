"""A worker node removed mid-run (ray.cluster_utils.Cluster): the job ends with the same rows
and detection ids as a clean run.

``Cluster`` needs a driver of its own (the session's Ray is already initialised in this
process), so the multi-node run happens in a subprocess, which shuts its cluster down."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from faults import SMALL_RETINANET, clean_env, output_rows, threshold_job, write_archive

from pipeline.config import parse_job
from pipeline.jobs.run import run_job

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SCENES = 3

DRIVER = textwrap.dedent(
    """
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from pipeline.config import parse_job
    from pipeline.jobs.run import run_job

    # The head runs no tasks: every read, detection and merge lands on the doomed node.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    doomed = cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    removed = []

    def progress(line):
        if not removed and line.strip().startswith("scenes "):
            seen = int(line.split("tiles ", 1)[1].split("/", 1)[0])
            if not seen:  # the driver reports from the start: remove it once tiles flow
                return
            cluster.add_node(num_cpus=2)  # somewhere for the work to go
            cluster.remove_node(doomed, allow_graceful=False)
            removed.append(seen)

    try:
        report = run_job(
            parse_job(json.loads(sys.argv[1])), progress=progress, progress_every_s=0
        )
        print(json.dumps({"removed_at_tiles": removed, "tiles": report.tiles,
                          "done": report.count("done"), "failed": report.count("failed"),
                          "errors": sorted({s.error for s in report.scenes if s.error})}))
    finally:
        ray.shutdown()
        cluster.shutdown()
    """
)


def test_a_worker_node_removed_mid_run_changes_nothing(ray_session, tmp_path):
    folder = tmp_path / "archive"
    write_archive(folder, SCENES)
    model = SMALL_RETINANET
    inputs = sorted(folder.glob("*.tif"))
    clean = {**threshold_job(inputs, tmp_path / "clean"), "model": model}
    assert run_job(parse_job(clean), progress=lambda _: None).count("done") == SCENES

    job = {**clean, "output": {"path": str(tmp_path / "out")}}
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(job)],
        capture_output=True,
        text=True,
        timeout=400,
        env=clean_env(),
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (line,) = [x for x in result.stdout.splitlines() if x.startswith('{"removed_at_tiles"')]
    summary = json.loads(line)
    total = summary["tiles"]
    assert summary["removed_at_tiles"] and summary["removed_at_tiles"][0] < total, summary
    assert summary == {**summary, "done": SCENES, "failed": 0}, summary
    assert output_rows(str(tmp_path / "out")) == output_rows(str(tmp_path / "clean"))
