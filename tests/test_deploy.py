"""No cluster runs here: the manifests are validated against the Kubernetes and KEDA
schemas (``kubernetes-validate``'s bundled schemas; KEDA's CRDs from its release on the
Go module proxy, in ``tests/data/k8s``), and their wiring and policies are checked."""

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


#: What each probe asks: liveness the batch loop's progress, readiness the rest.
PROBES = {"livenessProbe": "/healthz", "readinessProbe": "/readyz"}


def test_probes_target_the_health_endpoints(sts):
    from flows.settings import Settings

    config = load("configmap.yaml")["data"]
    ports = {p["name"]: p["containerPort"] for p in container(sts)["ports"]}
    assert ports["metrics"] == int(config["EMBEDSTREAM_METRICS_PORT"])
    for name, pod in worker_pods().items():
        [c] = pod["spec"]["containers"]
        for probe, path in PROBES.items():
            assert c[probe]["httpGet"] == {"path": path, "port": "metrics"}, (name, probe)
    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == config["EMBEDSTREAM_METRICS_PORT"]
    # Probes come from outside the pod: the endpoints listen on every interface there,
    # on the loopback only for a local run.
    assert Settings.from_env(config).metrics_host == "0.0.0.0"
    assert Settings.from_env({}).metrics_host == "127.0.0.1"


def test_config_and_secrets_reach_the_worker(sts):
    from flows.settings import Settings

    refs = container(sts)["envFrom"]
    config, secret = load("configmap.yaml"), load("secret.example.yaml")
    assert {"configMapRef": {"name": config["metadata"]["name"]}} in refs
    assert {"secretRef": {"name": secret["metadata"]["name"]}} in refs
    assert all(k.startswith("EMBEDSTREAM_") for k in config["data"])
    assert all(k.startswith(("EMBEDSTREAM_", "KEDA_")) for k in secret["stringData"])
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
    mounts = {m["mountPath"]: m["name"] for m in container(sts)["volumeMounts"]}
    name = mounts[env(sts)["EMBEDSTREAM_RECOVERY_DIR"]]
    assert volumes[name]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 60  # room to drain


