"""What the local services share: their Java artefacts fetched once from Maven Central
(the broker, the schema registry), a process that outlives the command that started it,
known by its pid file, and a child process that lives as long as a test session
(the object-store emulators)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional


def fetch_with_maven(pom_xml: bytes, home: Path, target: Path, goal: list[str], what: str) -> None:
    """Runs ``goal`` (a dependency plugin goal and its flags, writing into ``target``) on
    ``pom_xml``, unless ``target`` already holds the result of this very POM."""
    # Keyed by the POM's content: an installed wheel and a checkout share one cache.
    stamp = target / ".pom-sha256"
    digest = hashlib.sha256(pom_xml).hexdigest()
    if stamp.is_file() and stamp.read_text() == digest:
        return
    if shutil.which("mvn") is None:
        raise RuntimeError(f"Maven (mvn) is needed once to fetch {what} from Maven Central")
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    # Maven wants a file: a copy beside the artefacts, wherever the package lives.
    pom_file = home / "pom.xml"
    pom_file.write_bytes(pom_xml)
    # Quiet unless it fails: Maven writes colour codes even in batch mode.
    mvn = subprocess.run(
        ["mvn", "-q", "-B", "-f", str(pom_file), *goal, f"-DoutputDirectory={target}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if mvn.returncode != 0:
        raise RuntimeError(f"Maven could not fetch {what}:\n{mvn.stdout[-4000:]}")
    stamp.write_text(digest)


def running_pid(pid_file: Path) -> Optional[int]:
    """The pid in ``pid_file`` if that process is alive."""
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None


def stop(pid_file: Path, timeout: float) -> bool:
    """SIGTERM, then SIGKILL after ``timeout``; returns whether it was running."""
    pid = running_pid(pid_file)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    return True


def start_child(
    argv: list[str], log_file: Path, ready: Callable[[], bool], timeout: float, what: str
) -> subprocess.Popen:
    """Starts ``argv`` with its output in ``log_file`` and waits until ``ready()`` holds;
    raises, naming the log, if it exits or does not get ready within ``timeout``."""
    with open(log_file, "ab") as log:  # the child keeps its own copy
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; see {log_file}")
        if ready():
            return proc
        time.sleep(0.2)
    stop_child(proc)
    raise RuntimeError(f"{what} did not answer in {timeout:.0f} s; see {log_file}")


def stop_child(proc: Optional[subprocess.Popen], timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL after ``timeout``."""
    if proc is None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
