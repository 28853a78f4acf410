"""Reading documents from object stores: ``s3://bucket/key``, ``gs://bucket/object``,
``az://container/blob`` and ``abfs[s]://container@account.dfs.core.windows.net/path``,
through obstore (Python bindings to Rust's ``object_store``; requests run on its Tokio
runtime with the GIL released, so a worker's fetch threads overlap).

Credentials and endpoints come from each cloud's standard chain, read by
``object_store`` itself: ``AWS_*`` variables (``AWS_ENDPOINT_URL``, ``AWS_REGION``, keys,
``AWS_WEB_IDENTITY_TOKEN_FILE`` + ``AWS_ROLE_ARN`` for IRSA, the ECS container endpoint,
EC2 instance metadata), ``GOOGLE_*`` (a service account file, workload identity through
the metadata server), ``AZURE_*`` (account, keys, workload identity, managed identity).
``--object-store KEY=VALUE`` passes any of ``object_store``'s keys on top: ``aws_…``
keys go to S3 stores, ``google_…`` to GCS, ``azure_…`` to Azure, and its HTTP client
keys (``timeout``, ``allow_http``, ``proxy_url``, …) to all.

The key of a URI is its path as written, not percent-decoded: S3 event notifications
and ``embedstream publish s3://…`` put the object's real key there.

A read is one ranged GET of the first ``max_bytes`` + 1 bytes: the object's size comes
with the answer's headers (``Content-Range``) and is checked before any of the body is
read, and however large the object, the server sends no more than the limit plus one
byte. Failures: :class:`flows.fetch.FetchError` for what retrying cannot mend
(``not_found``, ``forbidden`` for refused or bad credentials, ``too_large``,
``fetch_failed`` for another 4xx); :class:`flows.fetch.FetchUnavailable` for 5xx,
throttling (429, 503 SlowDown), timeouts and connection errors, for the caller to retry
and wait out. Messages name the URI, the HTTP status and the store's error code, never
the request (an Azure SAS token travels in its query) or any credential.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import obstore
from obstore import exceptions as obstore_errors

from flows.fetch import READ_CHUNK, FetchError, FetchUnavailable, read_bounded

#: Each scheme's prefix of the pass-through keys it takes.
SCHEMES = {"s3": "aws_", "gs": "google_", "az": "azure_", "abfs": "azure_", "abfss": "azure_"}
#: object_store's HTTP client keys (ClientConfig), which every store takes.
CLIENT_KEYS = frozenset(
    {
        "allow_http",
        "allow_invalid_certificates",
        "connect_timeout",
        "default_content_type",
        "http1_only",
        "http2_only",
        "http2_keep_alive_interval",
        "http2_keep_alive_timeout",
        "http2_keep_alive_while_idle",
        "pool_idle_timeout",
        "pool_max_idle_per_host",
        "proxy_url",
        "proxy_ca_certificate",
        "proxy_excludes",
        "randomize_addresses",
        "read_timeout",
        "timeout",
        "user_agent",
    }
)
#: Variables that allow plain http:// endpoints (a local MinIO or SeaweedFS), per scheme.
_ALLOW_HTTP_VARIABLES = {
    "aws_": "AWS_ALLOW_HTTP",
    "google_": "GOOGLE_ALLOW_HTTP",
    "azure_": "AZURE_ALLOW_HTTP",
}
_STATUS = re.compile(r"status code: (\d{3})")
_CODE = re.compile(r"<Code>([A-Za-z0-9.]{1,64})</Code>")
#: The request that failed: its method and scheme://host (never its path or query).
_REQUEST = re.compile(r"Error performing [A-Z]+ (https?://[^/\s?]+)(\S*)")
#: Hosts and paths of the credential providers object_store asks (instance metadata,
#: STS for web identity, OAuth token endpoints).
_CREDENTIAL_SOURCES = (
    "169.254.169.254",
    "169.254.170.2",
    "fd00:ec2::254",
    "metadata.google.internal",
    "sts.",
    "oauth2.googleapis.com",
    "login.microsoftonline.com",
    "/latest/api/token",
    "/latest/meta-data",
    "/metadata/identity",
)


def is_object_uri(uri: str) -> bool:
    return uri.partition("://")[0].lower() in SCHEMES


def parse_options(pairs: Mapping[str, str]) -> dict[str, str]:
    """Checks ``--object-store`` keys: raises ValueError naming one no store takes."""
    options = {}
    for key, value in pairs.items():
        k = key.strip().lower()
        if k not in CLIENT_KEYS and not k.startswith(tuple(SCHEMES.values())):
            raise ValueError(
                f"object store setting {key!r}: prefix it with aws_, google_ or azure_ "
                f"(object_store's keys), or use one of the client keys: {', '.join(sorted(CLIENT_KEYS))}"
            )
        options[k] = value
    return options


class ObjectStores:
    """One obstore store per bucket or container, made on first use and kept."""

    def __init__(
        self,
        options: Optional[Mapping[str, str]] = None,
        timeout_s: float = 60.0,
        environ: Optional[Mapping[str, str]] = None,
    ) -> None:
        self.options = parse_options(options or {})
        self.timeout_s = timeout_s
        self._environ = os.environ if environ is None else environ
        self._stores: dict[str, Any] = {}
        self._lock = threading.Lock()

    def store(self, scheme: str, authority: str) -> Any:
        root = f"{scheme}://{authority}"
        with self._lock:
            store = self._stores.get(root)
            if store is None:
                store = self._stores[root] = self._make(scheme, root)
            return store

    def _make(self, scheme: str, root: str) -> Any:
        prefix = SCHEMES[scheme]
        client: dict[str, Any] = {
            "timeout": f"{max(int(self.timeout_s * 1000), 1)}ms",
            "connect_timeout": f"{max(min(int(self.timeout_s * 1000), 10_000), 1)}ms",
        }
        # Giving client options replaces those object_store would read from the
        # environment: the one that matters, *_ALLOW_HTTP, is read here.
        if self._environ.get(_ALLOW_HTTP_VARIABLES[prefix], "").lower() in ("1", "true", "yes"):
            client["allow_http"] = True
        config = {}
        for key, value in self.options.items():
            if key in CLIENT_KEYS:
                client[key] = _client_value(value)
            elif key.startswith(prefix):
                config[key] = value
        try:
            # Retries are ours (flows.embed_steps), counted and waited out; one try here.
            return obstore.store.from_url(
                root, config=config, client_options=client, retry_config={"max_retries": 0}
            )
        except (obstore_errors.BaseError, ValueError) as e:
            # Not the error's text: it may quote a configured value, a secret among them.
            raise FetchError(
                "fetch_failed",
                f"{root}: the object store cannot be set up ({type(e).__name__}); check the "
                "--object-store keys and the AWS_, GOOGLE_ or AZURE_ variables",
            ) from None

    def read(self, uri: str, *, max_bytes: int, version: Optional[str] = None) -> bytes:
        """The object ``uri`` names (at ``version`` when given), of at most ``max_bytes``."""
        scheme, _, rest = uri.partition("://")
        scheme = scheme.lower()
        authority, _, key = rest.partition("/")
        if scheme not in SCHEMES or not authority or not key:
            raise FetchError("uri_not_allowed", f"{uri}: not an object URI (s3://bucket/key)")
        store = self.store(scheme, authority)
        options: dict[str, Any] = {"range": (0, max_bytes + 1)}
        if version:
            options["version"] = version
        try:
            try:
                answer = obstore.get(store, key, options=options)
            except obstore_errors.GenericError as e:
                if _status(e) != 416:
                    raise
                # Nothing to range over: the object is empty (or was emptied since).
                del options["range"]
                answer = obstore.get(store, key, options=options)
            size = answer.meta["size"]
            if size > max_bytes:
                raise FetchError("too_large", f"{uri} is {size} bytes, over the limit of {max_bytes}")
            try:
                return read_bounded(_Reader(iter(answer.stream(min_chunk_size=READ_CHUNK))), max_bytes)
            except FetchError as e:  # it grew between the headers and the body
                raise FetchError(e.reason, f"{uri}: {e.message}") from None
        except FetchError:
            raise
        except Exception as e:
            raise failure(uri, e) from None


class _Reader:
    """An obstore byte stream as what :func:`flows.fetch.read_bounded` reads."""

    def __init__(self, chunks: Iterator[Any]) -> None:
        self._chunks = chunks
        self._left = memoryview(b"")

    def read(self, n: int) -> bytes:
        if not self._left:
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            self._left = memoryview(bytes(chunk))
        part, self._left = self._left[:n], self._left[n:]
        return bytes(part)


def failure(uri: str, e: Exception) -> Exception:
    """The FetchError or FetchUnavailable for what obstore raised about ``uri`` (a
    listing's too, in ``embedstream publish s3://…``)."""
    text = str(e)
    status = _status(e)
    code = _CODE.search(text)
    said = f"HTTP {status}" if status else _cause(text)
    if code:
        said += f" {code.group(1)}"
    request = _REQUEST.search(text)
    if request and any(source in request.group(1) + request.group(2) for source in _CREDENTIAL_SOURCES):
        # The store was not reached: the credential chain failed on its way there.
        said = f"credentials not obtained from {request.group(1)}: {said}"
    if isinstance(e, (FileNotFoundError, obstore_errors.NotFoundError)):
        return FetchError("not_found", f"{uri} does not exist ({said})")
    if isinstance(e, (obstore_errors.PermissionDeniedError, obstore_errors.UnauthenticatedError)):
        return FetchError("forbidden", f"{uri}: access refused ({said}); check the worker's credentials")
    if isinstance(e, obstore_errors.GenericError):
        if status is None or status >= 500 or status in (408, 429):
            return FetchUnavailable(f"{uri}: the object store is unavailable ({said})")
        if status in (401, 403):
            return FetchError("forbidden", f"{uri}: access refused ({said})")
        if status in (404, 410):
            return FetchError("not_found", f"{uri} does not exist ({said})")
        return FetchError("fetch_failed", f"{uri}: the object store refused the request ({said})")
    if isinstance(e, (obstore_errors.InvalidPathError, obstore_errors.NotSupportedError)):
        return FetchError("fetch_failed", f"{uri}: {type(e).__name__}")
    # A transport error in the body's stream (a connection cut mid-way) and the like.
    return FetchUnavailable(f"{uri}: the object store is unavailable ({type(e).__name__})")


def _status(e: Exception) -> Optional[int]:
    found = _STATUS.search(str(e))
    return int(found.group(1)) if found else None


def _cause(text: str) -> str:
    """A short cause from a transport error's text, without URLs (a SAS token travels in
    one's query)."""
    lowered = text.lower()
    for needle, said in (
        ("timed out", "timed out"),
        ("timedout", "timed out"),
        ("kind: timeout", "timed out"),
        ("connection refused", "connection refused"),
        ("connection reset", "connection reset"),
        ("dns error", "name not resolved"),
        ("error decoding response body", "connection broken mid-body"),
        ("error sending request", "connection failed"),
        ("credential", "credentials unavailable"),
    ):
        if needle in lowered:
            return said
    return "no answer"


def _client_value(value: str) -> Any:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value
