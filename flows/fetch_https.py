"""Fetching ``https://`` (and, where a prefix names it, ``http://``) documents without
letting an event's URI reach what it must not (SSRF).

:func:`fetch_https` resolves the host itself and refuses loopback, link-local (cloud
metadata endpoints included), private, unique-local, shared, unspecified, multicast and
reserved addresses, unless an allowed prefix names that very address on the same scheme
and port (``http://127.0.0.1:8080/``, ``https://[fd00::7]/``): a prefix with a host *name* never
opens a private address, so a name whose DNS turns to ``169.254.169.254`` or ``127.0.0.1``
is refused. It then connects to the address it checked, so a second lookup cannot change
it, with TLS verified against the host name (SNI and certificate; the system's CA store,
or ``SSL_CERT_FILE``). Redirects are followed here, at most :data:`MAX_REDIRECTS`, each
one checked again against the allowlist and the address rules; one to another scheme
(``file://``, ``s3://``) is refused. Nothing of ours travels with a request: no
``Authorization``, no cookies, no client certificate, no proxy (proxy variables are not
read: a proxy would resolve the name where we cannot check it).

Sizes and time: a ``Content-Length`` over the limit is refused before a byte of the body
is read; a body without one is read through :func:`flows.fetch.read_bounded`, at most the
limit plus one byte; the whole fetch, redirects included, ends by ``timeout_s`` however
slowly the server sends.

Failures: :class:`flows.fetch.FetchError` for what retrying cannot mend (``not_found``:
404, 410, a host name that does not exist; ``forbidden``: 401, 403, 407;
``too_large``; ``uri_not_allowed``; ``fetch_failed``: another 4xx, a bad redirect, a TLS
certificate that does not verify, a reply that is not HTTP). :class:`HttpUnavailable`, a
:class:`flows.fetch.FetchUnavailable` and so an :class:`flows.outage.Outage`, for what may
pass: 5xx, 408, 425, 429, timeouts, refused or broken connections and failed DNS lookups,
for the caller to retry and wait out.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import ipaddress
import socket
import ssl
import threading
import time
from typing import Optional, Union
from urllib.parse import quote, urljoin, urlsplit

from flows.allowlist import WEB_SCHEMES, UriAllowlist
from flows.fetch import FetchError, FetchUnavailable, read_bounded

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

#: Redirects followed before a fetch is refused (browsers allow 20; documents need few).
MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_NOT_FOUND = frozenset({404, 410})
_FORBIDDEN = frozenset({401, 403, 407})
#: Statuses that may pass (besides 5xx): request timeout, too early, too many requests.
_TRANSIENT = frozenset({408, 425, 429})
#: Characters a request target keeps as they are: RFC 3986's reserved ones, and "%".
_SAFE = "/?:@!$&'()*+,;=%~[]"
_HEADERS = {"User-Agent": "embedstream", "Accept-Encoding": "identity", "Connection": "close"}


class HttpUnavailable(FetchUnavailable):
    """The server or the way to it is down or throttling: retry, do not dead-letter.
    ``reason``: ``http_<status>``, ``timeout``, ``connection`` or ``dns``;
    ``retry_after``: the seconds a 429 or 503 asked for, if it said."""

    def __init__(self, reason: str, message: str, retry_after: Optional[float] = None) -> None:
        super().__init__(message)
        self.reason, self.message, self.retry_after = reason, message, retry_after


def fetch_https(
    uri: str,
    *,
    allowlist: UriAllowlist,
    max_bytes: int,
    timeout_s: float,
    ssl_context: Optional[ssl.SSLContext] = None,
) -> bytes:
    """The body at ``uri``, at most ``max_bytes``, within ``timeout_s`` seconds in all.
    ``ssl_context``: how servers are verified (default: the system's CAs)."""
    context = ssl_context or _default_context()
    deadline = time.monotonic() + timeout_s
    current, first = uri, uri
    for hop in range(MAX_REDIRECTS + 1):
        came = f" (redirected from {first})" if hop else ""
        try:
            allowlist.check(current)
        except FetchError as e:
            raise FetchError(e.reason, e.message + came) from None
        status, location, retry_after, body = _get(
            current, allowlist, max_bytes, deadline, timeout_s, context, came
        )
        if body is not None:
            return body
        if status not in _REDIRECTS:
            raise _refusal(status, current, came, retry_after)
        if not location:
            raise FetchError("fetch_failed", f"{current}: HTTP {status} without a Location{came}")
        current = urljoin(current, location.strip()).partition("#")[0]
        if urlsplit(current).scheme not in WEB_SCHEMES:
            raise FetchError("uri_not_allowed", f"{first} redirects off http(s), which is not followed")
    raise FetchError("fetch_failed", f"{first}: more than {MAX_REDIRECTS} redirects")


def refused_kind(ip: IPAddress) -> Optional[str]:
    """Why ``ip`` is no address to fetch from ("loopback", "link-local", …), or None for
    a public one. An IPv4 address inside an IPv6 one (mapped, 6to4, Teredo, NAT64) is
    judged as itself."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if inner is None and ip in _NAT64:
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if inner is not None and refused_kind(inner):
            return f"{refused_kind(inner)}, inside IPv6"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_multicast:
        return "multicast"
    if isinstance(ip, ipaddress.IPv6Address) and ip in _UNIQUE_LOCAL:
        return "unique-local"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "not globally routable"
    return None


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_UNIQUE_LOCAL = ipaddress.IPv6Network("fc00::/7")


def _get(
    uri: str,
    allowlist: UriAllowlist,
    max_bytes: int,
    deadline: float,
    timeout_s: float,
    context: ssl.SSLContext,
    came: str,
) -> tuple[int, Optional[str], Optional[float], Optional[bytes]]:
    """One request: (status, Location, Retry-After, the body of a 2xx reply, else None)."""
    parts = urlsplit(uri)
    host, port = parts.hostname or "", parts.port or WEB_SCHEMES[parts.scheme]
    addresses = _addresses(host, port, allowlist, deadline, uri, came)
    # As a browser sends it: spaces and non-ASCII escaped, escapes already there kept.
    target = quote((parts.path or "/") + (f"?{parts.query}" if parts.query else ""), safe=_SAFE)
    sock = _connect(addresses, port, deadline, uri)
    # The deadline holds however slowly a reply comes: at it the connection is shut down,
    # which ends any read in progress. Through a duplicate of the descriptor, as TLS takes
    # the socket object over; under a lock, so a descriptor closed and reused meanwhile is
    # never touched.
    expired, lock, fd, family = threading.Event(), threading.Lock(), sock.fileno(), sock.family

    def expire() -> None:
        with lock:
            if expired.is_set():
                return
            expired.set()
            try:
                with socket.fromfd(fd, family, socket.SOCK_STREAM) as dup:
                    dup.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(max(deadline - time.monotonic(), 0.0), expire)
    timer.daemon = True
    timer.start()
    conn: Optional[http.client.HTTPConnection] = None
    reply: Optional[http.client.HTTPResponse] = None
    try:
        if parts.scheme == "https":
            sock = context.wrap_socket(sock, server_hostname=host)
            conn = http.client.HTTPSConnection(host, port, context=context)
        else:
            conn = http.client.HTTPConnection(host, port)
        conn.sock = sock  # already connected, to the address checked above
        conn.request("GET", target, headers=_HEADERS)
        reply = conn.getresponse()
        if not 200 <= reply.status < 300:
            return reply.status, reply.getheader("Location"), _retry_after(reply), None
        length = _content_length(reply)
        if length is not None and length > max_bytes:
            raise FetchError("too_large", f"{uri} is {length} bytes, over the limit of {max_bytes}{came}")
        body = read_bounded(reply, max_bytes)
        if (length is not None and len(body) < length) or expired.is_set():
            raise http.client.IncompleteRead(body, (length or 0) - len(body))
        return reply.status, None, None, body
    except FetchError as e:
        if e.reason == "too_large" and not e.message.startswith(uri):
            raise FetchError("too_large", f"{uri}: {e.message}{came}") from None
        raise
    except ssl.SSLCertVerificationError as e:
        raise FetchError(
            "fetch_failed", f"{uri}: TLS certificate refused: {e.verify_message}{came}"
        ) from None
    except ssl.SSLError as e:
        if expired.is_set() or isinstance(e, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
            raise HttpUnavailable("connection", f"{uri}: TLS connection cut: {_said(e)}{came}") from None
        raise FetchError("fetch_failed", f"{uri}: TLS failed: {_said(e)}{came}") from None
    except ValueError as e:  # http.client refuses a target with control characters
        raise FetchError("uri_not_allowed", f"{uri}: {e}{came}") from None
    except (OSError, http.client.IncompleteRead, http.client.RemoteDisconnected) as e:
        if expired.is_set() or isinstance(e, socket.timeout):
            raise HttpUnavailable(
                "timeout", f"{uri}: no complete reply within {timeout_s:g} s{came}"
            ) from None
        raise HttpUnavailable("connection", f"{uri}: connection failed: {_said(e)}{came}") from None
    except http.client.HTTPException as e:
        raise FetchError("fetch_failed", f"{uri}: not an HTTP reply: {_said(e)}{came}") from None
    finally:
        timer.cancel()
        with lock:
            expired.set()  # from here on the timer leaves the descriptor alone
            if reply is not None:  # it holds the connection once the server says close
                reply.close()
            (conn or sock).close()


def _addresses(
    host: str, port: int, allowlist: UriAllowlist, deadline: float, uri: str, came: str
) -> list[IPAddress]:
    """The addresses of ``host`` that may be fetched from, in the resolver's order; a host
    left with none is refused, naming what it resolved to and why."""
    try:
        found = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            # getaddrinfo has no timeout of its own: the fetch's deadline bounds the wait.
            lookup = _resolver.submit(
                socket.getaddrinfo, host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
            infos = lookup.result(timeout=max(deadline - time.monotonic(), 0.0))
        except concurrent.futures.TimeoutError:
            raise HttpUnavailable("timeout", f"{uri}: no DNS answer for {host} in time{came}") from None
        except socket.gaierror as e:
            if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
                raise FetchError("not_found", f"{uri}: host {host} does not exist{came}") from None
            raise HttpUnavailable("dns", f"{uri}: cannot resolve {host}: {e.strerror}{came}") from None
        found = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
    allowed, refused = [], []
    for ip in found:
        kind = refused_kind(ip)
        if kind and not allowlist.names_address(str(ip), uri.partition("://")[0].lower(), port):
            refused.append(f"{ip} ({kind})")
        else:
            allowed.append(ip)
    if not allowed:
        raise FetchError(
            "uri_not_allowed",
            f"{uri}: {host} resolves to {', '.join(refused)}; only an allowed prefix that names "
            f"the address opens it{came}",
        )
    return allowed


def _connect(addresses: list[IPAddress], port: int, deadline: float, uri: str) -> socket.socket:
    """A connection to the first of ``addresses`` that answers."""
    error: Optional[OSError] = None
    for ip in addresses:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            return socket.create_connection((str(ip), port), timeout=left)
        except OSError as e:
            error = e
    if error is None or isinstance(error, socket.timeout):
        raise HttpUnavailable("timeout", f"{uri}: no connection within the fetch's time")
    raise HttpUnavailable("connection", f"{uri}: cannot connect: {_said(error)}")


def _refusal(status: int, uri: str, came: str, retry_after: Optional[float] = None) -> Exception:
    said = f"{uri}: HTTP {status}{came}"
    if status in _NOT_FOUND:
        return FetchError("not_found", said)
    if status in _FORBIDDEN:
        return FetchError("forbidden", said)
    if status >= 500 or status in _TRANSIENT:
        return HttpUnavailable(f"http_{status}", said, retry_after)
    return FetchError("fetch_failed", said)


def _retry_after(reply: http.client.HTTPResponse) -> Optional[float]:
    """Retry-After in seconds; its HTTP-date form is left to the caller's backoff."""
    try:
        return max(float(reply.getheader("Retry-After", "")), 0.0)
    except ValueError:
        return None


def _content_length(reply: http.client.HTTPResponse) -> Optional[int]:
    """The announced body size, or None where there is none (chunked, or until close)."""
    if reply.chunked:
        return None
    try:
        return int(reply.getheader("Content-Length", ""))
    except ValueError:
        return None


def _said(error: BaseException) -> str:
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


_context: Optional[ssl.SSLContext] = None
#: Threads that run DNS lookups, so that a fetch can stop waiting for one.
_resolver = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="embedstream-dns")


def _default_context() -> ssl.SSLContext:
    global _context
    if _context is None:  # loading the CA store takes milliseconds: once per process
        _context = ssl.create_default_context()
    return _context
