"""Fetching the document an event names by ``uri`` instead of carrying it.

One entry point, :func:`fetch`, which picks the reader of the URI's scheme. The one
scheme today is ``file://``, for paths under the allowed roots.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Callable
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


def _read_file(uri: ParseResult, roots: Sequence[Path], max_bytes: int) -> bytes:
    path = Path(unquote(uri.path)).resolve()
    if not any(path.is_relative_to(root) for root in roots):
        raise FetchError("uri_not_allowed", f"{path} is outside the allowed roots")
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise FetchError("too_large", f"{path} is {size} bytes")
        return path.read_bytes()
    except FileNotFoundError:
        raise FetchError("not_found", f"{path} does not exist") from None
    except IsADirectoryError:
        raise FetchError("not_found", f"{path} is a directory") from None
    except PermissionError as e:
        raise FetchError("forbidden", str(e)) from None


#: The reader of each URI scheme: (the parsed URI, the allowed roots, the size limit) → bytes.
READERS: dict[str, Callable[[ParseResult, Sequence[Path], int], bytes]] = {"file": _read_file}
