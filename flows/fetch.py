"""Fetching the document an event names by ``uri`` instead of carrying it.

One entry point, :func:`fetch`, which picks the reader of the URI's scheme. The one
scheme today is ``file://``, for regular files under the allowed roots. Every reader
reads through :func:`read_bounded`, which never takes more than the limit plus one byte.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, Callable, Union
from urllib.parse import ParseResult, unquote, urlparse


class FetchError(Exception):
    """The document cannot be fetched; ``reason`` is its dead letter's."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


def fetch(uri: str, *, roots: Sequence[Path], max_bytes: int) -> bytes:
    """The document at ``uri``, of at most ``max_bytes``. ``roots``: the resolved
    directories that ``file://`` URIs may read. Raises :class:`FetchError`."""
    parsed = urlparse(uri)
    reader = READERS.get(parsed.scheme)
    if reader is None:
        schemes = ", ".join(f"{s}://" for s in READERS)
        raise FetchError("uri_not_allowed", f"only {schemes} URIs are fetched, not {parsed.scheme}://")
    return reader(parsed, roots, max_bytes)


def read_bounded(source: Union[int, BinaryIO], limit: int) -> bytes:
    """Everything ``source`` (a file descriptor or a binary stream) holds, read to its end
    but never more than ``limit`` + 1 bytes: one byte past the limit proves the document
    too large without reading the rest. Every reader of a scheme ends here, whatever size
    its source announced. Raises :class:`FetchError` ``too_large``."""
    read = (lambda n: os.read(source, n)) if isinstance(source, int) else source.read
    parts, total = [], 0
    while total <= limit:
        part = read(min(limit + 1 - total, _READ_CHUNK))
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
_READ_CHUNK = 1 << 20


#: The reader of each URI scheme: (the parsed URI, the allowed roots, the size limit) → bytes.
READERS: dict[str, Callable[[ParseResult, Sequence[Path], int], bytes]] = {"file": _read_file}
