"""Security: credentials never reach logs, reports, the ledger or the output; job files are
parsed without running code; infra/ keeps the Ray dashboard and Job API private.

Checkpoints never unpickle objects: tests/test_detect.py::test_pickled_objects_are_refused
(a pickle whose ``__reduce__`` would run code is refused by ``weights_only`` loading).
"""

from __future__ import annotations

import io
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import s3fs
import yaml
from faults import GEORETINA, clean_env, threshold_job, write_archive
from servers import RangeServer

from pipeline.cli.main import main
from pipeline.errors import SceneError
from pipeline.io.discovery import discover_scenes
from pipeline.io.scenes import scene_id_for
from pipeline.redact import REDACTED, redact_text, redact_uri

ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------------------
# Redaction (pure)
# --------------------------------------------------------------------------------------------

PRESIGNED = [
    (
        "https://b.s3.amazonaws.com/a/x.tif?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIAEXAMPLE%2F20260601&X-Amz-Security-Token=TOKENVALUE"
        "&X-Amz-Signature=deadbeef&versionId=v7",
        ["AKIAEXAMPLE", "TOKENVALUE", "deadbeef"],
        ["X-Amz-Algorithm=AWS4-HMAC-SHA256", "versionId=v7"],
    ),
    (
        "https://storage.googleapis.com/b/x.tif?X-Goog-Credential=svc&X-Goog-Signature=cafe",
        ["svc", "cafe"],
        ["storage.googleapis.com/b/x.tif"],
    ),
    (
        "https://acct.blob.core.windows.net/c/x.tif?sv=2024-01-01&sp=r&sig=SASSECRET%3D",
        ["SASSECRET"],
        ["sv=2024-01-01", "sp=r"],
    ),
    ("https://user:hunter2@host.example/x.tif", ["hunter2"], ["user:", "host.example/x.tif"]),
    ("https://host.example/x.tif?access_token=abc123&api_key=k9", ["abc123", "k9"], []),
]


@pytest.mark.parametrize("uri, hidden, kept", PRESIGNED, ids=["s3", "gcs", "azure", "user", "api"])
def test_credentials_in_uris_are_redacted_and_the_rest_kept(uri, hidden, kept):
    public = redact_uri(uri)
    assert REDACTED in public
    for secret in hidden:
        assert secret not in public
    for part in kept:
        assert part in public
    message = f"'/vsicurl/{uri}' not recognized as a supported file format."
    assert all(secret not in redact_text(message) for secret in hidden)
    assert all(secret not in str(SceneError("s", message)) for secret in hidden)


def test_plain_uris_are_untouched_and_scene_ids_stable_when_presigned_again():
    for uri in ["s3://bucket/a b/x.tif", "/data/x.tif", "https://h/x.tif?format=tif&v=2"]:
        assert redact_uri(uri) == uri
    first = "https://h/x.tif?X-Amz-Signature=aaa&X-Amz-Date=20260601"
    second = "https://h/x.tif?X-Amz-Signature=bbb&X-Amz-Date=20260601"
    assert scene_id_for(first) == scene_id_for(second) != scene_id_for("https://h/y.tif")
    assert scene_id_for(first).startswith("x-")
    # The same object presigned twice in one job is one scene.
    assert len(discover_scenes([first, second])) == 1


# --------------------------------------------------------------------------------------------
# Job files are data, never code
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tagged",
    [
        "inputs: !!python/object/apply:os.system ['touch {marker}']\n",
        "inputs: [a.tif]\noutput: !!python/object/new:pathlib.Path ['{marker}']\n",
        "inputs: [a.tif]\nmodel: !!python/name:os.system\noutput: {{path: out}}\n",
    ],
    ids=["apply", "new", "name"],
)
def test_python_tags_in_a_job_file_fail_clearly_and_run_nothing(tmp_path, capsys, tagged):
    """yaml.safe_load refuses every python/* tag (see also
    tests/test_config.py::test_yaml_tags_are_not_executed)."""
    marker = tmp_path / "ran"
    job = tmp_path / "evil.yaml"
    job.write_text(tagged.format(marker=marker))
    assert main(["run", str(job)]) == 2
    err = capsys.readouterr().err
    assert f"invalid job {job}" in err and "(yaml)" in err and "python/" in err
    assert not marker.exists()


def test_a_model_preset_with_python_tags_fails_clearly(tmp_path, capsys):
    (tmp_path / "preset.yaml").write_text("backbone: !!python/object/apply:os.getcwd []\n")
    job = tmp_path / "job.yaml"
    job.write_text("inputs: [a.tif]\nmodel: preset.yaml\noutput: {path: out}\n")
    assert main(["run", str(job)]) == 2
    assert "cannot load preset 'preset.yaml'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# A planted secret, grepped for in every artefact of a real run
# --------------------------------------------------------------------------------------------


def artefact_texts(fs: s3fs.S3FileSystem, prefix: str) -> dict[str, bytes]:
    """Every object under the output, raw; GeoParquet files also decoded (values are
    compressed on disk): every column's values and the schema metadata."""
    fs.invalidate_cache()
    texts = {}
    for key in fs.find(prefix):
        blob = fs.cat_file(key)
        texts[key] = blob
        if key.endswith(".parquet"):
            table = pq.read_table(io.BytesIO(blob))
            decoded = repr(table.schema.metadata) + repr(table.to_pylist())
            texts[f"{key} (decoded)"] = decoded.encode()
    return texts


