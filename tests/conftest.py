from __future__ import annotations

import sys
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def minilm():
    """The real default model (installed by `embedstream models pull`, which setup runs)."""
    import operators

    return operators.Embedder.load()


@pytest.fixture(scope="session")
def tiny_bert():
    import operators

    return operators.Embedder.load(DATA / "tiny-bert-cls")


@pytest.fixture(scope="session")
def kafka_bootstrap():
    """A real Kafka broker: $KAFKA_BOOTSTRAP_SERVERS, else the project's local KRaft broker,
    started here (and stopped afterwards if this session started it)."""
    import os

    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        return
    from flows.dev.kafka import LocalKafka

    broker = LocalKafka()
    was_running = broker.pid() is not None and broker.ready()
    yield broker.start()
    if not was_running:
        broker.stop()


@pytest.fixture(scope="session")
def schema_registry(tmp_path_factory):
    """A real schema registry with a Confluent-compatible API: the local Apicurio Registry
    of `embedstream registry`, on a port and in a data directory of this session. Tests
    may stop and start it; it is stopped afterwards."""
    from kafka_helpers import free_port

    from flows.dev.registry import LocalRegistry

    registry = LocalRegistry(port=free_port(), storage=tmp_path_factory.mktemp("registry"))
    registry.start()
    yield registry
    registry.stop()


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """A real PostgreSQL with pgvector: $EMBEDSTREAM_TEST_POSTGRES (a DSN), else the
    local server of `embedstream postgres`, in a data directory of this session."""
    import os

    if os.environ.get("EMBEDSTREAM_TEST_POSTGRES"):
        yield os.environ["EMBEDSTREAM_TEST_POSTGRES"]
        return
    from flows.dev import postgres as local_postgres

    os.environ["EMBEDSTREAM_POSTGRES_DIR"] = str(tmp_path_factory.mktemp("postgres") / "data")
    yield local_postgres.start()
    local_postgres.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible object store: SeaweedFS (``flows.dev.s3.LocalS3``) on loopback
    ports free now, in a data directory of this session, stopped afterwards. It has
    ``endpoint``, ``access_key``, ``secret_key``, ``region``, ``env()`` (the AWS_*
    variables), ``store_options()`` (for ``obstore.store.S3Store``) and
    ``create_bucket(name, versioned=True)``; tests may stop and start it."""
    from flows.dev.s3 import LocalS3, free_base_port

    server = LocalS3(port=free_base_port(), storage=tmp_path_factory.mktemp("s3"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """A real Google Cloud Storage emulator: fake-gcs-server (``flows.dev.gcs.LocalGCS``)
    on a free loopback port, stopped afterwards. ``service_account_key()`` points
    object_store at it; ``create_bucket`` and ``put`` seed it."""
    from kafka_helpers import free_port

    from flows.dev.gcs import LocalGCS

    server = LocalGCS(port=free_port(), storage=tmp_path_factory.mktemp("gcs"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def azurite(tmp_path_factory):
    """A real Azure Blob Storage emulator: Azurite (``flows.dev.azurite.LocalAzurite``,
    installed by deploy/dev.sh setup) on a free loopback port, stopped afterwards.
    ``options()`` points az:// URIs at it; ``create_container`` makes containers."""
    from kafka_helpers import free_port

    from flows.dev.azurite import LocalAzurite

    server = LocalAzurite(port=free_port(), storage=tmp_path_factory.mktemp("azurite"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh versioned bucket on ``s3_server``, for one test: its name."""
    import re
    import uuid

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    name = f"{name}-{uuid.uuid4().hex[:8]}"
    s3_server.create_bucket(name)
    return name


@pytest.fixture
def postgres_dsn(postgres_server):
    """A fresh database on the server, for one test."""
    import uuid

    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return postgres_server.replace("/postgres?", f"/{name}?", 1)


@pytest.fixture(params=["lancedb", "postgres"])
def store_url(request, tmp_path):
    """Each vector store, empty."""
    if request.param == "lancedb":
        return f"lancedb:{tmp_path / 'lance'}"
    return request.getfixturevalue("postgres_dsn")


@pytest.fixture
def forced_kernels(monkeypatch):
    """Sets EMBEDSTREAM_CPU_KERNELS for the test; afterwards a load puts auto back."""
    from operators import Embedder

    yield lambda path: monkeypatch.setenv("EMBEDSTREAM_CPU_KERNELS", path)
    monkeypatch.delenv("EMBEDSTREAM_CPU_KERNELS", raising=False)
    Embedder.load(str(DATA / "tiny-bert-cls"))
