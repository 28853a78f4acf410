"""Fetching the document an event names by ``uri`` instead of carrying it.

One entry point, :func:`fetch`, which picks the reader of the URI's scheme:

- ``file://``: regular files under the allowed roots (``--allow-root``), below;
- ``s3://``, ``gs://``, ``az://``, ``abfs[s]://``: objects, through
  :mod:`flows.object_store`;
- ``https://`` (and ``http://`` where a prefix names it): :mod:`flows.fetch_https`,
  which checks every address and redirect (SSRF).

Every URI but ``file://`` must first be under an ``--allow-uri`` prefix
(:class:`flows.allowlist.UriAllowlist`). Every reader reads through
:func:`read_bounded`, which never takes more than the limit plus one byte.

:class:`FetchError` is a dead letter's reason; :class:`FetchUnavailable` (an
:class:`flows.outage.Outage`) means the store or server may answer later: the caller
retries and waits it out, it never becomes a dead letter. Each fetch is timed and
counted by scheme and outcome (:mod:`flows.metrics`).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Optional, Union
from urllib.parse import ParseResult, unquote, urlparse

from flows import metrics
from flows.outage import Outage

if TYPE_CHECKING:
    from flows.allowlist import UriAllowlist
    from flows.object_store import ObjectStores


class FetchError(Exception):
    """The document cannot be fetched; ``reason`` is its dead letter's."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


class FetchUnavailable(Outage):
    """The store or server did not answer (5xx, throttling, timeout, connection): retry."""


#: Seconds a fetch may take by default, answer and body.
DEFAULT_TIMEOUT_S = 60.0


def fetch(
    uri: str,
    *,
    roots: Sequence[Path],
    max_bytes: int,
    allowlist: Optional[UriAllowlist] = None,
    version: Optional[str] = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    stores: Optional[ObjectStores] = None,
) -> bytes:
    """The document at ``uri``, of at most ``max_bytes``. ``roots``: the resolved
    directories that ``file://`` URIs may read; ``allowlist``: the prefixes every other
    URI must start with (None or empty: none is fetched); ``version``: the object
    version to read (an S3 versionId, a GCS generation, an Azure version id);
    ``stores``: the object stores to read through (default: one set configured by the
    environment alone). Raises :class:`FetchError` or :class:`FetchUnavailable`."""
    scheme = uri.partition("://")[0].lower() if "://" in uri else urlparse(uri).scheme
    label = scheme_label(uri)
    started = time.monotonic()
    metrics.FETCHES_IN_FLIGHT.inc()
    try:
        data = _fetch(uri, scheme, roots, max_bytes, allowlist, version, timeout_s, stores)
    except FetchError as e:
        metrics.FETCHES.labels(label, e.reason).inc()
        raise
    except Outage:
        metrics.FETCHES.labels(label, "unavailable").inc()
        raise
    finally:
        metrics.FETCHES_IN_FLIGHT.dec()
        metrics.FETCH_SECONDS.labels(label).observe(time.monotonic() - started)
    metrics.FETCHES.labels(label, "ok").inc()
    metrics.FETCH_BYTES.labels(label).inc(len(data))
    return data


def scheme_label(uri: str) -> str:
    """The scheme of ``uri`` as the fetch metrics name it ("other" for any we do not fetch)."""
    scheme = uri.partition("://")[0].lower() if "://" in uri else urlparse(uri).scheme
    return scheme if scheme in _LABELS else "other"


def _fetch(
    uri: str,
    scheme: str,
    roots: Sequence[Path],
    max_bytes: int,
    allowlist: Optional[UriAllowlist],
    version: Optional[str],
    timeout_s: float,
    stores: Optional[ObjectStores],
) -> bytes:
    if scheme == "file":
        return _read_file(urlparse(uri), roots, max_bytes)
    from flows import fetch_https, object_store  # they import this module
    from flows.allowlist import UriAllowlist

    allowlist = allowlist if allowlist is not None else UriAllowlist(())
    allowlist.check(uri)  # first: nothing is asked of a store or host it does not allow
    if scheme in object_store.SCHEMES:
        return (stores or _default_stores()).read(uri, max_bytes=max_bytes, version=version)
    if scheme in ("https", "http"):
        return fetch_https.fetch_https(uri, allowlist=allowlist, max_bytes=max_bytes, timeout_s=timeout_s)
    raise FetchError("uri_not_allowed", f"{scheme}:// URIs are not fetched")


