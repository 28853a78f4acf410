"""The worker image and the testcontainers variant on a real container engine: Docker
where one answers, else podman as flows.dev.containers sets it up. The tests install
nothing (`make setup` does, as root); they skip, with the reason, where no engine runs
or the local base images cannot be made."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from kafka_helpers import FlowTopics, avro_event, count, free_port, wait_for

from flows.dev.containers import LOCAL_JRE_BASE, LOCAL_PYTHON_BASE, ContainerError, Engine, image_name

SAMPLES = Path(__file__).resolve().parent.parent / "flows" / "samples"
TEXT_SAMPLES = ["faq.html", "guide.md", "notes.txt", "onboarding.docx", "report.pdf"]


@pytest.fixture(scope="module")
def engine() -> Engine:
    """The engine as the machine has it: tests install nothing (`make setup` does)."""
    try:
        engine = Engine.find()
    except ContainerError as e:
        pytest.skip(f"no container engine can run here: {e}")
    bases = [b for b in (LOCAL_PYTHON_BASE, LOCAL_JRE_BASE) if not engine.has_image(b)]
    if bases and shutil.which("mmdebstrap") is None:
        pytest.skip(f"mmdebstrap is not installed (`make setup` installs it), and {bases} need it")
    return engine


@pytest.fixture(scope="module")
def worker_image(engine) -> str:
    # The locally made Debian base: no image registry is reachable here.
    started = time.monotonic()
    name = engine.build_worker(
        Path(os.environ["EMBEDSTREAM_WHEEL"]) if "EMBEDSTREAM_WHEEL" in os.environ else None, local_base=True
    )
    print(f"worker image {name} built in {time.monotonic() - started:.0f} s")
    return name


def test_image_name_scheme(monkeypatch):
    from importlib.metadata import version

    assert image_name() == f"embedstream:{version('embedstream')}"
    monkeypatch.setenv("EMBEDSTREAM_IMAGE_REGISTRY", "registry.example.com/data/")
    assert image_name() == f"registry.example.com/data/embedstream:{version('embedstream')}"


def test_worker_image_runs_the_flow_healthy_and_drains_on_sigterm(
    engine, worker_image, kafka_bootstrap, minilm
):
    topics = FlowTopics(kafka_bootstrap, partitions=2)
    topics.produce(
        [(n.encode(), avro_event(n, content=(SAMPLES / n).read_bytes(), filename=n)) for n in TEXT_SAMPLES]
    )
    late = [f"late-{i}" for i in range(20)]
    name = f"embedstream-test-{uuid.uuid4().hex[:8]}"
    port = free_port()
    args = ["--brokers", kafka_bootstrap, "--input-topic", topics.input, "--output-topic", topics.output]
    args += ["--dlq-topic", topics.dlq, "--from", "beginning", "--group-id", topics.group]
    # The host's network: the local broker listens on loopback. The metrics port by
    # variable, as the manifests set it: the image's health check reads it too. Locked
    # down as the Deployment's security context asks.
    engine.run(
        "run",
        "-d",
        "--name",
        name,
        "--network",
        "host",
        "-e",
        f"EMBEDSTREAM_METRICS_PORT={port}",
        *hardening_flags(),
        worker_image,
        "run",
        *args,
    )
    try:
        assert engine.run("inspect", "--format", "{{.Config.User}}", name).stdout.strip() == "10001"
        assert (
            engine.run("inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", name).stdout.strip() == "true"
        )
        assert wait_for(
            lambda: count(topics) >= 1 and engine.health(name) == "healthy", timeout=300, every=2
        ), engine.run("logs", name, check=False).stderr[-3000:]
        assert wait_for(lambda: _embedded(topics) == set(TEXT_SAMPLES), timeout=300, every=2)
        # The records are what the flow computes here: same chunks, same vectors.
        records = [r for kind, r, _ in topics.read(topics.output) if kind == "VectorRecord"]
        assert {r["model_id"] for r in records} == {minilm.model_id}
        assert {r["model_revision"] for r in records} == {minilm.model_revision}
        vectors = minilm.embed([r["text"] for r in records])
        cosine = np.sum(vectors * np.array([r["embedding"] for r in records]), axis=1)
        assert cosine.min() >= 0.9999
        # More events, then SIGTERM at once: the worker drains and exits 0.
        topics.produce(
            [(f"late-{i}".encode(), avro_event(f"late-{i}", content=b"late " * 50)) for i in range(20)]
        )
        engine.run("stop", "--time", "120", name, timeout=240)
        assert engine.exit_code(name) == 0, engine.run("logs", name, check=False).stderr[-3000:]
    finally:
        engine.run("rm", "-f", name, check=False)
    # Nothing lost: a worker resuming from the committed offsets accounts for every event.
    topics.run()
    assert _embedded(topics) == set(TEXT_SAMPLES) | set(late)


def hardening_flags() -> list[str]:
    """The Deployment's container security context as engine flags: a read-only root
    with its emptyDir volumes as the only writable paths, no capabilities, no privilege
    escalation, the engine's default seccomp profile."""
    import yaml

    manifest = yaml.safe_load(
        (Path(__file__).resolve().parent.parent / "deploy/k8s/deployment.yaml").read_text()
    )
    pod = manifest["spec"]["template"]["spec"]
    [worker] = pod["containers"]
    ctx = worker["securityContext"]
    assert ctx["seccompProfile"]["type"] == "RuntimeDefault"  # the engine's default profile
    flags = ["--user", str(pod["securityContext"]["runAsUser"])]
    if ctx["readOnlyRootFilesystem"]:
        flags.append("--read-only")
    if not ctx["allowPrivilegeEscalation"]:
        flags += ["--security-opt", "no-new-privileges"]
    flags += [f"--cap-drop={c}" for c in ctx["capabilities"]["drop"]]
    scratch = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    flags += [f"--tmpfs={m['mountPath']}" for m in worker["volumeMounts"] if m["name"] in scratch]
    return flags


def _embedded(topics: FlowTopics) -> set[str]:
    return {r["doc_id"] for kind, r, _ in topics.read(topics.output) if kind == "VectorRecord"}


def test_testcontainers_kafka_variant(engine, monkeypatch):
    """The flow against a broker that testcontainers starts through the engine's Docker
    API (podman's, here), from an image built locally from the Maven-resolved jars."""
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.wait_strategies import LogMessageWaitStrategy

    image = engine.build_kafka()
    monkeypatch.setenv("DOCKER_HOST", engine.docker_host())
    monkeypatch.setenv("TESTCONTAINERS_RYUK_DISABLED", "true")  # its reaper image cannot be pulled
    port = free_port()
    kafka = (
        DockerContainer(image)
        .with_env("KAFKA_PORT", str(port))
        .with_bind_ports(port, port)
        .waiting_for(LogMessageWaitStrategy("Kafka Server started").with_startup_timeout(180))
    )
    with kafka:
        topics = FlowTopics(f"127.0.0.1:{port}")
        topics.produce([(b"d", avro_event("d", content=b"Hello from a container.", filename="d.txt"))])
        topics.run()
        assert [(kind, r["doc_id"]) for kind, r, _ in topics.read(topics.output)] == [
            ("VectorRecord", "d"),
            ("DocManifest", "d"),
        ]
