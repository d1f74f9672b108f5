"""infra/ and jobs/: every manifest parses, has what KubeRay / Kubernetes / Ray's cluster
launcher require, keeps the Job API private, and runs a job file that load_job accepts."""

import json
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from pipeline.config import load_job
from pipeline.jobs.ray_session import RAY_SYSTEM_CONFIG

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
IMAGE_ROOT = "/opt/georetina"  # WORKDIR of infra/Dockerfile, where jobs/ is copied


def load(path: Path) -> dict:
    (document,) = list(yaml.safe_load_all(path.read_text()))
    return document


def every_manifest() -> list[Path]:
    return sorted(INFRA.rglob("*.yaml")) + sorted((ROOT / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("path", every_manifest(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_parses(path):
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert documents and all(isinstance(d, dict) for d in documents)


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_job_file_loads(path):
    if "data" in load(path):  # a training file (georetina train) lives in jobs/ too
        from pipeline.config import load_train_spec

        load_train_spec(path)
    else:
        load_job(path)


def test_nightly_job_reads_stac_on_gpus_into_object_storage():
    spec = load_job(ROOT / "jobs" / "nightly.yaml")
    (source,) = spec.inputs
    assert source.stac.api and source.stac.asset and source.stac.lookback_days
    assert spec.detect.num_gpus_per_actor >= 1 and spec.detect.precision == "bf16"
    assert spec.output.path.startswith("s3://")
    assert spec.model.checkpoint and spec.model.checkpoint.endswith(".safetensors")


def job_file_of(entrypoint: str) -> Path:
    """The job file an entrypoint runs, mapped from the image's /opt/georetina to this repo."""
    words = shlex.split(entrypoint)
    assert words[:2] == ["georetina", "run"], entrypoint
    image_path = Path(words[2])
    assert image_path.is_relative_to(IMAGE_ROOT), entrypoint
    return ROOT / image_path.relative_to(IMAGE_ROOT)


def check_cluster_spec(spec: dict) -> None:
    """What the KubeRay operator needs of a RayCluster spec, and what we promise of ours."""
    assert spec["rayVersion"] == ray.__version__  # the image's Ray is the pinned one
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"]
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"  # the Job API is never exposed outside
    assert isinstance(head["rayStartParams"], dict)
    assert head["rayStartParams"]["num-cpus"] == "0"
    (head_container,) = head["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in head_container["ports"]}
    assert ports["dashboard"] == 8265 and ports["gcs-server"] == 6379
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"]
    images = {head_container["image"]}
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        images.add(container["image"])
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert container["resources"]["requests"] == container["resources"]["limits"]
    gpu_groups = [g for g in spec["workerGroupSpecs"] if g["maxReplicas"] > g["minReplicas"]]
    assert gpu_groups, "an autoscaling GPU worker group"
    assert len(images) == 1  # head and workers run the same image


def test_raycluster():
    cluster = load(K8S / "raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    assert cluster["metadata"]["name"]
    check_cluster_spec(cluster["spec"])
    assert load_job(ROOT / "jobs" / "nightly.yaml").detect.num_actors <= sum(
        g["maxReplicas"] for g in cluster["spec"]["workerGroupSpecs"]
    )  # the nightly job's GPU actors fit in the worker group


def test_rayjob_runs_a_real_job_file_and_shuts_down():
    job = load(K8S / "rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["activeDeadlineSeconds"] < 24 * 3600  # ends before the next night's run
    assert spec["rayClusterSpec"] == load(K8S / "raycluster.yaml")["spec"]  # one cluster shape
    check_cluster_spec(spec["rayClusterSpec"])
    path = job_file_of(spec["entrypoint"])
    assert path.exists(), path
    load_job(path)


def test_raycronjob_schedules_the_rayjob_nightly():
    cron = load(K8S / "raycronjob.yaml")
    assert cron["apiVersion"] == "ray.io/v1" and cron["kind"] == "RayCronJob"
    assert len(cron["spec"]["schedule"].split()) == 5
    assert cron["spec"]["jobTemplate"] == load(K8S / "rayjob.yaml")["spec"]


def cronjob_script() -> str:
    cron = load(K8S / "cronjob.yaml")
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return container["args"][0]


def test_cronjob_forbids_overlap_and_waits_on_its_rayjob():
    cron = load(K8S / "cronjob.yaml")
    assert cron["apiVersion"] == "batch/v1" and cron["kind"] == "CronJob"
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert len(spec["schedule"].split()) == 5
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    rayjob = load(K8S / "rayjob.yaml")
    # The creator pod outlives the RayJob, so Forbid also covers a run still going.
    assert (
        spec["jobTemplate"]["spec"]["activeDeadlineSeconds"]
        > rayjob["spec"]["activeDeadlineSeconds"]
    )
    script = cronjob_script()
    assert "date -u +%Y%m%d" in script and "kubectl create -f -" in script
    assert "Complete)" in script and "Failed)" in script  # waits for the RayJob's end

    rbac = list(yaml.safe_load_all((K8S / "rbac.yaml").read_text()))
    accounts = {d["metadata"]["name"] for d in rbac if d["kind"] == "ServiceAccount"}
    assert pod["serviceAccountName"] in accounts
    (role,) = [d for d in rbac if d["kind"] == "Role"]
    (rule,) = role["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
    assert {"create", "get"} <= set(rule["verbs"]) and "delete" not in rule["verbs"]

    kustomization = load(K8S / "kustomization.yaml")
    assert set(kustomization["resources"]) == {"rbac.yaml", "cronjob.yaml"}
    (generated,) = kustomization["configMapGenerator"]
    (volume,) = pod["volumes"]
    assert volume["configMap"]["name"] == generated["name"]
    assert generated["files"] == ["rayjob.yaml"]
    assert kustomization["generatorOptions"]["disableNameSuffixHash"] is True


def test_cronjob_names_tonights_rayjob_after_the_date():
    """Run the script's own sed on rayjob.yaml: only metadata.name changes."""
    (expression,) = re.findall(r'sed "([^"]+)" /rayjob/rayjob\.yaml', cronjob_script())
    expression = expression.replace("${name}", "georetina-nightly-20260601")
    renamed = subprocess.run(
        ["sed", expression, str(K8S / "rayjob.yaml")], capture_output=True, text=True, check=True
    ).stdout
    original, tonight = load(K8S / "rayjob.yaml"), yaml.safe_load(renamed)
    assert tonight["metadata"]["name"] == "georetina-nightly-20260601"
    tonight["metadata"]["name"] = original["metadata"]["name"]
    assert tonight == original


def test_no_manifest_exposes_a_service():
    for path in sorted(K8S.glob("*.yaml")):
        text = path.read_text()
        assert "LoadBalancer" not in text and "NodePort" not in text, path


def test_cluster_launcher_matches_rays_schema_and_keeps_the_dashboard_private():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = load(INFRA / "cluster-launcher" / "aws.yaml")
    jsonschema.validate(config, schema)
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert (
        config["docker"]["image"]
        == load(K8S / "raycluster.yaml")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][
            0
        ]["image"]
    )
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])


def test_image_is_cuda_with_the_project_and_its_jobs():
    text = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+", text, re.MULTILINE)
    assert f"WORKDIR {IMAGE_ROOT}" in text
    assert "COPY jobs ./jobs" in text and "COPY pipeline ./pipeline" in text
    assert "pip install --no-cache-dir ." in text
    assert "wget" in text  # KubeRay's default readiness probes
    # Every node (KubeRay's pods, the launcher's containers) frees store memory as promptly as
    # an embedded Ray does.
    for key, value in RAY_SYSTEM_CONFIG.items():
        assert f"ENV RAY_{key}={value}" in text


def test_readme_explains_every_manifest():
    readme = (INFRA / "README.md").read_text()
    for path in sorted(INFRA.rglob("*.yaml")) + [INFRA / "Dockerfile"]:
        assert str(path.relative_to(INFRA)) in readme, path
    for needle in ("port-forward", "RAY_AUTH_TOKEN", "ClusterIP", "georetina submit"):
        assert needle in readme