def test_planted_secrets_never_reach_logs_reports_ledger_or_output(
    s3_endpoint, tmp_path, make_raster
):
    """`georetina run` with a secret key and session token in the environment, a presigned
    URL whose token the server requires, and one whose read fails (its error quotes the URL);
    then every artefact is searched: each output object (GeoParquet decoded), the ledger, the
    run report and map, stdout, stderr and every file Ray wrote (its logs)."""
    planted = {
        "AWS_SECRET_ACCESS_KEY": "SECRETKEY" + secrets.token_hex(8),
        "AWS_SESSION_TOKEN": "SESSIONTOKEN" + secrets.token_hex(8),
    }
    url_token = "URLTOKEN" + secrets.token_hex(8)
    url_signature = "URLSIGNATURE" + secrets.token_hex(8)
    missing_signature = "MISSINGSIG" + secrets.token_hex(8)
    everything = [*planted.values(), url_token, url_signature, missing_signature]

    archive = tmp_path / "archive"
    write_archive(archive, 2, size=400)
    fs = s3fs.S3FileSystem()
    fs.mkdir("georetina-secrets")
    fs.put(str(archive / "scene_000.tif"), "georetina-secrets/in/scene_000.tif")
    server = RangeServer(
        {"/presigned.tif": (archive / "scene_001.tif").read_bytes()}, require_token=url_token
    )
    inputs = [
        "s3://georetina-secrets/in/scene_000.tif",
        f"{server.url}/presigned.tif?X-Amz-Signature={url_signature}&token={url_token}",
        f"{server.url}/missing.tif?X-Amz-Signature={missing_signature}&token={url_token}",
    ]
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(threshold_job(inputs, "s3://georetina-secrets/out")))
    # Ray's files (logs included) go to a fresh, short folder (its socket paths are limited).
    ray_dir = tempfile.mkdtemp(prefix="gr-", dir="/tmp")  # removed at the end
    try:
        result = subprocess.run(
            [GEORETINA, "run", str(job), "--run-id", "secrets"],
            capture_output=True,
            text=True,
            timeout=300,
            env=clean_env(**planted, RAY_TMPDIR=ray_dir),
        )
    finally:
        server.close()
    assert result.returncode == 1, result.stdout + result.stderr  # the missing scene failed
    assert "scenes: 2 done, 0 skipped, 1 failed" in result.stdout
    assert any(path == "/presigned.tif" for _, path, _ in server.requests)  # token used

    texts = artefact_texts(fs, "georetina-secrets/out")
    assert (
        any("_ledger/" in k for k in texts) and "georetina-secrets/out/_runs/secrets.json" in texts
    )
    assert sum(k.endswith("(decoded)") and "/detections/" in k for k in texts) == 2
    texts["stdout"] = result.stdout.encode()
    texts["stderr"] = result.stderr.encode()
    ray_files = [p for p in Path(ray_dir).rglob("*") if p.is_file() and not p.is_socket()]
    assert any(p.suffix in (".log", ".out", ".err") for p in ray_files)
    for path in ray_files:
        try:
            texts[str(path)] = path.read_bytes()
        except OSError:
            continue
    leaks = [(name, s) for name, blob in texts.items() for s in everything if s.encode() in blob]
    assert not leaks, leaks
    # The failed scene is still named, with its URL (redacted) and what went wrong.
    report = texts["georetina-secrets/out/_runs/secrets.json"].decode()
    assert "missing.tif?X-Amz-Signature=REDACTED&token=REDACTED" in report
    print(f"searched {len(texts)} artefacts ({len(ray_files)} Ray files) for {len(everything)}")
    shutil.rmtree(ray_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# infra/: the Ray dashboard and Job API stay off public addresses
# --------------------------------------------------------------------------------------------


def _documents() -> list[tuple[Path, dict]]:
    found = []
    for path in sorted((ROOT / "infra").rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if isinstance(document, dict):
                found.append((path, document))
    return found


def _walk(node: object, trail: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{trail}.{key}", key, value
            yield from _walk(value, f"{trail}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, f"{trail}[{index}]")


def test_infra_keeps_the_dashboard_and_job_api_private():
    documents = _documents()
    assert documents, "infra/ has no manifests"
    ray_clusters = 0
    for path, document in documents:
        name = f"{path.relative_to(ROOT)}:{document.get('kind', 'cluster-launcher')}"
        assert document.get("kind") not in ("Ingress", "Route", "Gateway"), name
        if document.get("kind") == "Service":
            assert document.get("spec", {}).get("type", "ClusterIP") == "ClusterIP", name
        for where, key, value in _walk(document):
            assert key != "hostNetwork" or value is not True, f"{name}{where}"
            assert key not in ("hostPort", "nodePort", "loadBalancerIP"), f"{name}{where}"
            if key == "serviceType":
                assert value == "ClusterIP", f"{name}{where}"
        for cluster_spec in _ray_cluster_specs(document):
            ray_clusters += 1
            head = cluster_spec["headGroupSpec"]
            # 0.0.0.0 inside the pod is what lets the ClusterIP service reach it; the
            # service itself must then be cluster-internal, and the API token-protected.
            assert head.get("serviceType", "ClusterIP") == "ClusterIP", name
            assert cluster_spec.get("authOptions", {}).get("mode") == "token", name
        if "head_start_ray_commands" in document:  # Ray's cluster launcher: a bare VM
            started = " ".join(document["head_start_ray_commands"])
            assert "--dashboard-host=127.0.0.1" in started, name
            assert "RAY_AUTH_MODE=token" in started, name
    assert ray_clusters >= 1
    readme = (ROOT / "infra" / "README.md").read_text()
    assert "port-forward" in readme and "token" in readme.lower()


def _ray_cluster_specs(document: dict) -> list[dict]:
    """The RayCluster spec of a RayCluster, RayJob or RayCronJob document."""
    found = []
    for _, key, value in _walk(document):
        if key in ("rayClusterSpec", "spec") and isinstance(value, dict):
            if "headGroupSpec" in value:
                found.append(value)
    return found
