"""Test helpers for the real-Kafka tests: unique topics, producing events, running the
flow as the `embedstream run` command, and reading what it wrote."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from confluent_kafka import Consumer, Producer

from operators import codecs
from operators.config import Settings
from operators.topics import create


@dataclass
class FlowTopics:
    bootstrap: str
    partitions: int = 1
    prefix: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:10]}")

    def __post_init__(self) -> None:
        settings = Settings(brokers=self.bootstrap)
        for name in (self.input, self.output, self.dlq):
            create(settings, name, self.partitions)

    @property
    def input(self) -> str:
        return f"{self.prefix}.documents"

    @property
    def output(self) -> str:
        return f"{self.prefix}.vectors"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}.dlq"

    def produce(self, messages: list[tuple[Optional[bytes], bytes]], partition: Optional[int] = None) -> None:
        producer = Producer({"bootstrap.servers": self.bootstrap, "enable.idempotence": "true"})
        for key, value in messages:
            kwargs = {"partition": partition} if partition is not None else {}
            producer.produce(self.input, value, key, **kwargs)
        assert producer.flush(30) == 0

    def run(
        self,
        *args: str,
        env: Optional[dict[str, str]] = None,
        output: Optional[str] = None,
        timeout: float = 240,
    ) -> subprocess.CompletedProcess:
        cmd = [
            sys.executable,
            "-m",
            "operators.cli",
            "run",
            "--until-end",
            "--epoch-s",
            "1",
            "--brokers",
            self.bootstrap,
            "--input-topic",
            self.input,
            "--output-topic",
            output or self.output,
            "--dlq-topic",
            self.dlq,
            *args,
        ]
        result = subprocess.run(
            cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    def read(self, topic: str, timeout: float = 3.0) -> list[tuple[str, dict[str, Any], Any]]:
        """Every message of the topic, in partition order: (type, record, raw message)."""
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": uuid.uuid4().hex,
                "auto.offset.reset": "earliest",
                "enable.auto.commit": "false",
            }
        )
        consumer.subscribe([topic])
        found = []
        try:
            while True:
                msg = consumer.poll(timeout)
                if msg is None:
                    break
                assert msg.error() is None, msg.error()
                kind, record = codecs.decode_output(msg.value())
                assert dict(msg.headers() or [])[codecs.TYPE_HEADER].decode() == kind
                found.append((kind, record, msg))
        finally:
            consumer.close()
        return sorted(found, key=lambda f: (f[2].partition(), f[2].offset()))


def avro_event(
    doc_id: str,
    *,
    content: Optional[bytes] = None,
    op: str = "UPSERT",
    uri: Optional[str] = None,
    filename: Optional[str] = None,
    metadata: Optional[dict[str, str]] = None,
    mime_type: Optional[str] = None,
) -> bytes:
    return codecs.encode_single_object(
        "DocumentEvent",
        {
            "doc_id": doc_id,
            "op": op,
            "content": content,
            "uri": uri,
            "mime_type": mime_type,
            "filename": filename,
            "metadata": metadata or {},
            "event_time": 1_700_000_000_000,
        },
    )
