"""deploy/ checked structurally: every manifest parses and has the fields its kind needs, secrets
only ever come from Secrets or the environment, and every image is pinned to the versions that
pyproject.toml pins. (No Kubernetes API server here: tests/test_mlflow_server.py runs the MLflow
server stack itself, live.)"""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

K8S_API_VERSIONS = {
    "Namespace": "v1",
    "ConfigMap": "v1",
    "Service": "v1",
    "StatefulSet": "apps/v1",
    "Deployment": "apps/v1",
    "Job": "batch/v1",
    "Ingress": "networking.k8s.io/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
    "RayCluster": "ray.io/v1",
    "RayJob": "ray.io/v1",
}
NOT_K8S = {"compose.yaml", "kustomization.yaml", "aws.yaml"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|KEY_ID")
CREDENTIALS_IN_URI = re.compile(r"://[^/\s:@'\"*]+:[^/\s@'\"*]+@")  # user:password@ (not a glob)


def _pin(name: str) -> Requirement:
    return next(Requirement(d) for d in PYPROJECT["project"]["dependencies"] if Requirement(d).name == name)


def _dockerfile_args(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", path.read_text(), re.M))


ARGS = _dockerfile_args(DEPLOY / "docker" / "Dockerfile")
PROJECT_IMAGE = "ghcr.io/transferlab/transferlab"
CPU_IMAGE = f"{PROJECT_IMAGE}:{PYPROJECT['project']['version']}-ray{ARGS['RAY_VERSION']}-{ARGS['PYTHON_TAG']}-cpu"
GPU_IMAGE = CPU_IMAGE.removesuffix("-cpu") + f"-{ARGS['CUDA_TAG']}"
MLFLOW_IMAGE = f"ghcr.io/transferlab/transferlab-mlflow:{PYPROJECT['project']['version']}"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _k8s_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(DEPLOY.rglob("*.yaml")) if p.name not in NOT_K8S for d in _docs(p)]


def _one(kind: str) -> dict:
    (doc,) = [d for _, d in _k8s_docs() if d["kind"] == kind]
    return doc


def _pod_specs(doc: dict) -> list[dict]:
    """Every pod spec inside a workload or KubeRay object."""
    spec = doc.get("spec", {})
    if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
        return [spec["template"]["spec"]]
    cluster = spec.get("rayClusterSpec", spec) if doc["kind"] in ("RayCluster", "RayJob") else None
    if cluster is None:
        return []
    return [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]


def _images(obj) -> list[str]:
    if isinstance(obj, dict):
        return [v for k, v in obj.items() if k in ("image", "head_image", "worker_image") and isinstance(v, str)] + [
            i for v in obj.values() for i in _images(v)
        ]
    if isinstance(obj, list):
        return [i for v in obj for i in _images(v)]
    return []


def test_every_manifest_parses_with_known_kind_and_api_version():
    docs = _k8s_docs()
    kinds = {d["kind"] for _, d in docs}
    assert {"RayCluster", "RayJob", "Deployment", "StatefulSet", "Ingress", "ConfigMap"} <= kinds
    for path, d in docs:
        assert d["kind"] in K8S_API_VERSIONS, f"{path}: unexpected kind {d['kind']}"
        assert d["apiVersion"] == K8S_API_VERSIONS[d["kind"]], (
            f"{path}: {d['kind']} needs {K8S_API_VERSIONS[d['kind']]}"
        )
        assert d["metadata"]["name"], path
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "transferlab", path
        for pod in _pod_specs(d):
            for c in pod["containers"]:
                assert c["name"] and c["image"], f"{path}: container without name or image"
                assert "resources" in c and c["resources"].get("requests"), (
                    f"{path}: {c['name']} has no resource requests"
                )
    assert not [p for p, d in docs if d["kind"] == "Secret"], "Secrets are created by hand, never committed"


def test_kustomization_lists_existing_files_and_builds():
    k = _docs(DEPLOY / "mlflow" / "k8s" / "kustomization.yaml")[0]
    assert all((DEPLOY / "mlflow" / "k8s" / r).exists() for r in k["resources"])
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed: kustomize build not checked")
    out = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY / "mlflow" / "k8s")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert {d["kind"] for d in yaml.safe_load_all(out.stdout)} >= {"Deployment", "StatefulSet", "Ingress"}


