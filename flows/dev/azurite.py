"""A local Azure Blob Storage emulator for tests: Azurite (Microsoft's, MIT, from npm) on
loopback, installed once into the cache by ``deploy/dev.sh setup`` (:func:`install`;
needs Node.js and npm, which setup installs with apt where it can). 3.35.0 is the last
release that declares support for Debian bookworm's Node.js 18 (3.36 wants 21, 3.37 22).

It knows one account, Azurite's well-known development account; containers are made with
a Shared Key signed request here, objects with any client. :meth:`LocalAzurite.options`
is what ``--object-store`` takes to point az:// URIs at it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Optional

from flows.dev import service

VERSION = "3.35.0"
HOME = Path(os.environ.get("EMBEDSTREAM_AZURITE_HOME", Path.home() / ".cache/embedstream/azurite"))
#: Azurite's development account and its published key (not a secret).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
_API_VERSION = "2021-08-06"


def binary(home: Path = HOME) -> Path:
    return home / VERSION / "node_modules" / ".bin" / "azurite-blob"


def install(home: Path = HOME) -> Path:
    """Installs Azurite into ``home`` unless it is there; returns its blob server."""
    target = binary(home)
    if target.exists():
        return target
    if shutil.which("npm") is None:
        _apt_install(["nodejs", "npm"])
    prefix = home / VERSION
    prefix.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(prefix), f"azurite@{VERSION}"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return target


def _apt_install(packages: list[str]) -> None:
    """Installs Debian ``packages`` as root where apt-get is; else says what to run."""
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise RuntimeError(f"Azurite needs Node.js and npm: install {' and '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=900)
    subprocess.run(["apt-get", "install", "-y", "-qq", *packages], check=True, env=env, timeout=1800)


@dataclass
class LocalAzurite:
    port: int
    storage: Path
    _proc: Optional[subprocess.Popen] = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        """The account's blob endpoint (path style, as Azurite serves it)."""
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    def options(self, key: str = ACCOUNT_KEY) -> dict[str, str]:
        return {
            "azure_storage_account_name": ACCOUNT,
            "azure_storage_account_key": key,
            "azure_storage_endpoint": self.endpoint,
            "allow_http": "true",
        }

    def start(self, timeout: float = 60) -> str:
        server = binary()
        if not server.exists():
            raise RuntimeError(f"Azurite is not installed at {server}: run deploy/dev.sh setup")
        self.storage.mkdir(parents=True, exist_ok=True)
        self._proc = service.start_child(
            [
                str(server),
                "--blobHost=127.0.0.1",
                f"--blobPort={self.port}",
                f"--location={self.storage}",
                "--skipApiVersionCheck",
                "--disableTelemetry",
            ],
            self.storage / "azurite.log",
            self._answers,
            timeout,
            "Azurite",
        )
        return self.endpoint

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(f"{self.endpoint}?comp=list", timeout=2).close()
        except urllib.error.HTTPError:
            return True  # it answers (403 to an unsigned request)
        except OSError:
            return False
        return True

    def stop(self) -> None:
        service.stop_child(self._proc)
        self._proc = None

    def create_container(self, name: str) -> None:
        """Makes container ``name`` (nothing if it exists)."""
        date = formatdate(usegmt=True)
        to_sign = "\n".join(
            [
                "PUT",
                *[""] * 4,  # content encoding, language, length (0 is empty), MD5
                "application/xml",
                *[""] * 6,  # date (x-ms-date instead), conditions, range
                f"x-ms-date:{date}",
                f"x-ms-version:{_API_VERSION}",
                f"/{ACCOUNT}/{ACCOUNT}/{name}",
                "restype:container",
            ]
        )
        signature = hmac.new(base64.b64decode(ACCOUNT_KEY), to_sign.encode(), hashlib.sha256).digest()
        request = urllib.request.Request(
            f"{self.endpoint}/{name}?restype=container",
            data=b"",
            method="PUT",
            headers={
                "x-ms-date": date,
                "x-ms-version": _API_VERSION,
                "Content-Type": "application/xml",
                "Authorization": f"SharedKey {ACCOUNT}:{base64.b64encode(signature).decode()}",
            },
        )
        try:
            urllib.request.urlopen(request, timeout=30).close()
        except urllib.error.HTTPError as e:
            if e.code != 409:  # it exists
                raise
