"""A local PostgreSQL with pgvector for development and tests, as ``embedstream kafka``
runs a local broker: the server of the ``pgserver`` wheel (PostgreSQL 16, pgvector
0.6.2), listening on a Unix socket in its data directory, outliving the command that
started it. Install it with ``pip install 'embedstream[local-postgres]'``."""

from __future__ import annotations

import contextlib
import os
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import psycopg

#: pgvector's HNSW insert allocates and frees a few MB per row. glibc's defaults hand
#: that memory back to the kernel after every row (trim) or map it afresh (mmap), and
#: page faults then took a third of each insert; keeping up to 32 MiB in the heap made
#: inserts about twice as fast (bench/sink.py). Any server of ours gets this setting;
#: self-managed servers can set the same variable in their environment.
SERVER_MALLOC_TUNABLES = "glibc.malloc.trim_threshold=33554432:glibc.malloc.mmap_threshold=33554432"


def data_dir() -> Path:
    default = Path.home() / ".cache" / "embedstream" / "postgres"
    return Path(os.environ.get("EMBEDSTREAM_POSTGRES_DIR", default))


def _pgserver():
    try:
        with warnings.catch_warnings():  # platformdirs: "XDG_RUNTIME_DIR is not set" (harmless)
            warnings.simplefilter("ignore")
            import pgserver
    except ImportError:
        raise SystemExit(
            "embedstream: the local PostgreSQL needs the pgserver wheel: "
            "pip install 'embedstream[local-postgres]' (or use any PostgreSQL with pgvector via its DSN)"
        ) from None
    return pgserver


def start() -> str:
    """Starts the server if it is not running; returns its DSN, with pgvector enabled."""
    path = data_dir()
    path.parent.mkdir(parents=True, exist_ok=True)
    pgserver = _pgserver()
    if dsn() is None:
        # pgserver keeps one handle per directory and process; one from before a stop
        # would hand back the stopped server instead of starting it.
        handles = getattr(getattr(pgserver, "PostgresServer", None), "_instances", {})
        handles.pop(path.resolve(), None)
    with warnings.catch_warnings(), _server_environment():
        warnings.simplefilter("ignore")
        server = pgserver.get_server(path, cleanup_mode=None)  # None: keep running after we exit
    uri = server.get_uri()
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    return uri


@contextlib.contextmanager
def _server_environment() -> Iterator[None]:
    """The server inherits our environment: lend it the allocator setting while it
    starts, unless the user has set their own."""
    if "GLIBC_TUNABLES" in os.environ:
        yield
        return
    os.environ["GLIBC_TUNABLES"] = SERVER_MALLOC_TUNABLES
    try:
        yield
    finally:
        del os.environ["GLIBC_TUNABLES"]


def dsn() -> Optional[str]:
    """The running server's DSN, or None."""
    pid_file = data_dir() / "postmaster.pid"
    if not pid_file.exists():
        return None
    lines = pid_file.read_text().splitlines()
    # postmaster.pid: pid, data dir, start time, port, socket dir, listen address, …
    if len(lines) < 5 or not _alive(int(lines[0])):
        return None
    return f"postgresql://postgres:@/postgres?host={lines[4]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop() -> bool:
    if dsn() is None:
        return False
    pg_ctl = Path(_pgserver().__file__).parent / "pginstall" / "bin" / "pg_ctl"
    command = [str(pg_ctl), "-D", str(data_dir()), "-w", "stop", "-m", "fast"]
    if os.geteuid() == 0:  # pgserver runs the server as its own user when we are root
        command = ["su", "pgserver", "-s", "/bin/sh", "-c", " ".join(command)]
    subprocess.run(command, check=True, capture_output=True)
    return True


def status() -> str:
    found = dsn()
    return f"running: {found}" if found else f"not running (data in {data_dir()})"
