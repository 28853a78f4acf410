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
    from flows.kafka.local import LocalKafka

    broker = LocalKafka()
    was_running = broker.pid() is not None and broker.ready()
    yield broker.start()
    if not was_running:
        broker.stop()
