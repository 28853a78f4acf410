"""``https://`` and ``http://`` fetches against real local servers (the standard library's
HTTP server, TLS from a certificate authority made for the test session): the SSRF rules
(metadata addresses, names that resolve to loopback, redirects off the allowlist or off
http), sizes refused before the body is read and bodies cut at the limit plus one byte,
statuses typed as dead-letter reasons or as outages to wait out, and the fetch's timeout."""

from __future__ import annotations

import http.server
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections import Counter
from urllib.parse import parse_qs, quote, urlsplit

import pytest
import trustme

from flows import outage
from flows.allowlist import UriAllowlist
from flows.fetch import FetchError, FetchUnavailable, fetch
from flows.fetch_https import HttpUnavailable, fetch_https, refused_kind
from flows.outage import Outage

MIB = 1 << 20


class Server(http.server.ThreadingHTTPServer):
    """A local server whose paths play the parts a document server may play. It counts
    connections, requests by path, and the body bytes its socket accepted."""

    daemon_threads = True

    def __init__(self, host: str, context: ssl.SSLContext | None = None) -> None:
        super().__init__((host, 0), Handler)
        self.context = context
        self.connections = 0
        self.requests: Counter[str] = Counter()
        self.sent: dict[str, int] = {}
        self.closed_before_body: dict[str, bool] = {}
        self.lock = threading.Lock()
        self.scheme = "https" if context else "http"
        self.base = f"{self.scheme}://{host}:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def handle_error(self, request, client_address) -> None:
        pass  # clients that hang up mid-body are what several tests are about

    def get_request(self):
        sock, address = super().get_request()
        with self.lock:
            self.connections += 1
        if self.context:
            sock = self.context.wrap_socket(sock, server_side=True)
        return sock, address


class V6Server(Server):
    address_family = socket.AF_INET6


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        route, _, arg = parts.path.lstrip("/").partition("/")
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        with self.server.lock:
            self.server.requests[route] += 1
        getattr(self, f"route_{route.replace('-', '_')}", self.route_doc)(arg, query)

    def reply(self, status: int, body: bytes = b"", **headers: str) -> None:
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def route_doc(self, arg: str, query: dict) -> None:
        self.reply(200, f"document from {self.server.base}".encode())

    def route_size(self, arg: str, query: dict) -> None:
        self.reply(200, b"x" * int(arg))

    def route_path(self, arg: str, query: dict) -> None:
        self.reply(200, self.path.encode())

    def route_headers(self, arg: str, query: dict) -> None:
        self.reply(200, json.dumps(dict(self.headers.items())).encode())

    def route_status(self, arg: str, query: dict) -> None:
        extra = {"Retry_After": "7"} if arg in ("429", "503") else {}
        self.reply(int(arg), b"not this", **extra)

    def route_redirect(self, arg: str, query: dict) -> None:
        self.reply(int(query.get("code", "302")), Location=query["to"])

    def route_loop(self, arg: str, query: dict) -> None:
        self.reply(302, Location=f"/loop/{int(arg or 0) + 1}")

    def route_flaky(self, arg: str, query: dict) -> None:
        """503 the first ``arg`` times it is asked, then the document."""
        with self.server.lock:
            asked = self.server.requests["flaky"]
        self.reply(503, b"busy") if asked <= int(arg) else self.route_doc(arg, query)

    def route_announced(self, arg: str, query: dict) -> None:
        """Says ``arg`` bytes, then waits to see whether the client hangs up before
        asking for the body: only a client still waiting after 5 s gets it."""
        self.send_response(200)
        self.send_header("Content-Length", arg)
        self.end_headers()
        self.wfile.flush()
        self.connection.settimeout(5)
        try:
            hung_up = self.connection.recv(1) == b""
        except socket.timeout:
            hung_up = False
        except OSError:
            hung_up = True
        self.server.closed_before_body[self.path] = hung_up
        self.stream(b"", int(arg)) if not hung_up else self.count(0)

    def route_chunked(self, arg: str, query: dict) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.stream(b"", int(arg), chunked=True)

    def route_until_close(self, arg: str, query: dict) -> None:
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        self.stream(b"", int(arg))

    def route_liar(self, arg: str, query: dict) -> None:
        """Says 5 bytes and sends 5,000."""
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"12345" + b"y" * 4995)

    def route_short(self, arg: str, query: dict) -> None:
        """Says 1,000 bytes, sends 10 and hangs up."""
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"0123456789")
        self.close_connection = True

    def route_drip(self, arg: str, query: dict) -> None:
        """A byte every 0.1 s: 100 bytes in 10 s."""
        self.send_response(200)
        self.send_header("Content-Length", "100")
        self.end_headers()
        for _ in range(100):
            self.wfile.write(b".")
            self.wfile.flush()
            time.sleep(0.1)

    def route_silent(self, arg: str, query: dict) -> None:
        time.sleep(3)
        self.reply(200, b"late")

    def stream(self, _: bytes, total: int, chunked: bool = False) -> None:
        sent, block = 0, b"z" * 65536
        try:
            while sent < total:
                piece = block[: total - sent]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                sent += len(piece)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True
        self.count(sent)

    def count(self, sent: int) -> None:
        with self.server.lock:
            self.server.sent[self.path] = sent


