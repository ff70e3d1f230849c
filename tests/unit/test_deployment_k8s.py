"""The Kubernetes manifests (deploy/k8s), checked without a cluster (none runs in CI).

kubernetes-validate (PyPI) checks every resource against the Kubernetes API's own schema, strict
(an unknown or misspelt field is an error), as `make lint-deploy` does; the tests below check
what the schema cannot: that the commands exist in the real CLI, that every environment
variable is one the Settings read, that the secrets the settings point at are mounted, that
the probes hit served routes, and that KEDA's list is the Redis key Celery fills.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import redis
import yaml

from service.app import create_app
from service.broker import Broker
from service.cli import _parser, parse_roles
from service.settings import Settings
from tests.unit.test_deployment import _free_port

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "k8s" / "base"
KEDA = ROOT / "deploy" / "k8s" / "keda"
K8S_VERSION = "1.30.0"  # the Makefile's K8S_VERSION
# Read by boto3 (the object store), not by bitserve's Settings.
THIRD_PARTY_ENV = {"AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_SHARED_CREDENTIALS_FILE"}
SECRET_DIR = "/run/secrets/bitserve/"


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


MANIFESTS = sorted(p for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")
RESOURCES = {
    (doc["kind"], doc["metadata"]["name"]): doc for path in MANIFESTS for doc in load(path)
}
CONFIG = RESOURCES[("ConfigMap", "bitserve-config")]["data"]
SECRET = RESOURCES[("Secret", "bitserve-secrets")]
WORKLOADS = {
    name: doc["spec"]["template"]["spec"]
    for (kind, name), doc in RESOURCES.items()
    if kind in ("Deployment", "Job")
}


def containers() -> list[tuple[str, dict[str, Any]]]:
    return [(name, c) for name, pod in WORKLOADS.items() for c in pod["containers"]]


def test_the_validator_passes_every_manifest() -> None:
    """The command `make lint-deploy` runs, on the same files."""
    validator = Path(sys.executable).parent / "kubernetes-validate"
    listed = [str(p) for p in MANIFESTS]
    run = subprocess.run(
        [str(validator), "--strict", "-k", K8S_VERSION, *listed],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    passed = [line for line in run.stdout.splitlines() if " passed for resource " in line]
    assert len(passed) == len(RESOURCES)
    assert "ERROR" not in run.stdout and "WARN" not in run.stdout


@pytest.mark.parametrize(("kind", "name"), sorted(RESOURCES))
def test_each_resource_matches_the_schema_and_a_broken_copy_does_not(kind: str, name: str) -> None:
    doc = RESOURCES[(kind, name)]
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    broken = copy.deepcopy(doc)
    broken["metadata"]["lables"] = {"a": "b"}  # a typo strict validation must catch
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_the_kustomization_lists_every_manifest_but_the_secret_template() -> None:
    kustomization = load(BASE / "kustomization.yaml")[0]
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in MANIFESTS if p.name != "secret.template.yaml"
    )
    images = {image["name"] for image in kustomization["images"]}
    used = {c["image"] for _, c in containers()}
    assert used == images == {"bitserve", "bitserve-gpu"}
    keda = load(KEDA / "kustomization.yaml")[0]
    assert keda["resources"] == ["../base", "worker-scaledobject.yaml"]


def test_the_manifests_run_gateway_workers_and_migrations_with_the_real_cli() -> None:
    commands = {name: c["command"] for name, c in containers()}
    assert commands["bitserve-gateway"][:2] == ["bitserve", "api"]
    # GPU nodes train only; uploads are ingested on CPU nodes.
    assert commands["bitserve-worker"] == ["bitserve", "worker", "--queues", "train"]
    assert commands["bitserve-migrate"] == ["bitserve", "migrate"]
    assert commands["bitserve-ingest-worker"] == ["bitserve", "worker", "--queues", "ingest"]
    assert RESOURCES[("Deployment", "bitserve-ingest-worker")]["spec"]["replicas"] == 1
    for name, command in commands.items():
        args = _parser().parse_args(command[1:])
        assert args.command == command[1], name
        if args.command == "worker":
            assert parse_roles(args.queues) == (command[3],), name
    gateway = _parser().parse_args(commands["bitserve-gateway"][1:])
    port = WORKLOADS["bitserve-gateway"]["containers"][0]["ports"][0]["containerPort"]
    assert (gateway.host, gateway.port) == ("0.0.0.0", port)


def test_every_environment_variable_is_read_by_settings_or_boto3() -> None:
    known = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        choices = getattr(alias, "choices", None) or []
        known |= {c for c in choices if isinstance(c, str) and c.isupper()}
        known.add(f"BITSERVE_{name.upper()}")
    used = set(CONFIG)
    for _, container in containers():
        used |= {env["name"] for env in container.get("env", [])}
        assert [ref["configMapRef"]["name"] for ref in container["envFrom"]] == ["bitserve-config"]
    assert used - known == THIRD_PARTY_ENV


def test_the_configmap_and_secret_files_load_into_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ConfigMap as the pods' environment, the Secret's keys as the mounted files."""
    secrets = {}
    for key in SECRET["stringData"]:
        local = tmp_path / "secrets" / key
        local.parent.mkdir(exist_ok=True)
        local.write_text(f"p@ss/{key}\n")
        secrets[SECRET_DIR + key] = str(local)
    for key, value in CONFIG.items():
        monkeypatch.setenv(key, secrets.get(value, value))
    monkeypatch.setenv("BITSERVE_HOME", str(tmp_path))  # the pods' /data is not writable here
    monkeypatch.setenv("BITSERVE_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    # Every secret file the settings point at is a key of the Secret.
    pointed = {v for v in CONFIG.values() if v.startswith(SECRET_DIR)}
    assert pointed <= set(secrets), pointed - set(secrets)
    settings = Settings()
    assert settings.pepper == b"p@ss/api_key_pepper"
    assert urlsplit(settings.database_url).password == "p%40ss%2Fpostgres_password"
    assert urlsplit(settings.broker_url).password == "p%40ss%2Fredis_password"
    assert settings.train_queue == CONFIG["BITSERVE_TRAIN_QUEUE"] == "train"
    assert settings.auth == "required"


def test_the_secret_is_a_template_of_placeholders() -> None:
    values = SECRET["stringData"]
    assert set(values) == {
        "postgres_password",
        "redis_password",
        "api_key_pepper",
        "s3_credentials",
    }
    for key, value in values.items():
        assert value.count("REPLACE_ME") >= 1, key
        assert value.replace("REPLACE_ME", "").strip() in ("", _CREDENTIALS_SHAPE), key


_CREDENTIALS_SHAPE = "[default]\naws_access_key_id = \naws_secret_access_key ="


def test_every_pod_is_hardened_and_sized() -> None:
    for name, pod in WORKLOADS.items():
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] == 10001, name  # docker/Dockerfile's USER
        assert pod["automountServiceAccountToken"] is False, name
        secret_volumes = [v for v in pod["volumes"] if "secret" in v]
        assert [v["secret"]["secretName"] for v in secret_volumes] == ["bitserve-secrets"]
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), (name, bound)
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            # A read-only root: bitserve writes only to its home and /tmp.
            assert {CONFIG["BITSERVE_HOME"], "/tmp", SECRET_DIR.rstrip("/")} <= set(mounts)
            assert mounts[SECRET_DIR.rstrip("/")]["readOnly"] is True


