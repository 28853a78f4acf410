"""No cluster runs here: the manifests are parsed and their wiring checked."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / "k8s" / name).read_text())


@pytest.fixture(scope="module")
def sts():
    return load("statefulset.yaml")


def container(sts) -> dict:
    [c] = sts["spec"]["template"]["spec"]["containers"]
    return c


def env(sts) -> dict:
    return {e["name"]: e.get("value") for e in container(sts)["env"]}


def test_cluster_addressing_is_consistent(sts):
    from flows.settings import Settings

    service = load("service.yaml")
    assert service["spec"]["clusterIP"] == "None"  # headless: per-pod DNS names
    assert sts["spec"]["serviceName"] == service["metadata"]["name"] == env(sts)["EMBEDSTREAM_SERVICE"]
    assert int(env(sts)["EMBEDSTREAM_REPLICAS"]) == sts["spec"]["replicas"]
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert service["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    pod_env = container(sts)["env"][0]
    assert pod_env["name"] == "POD_NAME" and pod_env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    ports = {p["name"]: p["containerPort"] for p in container(sts)["ports"]}
    assert ports["cluster"] == int(env(sts)["EMBEDSTREAM_CLUSTER_PORT"])
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["cluster"] == ports["cluster"]
    # What a pod derives from that wiring: its ordinal and every peer's stable name.
    settings = Settings.from_env({k: v for k, v in env(sts).items() if v is not None})
    name = sts["metadata"]["name"]
    process_id, addresses = settings.cluster(f"{name}-1")
    assert process_id == 1
    assert addresses == [
        f"{name}-{i}.{service['metadata']['name']}:{ports['cluster']}" for i in range(sts["spec"]["replicas"])
    ]


def test_probes_target_the_metrics_endpoint(sts):
    config = load("configmap.yaml")["data"]
    ports = {p["name"]: p["containerPort"] for p in container(sts)["ports"]}
    assert ports["metrics"] == int(config["EMBEDSTREAM_METRICS_PORT"])
    for probe in ("livenessProbe", "readinessProbe"):
        get = container(sts)[probe]["httpGet"]
        assert (get["path"], get["port"]) == ("/metrics", "metrics")
    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == config["EMBEDSTREAM_METRICS_PORT"]


def test_config_and_secrets_reach_the_worker(sts):
    from flows.settings import Settings

    refs = container(sts)["envFrom"]
    config, secret = load("configmap.yaml"), load("secret.example.yaml")
    assert {"configMapRef": {"name": config["metadata"]["name"]}} in refs
    assert {"secretRef": {"name": secret["metadata"]["name"]}} in refs
    assert all(k.startswith("EMBEDSTREAM_") for k in [*config["data"], *secret["stringData"]])
    assert not any(re.search("password|secret", k, re.I) for k in config["data"]), (
        "secrets belong in the Secret"
    )
    settings = Settings.from_env({**config["data"], **secret["stringData"]})  # every value parses
    assert settings.kafka["sasl.password"] == "change-me"
    assert "change-me" not in json.dumps(settings.redacted())


def test_recovery_store_is_shared_and_mounted(sts):
    pvc = load("recovery-pvc.yaml")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # survives a reschedule to another node
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container(sts)["volumeMounts"]}
    [(name, path)] = mounts.items()
    assert volumes[name]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert path == load("configmap.yaml")["data"]["EMBEDSTREAM_RECOVERY_DIR"]
    assert sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 60  # room to drain


def test_manifests_run_the_image_the_tooling_builds(sts):
    from flows.containers import image_name

    [worker] = sts["spec"]["template"]["spec"]["containers"]
    assert worker["image"] == image_name(registry="")
    # The Dockerfile's entrypoint with the manifests' arguments is `embedstream run`.
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["embedstream"\]$', dockerfile, re.M) and worker["args"] == ["run"]
    # The user the image runs as is the one the pod's security context asks for.
    user = re.search(r"^USER (\d+)$", dockerfile, re.M).group(1)
    assert int(user) == sts["spec"]["template"]["spec"]["securityContext"]["runAsUser"]


def test_image_recipe_and_dashboard():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "--no-index --find-links /tmp/wheels embedstream" in dockerfile  # no network at build time
    assert re.search(r"^HEALTHCHECK .*?/metrics", dockerfile, re.M | re.S)
    dashboard = json.loads((DEPLOY / "grafana" / "embedstream.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    from flows import metrics

    for metric in (
        metrics.EVENTS,
        metrics.DEAD_LETTERS,
        metrics.TOKENS,
        metrics.CHUNKS_REUSED,
        metrics.CONSUMER_LAG,
        metrics.STAGE_SECONDS,
        metrics.END_TO_END_SECONDS,
    ):
        assert metric._name in exprs, metric._name


def test_the_sink_runs_alone_with_its_store_secret_and_metrics():
    from flows.cli import build_parser
    from flows.settings import Settings, redact_url

    sink = load("sink-deployment.yaml")
    assert sink["spec"]["replicas"] == 1 and sink["spec"]["strategy"]["type"] == "Recreate"
    [worker] = sink["spec"]["template"]["spec"]["containers"]
    args = build_parser().parse_args(worker["args"])  # the CLI takes exactly these arguments
    assert args.command == "sink"
    ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
    assert ports["metrics"] == args.metrics_port
    assert sink["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(args.metrics_port)
    for probe in ("livenessProbe", "readinessProbe"):
        assert worker[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    secret = load("store-secret.example.yaml")
    assert {"secretRef": {"name": secret["metadata"]["name"]}} in worker["envFrom"]
    env = {e["name"]: e["value"] for e in worker["env"]}
    settings = Settings.from_env(
        {
            **load("configmap.yaml")["data"],
            **load("secret.example.yaml")["stringData"],
            **secret["stringData"],
            **env,
        }
    )
    assert settings.store.startswith("postgresql://") and settings.sink_group_id == "embedstream-sink"
    assert "change-me" not in json.dumps(settings.sink_view()) and "change-me" not in redact_url(
        settings.store
    )