@functools.cache
def _default_stores() -> ObjectStores:
    from flows.object_store import ObjectStores

    return ObjectStores()


def read_bounded(source: Union[int, BinaryIO], limit: int) -> bytes:
    """Everything ``source`` (a file descriptor or a binary stream) holds, read to its end
    but never more than ``limit`` + 1 bytes: one byte past the limit proves the document
    too large without reading the rest. Every reader of a scheme ends here, whatever size
    its source announced. Raises :class:`FetchError` ``too_large``."""
    read = (lambda n: os.read(source, n)) if isinstance(source, int) else source.read
    parts, total = [], 0
    while total <= limit:
        part = read(min(limit + 1 - total, READ_CHUNK))
        if not part:
            return b"".join(parts)
        parts.append(part)
        total += len(part)
    raise FetchError("too_large", f"more than the limit of {limit} bytes")


def _read_file(uri: ParseResult, roots: Sequence[Path], max_bytes: int) -> bytes:
    """The file at ``uri``, opened once: the checks below are made on the open file, so
    nothing swapped in on the path between them and the read is ever read."""
    path = os.path.normpath(unquote(uri.path))
    if not _under(path, roots):
        raise FetchError("uri_not_allowed", f"{path} is outside the allowed roots")
    try:
        # O_NOFOLLOW: a link as the last component is refused (ELOOP); O_NONBLOCK: a FIFO
        # opens at once instead of waiting for a writer, and is refused below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except (FileNotFoundError, NotADirectoryError):
        raise FetchError("not_found", f"{path} does not exist") from None
    except PermissionError as e:
        raise FetchError("forbidden", str(e)) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FetchError("uri_not_allowed", f"{path} is a symbolic link: name its target") from None
        raise FetchError("not_a_file", f"{path} cannot be opened as a file: {e.strerror}") from None
    try:
        # Links in the directories on the path are followed: where they led is checked.
        real = _real_path(fd)
        if not _under(real, roots):
            raise FetchError("uri_not_allowed", f"{path} leads to {real}, outside the allowed roots")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_dev in _pseudo_devices():
            kind = _KINDS.get(stat.S_IFMT(st.st_mode), "a file of /proc or /sys")
            raise FetchError("not_a_file", f"{path} is {kind}, not a regular file")
        if st.st_size > max_bytes:
            raise FetchError("too_large", f"{path} is {st.st_size} bytes, over the limit of {max_bytes}")
        os.set_blocking(fd, True)
        try:
            return read_bounded(fd, max_bytes)
        except FetchError as e:  # it grew since fstat
            raise FetchError(e.reason, f"{path}: {e.message}") from None
    finally:
        os.close(fd)


def _under(path: str, roots: Sequence[Path]) -> bool:
    return any(Path(path).is_relative_to(root) for root in roots)


def _real_path(fd: int) -> str:
    """Where the open file ``fd`` really is, links resolved (Linux: /proc; macOS: F_GETPATH)."""
    if hasattr(fcntl, "F_GETPATH"):
        return os.fsdecode(fcntl.fcntl(fd, fcntl.F_GETPATH, bytes(1024)).rstrip(b"\0"))
    return os.readlink(f"/proc/self/fd/{fd}")


@functools.cache
def _pseudo_devices() -> frozenset[int]:
    """The devices of /proc and /sys: their files say size 0 and may never end."""
    return frozenset(os.stat(p).st_dev for p in ("/proc", "/sys") if os.path.isdir(p))


#: How a refusal names a file that is not a regular one.
_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}
#: Bytes asked of the source per read.
READ_CHUNK = 1 << 20

#: Schemes the fetch metrics name; any other is counted as "other".
_LABELS = frozenset({"file", "s3", "gs", "az", "abfs", "abfss", "https", "http"})