def test_manifests_run_the_image_the_tooling_builds(sts):
    from flows.dev.containers import image_name

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
    assert re.search(r"^HEALTHCHECK .*?/healthz", dockerfile, re.M | re.S)
    assert re.search(r"^\s*EMBEDSTREAM_METRICS_HOST=0\.0\.0\.0\b", dockerfile, re.M)
    dashboard = json.loads((DEPLOY / "grafana" / "embedstream.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    from flows import metrics

    for metric in (
        metrics.EVENTS,
        metrics.DEAD_LETTERS,
        metrics.TOKENS,
        metrics.CHUNKS_REUSED,
        metrics.CONSUMER_LAG,
        metrics.ASSIGNED_PARTITIONS,
        metrics.REBALANCES,
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
    for probe, path in PROBES.items():
        assert worker[probe]["httpGet"] == {"path": path, "port": "metrics"}
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


# --- schemas, hardening, network policies, autoscaling ------------------------------------

#: The oldest and newest Kubernetes minor versions the manifests are checked against.
K8S_VERSIONS = ("1.30", "1.37")
KEDA_CRDS = Path(__file__).resolve().parent / "data" / "k8s" / "keda-v2.21.0"


def all_manifests() -> list[tuple[str, dict]]:
    found = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        found += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def _closed(schema):
    """An OpenAPI schema of a CRD, closed as the API server's pruning makes it: a field
    it does not declare is an error here instead of silently dropped."""
    if isinstance(schema, dict):
        schema = {k: _closed(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    return schema


def keda_validator(kind: str):
    import jsonschema

    for path in KEDA_CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            [version] = [v for v in crd["spec"]["versions"] if v["served"]]
            schema = _closed(version["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = {"type": "object"}
            return jsonschema.Draft7Validator(schema), f"{crd['spec']['group']}/{version['name']}"
    raise AssertionError(f"no KEDA CRD for {kind}")


def validate(doc: dict, k8s_version: str) -> None:
    """Raises a jsonschema ValidationError if ``doc`` does not fit its schema."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    if doc["apiVersion"].startswith("keda.sh/"):
        validator, api_version = keda_validator(doc["kind"])
        assert doc["apiVersion"] == api_version
        validator.validate(doc)
    else:
        kubernetes_validate.validate(doc, k8s_version, strict=True)


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_every_manifest_fits_the_kubernetes_and_keda_schemas(k8s_version):
    manifests = all_manifests()
    kinds = {doc["kind"] for _, doc in manifests}
    assert {"StatefulSet", "Deployment", "ScaledObject", "TriggerAuthentication", "NetworkPolicy"} <= kinds
    for name, doc in manifests:
        try:
            validate(doc, k8s_version)
        except Exception as e:
            raise AssertionError(f"{name}: {doc['kind']} {doc['metadata']['name']}: {e}") from None


@pytest.mark.parametrize(
    "name, kind, path, value",
    [
        (
            "deployment.yaml",
            "Deployment",
            "spec.template.spec.containers.0.securityContext.readOnlyRootFileSystem",
            True,
        ),
        ("statefulset.yaml", "StatefulSet", "spec.template.spec.securityContext.seccompProfile.type", 1),
        ("networkpolicy.yaml", "NetworkPolicy", "spec.ingress.0.ports.0.protocol", ["TCP"]),
        ("keda-scaledobject.yaml", "ScaledObject", "spec.maxReplicaCount", "eight"),
        ("keda-scaledobject.yaml", "ScaledObject", "spec.triggers.0.lagThreshold", "2000"),
        ("keda-scaledobject.yaml", "TriggerAuthentication", "spec.secretTargetRef.0.secret", "x"),
    ],
)
def test_the_schemas_catch_a_broken_manifest(name, kind, path, value):
    import copy

    import jsonschema

    doc = next(d for n, d in all_manifests() if n == name and d["kind"] == kind)
    broken = copy.deepcopy(doc)
    *parents, leaf = path.split(".")
    node = broken
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[leaf] = value
    validate(doc, K8S_VERSIONS[-1])
    with pytest.raises(jsonschema.ValidationError):
        validate(broken, K8S_VERSIONS[-1])


def all_pods() -> dict[str, dict]:
    """Pod templates of every workload: the two kinds of worker, the sink and serve."""
    return {
        f"{name}/{doc['metadata']['name']}": doc["spec"]["template"]
        for name, doc in all_manifests()
        if doc["kind"] in ("Deployment", "StatefulSet")
    }


def worker_pods() -> dict[str, dict]:
    """Pod templates of the workloads of the stream: the two kinds of worker and the sink."""
    return {name: pod for name, pod in all_pods().items() if not name.startswith("serve-")}


def test_every_container_is_locked_down():
    pods = all_pods()
    assert len(pods) == 4
    for name, pod in pods.items():
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in spec["containers"]:
            ctx = c["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True, name
            assert ctx["allowPrivilegeEscalation"] is False and ctx["privileged"] is False, name
            assert ctx["capabilities"] == {"drop": ["ALL"]}, name
            assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, name
            # Writable only where a volume is mounted: /tmp always, scratch or a claim.
            mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
            assert "emptyDir" in mounts["/tmp"], name
            assert all("emptyDir" in v or "persistentVolumeClaim" in v for v in mounts.values()), name


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _peer_matches(peer: dict, labels: dict, namespace: str, own_namespace: str) -> bool:
    ns_labels = {"kubernetes.io/metadata.name": namespace}
    if "namespaceSelector" in peer:
        if not _matches(peer["namespaceSelector"], ns_labels):
            return False
    elif namespace != own_namespace:
        return False  # a bare podSelector means the policy's own namespace
    return _matches(peer.get("podSelector", {}), labels)


def admits(policies, direction: str, pod: dict, peer: dict, peer_namespace: str, port: int, protocol="TCP"):
    """What Kubernetes NetworkPolicy semantics say about one connection: ``pod`` (labels,
    in namespace "apps") receives from (Ingress) or opens to (Egress) ``peer``."""
    selecting = [
        p["spec"]
        for p in policies
        if direction in p["spec"]["policyTypes"] and _matches(p["spec"]["podSelector"], pod)
    ]
    if not selecting:
        return True  # not isolated in this direction
    for spec in selecting:
        for rule in spec.get(direction.lower(), []):
            peers = rule.get("from" if direction == "Ingress" else "to")
            ports = rule.get("ports")
            port_ok = ports is None or any(
                p.get("port") == port and p.get("protocol", "TCP") == protocol for p in ports
            )
            peer_ok = peers is None or any(_peer_matches(x, peer, peer_namespace, "apps") for x in peers)
            if port_ok and peer_ok:
                return True
    return False


def test_network_policies_admit_only_the_cluster_peers_monitoring_brokers_and_dns():
    policies = [doc for _, doc in all_manifests() if doc["kind"] == "NetworkPolicy"]
    pods = {
        doc["kind"]: doc["spec"]["template"]["metadata"]["labels"]
        for _, doc in all_manifests()
        if doc["kind"] in ("Deployment", "StatefulSet")
        and doc["metadata"]["name"] not in ("embedstream-sink", "embedstream-serve")
    }
    cluster, group = pods["StatefulSet"], pods["Deployment"]
    stranger = {"app": "something-else"}
    dns = {"k8s-app": "kube-dns"}
    cluster_port = next(
        p["containerPort"] for p in container(load("statefulset.yaml"))["ports"] if p["name"] == "cluster"
    )
    metrics_port = int(load("configmap.yaml")["data"]["EMBEDSTREAM_METRICS_PORT"])
    broker_port = int(load("configmap.yaml")["data"]["EMBEDSTREAM_BROKERS"].rsplit(":", 1)[1])
    broker_ns = load("configmap.yaml")["data"]["EMBEDSTREAM_BROKERS"].split(".")[1]

    # The cluster port: only the StatefulSet's own pods, in and out.
    assert admits(policies, "Ingress", cluster, cluster, "apps", cluster_port)
    assert admits(policies, "Egress", cluster, cluster, "apps", cluster_port)
    for who, ns in ((group, "apps"), (stranger, "apps"), (cluster, "other"), (stranger, "monitoring")):
        assert not admits(policies, "Ingress", cluster, who, ns, cluster_port), (who, ns)
    assert not admits(policies, "Egress", group, cluster, "apps", cluster_port)
    assert not admits(policies, "Ingress", group, group, "apps", cluster_port)
    # Metrics: the monitoring namespace only, for both kinds of worker.
    for pod in (cluster, group):
        assert admits(policies, "Ingress", pod, stranger, "monitoring", metrics_port)
        assert not admits(policies, "Ingress", pod, stranger, "apps", metrics_port)
        assert not admits(policies, "Ingress", pod, stranger, "default", metrics_port)
        assert not admits(policies, "Ingress", pod, stranger, "monitoring", 22)
        # Egress: the brokers and the DNS, nothing else.
        assert admits(policies, "Egress", pod, stranger, broker_ns, broker_port)
        assert admits(policies, "Egress", pod, dns, "kube-system", 53, "UDP")
        assert admits(policies, "Egress", pod, dns, "kube-system", 53, "TCP")
        assert not admits(policies, "Egress", pod, stranger, broker_ns, 22)
        assert not admits(policies, "Egress", pod, stranger, "kube-system", 53, "UDP")
        assert not admits(policies, "Egress", pod, stranger, "default", 443)
        assert not admits(policies, "Egress", pod, stranger, "apps", metrics_port)


def test_keda_scales_the_group_workers_on_their_groups_lag():
    from flows.settings import Settings

    scaled = next(doc for _, doc in all_manifests() if doc["kind"] == "ScaledObject")
    auth = next(doc for _, doc in all_manifests() if doc["kind"] == "TriggerAuthentication")
    deployment = load("deployment.yaml")
    config = load("configmap.yaml")["data"]
    secret = load("secret.example.yaml")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["topic"] == config["EMBEDSTREAM_INPUT_TOPIC"]
    assert meta["consumerGroup"] == config["EMBEDSTREAM_GROUP_ID"]
    assert meta["bootstrapServers"] == config["EMBEDSTREAM_BROKERS"]
    assert meta["allowIdleConsumers"] == "false"  # never more members than partitions
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    keda_sasl = {"plaintext": "PLAIN", "scram_sha256": "SCRAM-SHA-256", "scram_sha512": "SCRAM-SHA-512"}
    assert keda_sasl[secret["stringData"]["KEDA_KAFKA_SASL"]] == config["EMBEDSTREAM_KAFKA_SASL_MECHANISM"]
    # The Deployment runs group mode, the StatefulSet cluster mode, from the same settings.
    [worker] = deployment["spec"]["template"]["spec"]["containers"]
    [cluster_worker] = load("statefulset.yaml")["spec"]["template"]["spec"]["containers"]
    assert (worker["image"], worker["args"], worker["envFrom"]) == (
        cluster_worker["image"],
        cluster_worker["args"],
        cluster_worker["envFrom"],
    )
    group_env = {e["name"]: e["value"] for e in worker["env"]}
    assert Settings.from_env({**config, **group_env}).scaling_mode() == "group"
    cluster_env = {e["name"]: e.get("value") for e in cluster_worker["env"] if "value" in e}
    settings = Settings.from_env({**config, **cluster_env})
    assert settings.scaling_mode() == "cluster" and settings.recovery_dir
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 60  # room to drain


def test_workers_reach_object_stores_through_their_service_account_and_port_443_only():
    """Cloud credentials come from the service account's identity (IRSA, GKE or AKS
    workload identity), never from keys in a Secret or the ConfigMap; object stores are
    reachable on 443 at public addresses, the instance metadata service and private
    addresses are not."""
    import ipaddress

    account = load("serviceaccount.yaml")
    assert account["kind"] == "ServiceAccount" and account["automountServiceAccountToken"] is False
    assert {"eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account"} <= set(
        account["metadata"]["annotations"]
    )
    for name, pod in worker_pods().items():
        if "sink" in name:
            assert "serviceAccountName" not in pod["spec"], name  # the sink reads no object store
            continue
        assert pod["spec"]["serviceAccountName"] == account["metadata"]["name"], name
        assert pod["metadata"]["labels"]["azure.workload.identity/use"] == "true", name
    keys = re.compile(
        r"^(AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN)|GOOGLE_APPLICATION_CREDENTIALS|"
        r"AZURE_(STORAGE_ACCOUNT_KEY|STORAGE_SAS_KEY|CLIENT_SECRET))$"
    )
    for name, doc in all_manifests():
        for data in (doc.get("data") or {}, doc.get("stringData") or {}):
            assert not [k for k in data if keys.match(k)], name
            assert not re.search(r"aws_secret|account_key|sas_key|client_secret", json.dumps(data), re.I), (
                name
            )

    policies = [doc for _, doc in all_manifests() if doc["kind"] == "NetworkPolicy"]
    worker = worker_pods()["deployment.yaml/embedstream-worker"]["metadata"]["labels"]

    def egress_to(address: str, port: int) -> bool:
        ip = ipaddress.ip_address(address)
        for p in policies:
            spec = p["spec"]
            if "Egress" not in spec["policyTypes"] or not _matches(spec["podSelector"], worker):
                continue
            for rule in spec.get("egress", []):
                if not any(x.get("port") == port for x in rule.get("ports", [])):
                    continue
                for peer in rule.get("to", []):
                    block = peer.get("ipBlock")
                    if block and ip.version == ipaddress.ip_network(block["cidr"]).version:
                        inside = ip in ipaddress.ip_network(block["cidr"])
                        if inside and not any(ip in ipaddress.ip_network(e) for e in block.get("except", [])):
                            return True
        return False

    for public in ("52.216.8.16", "142.250.74.27", "20.60.10.4", "2600:1f18::1"):
        assert egress_to(public, 443), public
        assert not egress_to(public, 80), public
    for private in (
        "169.254.169.254",
        "10.0.0.7",
        "172.20.0.1",
        "192.168.1.1",
        "127.0.0.1",
        "fd00::1",
        "::1",
    ):
        assert not egress_to(private, 443) and not egress_to(private, 80), private


def test_serve_runs_the_image_probed_and_reached_only_by_labelled_clients():
    from flows.cli import build_parser

    deployment, service = load("serve-deployment.yaml"), load("serve-service.yaml")
    pod = deployment["spec"]["template"]
    [c] = pod["spec"]["containers"]
    # The worker image with the command overridden, and flags the command line takes.
    assert c["image"] == container(load("statefulset.yaml"))["image"]
    args = build_parser().parse_args(c["args"])
    assert args.command == "serve" and args.serve_host == "0.0.0.0"
    port = {p["name"]: p["containerPort"] for p in c["ports"]}["http"]
    assert args.serve_port == port
    assert (
        c["startupProbe"]["httpGet"] == c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    )
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    secrets = {ref["secretRef"]["name"] for ref in c["envFrom"] if "secretRef" in ref}
    assert {"embedstream-store", "embedstream-serve"} <= secrets
    key = load("serve-secret.example.yaml")
    assert key["metadata"]["name"] == "embedstream-serve" and set(key["stringData"]) == {
        "EMBEDSTREAM_SERVE_API_KEY"
    }
    # Room to drain: the preStop pause, then the requests in flight.
    timeout = float({e["name"]: e["value"] for e in c["env"]}["EMBEDSTREAM_SERVE_TIMEOUT_S"])
    assert pod["spec"]["terminationGracePeriodSeconds"] >= timeout + 5 + 5
    # The Service reaches these pods on that port.
    assert (
        service["spec"]["selector"]
        == deployment["spec"]["selector"]["matchLabels"]
        == pod["metadata"]["labels"]
    )
    [svc_port] = service["spec"]["ports"]
    assert svc_port["targetPort"] == "http" and svc_port["port"] == port

    # Only labelled clients (any namespace) and the monitoring namespace reach it, on that port only.
    policies = [doc for _, doc in all_manifests() if doc["kind"] == "NetworkPolicy"]
    labels = pod["metadata"]["labels"]
    client = {"embedstream.io/serve-client": "true", "app": "rag-backend"}
    stranger = {"app": "rag-backend"}
    assert admits(policies, "Ingress", labels, client, "apps", port)
    assert admits(policies, "Ingress", labels, client, "other-team", port)
    assert admits(policies, "Ingress", labels, stranger, "monitoring", port)
    assert not admits(policies, "Ingress", labels, stranger, "apps", port)
    assert not admits(
        policies, "Ingress", labels, {**client, "embedstream.io/serve-client": "yes"}, "apps", port
    )
    assert not admits(policies, "Ingress", labels, client, "apps", 22)
    # Out: the store and the DNS only; the workers' policies do not select it, nor its policies them.
    dsn = load("store-secret.example.yaml")["stringData"]["EMBEDSTREAM_STORE"]
    db_host, db_port = dsn.rsplit("@", 1)[1].split("/", 1)[0].split(":")
    assert admits(policies, "Egress", labels, stranger, db_host.split(".")[1], int(db_port))
    assert admits(policies, "Egress", labels, {"k8s-app": "kube-dns"}, "kube-system", 53, "UDP")
    assert not admits(policies, "Egress", labels, stranger, "kafka", 9093)
    assert not admits(policies, "Egress", labels, stranger, "default", 443)
    worker = worker_pods()["deployment.yaml/embedstream-worker"]["metadata"]["labels"]
    assert not admits(policies, "Ingress", worker, client, "apps", port)
