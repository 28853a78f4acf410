"""A local schema registry with a Confluent-compatible API, for development and tests:
Apicurio Registry on loopback, its API under ``/apis/ccompat/v7``.

The application is the Quarkus build that the Apicurio project publishes on Maven Central
(``flows/dev/registry-pom.xml``, unpacked once into the cache with ``mvn
dependency:unpack-dependencies``); it runs as ``java -jar quarkus-run.jar`` with H2 storage
in a file, so schema ids survive a restart. Needs Maven and a JDK 21+ (Apicurio is built for
Java 21). Every step is idempotent.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Optional

from flows.dev import service

#: The oldest Java that runs Apicurio Registry 3.
JAVA_RELEASE = 21


def pom() -> bytes:
    """The registry's Maven POM, shipped inside the package (a wheel has no deploy/)."""
    return (files("flows.dev") / "registry-pom.xml").read_bytes()


@dataclass(frozen=True)
class LocalRegistry:
    home: Path = Path(
        os.environ.get("EMBEDSTREAM_REGISTRY_HOME", Path.home() / ".cache/embedstream/registry")
    )
    port: int = int(os.environ.get("EMBEDSTREAM_REGISTRY_PORT", "38081"))
    #: Where its H2 database lives (default: ``data-PORT`` in ``home``).
    storage: Optional[Path] = None

    @property
    def url(self) -> str:
        """What ``--schema-registry-url`` takes: the Confluent-compatible API."""
        return f"http://127.0.0.1:{self.port}/apis/ccompat/v7"

    @property
    def app(self) -> Path:
        return self.home / "app"

    @property
    def data(self) -> Path:
        return self.storage or self.home / f"data-{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.home / f"registry-{self.port}.pid"

    @property
    def log_file(self) -> Path:
        return (self.storage or self.home) / f"registry-{self.port}.log"

    def ensure_app(self) -> None:
        service.fetch_with_maven(
            pom(), self.home, self.app, ["dependency:unpack-dependencies"], "Apicurio Registry"
        )

    def pid(self) -> Optional[int]:
        return service.running_pid(self.pid_file)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/subjects", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    def start(self, timeout: float = 120) -> str:
        """Starts the registry unless it runs already; returns its URL."""
        self.home.mkdir(parents=True, exist_ok=True)
        if self.pid() and self.ready():
            return self.url
        self.ensure_app()
        cmd = [
            java(),
            "-Xms128m",
            "-Xmx512m",
            "-Dquarkus.http.host=127.0.0.1",
            f"-Dquarkus.http.port={self.port}",
            # Its health and metrics (built in: they cannot be switched off) would listen
            # on every interface, port 9000: loopback, on any free port.
            "-Dquarkus.management.host=127.0.0.1",
            "-Dquarkus.management.port=0",
            "-Dquarkus.otel.sdk.disabled=true",
            "-Dapicurio.storage.kind=sql",
            "-Dapicurio.storage.sql.kind=h2",
            f"-Dapicurio.datasource.url=jdbc:h2:file:{self.data}/registry",
            "-jar",
            str(self.app / "quarkus-run.jar"),
        ]
        with open(self.log_file, "ab") as log:
            # Its own working directory and session: it outlives its caller.
            proc = subprocess.Popen(
                cmd, cwd=self.home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.pid_file.write_text(str(proc.pid))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the registry exited with {proc.returncode}; see {self.log_file}")
            if self.ready():
                return self.url
            time.sleep(0.5)
        raise RuntimeError(f"the registry did not become ready in {timeout:.0f} s; see {self.log_file}")

    def stop(self, timeout: float = 10) -> bool:
        """Stops the registry; returns whether one was running. Its JVM can linger after
        the application has stopped (while a client holds a connection): killed after
        ``timeout``, by when its storage is closed."""
        return service.stop(self.pid_file, timeout)

    def status(self) -> str:
        pid = self.pid()
        if pid is None:
            return f"stopped (would listen on {self.url})"
        return f"running, pid {pid}, {self.url}, {'ready' if self.ready() else 'not ready'}"


def java() -> str:
    """A Java runtime of release 21 or later: ``$EMBEDSTREAM_REGISTRY_JAVA``, else the
    first of ``$JAVA_HOME``, ``java`` on the PATH and the JDKs in ``/usr/lib/jvm``."""
    chosen = os.environ.get("EMBEDSTREAM_REGISTRY_JAVA")
    if chosen:
        return chosen
    candidates = [
        os.path.join(os.environ.get("JAVA_HOME", ""), "bin", "java"),
        shutil.which("java") or "",
        *sorted(glob.glob("/usr/lib/jvm/*/bin/java"), reverse=True),
    ]
    for candidate in candidates:
        if os.access(candidate, os.X_OK) and (_release(candidate) or 0) >= JAVA_RELEASE:
            return candidate
    raise RuntimeError(
        f"the local schema registry needs Java {JAVA_RELEASE}+; none found "
        "(set EMBEDSTREAM_REGISTRY_JAVA to its java binary)"
    )


def _release(java_binary: str) -> Optional[int]:
    """The feature release of a ``java`` binary (17 for "17.0.15", 8 for "1.8.0")."""
    try:
        out = subprocess.run([java_binary, "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r'version "(?:1\.)?(\d+)', out)
    return int(found.group(1)) if found else None
