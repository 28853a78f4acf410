"""Which object-store and web URIs the flow may fetch: ``--allow-uri PREFIX``.

A prefix is a URI: ``s3://docs-bucket/``, ``gs://bucket/exports/``, ``az://container/``,
``abfss://container@account.dfs.core.windows.net/``, ``https://wiki.example.com/export/``
or, for plain HTTP, which nothing else allows, ``http://127.0.0.1:8080/``. A URI is
allowed when its scheme and authority equal a prefix's and the prefix's path is a run of
whole path segments at the start of the URI's path: ``s3://docs`` allows ``s3://docs/x``
and never ``s3://docs-private/x``; ``https://host/export`` allows ``/export`` and
``/export/a``, never ``/exporter``. ``file://`` is not listed here: ``--allow-root``
names its directories.

A URI's path is compared twice, as written and percent-decoded, and must match both
ways, so no reader that decodes (or does not) can take it elsewhere; ``.`` and ``..``
segments, before or after decoding, and credentials in the URI are refused outright.
For http(s) the host is compared case-insensitively and the port must be the prefix's
(the scheme's default where neither names one).

:meth:`UriAllowlist.names_address` says whether a prefix names an address on a scheme
and port: :mod:`flows.fetch_https` opens a private, loopback or link-local address only
there, never to a name that resolves to it on another port.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional
from urllib.parse import unquote, urlsplit

from flows.fetch import FetchError

#: Schemes whose authority is a bucket or container, compared exactly as written.
OBJECT_SCHEMES = frozenset({"s3", "gs", "az", "abfs", "abfss"})
#: Schemes whose authority is a network host and port.
WEB_SCHEMES = {"https": 443, "http": 80}


@dataclass(frozen=True)
class _Target:
    """The parts of a URI that are compared: scheme, authority, path segments."""

    scheme: str
    authority: str
    raw: tuple[str, ...]
    decoded: tuple[str, ...]


class UriAllowlist:
    """The prefixes URIs must start with; an empty list allows nothing."""

    def __init__(self, prefixes: Sequence[str]) -> None:
        """Raises ValueError naming a prefix that is not a URI this list can hold."""
        self._prefixes: list[_Target] = []
        for prefix in prefixes:
            try:
                target = _parse(prefix.strip())
                if target.scheme in WEB_SCHEMES and (urlsplit(prefix).query or urlsplit(prefix).fragment):
                    raise _Refused("a prefix ends at its path: no query or fragment")
            except _Refused as e:
                raise ValueError(f"allowed URI prefix {prefix!r}: {e}") from None
            # "s3://docs/" and "s3://docs" both mean the whole bucket.
            raw, decoded = target.raw, target.decoded
            if raw and raw[-1] == "":
                raw, decoded = raw[:-1], decoded[:-1]
            self._prefixes.append(_Target(target.scheme, target.authority, raw, decoded))
        self.prefixes: tuple[str, ...] = tuple(p.strip() for p in prefixes)

    def __bool__(self) -> bool:
        return bool(self._prefixes)

    def __repr__(self) -> str:
        return f"UriAllowlist({list(self.prefixes)!r})"

    def allows(self, uri: str) -> bool:
        try:
            self.check(uri)
        except FetchError:
            return False
        return True

    def check(self, uri: str) -> None:
        """Raises :class:`FetchError` ``uri_not_allowed`` unless a prefix allows ``uri``."""
        try:
            target = _parse(uri)
        except _Refused as e:
            raise FetchError("uri_not_allowed", f"{redact(uri)}: {e}") from None
        for p in self._prefixes:
            n = len(p.raw)
            if (
                p.scheme == target.scheme
                and p.authority == target.authority
                and target.raw[:n] == p.raw
                and target.decoded[:n] == p.decoded
            ):
                return
        if not self._prefixes:
            raise FetchError(
                "uri_not_allowed",
                f"{redact(uri)}: no URI prefixes are allowed (--allow-uri, EMBEDSTREAM_ALLOWED_URIS)",
            )
        raise FetchError("uri_not_allowed", f"{redact(uri)} is under no allowed URI prefix")

    def names_host(self, uri_or_host: str) -> bool:
        """Whether an http(s) prefix names this host literally: a name, or an address in
        any of its spellings (``::1`` and ``[0:0::1]`` are one). Given a URI, its host."""
        host = uri_or_host
        if "://" in uri_or_host:
            host = urlsplit(uri_or_host).hostname or ""
        try:
            host = _host_key(host.strip("[]"))
        except _Refused:
            return False
        return any(p.scheme in WEB_SCHEMES and _host_of(p.authority) == host for p in self._prefixes)

    def names_address(self, address: str, scheme: str, port: int) -> bool:
        """Whether an http(s) prefix names this address on this scheme and port: what
        opens a loopback or private address to a fetch. A prefix for 127.0.0.1:8080 opens
        nothing else on 127.0.0.1 to a name that resolves (or rebinds) there."""
        try:
            authority = f"{_host_key(address.strip('[]'))}:{port}"
        except _Refused:
            return False
        return any(p.scheme == scheme and p.authority == authority for p in self._prefixes)


def redact(uri: str) -> str:
    """``uri`` without any user name or password, fit for logs and dead letters."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<an unparseable URI>"
    if parts.scheme in WEB_SCHEMES and "@" in parts.netloc:
        return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    return uri