def test_gateway_probes_hit_served_routes_and_the_hpa_scales_it(tmp_path: Path) -> None:
    gateway = WORKLOADS["bitserve-gateway"]["containers"][0]
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    paths = create_app(Settings(home=tmp_path)).openapi()["paths"]
    assert "get" in paths["/healthz"] and "get" in paths["/readyz"]
    service = RESOURCES[("Service", "bitserve-gateway")]["spec"]
    labels = RESOURCES[("Deployment", "bitserve-gateway")]["spec"]["template"]["metadata"]
    assert service["selector"].items() <= labels["labels"].items()
    hpa = RESOURCES[("HorizontalPodAutoscaler", "bitserve-gateway")]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "bitserve-gateway",
    }
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"


def test_the_training_worker_takes_one_gpu_on_a_gpu_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pod = WORKLOADS["bitserve-worker"]
    (worker,) = pod["containers"]
    resources = worker["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert CONFIG["BITSERVE_WORKER_CONCURRENCY"] == "1"  # one training process per GPU
    env = {e["name"]: e["value"] for e in worker["env"]}
    monkeypatch.setenv("BITSERVE_HOME", str(tmp_path))
    monkeypatch.setenv("BITSERVE_DEVICE", env["BITSERVE_DEVICE"])
    assert Settings().device == "cuda"
    # Time for the running step to checkpoint, as in docker-compose.yml.
    assert pod["terminationGracePeriodSeconds"] == 120


# -- KEDA: a CRD, so not in Kubernetes' schema; checked here instead -----------------------------

KEDA_DOCS = {doc["kind"]: doc for doc in load(KEDA / "worker-scaledobject.yaml")}


def test_the_keda_scaledobject_scales_the_worker_on_the_train_queue() -> None:
    scaled = KEDA_DOCS["ScaledObject"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"] == {"name": "bitserve-worker"}
    assert scaled["spec"]["minReplicaCount"] >= 1  # the reconciler runs in a worker
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis"
    broker = urlsplit(CONFIG["CELERY_BROKER_URL"])
    assert trigger["metadata"]["address"] == f"{broker.hostname}:{broker.port}"
    assert trigger["metadata"]["databaseIndex"] == broker.path.strip("/")
    assert trigger["metadata"]["listName"] == CONFIG["BITSERVE_TRAIN_QUEUE"]
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["selectPolicy"] == "Disabled"
    auth = KEDA_DOCS["TriggerAuthentication"]
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    (ref,) = auth["spec"]["secretTargetRef"]
    assert (ref["parameter"], ref["name"]) == ("password", SECRET["metadata"]["name"])
    assert ref["key"] in SECRET["stringData"]


def test_keda_list_is_the_redis_key_a_queued_job_lands_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job sent by the gateway's own Broker, through a real Redis: the list KEDA reads grows."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is needed (tests/services.py says how to get it)")
    port = _free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port, socket_timeout=5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        monkeypatch.setenv("BITSERVE_HOME", str(tmp_path))
        monkeypatch.setenv("CELERY_BROKER_URL", f"redis://127.0.0.1:{port}/0")
        monkeypatch.setenv("BITSERVE_TRAIN_QUEUE", CONFIG["BITSERVE_TRAIN_QUEUE"])
        list_name = KEDA_DOCS["ScaledObject"]["spec"]["triggers"][0]["metadata"]["listName"]
        broker = Broker(Settings())
        try:
            assert client.llen(list_name) == 0
            broker.send_finetune("job_a")
            broker.send_finetune("job_b")
            assert client.type(list_name) == b"list"
            assert client.llen(list_name) == 2
        finally:
            broker.close()
    finally:
        server.terminate()
        server.wait(timeout=10)
