"""A single-node Apache Kafka 4.x broker (KRaft) on loopback, for development and tests.

The broker's jars come from Maven Central (``flows/dev/pom.xml``, package data, resolved once
into the cache with ``mvn dependency:copy-dependencies``); storage is formatted with
``kafka.tools.StorageTool`` and the broker runs as ``java kafka.Kafka``. Needs only a
JDK 17+ and Maven. Every step is idempotent.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from flows.dev import service


def pom() -> bytes:
    """The broker's Maven POM, shipped inside the package (a wheel has no deploy/)."""
    return (files("flows.dev") / "pom.xml").read_bytes()


@dataclass(frozen=True)
class LocalKafka:
    home: Path = Path(os.environ.get("EMBEDSTREAM_KAFKA_HOME", Path.home() / ".cache/embedstream/kafka"))
    # Below Linux's ephemeral range (32768-60999): a port in it can be taken at any time
    # as the source port of some outgoing connection, and the broker then cannot bind.
    port: int = int(os.environ.get("EMBEDSTREAM_KAFKA_PORT", "29092"))
    controller_port: int = int(os.environ.get("EMBEDSTREAM_KAFKA_CONTROLLER_PORT", "29093"))

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def lib(self) -> Path:
        return self.home / "lib"

    @property
    def data(self) -> Path:
        return self.home / f"data-{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.home / f"broker-{self.port}.pid"

    @property
    def log_file(self) -> Path:
        return self.home / f"broker-{self.port}.log"

    # --- jars ------------------------------------------------------------------------------

    def ensure_jars(self) -> None:
        goal = ["dependency:copy-dependencies", "-DincludeScope=runtime"]
        service.fetch_with_maven(pom(), self.home, self.lib, goal, "the Kafka jars")

    def _java(self, *args: str, **kwargs) -> subprocess.Popen:
        java = shutil.which("java")
        if java is None:
            raise RuntimeError("a Java 17+ runtime (java) is needed to run the local broker")
        log4j = self.home / "log4j2.properties"
        if not log4j.exists():
            log4j.write_text(
                "rootLogger.level = WARN\nrootLogger.appenderRef.out.ref = out\n"
                "appender.out.type = Console\nappender.out.name = out\n"
                "appender.out.layout.type = PatternLayout\nappender.out.layout.pattern = [%d] %p %m (%c)%n\n"
                "logger.kafka.name = kafka.server.KafkaRaftServer\nlogger.kafka.level = INFO\n"
            )
        cmd = [
            java,
            "-Xms256m",
            "-Xmx1g",
            f"-Dlog4j2.configurationFile={log4j}",
            "-cp",
            str(self.lib / "*"),
            *args,
        ]
        # Run from our own directory: a broker that outlives its caller must not hold the
        # caller's working directory (a CI clone, say), which may be deleted under it.
        return subprocess.Popen(cmd, cwd=self.home, **kwargs)

    # --- lifecycle -------------------------------------------------------------------------

    def _write_config(self) -> Path:
        config = self.home / f"server-{self.port}.properties"
        config.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.bootstrap.servers=127.0.0.1:{self.controller_port}",
                    f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
                    f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
                    "controller.listener.names=CONTROLLER",
                    "inter.broker.listener.name=PLAINTEXT",
                    "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                    f"log.dirs={self.data}",
                    "num.partitions=1",
                    "offsets.topic.replication.factor=1",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "share.coordinator.state.topic.replication.factor=1",
                    "share.coordinator.state.topic.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    "auto.create.topics.enable=false",
                    "message.max.bytes=10485760",
                    "",
                ]
            )
        )
        return config

    def pid(self) -> int | None:
        return service.running_pid(self.pid_file)

    def ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                pass
        except OSError:
            return False
        from confluent_kafka.admin import AdminClient

        from flows.settings import CLIENT_LOG

        admin = AdminClient({"bootstrap.servers": self.bootstrap, "logger": CLIENT_LOG})
        try:
            admin.list_topics(timeout=2)
            return True
        except Exception:
            return False

    def start(self, timeout: float = 90) -> str:
        """Starts the broker unless it runs already; returns its bootstrap address."""
        self.home.mkdir(parents=True, exist_ok=True)
        if self.pid() and self.ready():
            return self.bootstrap
        self.ensure_jars()
        config = self._write_config()
        if not (self.data / "meta.properties").exists():
            cluster_id = base64_uuid()
            fmt = self._java(
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id,
                "-c",
                str(config),
                "--standalone",
                "--ignore-formatted",
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            out, _ = fmt.communicate(timeout=120)
            if fmt.returncode != 0:
                raise RuntimeError(f"formatting Kafka storage failed: {out.decode(errors='replace')}")
        with open(self.log_file, "ab") as log:
            proc = self._java(
                "kafka.Kafka", str(config), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.pid_file.write_text(str(proc.pid))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"Kafka exited with {proc.returncode}; see {self.log_file}")
            if self.ready():
                return self.bootstrap
            time.sleep(0.5)
        raise RuntimeError(f"Kafka did not become ready in {timeout:.0f} s; see {self.log_file}")

    def run_tool(self, main_class: str, *args: str, timeout: float = 120) -> str:
        """Runs one of Kafka's command-line tools (e.g. ``kafka.admin.ConfigCommand``)
        from the same jars; returns its output, raises with it on failure."""
        self.ensure_jars()
        proc = self._java(main_class, *args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = proc.communicate(timeout=timeout)
        text = out.decode(errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(f"{main_class} failed ({proc.returncode}): {text[-2000:]}")
        return text

    def stop(self, timeout: float = 30) -> bool:
        """Stops the broker; returns whether one was running."""
        return service.stop(self.pid_file, timeout)

    def status(self) -> str:
        pid = self.pid()
        if pid is None:
            return f"stopped (would listen on {self.bootstrap})"
        return f"running, pid {pid}, {self.bootstrap}, {'ready' if self.ready() else 'not ready'}"


def base64_uuid() -> str:
    """A Kafka cluster id: a random UUID in URL-safe base64 without padding, never
    starting with '-' (the storage tool would take it for an option), as Kafka's own
    ``Uuid.randomUuid()`` makes them."""
    import base64

    while True:
        found = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not found.startswith("-"):
            return found
