"""Container images of the worker, built and run with Docker or, where no Docker
engine runs, with podman configured under our cache directory (never in ``/etc``).

Nothing is installed unless asked: :func:`install_tools` (run by ``make setup``) and
``embedstream image`` install podman, runc and mmdebstrap with apt where they are
missing; the tests never do. Podman runs rootful with runc, cgroupfs and vfs storage,
which work where overlay mounts and systemd do not, and serves the Docker API on a
socket of ours, so the docker CLI and docker-py (testcontainers) work against it.
Without a reachable image registry, base images are made locally from Debian's
packages with mmdebstrap.

Every image is named ``[REGISTRY/]embedstream:<package version>``; the registry
prefix comes from ``EMBEDSTREAM_IMAGE_REGISTRY``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Optional

CACHE = Path(os.environ.get("EMBEDSTREAM_CONTAINERS_HOME", Path.home() / ".cache/embedstream/containers"))
ROOT = Path(__file__).resolve().parents[2]
#: The Python of both base images (python:3.11-slim and Debian bookworm's python3):
#: the dependency wheels are fetched for it.
IMAGE_PYTHON = "3.11"
PUBLIC_BASE = "python:3.11-slim-bookworm"
LOCAL_PYTHON_BASE = "localhost/embedstream-base:bookworm-python"
LOCAL_JRE_BASE = "localhost/embedstream-base:bookworm-jre"
#: Podman and what our configuration of it needs (runc: crun refuses the hybrid cgroup
#: layout of these machines; mmdebstrap: local base images).
PODMAN_PACKAGES = ["podman", "runc", "mmdebstrap"]


class ContainerError(RuntimeError):
    """No engine could be found or set up, or an engine command failed."""


def image_name(name: str = "embedstream", registry: Optional[str] = None) -> str:
    """``[REGISTRY/]NAME:<package version>``: the one scheme of the build tooling, the
    tests and the Kubernetes manifests."""
    prefix = os.environ.get("EMBEDSTREAM_IMAGE_REGISTRY", "") if registry is None else registry
    prefix = prefix.rstrip("/")
    return f"{prefix + '/' if prefix else ''}{name}:{version('embedstream')}"


@dataclass
class Engine:
    """A container engine's command line: ``docker``, or ``podman`` with our config."""

    kind: str
    env: dict[str, str] = field(default_factory=dict)
    #: Whether a missing tool (mmdebstrap) may be installed with apt when needed.
    install: bool = False

    @classmethod
    def find(cls, install: bool = False) -> Engine:
        """A Docker engine that answers, used as it is; else podman. With ``install``,
        what is missing is installed with apt; without, it is an error."""
        if _docker_answers():
            return cls("docker", install=install)
        if shutil.which("podman") is None:
            if not install:
                raise ContainerError(
                    "no Docker engine answers and podman is not installed (`make setup` installs it, as root)"
                )
            _apt_install(PODMAN_PACKAGES)
        engine = cls("podman", _podman_env(), install)
        if not _quiet(["podman", "info"], {**os.environ, **engine.env}):
            raise ContainerError(
                f"podman does not run here: {engine.run('info', check=False).stderr[-2000:]}"
            )
        return engine

    def command(self, *args: str) -> list[str]:
        return [self.kind, *args]

    def run(self, *args: str, check: bool = True, timeout: float = 1800) -> subprocess.CompletedProcess:
        done = subprocess.run(
            self.command(*args),
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise ContainerError(f"{self.kind} {' '.join(args[:3])} failed: {done.stderr[-3000:]}")
        return done

    def has_image(self, name: str) -> bool:
        return self.run("image", "inspect", name, check=False).returncode == 0

    # --- the Docker API ------------------------------------------------------------------------

    def docker_host(self) -> str:
        """A ``DOCKER_HOST`` for docker-py and testcontainers; for podman, its API
        service on our socket, started (detached) when it does not answer yet."""
        if self.kind == "docker":
            return os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        sock = CACHE / "podman" / "podman.sock"
        if not _answers(sock):
            sock.unlink(missing_ok=True)
            log = open(CACHE / "podman" / "service.log", "ab")
            subprocess.Popen(
                self.command("system", "service", "--time=0", f"unix://{sock}"),
                env={**os.environ, **self.env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # outlives this process, like the local broker
                # ...so it runs from our directory, not the caller's: conmon fails ("Failed
                # to get working directory") once a service's inherited directory is deleted.
                cwd=CACHE / "podman",
            )
            deadline = time.monotonic() + 30
            while not _answers(sock):
                if time.monotonic() > deadline:
                    raise ContainerError(f"podman's API service did not start: see {log.name}")
                time.sleep(0.2)
        return f"unix://{sock}"

    # --- images ----------------------------------------------------------------------------------

    def local_base(self, name: str, packages: Sequence[str]) -> str:
        """A Debian bookworm image with ``packages``, made with mmdebstrap from Debian's
        packages (for machines that reach no image registry); kept once made."""
        if self.has_image(name):
            return name
        if shutil.which("mmdebstrap") is None:
            if not self.install:
                raise ContainerError("mmdebstrap is not installed (`make setup` installs it, as root)")
            _apt_install(["mmdebstrap"])
        with tempfile.TemporaryDirectory(prefix="embedstream-base-") as tmp:
            tarball = Path(tmp) / "base.tar"
            subprocess.run(
                [
                    "mmdebstrap",
                    "--quiet",
                    "--variant=apt",
                    f"--include={','.join(packages)}",
                    "bookworm",
                    str(tarball),
                ],
                check=True,
                timeout=1800,
            )
            self.run("import", str(tarball), name)
        return name

    def build(self, dockerfile: Path, context: Path, tag: str, build_args: dict[str, str]) -> str:
        args = ["build", "-f", str(dockerfile), "-t", tag]
        if self.kind == "podman":
            # Docker's image format keeps HEALTHCHECK; OCI images drop it. vfs stores
            # every layer as a full copy: keep no intermediate images.
            args += ["--format", "docker", "--layers=false"]
        for key, value in build_args.items():
            args += ["--build-arg", f"{key}={value}"]
        self.run(*args, str(context), timeout=3600)
        # The image this tag named before is dangling now: free its space.
        self.run("image", "prune", "--force", check=False)
        return tag

    def build_worker(
        self, wheel: Optional[Path] = None, *, local_base: bool = False, registry: Optional[str] = None
    ) -> str:
        """Builds ``[REGISTRY/]embedstream:<version>`` from ``deploy/Dockerfile``: the wheel
        (built here with maturin when not given), its dependencies as wheels and the
        default model go into the build context, so the build needs no network."""
        from operators import models

        base = (
            self.local_base(LOCAL_PYTHON_BASE, ["python3", "python3-venv", "passwd"])
            if local_base
            else PUBLIC_BASE
        )
        with tempfile.TemporaryDirectory(prefix="embedstream-image-") as tmp:
            context = Path(tmp)
            wheels = context / "wheels"
            wheels.mkdir()
            wheel = wheel or _build_wheel(wheels)
            if wheel.parent != wheels:
                shutil.copy(wheel, wheels)
            _download_dependencies(wheels / wheel.name, wheels)
            model = models.default_model_dir()
            if not (model / "model.safetensors").is_file():
                models.pull()
            shutil.copytree(model, context / "models" / model.name)
            return self.build(
                ROOT / "deploy" / "Dockerfile", context, image_name(registry=registry), {"BASE_IMAGE": base}
            )

    def build_kafka(self) -> str:
        """``embedstream-kafka:<version>``: the broker jars that Maven resolved for the
        local broker, on a Debian base with a JRE. Listens (and advertises) on
        ``127.0.0.1:$KAFKA_PORT``: publish that port on the same host port."""
        from flows.dev.kafka import LocalKafka

        broker = LocalKafka()
        broker.ensure_jars()
        base = self.local_base(LOCAL_JRE_BASE, ["openjdk-17-jre-headless"])
        with tempfile.TemporaryDirectory(prefix="embedstream-kafka-image-") as tmp:
            context = Path(tmp)
            shutil.copytree(broker.lib, context / "lib")
            shutil.copy(ROOT / "deploy" / "kafka" / "start-kafka.sh", context)
            return self.build(
                ROOT / "deploy" / "kafka" / "Dockerfile",
                context,
                image_name("embedstream-kafka", registry=""),
                {"BASE_IMAGE": base},
            )

    # --- containers --------------------------------------------------------------------------------

    def health(self, container: str) -> str:
        """Runs the image's health check now (podman runs them only from systemd timers)
        and returns the status: ``healthy``, ``unhealthy`` or ``starting``."""
        if self.kind == "podman":
            self.run("healthcheck", "run", container, check=False)
        out = self.run("inspect", container).stdout
        state = json.loads(out)[0]["State"]
        health = state.get("Health") or state.get("Healthcheck") or {}
        return health.get("Status", "none")

    def exit_code(self, container: str) -> int:
        return int(json.loads(self.run("inspect", container).stdout)[0]["State"]["ExitCode"])


def install_tools() -> str:
    """Installs with apt what building and running images here needs and the machine
    lacks: podman and runc where no Docker engine answers, and mmdebstrap. Quick when
    all is there; only as root, where apt-get is. Returns what it did, or why not."""
    missing = [] if _docker_answers() else [p for p in PODMAN_PACKAGES if shutil.which(p) is None]
    if shutil.which("mmdebstrap") is None and "mmdebstrap" not in missing:
        missing.append("mmdebstrap")
    if not missing:
        return "container tools present"
    try:
        _apt_install(missing)
    except (ContainerError, subprocess.SubprocessError) as e:
        return f"{', '.join(missing)} not installed ({e}): the container tests will skip"
    return f"installed {', '.join(missing)}"


def _docker_answers() -> bool:
    return shutil.which("docker") is not None and _quiet(["docker", "info"], dict(os.environ))


def _quiet(cmd: list[str], env: dict[str, str]) -> bool:
    try:
        return subprocess.run(cmd, env=env, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _answers(sock: Path) -> bool:
    if not sock.exists():
        return False
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2)
        try:
            s.connect(str(sock))
            s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
            return b"OK" in s.recv(1024)
        except OSError:
            return False


def _apt_install(packages: list[str]) -> None:
    if shutil.which("apt-get") is None:
        raise ContainerError(f"{', '.join(packages)} missing, and no apt-get to install them with")
    if os.geteuid() != 0:
        raise ContainerError(
            f"{', '.join(packages)} missing: run `sudo apt-get install -y {' '.join(packages)}`"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=900)
    subprocess.run(["apt-get", "install", "-y", "-qq", *packages], check=True, env=env, timeout=1800)


def _podman_env() -> dict[str, str]:
    """Configuration files of ours, pointed at by podman's environment variables."""
    home = CACHE / "podman"
    home.mkdir(parents=True, exist_ok=True)
    conf, storage = home / "containers.conf", home / "storage.conf"
    conf.write_text(
        "[containers]\n"
        "# The machine's ulimits may be lower than podman's defaults.\n"
        "default_ulimits = []\n"
        "[engine]\n"
        'cgroup_manager = "cgroupfs"\n'
        'runtime = "runc"\n'
        'events_logger = "file"\n'
    )
    storage.write_text(
        f'[storage]\ndriver = "vfs"\ngraphroot = "{home / "storage"}"\nrunroot = "{home / "run"}"\n'
    )
    return {"CONTAINERS_CONF": str(conf), "CONTAINERS_STORAGE_CONF": str(storage)}


def _build_wheel(out: Path) -> Path:
    # The venv's own maturin (the dev extra), also when the venv is not activated.
    maturin = shutil.which("maturin", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if not (ROOT / "native" / "Cargo.toml").is_file() or maturin is None:
        raise ContainerError("give --wheel: building one needs the source tree and maturin")
    subprocess.run([maturin, "build", "--release", "--quiet", "--out", str(out)], cwd=ROOT, check=True)
    [wheel] = out.glob("embedstream-*.whl")
    return wheel


#: Every manylinux tag a Debian bookworm image (glibc 2.36) runs: pip matches them one by one.
_PLATFORMS = [
    arg
    for tag in [f"manylinux_2_{n}_x86_64" for n in range(36, 16, -1)] + ["manylinux2014_x86_64"]
    for arg in ("--platform", tag)
]


def _download_dependencies(wheel: Path, dest: Path) -> None:
    """Every dependency of ``wheel`` as a binary wheel for the images' Python."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
            "--only-binary=:all:",
            "--python-version",
            IMAGE_PYTHON,
            "--implementation",
            "cp",
            *_PLATFORMS,
            "--dest",
            str(dest),
            str(wheel),
        ],
        check=True,
        timeout=1800,
    )