def test_no_secret_is_written_in_any_deploy_file():
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        assert not CREDENTIALS_IN_URI.search(path.read_text()), f"{path}: credentials inside a URI"
    for path, d in _k8s_docs():
        for pod in _pod_specs(d):
            secrets = {v["name"] for v in pod.get("volumes", []) if "secret" in v}
            for c in pod["containers"]:
                mounted = [m["mountPath"] + "/" for m in c.get("volumeMounts", []) if m["name"] in secrets]
                for e in c.get("env", []):
                    if e["name"].endswith("_FILE"):  # names a file: one of a mounted Secret
                        assert any(e["value"].startswith(m) for m in mounted), f"{path}: {e['name']} outside a Secret"
                    elif SECRET_NAME.search(e["name"]):
                        assert "value" not in e and "secretKeyRef" in e["valueFrom"], (
                            f"{path}: {e['name']} must come from a Secret"
                        )
    compose = _docs(DEPLOY / "mlflow" / "compose.yaml")[0]
    for name, service in compose["services"].items():
        for key, value in service.get("environment", {}).items():
            if SECRET_NAME.search(key) or key == "PGPASSWORD" or key.startswith("MINIO_ROOT"):
                assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", value), (
                    f"compose {name}.{key} must be ${{VAR:?}} from the environment"
                )
    example = (DEPLOY / "mlflow" / ".env.example").read_text()
    assert all(
        re.fullmatch(r"\w+=", line)
        for line in example.splitlines()
        if SECRET_NAME.search(line.split("=")[0]) and not line.startswith("#")
    )