class _Refused(ValueError):
    pass


def _parse(uri: str) -> _Target:
    scheme, sep, rest = uri.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise _Refused("not a URI with a scheme (like s3://bucket/ or https://host/)")
    if scheme == "file":
        raise _Refused("file:// URIs are allowed by directory, with --allow-root")
    if scheme in OBJECT_SCHEMES:
        # Split by hand: an object key may hold "?" or "#", which are part of its name.
        authority, _, path = rest.partition("/")
        if not authority:
            raise _Refused("names no bucket or container")
        # abfs[s]://container@account.host is the one form with "@"; no form has a port.
        if ":" in authority or authority.count("@") > (scheme in ("abfs", "abfss")):
            raise _Refused("a bucket or container name holds no ':' or '@'")
    elif scheme in WEB_SCHEMES:
        try:
            parts = urlsplit(uri)
        except ValueError as e:  # "Invalid IPv6 URL" and the like
            raise _Refused(str(e)) from None
        if parts.username is not None or parts.password is not None or "@" in parts.netloc:
            raise _Refused("credentials in a URI are refused: they would be logged and recorded")
        try:
            port = parts.port
        except ValueError as e:
            raise _Refused(str(e)) from None
        if not parts.hostname:
            raise _Refused("names no host")
        host = _host_key(parts.hostname)
        authority = f"{host}:{port or WEB_SCHEMES[scheme]}"
        path = parts.path.removeprefix("/")
    else:
        known = ", ".join(f"{s}://" for s in sorted(OBJECT_SCHEMES | WEB_SCHEMES.keys()))
        raise _Refused(f"{scheme}:// is not a scheme the flow fetches ({known})")
    raw = tuple(path.split("/")) if path else ()
    decoded = tuple(unquote(s) for s in raw)
    for segment in raw + decoded:
        # Servers that take "\" for "/" would find dot segments in "a\..\b" too.
        if any(piece in (".", "..") for piece in segment.replace("\\", "/").split("/")):
            raise _Refused("'.' and '..' path segments are refused")
    return _Target(scheme, authority, raw, decoded)


def _host_key(host: str) -> str:
    """A host as compared: lower case, no trailing dot, an address in its one spelling,
    a name in its DNS (IDNA) spelling, as the resolver will be asked it."""
    host = host.lower().rstrip(".")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise _Refused(f"{host!r} is not a host name") from None
    if not _HOST_NAME.fullmatch(host):
        raise _Refused(f"{host!r} is not a host name")
    return host


_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")


def _host_of(authority: str) -> Optional[str]:
    return authority.rpartition(":")[0]