@pytest.fixture(scope="module")
def plain():
    server = Server("127.0.0.1")
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def other():
    """Another loopback server, which no test's allowlist opens."""
    server = Server("127.0.0.1")
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def tls(ca):
    """HTTPS on 127.0.0.1 with a certificate for the name ``localhost`` only."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    server = Server("127.0.0.1", context)
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def trusting(ca):
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def get(uri: str, *prefixes: str, max_bytes: int = MIB, timeout_s: float = 10, **kw) -> bytes:
    return fetch_https(uri, allowlist=UriAllowlist(prefixes), max_bytes=max_bytes, timeout_s=timeout_s, **kw)


def refused(uri: str, *prefixes: str, **kw) -> FetchError:
    with pytest.raises(FetchError) as e:
        get(uri, *prefixes, **kw)
    return e.value


def unavailable(uri: str, *prefixes: str, **kw) -> HttpUnavailable:
    with pytest.raises(HttpUnavailable) as e:
        get(uri, *prefixes, **kw)
    assert isinstance(e.value, FetchUnavailable) and isinstance(e.value, Outage)
    return e.value


def to(server: Server, target: str, code: int = 302) -> str:
    return f"{server.base}/redirect?code={code}&to={quote(target, safe='')}"


# SSRF: addresses


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("169.254.169.254", "link-local"),  # AWS, GCP, Azure instance metadata
        ("fd00:ec2::254", "unique-local"),  # AWS instance metadata over IPv6
        ("::ffff:169.254.169.254", "link-local, inside IPv6"),
        ("64:ff9b::a9fe:a9fe", "link-local, inside IPv6"),  # NAT64
        ("2002:7f00:1::", "loopback, inside IPv6"),  # 6to4
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("10.1.2.3", "private"),
        ("172.16.0.9", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "not globally routable"),
        ("224.0.0.251", "multicast"),
        ("240.0.0.1", "reserved"),
        ("::7f00:1", "reserved"),  # IPv4-compatible, long deprecated
        ("93.184.215.14", None),
        ("2606:4700::6810:84e5", None),
    ],
)
def test_addresses_that_are_not_public_are_refused(address, kind):
    assert refused_kind(ipaddress.ip_address(address)) == kind


def test_the_metadata_address_is_refused_without_a_connection(plain):
    e = refused("http://169.254.169.254/latest/meta-data/iam/security-credentials/", f"{plain.base}/")
    assert e.reason == "uri_not_allowed"
    # Redirected there from an allowed server: refused before connecting (a connection
    # to it from here would time out instead).
    e = refused(to(plain, "http://169.254.169.254/latest/meta-data/"), f"{plain.base}/", timeout_s=30)
    assert e.reason == "uri_not_allowed" and "redirected from" in e.message


def test_a_name_that_resolves_to_loopback_is_refused_unless_its_address_is_named(plain):
    port = plain.server_address[1]
    before = plain.connections
    e = refused(f"http://localhost:{port}/doc", f"http://localhost:{port}/")
    assert e.reason == "uri_not_allowed"
    assert "127.0.0.1 (loopback)" in e.message
    assert plain.connections == before
    # Named by address, the same server is fetched by its name: connected to the
    # address that was checked.
    body = get(f"http://localhost:{port}/doc", f"http://localhost:{port}/", f"{plain.base}/")
    assert body == f"document from {plain.base}".encode()
    assert plain.connections == before + 1


def test_an_address_named_for_one_port_opens_no_other_port_to_a_name(plain, other):
    """A prefix naming 127.0.0.1 on one server's port opens that address only on that
    port and scheme: a name that resolves (or rebinds) to 127.0.0.1 reaches nothing
    else there, such as another local service."""
    port, elsewhere = plain.server_address[1], other.server_address[1]
    before = other.connections
    e = refused(f"http://localhost:{elsewhere}/doc", f"http://localhost:{elsewhere}/", f"{plain.base}/")
    assert e.reason == "uri_not_allowed" and "127.0.0.1 (loopback)" in e.message
    assert other.connections == before
    e = refused(f"https://localhost:{port}/doc", f"https://localhost:{port}/", f"{plain.base}/")
    assert e.reason == "uri_not_allowed"


def test_a_redirect_to_a_loopback_name_is_checked_again():
    """From an allowed server on 127.0.0.2 to ``localhost``, whose prefix is allowed
    but whose address nothing names."""
    try:
        start = Server("127.0.0.2")
    except OSError as e:
        pytest.skip(f"127.0.0.2 cannot be bound here: {e}")
    target = Server("127.0.0.1")
    try:
        port = target.server_address[1]
        uri = to(start, f"http://localhost:{port}/doc")
        e = refused(uri, f"{start.base}/", f"http://localhost:{port}/")
        assert e.reason == "uri_not_allowed" and "loopback" in e.message
        assert target.connections == 0
        assert get(uri, f"{start.base}/", f"http://localhost:{port}/", f"{target.base}/") == (
            f"document from {target.base}".encode()
        )
    finally:
        start.shutdown()
        target.shutdown()


# SSRF: redirects


def test_a_redirect_to_a_port_the_allowlist_does_not_name_is_refused(plain, other):
    e = refused(to(plain, f"{other.base}/doc"), f"{plain.base}/")
    assert e.reason == "uri_not_allowed"
    assert e.message.startswith(f"{other.base}/doc is under no allowed URI prefix (redirected from ")
    assert other.connections == 0


def test_a_redirect_outside_the_allowed_path_is_refused(plain):
    e = refused(to(plain, "/doc"), f"{plain.base}/redirect")
    assert e.reason == "uri_not_allowed" and f"{plain.base}/doc is under no" in e.message
    assert get(to(plain, "/doc"), f"{plain.base}/redirect", f"{plain.base}/doc") == (
        f"document from {plain.base}".encode()
    )


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirects_within_the_allowlist_are_followed(plain, code):
    assert get(to(plain, "/size/3", code), f"{plain.base}/") == b"xxx"


@pytest.mark.parametrize(
    "target",
    [
        "file:///etc/passwd",
        "s3://docs/secret.pdf",
        "gs://docs/secret.pdf",
        "az://docs/secret.pdf",
        "abfss://docs@account.dfs.core.windows.net/secret.pdf",
        "data:text/plain,not%20a%20document",
        "ftp://127.0.0.1/secret.pdf",
    ],
)
def test_a_redirect_off_http_is_refused_even_to_an_allowed_prefix(plain, target):
    allowed = ("s3://docs/", "gs://docs/", "az://docs/", "abfss://docs@account.dfs.core.windows.net/")
    e = refused(to(plain, target), f"{plain.base}/", *allowed)
    assert e.reason == "uri_not_allowed" and "redirects off http(s)" in e.message


def test_a_redirect_from_https_to_http_needs_an_http_prefix(tls, plain, trusting):
    port = tls.server_address[1]
    start = f"https://localhost:{port}/redirect?to={quote(plain.base + '/doc', safe='')}"
    prefixes = (f"https://localhost:{port}/", f"https://127.0.0.1:{port}/")
    before = plain.connections
    e = refused(start, *prefixes, ssl_context=trusting)
    assert e.reason == "uri_not_allowed" and plain.connections == before
    body = get(start, *prefixes, f"{plain.base}/doc", ssl_context=trusting)
    assert body == f"document from {plain.base}".encode()


def test_a_redirect_from_http_to_https_is_followed_when_allowed(tls, plain, trusting):
    port = tls.server_address[1]
    start = to(plain, f"https://localhost:{port}/doc")
    e = refused(start, f"{plain.base}/", f"https://127.0.0.1:{port}/", ssl_context=trusting)
    assert e.reason == "uri_not_allowed" and f"https://localhost:{port}/doc is under no" in e.message
    prefixes = (f"{plain.base}/", f"https://localhost:{port}/", f"https://127.0.0.1:{port}/")
    assert get(start, *prefixes, ssl_context=trusting) == f"document from {tls.base}".encode()


def test_an_ipv6_address_named_by_a_prefix_is_fetched():
    try:
        server = V6Server("::1")
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    try:
        base = f"http://[::1]:{server.server_address[1]}"
        assert json.loads(get(f"{base}/headers", f"{base}/"))["Host"] == base.removeprefix("http://")
        e = refused(f"http://[::2]:{server.server_address[1]}/doc", f"{base}/")
        assert e.reason == "uri_not_allowed"
    finally:
        server.shutdown()


def test_credentials_in_a_redirect_are_refused_and_not_repeated(plain):
    port = plain.server_address[1]
    e = refused(to(plain, f"http://reader:hunter2@127.0.0.1:{port}/doc"), f"{plain.base}/")
    said = e.message.partition(" (redirected from ")[0]
    assert e.reason == "uri_not_allowed" and "credentials" in said
    assert said.startswith(f"http://127.0.0.1:{port}/doc") and "hunter2" not in said


def test_redirect_loops_end(plain):
    e = refused(f"{plain.base}/loop/0", f"{plain.base}/")
    assert e.reason == "fetch_failed" and "more than 5 redirects" in e.message


def test_nothing_of_ours_travels_with_a_request(plain):
    sent = json.loads(get(f"{plain.base}/headers", f"{plain.base}/"))
    names = {name.lower() for name in sent}
    assert not names & {"authorization", "cookie", "proxy-authorization"}
    assert sent["Host"] == f"127.0.0.1:{plain.server_address[1]}"
    assert sent["Accept-Encoding"] == "identity"


def test_a_path_is_sent_escaped_as_a_browser_would(plain):
    body = get(f"{plain.base}/path/naïve report+1.pdf?v=a%20b", f"{plain.base}/")
    assert body == b"/path/na%C3%AFve%20report+1.pdf?v=a%20b"


# TLS


def test_tls_is_verified_against_the_name_while_the_checked_address_is_dialled(tls, trusting):
    port = tls.server_address[1]
    uri = f"https://localhost:{port}/doc"
    prefixes = (f"https://localhost:{port}/", f"https://127.0.0.1:{port}/")
    assert get(uri, *prefixes, ssl_context=trusting) == f"document from {tls.base}".encode()
    # The certificate names localhost, not the address: by address it does not verify.
    e = refused(f"https://127.0.0.1:{port}/doc", *prefixes, ssl_context=trusting)
    assert e.reason == "fetch_failed" and "TLS certificate refused" in e.message
    # Nor does it with the system's CAs, which never signed it.
    e = refused(uri, *prefixes)
    assert e.reason == "fetch_failed" and "TLS certificate refused" in e.message


# Sizes


def test_an_announced_size_over_the_limit_is_refused_before_the_body(plain):
    path = "/announced/268435456"
    e = refused(f"{plain.base}{path}", f"{plain.base}/")
    assert e.reason == "too_large" and "268435456 bytes" in e.message
    deadline = time.monotonic() + 10
    while path not in plain.sent and time.monotonic() < deadline:
        time.sleep(0.01)
    assert plain.closed_before_body[path] is True
    assert plain.sent[path] == 0


@pytest.mark.parametrize("route", ["chunked", "until-close"])
def test_a_body_without_a_size_is_cut_at_the_limit_plus_one_byte(plain, route):
    path = f"/{route}/{64 * MIB}"
    e = refused(f"{plain.base}{path}", f"{plain.base}/", max_bytes=MIB)
    assert e.reason == "too_large" and f"more than the limit of {MIB} bytes" in e.message
    deadline = time.monotonic() + 10
    while path not in plain.sent and time.monotonic() < deadline:
        time.sleep(0.01)
    # What the server got out before the connection was dropped: the limit plus what
    # the two sockets' buffers hold, not the 64 MiB it had to send.
    assert plain.sent[path] < 24 * MIB


@pytest.mark.parametrize("route", ["chunked", "until-close"])
def test_a_body_at_the_limit_is_read_whole(plain, route):
    assert get(f"{plain.base}/{route}/{MIB}", f"{plain.base}/", max_bytes=MIB) == b"z" * MIB
    assert get(f"{plain.base}/size/{MIB}", f"{plain.base}/", max_bytes=MIB) == b"x" * MIB
    assert refused(f"{plain.base}/size/{MIB + 1}", f"{plain.base}/", max_bytes=MIB).reason == "too_large"


def test_bytes_past_the_announced_size_are_never_read(plain):
    assert get(f"{plain.base}/liar", f"{plain.base}/") == b"12345"


# Failures: permanent ones typed, passing ones for the caller to wait out


@pytest.mark.parametrize(
    ("status", "reason"),
    [(404, "not_found"), (410, "not_found"), (401, "forbidden"), (403, "forbidden"), (400, "fetch_failed")],
)
def test_permanent_statuses_are_typed(plain, status, reason):
    e = refused(f"{plain.base}/status/{status}", f"{plain.base}/")
    assert e.reason == reason and f"HTTP {status}" in e.message


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429, 408])
def test_passing_statuses_are_outages(plain, status):
    e = unavailable(f"{plain.base}/status/{status}", f"{plain.base}/")
    assert e.reason == f"http_{status}"
    assert e.retry_after == (7.0 if status in (429, 503) else None)


def test_connection_failures_and_cut_bodies_are_outages(plain):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert unavailable(f"{closed}/doc", f"{closed}/").reason == "connection"
    assert unavailable(f"{plain.base}/short", f"{plain.base}/").reason == "connection"


@pytest.mark.parametrize("route", ["drip", "silent"])
def test_a_fetch_ends_at_its_timeout_however_slowly_the_server_sends(plain, route):
    e = unavailable(f"{plain.base}/{route}", f"{plain.base}/", timeout_s=0.5)
    assert e.reason == "timeout" and "0.5 s" in e.message


def test_an_outage_is_waited_out_by_the_caller(plain):
    uri = f"{plain.base}/flaky/2"
    body = outage.wait_out(
        "test web server",
        lambda: get(uri, f"{plain.base}/"),
        keep_alive=lambda: None,
        first_delay_s=0.01,
    )
    assert body == f"document from {plain.base}".encode()
    assert plain.requests["flaky"] == 3


def test_the_first_uri_is_checked_too(plain):
    assert refused(f"{plain.base}/doc", "s3://docs/").reason == "uri_not_allowed"
    assert refused(f"{plain.base}/doc").reason == "uri_not_allowed"


def test_the_flows_fetch_sends_web_uris_here(plain):
    """``flows.fetch.fetch``, which the flow calls, checks the allowlist and goes through
    the same address rules."""
    port = plain.server_address[1]
    named, loopback_name = UriAllowlist([f"{plain.base}/"]), UriAllowlist([f"http://localhost:{port}/"])
    assert fetch(f"{plain.base}/size/4", roots=[], max_bytes=MIB, allowlist=named) == b"xxxx"
    for uri, allowlist in [
        (f"http://localhost:{port}/doc", loopback_name),
        (f"{plain.base}/doc", None),
        (to(plain, "http://169.254.169.254/latest/meta-data/"), named),
    ]:
        with pytest.raises(FetchError) as e:
            fetch(uri, roots=[], max_bytes=MIB, allowlist=allowlist)
        assert e.value.reason == "uri_not_allowed"
    with pytest.raises(FetchUnavailable):
        fetch(f"{plain.base}/status/503", roots=[], max_bytes=MIB, allowlist=named)
