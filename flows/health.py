"""Liveness and readiness of a worker or sink process, served with ``/metrics``.

Each Bytewax worker thread runs a batch loop: it asks its source for a batch, carries
the batch through every step, and comes back for the next. The source is wrapped
(:func:`watched`) so that every call marks its loop as advancing; an idle loop comes
back every ``poll_ms``, so a loop that has not come back for ``stall_s`` holds work it
does not finish.

- ``/healthz`` (liveness) fails while any loop has made no progress for longer than
  ``stall_s``. A loop waiting out an outage (:func:`waiting`) advances with every retry,
  so it stays alive.
- ``/readyz`` (readiness) succeeds once a loop has started, while no loop waits out an
  outage and none is stalled.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable, Optional

from bytewax.inputs import (
    DynamicSource,
    FixedPartitionedSource,
    StatefulSourcePartition,
    StatelessSourcePartition,
)


@dataclass
class _Loop:
    name: str
    #: When the loop last advanced (time.monotonic()).
    last: float
    #: The outage it waits out, if any.
    waiting: Optional[str] = None
    #: Seconds it may stay away besides stall_s: the pause before its next retry.
    away_s: float = 0.0


class Loops:
    """The batch loops of this process, one per worker thread."""

    def __init__(self, stall_s: float = 300.0) -> None:
        self.stall_s = stall_s
        self._lock = threading.Lock()
        self._loops: dict[int, _Loop] = {}
        self._started = False

    def advanced(self, waiting: Optional[str] = None, away_s: float = 0.0) -> None:
        """The calling thread's loop moved on (``waiting``: and waits out that outage,
        back in ``away_s``)."""
        thread = threading.current_thread()
        with self._lock:
            self._loops[thread.ident] = _Loop(thread.name, time.monotonic(), waiting, away_s)
            self._started = True

    def waits(self, outage: Optional[str], away_s: float = 0.0) -> None:
        """The calling thread's loop, if it is one of the watched ones, waits out
        ``outage`` (None: the wait is over). A thread that runs no watched source (the
        CLI's main thread, a test) is not a loop: its waits leave no entry behind that
        would later look stalled."""
        thread = threading.current_thread()
        with self._lock:
            if thread.ident in self._loops:
                self._loops[thread.ident] = _Loop(thread.name, time.monotonic(), outage, away_s)

    def ended(self) -> None:
        """The calling thread's source is done: its loop is no longer watched."""
        with self._lock:
            self._loops.pop(threading.get_ident(), None)

    def liveness(self) -> tuple[bool, str]:
        now = time.monotonic()
        with self._lock:
            stalled = [
                f"{loop.name}: no progress for {now - loop.last:.0f} s (stall_s {self.stall_s:g})"
                for loop in self._loops.values()
                if now - loop.last > self.stall_s + loop.away_s
            ]
        return (False, "\n".join(stalled)) if stalled else (True, "alive")

    def readiness(self) -> tuple[bool, str]:
        alive, why = self.liveness()
        if not alive:
            return False, why
        with self._lock:
            if not self._started:
                return False, "starting"
            waits = [f"{loop.name}: waiting: {loop.waiting}" for loop in self._loops.values() if loop.waiting]
        return (False, "\n".join(waits)) if waits else (True, "ready")


#: This process's loops.
LOOPS = Loops()


def waiting(outage: str, retry_in_s: float) -> None:
    """The calling loop waits out ``outage`` (the store, the registry, the broker) and
    retries in ``retry_in_s``: alive, not ready. Call it before every pause between
    retries, and :func:`resumed` once the wait is over."""
    LOOPS.waits(outage, away_s=retry_in_s)


def resumed() -> None:
    """The calling loop's outage wait is over (or there was none)."""
    LOOPS.waits(None)


# --- the sources' side -----------------------------------------------------------------------


def watched(source: Any) -> Any:
    """``source`` (a Bytewax source) with every batch call marking its loop as advancing."""
    if isinstance(source, FixedPartitionedSource):
        return _WatchedFixed(source)
    if isinstance(source, DynamicSource):
        return _WatchedDynamic(source)
    raise TypeError(f"not a partitioned or dynamic Bytewax source: {type(source).__name__}")


class _Watched:
    """A source partition whose batch calls mark the calling loop as advancing."""

    def __init__(self, part: Any) -> None:
        self.part = part

    def next_batch(self) -> list:
        LOOPS.advanced()
        try:
            return self.part.next_batch()
        except StopIteration:
            LOOPS.ended()
            raise

    def next_awake(self):
        return self.part.next_awake()

    def close(self) -> None:
        LOOPS.ended()
        self.part.close()


class _WatchedStateless(_Watched, StatelessSourcePartition):
    pass


class _WatchedStateful(_Watched, StatefulSourcePartition):
    def snapshot(self):
        return self.part.snapshot()


class _WatchedFixed(FixedPartitionedSource):
    def __init__(self, source: FixedPartitionedSource) -> None:
        self.source = source

    def list_parts(self) -> list[str]:
        return self.source.list_parts()

    def build_part(self, step_id: str, for_part: str, resume_state: Any) -> _WatchedStateful:
        return _WatchedStateful(self.source.build_part(step_id, for_part, resume_state))


class _WatchedDynamic(DynamicSource):
    def __init__(self, source: DynamicSource) -> None:
        self.source = source

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _WatchedStateless:
        return _WatchedStateless(self.source.build(step_id, worker_index, worker_count))


# --- the endpoints ----------------------------------------------------------------------------

WsgiApp = Callable[[dict, Callable], Iterable[bytes]]


def app(fallback: WsgiApp) -> WsgiApp:
    """A WSGI app answering ``/healthz`` and ``/readyz`` (200 or 503, with the reason),
    and everything else with ``fallback``."""
    checks = {"/healthz": LOOPS.liveness, "/readyz": LOOPS.readiness}

    def respond(environ: dict, start_response: Callable) -> Iterable[bytes]:
        check = checks.get(environ.get("PATH_INFO", ""))
        if check is None:
            return fallback(environ, start_response)
        ok, why = check()
        status = "200 OK" if ok else "503 Service Unavailable"
        start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
        return [why.encode() + b"\n"]

    return respond


def serve(host: str, port: int, stall_s: float) -> None:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` from a daemon
    thread (prometheus_client's WSGI app on the standard library's server); port 0 turns
    it off."""
    LOOPS.stall_s = stall_s
    if not port:
        return
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client import make_wsgi_app
    from prometheus_client.exposition import ThreadingWSGIServer

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds
            pass

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    server = make_server(host, port, app(make_wsgi_app()), Server, Quiet)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
