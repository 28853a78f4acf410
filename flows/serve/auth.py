"""API key check of ``embedstream serve``: an ASGI middleware in front of every route
but the probes and /metrics, which carry no data and are asked by the cluster without
credentials."""

from __future__ import annotations

import hmac
import json
from typing import Any, Callable

#: Paths asked without a key: Kubernetes' probes and Prometheus.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

ASGIApp = Callable[..., Any]


class BearerAuth:
    """Requires ``Authorization: Bearer <key>``, compared in constant time."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self._expected = f"Bearer {key}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
                break
        if hmac.compare_digest(given, self._expected):
            await self.app(scope, receive, send)
            return
        message = (
            "missing API key: send Authorization: Bearer <key>"
            if not given
            else "invalid API key in the Authorization header"
        )
        body = json.dumps(
            {
                "error": {
                    "message": message,
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