def test_images_are_pinned_to_the_versions_pyproject_pins():
    ray_pin, mlflow_pin = _pin("ray"), _pin("mlflow")
    assert Version(ARGS["RAY_VERSION"]) in ray_pin.specifier, (
        f"Dockerfile Ray {ARGS['RAY_VERSION']} vs pyproject {ray_pin}"
    )
    min_python = re.search(r"(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"]).groups()
    assert ARGS["PYTHON_TAG"] == f"py{''.join(min_python)}"
    assert re.fullmatch(r"cu1\d\d", ARGS["CUDA_TAG"])
    dockerfile = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert "FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-cpu" in dockerfile
    assert "FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${CUDA_TAG}" in dockerfile
    assert re.search(r"pip install [^\n]* \.\s", dockerfile), "dependencies are installed from pyproject.toml"
    assert re.findall(r"^USER (\S+)", dockerfile, re.M)[-1] == "ray"

    mlflow_dockerfile = (DEPLOY / "mlflow" / "Dockerfile").read_text()
    assert f"FROM python:{'.'.join(min_python)}-" in mlflow_dockerfile
    assert re.findall(r"^USER (\S+)", mlflow_dockerfile, re.M)[-1] not in ("root", "0")
    reqs = {
        Requirement(line).name: Requirement(line)
        for line in (DEPLOY / "mlflow" / "requirements.txt").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert reqs["mlflow"].specifier == mlflow_pin.specifier and "auth" in reqs["mlflow"].extras
    assert {"psycopg2-binary", "boto3"} <= set(reqs)

    every = [i for _, d in _k8s_docs() for i in _images(d)]
    every += _images(_docs(DEPLOY / "mlflow" / "compose.yaml")[0]) + _images(
        _docs(DEPLOY / "cluster-launcher" / "aws.yaml")[0]
    )
    assert every
    for image in every:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and "/" not in tag, f"{image} is not pinned"
        if name == PROJECT_IMAGE:
            assert image in (CPU_IMAGE, GPU_IMAGE), f"{image}: expected {CPU_IMAGE} or {GPU_IMAGE}"
        if name.endswith("transferlab-mlflow"):
            assert image == MLFLOW_IMAGE
    assert {CPU_IMAGE, GPU_IMAGE, MLFLOW_IMAGE} <= set(every)


def test_raycluster_head_workers_autoscaling_auth_and_shared_storage():
    rc = _one("RayCluster")["spec"]
    assert rc["rayVersion"] == ARGS["RAY_VERSION"]
    assert rc["authOptions"]["mode"] == "token"
    assert rc["enableInTreeAutoscaling"] is True
    head = rc["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "the dashboard must not be exposed publicly"
    assert head["template"]["spec"]["containers"][0]["image"] == CPU_IMAGE
    groups = {g["groupName"]: g for g in rc["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"] and g["maxReplicas"] > 0
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]
    assert gpu["image"] == GPU_IMAGE and gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert groups["cpu"]["template"]["spec"]["containers"][0]["image"] == CPU_IMAGE
    for pod in _pod_specs(_one("RayCluster")):
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["AWS_ENDPOINT_URL"]["value"].startswith("http")  # S3-compatible checkpoint storage
        assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http://mlflow.transferlab.svc")
        # Credentials are files of the Secret mounted on every Ray pod, never variables (which Ray
        # would pass on in every task's environment).
        secret_values = [
            n for n, e in env.items() if "valueFrom" in e or SECRET_NAME.search(n) and not n.endswith("_FILE")
        ]
        assert not secret_values, secret_values
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "credentials"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == "credentials"]
        assert volume["secret"]["secretName"] == "transferlab-ray" and mount["readOnly"] is True
        files = {
            "MLFLOW_TRACKING_USERNAME_FILE": "mlflow-username",
            "MLFLOW_TRACKING_PASSWORD_FILE": "mlflow-password",
            "AWS_SHARED_CREDENTIALS_FILE": "aws-credentials",
        }
        assert {name: env[name]["value"] for name in files} == {
            n: f"{mount['mountPath']}/{k}" for n, k in files.items()
        }


def test_rayjob_runs_the_study_from_its_configmap_and_resumes_on_retry(tmp_path):
    from orchestrator.cli.parser import build_parser
    from orchestrator.spec import load_spec

    job = _one("RayJob")["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["transferlab", "run"]
    args = build_parser().parse_args(argv[1:])
    assert args.storage_path.startswith("s3://"), "checkpoints must outlive the job's cluster"
    assert args.tracking_uri.startswith("http://mlflow.")
    assert job["backoffLimit"] >= 1 and job["shutdownAfterJobFinishes"] is True

    # The study file is the ConfigMap, mounted on the head where the entrypoint runs.
    cluster = copy.deepcopy(job["rayClusterSpec"])
    head = cluster["headGroupSpec"]["template"]["spec"]
    mounts, volumes = head["containers"][0]["volumeMounts"], head["volumes"]
    (mount,) = [mounts.pop(i) for i, m in enumerate(mounts) if m["name"] == "study"]
    (volume,) = [volumes.pop(i) for i, v in enumerate(volumes) if v["name"] == "study"]
    assert volume["configMap"]["name"] == "transferlab-study"
    study_key = Path(args.study_file).name
    assert Path(args.study_file) == Path(mount["mountPath"]) / study_key
    study = next(d for _, d in _k8s_docs() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "transferlab-study")
    (tmp_path / study_key).write_text(study["data"][study_key])
    spec = load_spec(tmp_path / study_key, [])
    assert spec.study and spec.storage_path is None and spec.tracking_uri is None  # the entrypoint decides both

    # Otherwise the job's cluster is exactly raycluster.yaml's.
    assert cluster == _one("RayCluster")["spec"]


def test_mlflow_server_manifests_and_compose_configure_the_same_server():
    entrypoint = (DEPLOY / "mlflow" / "entrypoint.sh").read_text()
    required = set(re.findall(r"^need (\w+)", entrypoint, re.M))
    assert {"MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION", "MLFLOW_ALLOWED_HOSTS"} <= required
    for flag in (
        "--app-name basic-auth",
        "--serve-artifacts",
        "--artifacts-destination",
        "--allowed-hosts",
        "--backend-store-uri",
    ):
        assert flag in entrypoint

    (deploy,) = [d for _, d in _k8s_docs() if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow"]
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    assert container["image"] == MLFLOW_IMAGE and "command" not in container and "args" not in container
    k8s_env = {e["name"]: e for e in container["env"]}
    compose = _docs(DEPLOY / "mlflow" / "compose.yaml")[0]["services"]
    compose_env = compose["mlflow"]["environment"]
    for env in (k8s_env, compose_env):
        assert required <= set(env) | {"MLFLOW_ALLOWED_HOSTS"}
        assert {
            "PGPASSWORD",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "MLFLOW_AUTH_ADMIN_PASSWORD",
            "MLFLOW_FLASK_SERVER_SECRET_KEY",
        } <= set(env)
    for uri in (k8s_env["MLFLOW_BACKEND_STORE_URI"]["value"], compose_env["MLFLOW_BACKEND_STORE_URI"]):
        assert uri.startswith("postgresql+psycopg2://")
    assert k8s_env["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith("s3://")
    assert compose_env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert "*" not in k8s_env["MLFLOW_ALLOWED_HOSTS"]["value"].split(",")

    ingress = _one("Ingress")["spec"]
    assert ingress["tls"] and ingress["tls"][0]["hosts"] == [r["host"] for r in ingress["rules"]]
    assert ingress["rules"][0]["host"] in k8s_env["MLFLOW_ALLOWED_HOSTS"]["value"].split(",")
    assert all(d["spec"].get("type", "ClusterIP") == "ClusterIP" for _, d in _k8s_docs() if d["kind"] == "Service")

    assert set(compose) >= {"postgres", "minio", "mlflow"}
    assert [p for s in compose.values() for p in s.get("ports", [])] == ["127.0.0.1:5000:5000"]
    assert compose["mlflow"]["image"] == MLFLOW_IMAGE and compose["mlflow"]["build"] == "."
    auth_db = compose_env["MLFLOW_AUTH_DATABASE_URI"].rsplit("/", 1)[1]
    assert f"CREATE DATABASE {auth_db}" in (DEPLOY / "mlflow" / "initdb" / "10-mlflow-auth.sql").read_text()


@pytest.mark.parametrize(
    "env, message",
    [
        ({}, "MLFLOW_BACKEND_STORE_URI is not set"),
        (
            {
                "MLFLOW_BACKEND_STORE_URI": "postgresql+psycopg2://mlflow:hunter2@db/mlflow",
                "MLFLOW_AUTH_DATABASE_URI": "postgresql+psycopg2://mlflow@db/a",
                "MLFLOW_ARTIFACTS_DESTINATION": "s3://b",
                "MLFLOW_ALLOWED_HOSTS": "h",
                "MLFLOW_FLASK_SERVER_SECRET_KEY": "k",
            },
            "holds a password",
        ),
    ],
)
def test_server_entrypoint_refuses_incomplete_or_leaky_configuration(env, message):
    out = subprocess.run(
        ["sh", str(DEPLOY / "mlflow" / "entrypoint.sh")],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and message in out.stderr


def test_cluster_launcher_config():
    c = _docs(DEPLOY / "cluster-launcher" / "aws.yaml")[0]
    assert c["docker"]["head_image"] == CPU_IMAGE and c["docker"]["worker_image"] == GPU_IMAGE
    assert "--gpus all" in c["docker"]["worker_run_options"]
    types = c["available_node_types"]
    assert c["head_node_type"] in types and types[c["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = types["gpu_worker"]
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] <= c["max_workers"]
    head_start = " ".join(c["head_start_ray_commands"])
    assert "--num-cpus=0" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert any("RAY_AUTH_MODE=token" in o for o in c["docker"]["run_options"])


def test_docs_cover_every_deploy_file():
    docs = (ROOT / "docs" / "cluster.md").read_text() + (DEPLOY / "README.md").read_text()
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.name not in ("README.md", ".env")):
        assert path.name in docs, f"{path.relative_to(ROOT)} is not mentioned in docs/cluster.md or deploy/README.md"
    assert "--allowed-hosts" in docs and "port-forward" in docs and "TLS" in docs


# --- NetworkPolicies: who reaches whom, computed from the manifests' own labels -------------------

NAMESPACE = {"kubernetes.io/metadata.name": "transferlab"}
RAY_PODS = ("ray-head", "ray-worker-cpu", "ray-worker-gpu")


def _pods() -> dict[str, tuple[dict, dict, set[int]]]:
    """Every pod the manifests make, and pods from outside them, by name: (its namespace's
    labels, its labels as Kubernetes gives them, its container ports)."""

    def ports(spec):
        return {p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}

    pods = {}
    for _, d in _k8s_docs():
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
            template = d["spec"]["template"]
            pods[d["metadata"]["name"]] = (
                NAMESPACE,
                template.get("metadata", {}).get("labels", {}),
                ports(template["spec"]),
            )
    rc = _one("RayCluster")["spec"]  # the RayJob's cluster is the same (test above)
    head = rc["headGroupSpec"]["template"]
    pods["ray-head"] = (NAMESPACE, head["metadata"]["labels"] | {"ray.io/node-type": "head"}, ports(head["spec"]))
    for g in rc["workerGroupSpecs"]:
        labels = g["template"]["metadata"]["labels"] | {"ray.io/node-type": "worker", "ray.io/group": g["groupName"]}
        pods[f"ray-worker-{g['groupName']}"] = (NAMESPACE, labels, ports(g["template"]["spec"]))
    submitter = _one("RayJob")["spec"]["submitterPodTemplate"]
    pods["ray-job-submitter"] = (NAMESPACE, submitter["metadata"]["labels"], set())
    pods["operator"] = (NAMESPACE, {"transferlab.io/operator": "true"}, set())  # an operator's toolbox pod
    pods["stranger"] = (NAMESPACE, {"app.kubernetes.io/name": "something-else"}, set())
    pods["ingress-nginx"] = (
        {"kubernetes.io/metadata.name": "ingress-nginx"},
        {"app.kubernetes.io/name": "ingress-nginx"},
        set(),
    )
    pods["kuberay-operator"] = (
        {"kubernetes.io/metadata.name": "kuberay-system"},
        {"app.kubernetes.io/name": "kuberay-operator"},
        set(),
    )
    pods["elsewhere"] = ({"kubernetes.io/metadata.name": "default"}, {"app.kubernetes.io/name": "mlflow"}, set())
    return pods


def _selects(selector: dict | None, labels: dict) -> bool:
    assert "matchExpressions" not in (selector or {}), "only matchLabels is modelled here"
    return (selector or {}).get("matchLabels", {}).items() <= labels.items()


def _peer_admits(peer: dict, namespace: dict, labels: dict) -> bool:
    assert "ipBlock" not in peer, "peers are pods, not addresses"
    if "namespaceSelector" not in peer:
        return namespace == NAMESPACE and _selects(peer["podSelector"], labels)
    return _selects(peer["namespaceSelector"], namespace) and _selects(peer.get("podSelector"), labels)


def _allowed(pods, policies) -> set[tuple[str, str, int | str]]:
    """(source, destination, port or "*") for every connection the policies let through; a pod no
    Ingress policy selects admits everything, as in Kubernetes."""
    allowed = set()
    for dst, (namespace, labels, _) in pods.items():
        if namespace != NAMESPACE:
            continue
        mine = [p["spec"] for p in policies if _selects(p["spec"]["podSelector"], labels)]
        if not [p for p in mine if "Ingress" in p["policyTypes"]]:
            allowed |= {(src, dst, "*") for src in pods}
        for rule in (r for p in mine for r in p.get("ingress", [])):
            ports = [p["port"] for p in rule.get("ports", [])] or ["*"]
            assert all(p.get("protocol", "TCP") == "TCP" for p in rule.get("ports", []))
            for src, (src_ns, src_labels, _) in pods.items():
                if "from" not in rule or any(_peer_admits(peer, src_ns, src_labels) for peer in rule["from"]):
                    allowed |= {(src, dst, port) for port in ports}
    return allowed


def test_network_policies_let_through_only_the_listed_connections():
    policies = [d for _, d in _k8s_docs() if d["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and "ingress" not in p["spec"]]
    assert deny and deny[0]["spec"]["policyTypes"] == ["Ingress"], "the namespace denies ingress by default"
    pods = _pods()
    expected = {(src, dst, "*") for src in RAY_PODS for dst in RAY_PODS}  # Ray's random node/worker ports
    expected |= {("operator", "ray-head", 8265), ("operator", "ray-head", 10001)}  # dashboard/job API, client
    expected |= {("ray-job-submitter", "ray-head", 8265), ("kuberay-operator", "ray-head", 8265)}
    expected |= {(src, "mlflow", 5000) for src in (*RAY_PODS, "operator", "ingress-nginx")}
    expected |= {(src, "minio", 9000) for src in (*RAY_PODS, "mlflow", "minio-buckets")}
    expected |= {("mlflow", "mlflow-postgres", 5432)}
    allowed = _allowed(pods, policies)
    assert allowed == expected, {"unexpected": allowed - expected, "missing": expected - allowed}
    for _, dst, port in allowed:  # every opened port is one the pod listens on
        assert port == "*" or port in pods[dst][2], (dst, port)
    # The policies are applied with the stacks they guard.
    k = _docs(DEPLOY / "mlflow" / "k8s" / "kustomization.yaml")[0]
    assert "networkpolicy.yaml" in k["resources"]
