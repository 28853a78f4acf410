"""Waiting out an outage: a dependency that is down (the schema registry, the database,
the object store, the broker) blocks the batch and is retried, never dead-lettered.

    schema = outage.wait_out("registry", lambda: client.get_schema(schema_id),
                             transient=(requests.ConnectionError, requests.Timeout))

:func:`wait_out` calls ``attempt`` until it returns. While it raises :class:`Outage`
(or one of the ``transient`` types), it logs, counts (``embedstream_outage_waits``,
``embedstream_outage_wait_seconds`` and ``embedstream_outage_retries``, labelled by
``what``) and retries with capped exponential backoff; any other exception passes
straight through, for the caller to dead-letter. ``give_up_s`` bounds the wait (None:
wait as long as it takes); past it the last error is raised.

A wait must not cost the worker its place in the consumer group: between attempts,
and at least every ``beat_s`` while sleeping, the keep-alive runs. By default that is
every keeper registered with :func:`add_keeper`: in group mode each member whose
batch is in flight pauses its partitions and polls, so Kafka sees it alive
(``max.poll.interval.ms``), and resumes them on its next batch. Time spent waiting is
not work: :func:`waited_s` is a clock of it, which the batch time budget subtracts.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional, TypeVar

from flows import health, metrics

log = logging.getLogger("embedstream.outage")

T = TypeVar("T")


class Outage(Exception):
    """A dependency is unavailable: what raises this is retried, not dead-lettered."""


_keepers: list[Callable[[], None]] = []
_lock = threading.Lock()
#: How many waits are in progress in this process, since when, and the seconds of
#: earlier waits (overlapping waits count once).
_active = 0
_since = 0.0
_waited = 0.0


def add_keeper(keeper: Callable[[], None]) -> None:
    """Runs ``keeper`` between the attempts of every wait in this process."""
    with _lock:
        _keepers.append(keeper)


def remove_keeper(keeper: Callable[[], None]) -> None:
    with _lock:
        if keeper in _keepers:
            _keepers.remove(keeper)


def run_keepers() -> None:
    """The default keep-alive: runs every registered keeper; one that fails is logged, not raised."""
    with _lock:
        keepers = list(_keepers)
    for keeper in keepers:
        try:
            keeper()
        except Exception:
            log.exception("keep-alive %r failed", keeper)


def waited_s() -> float:
    """A clock of the seconds during which this process was waiting out an outage."""
    with _lock:
        return _waited + (time.monotonic() - _since if _active else 0.0)


def _begin() -> None:
    global _active, _since
    with _lock:
        if not _active:
            _since = time.monotonic()
        _active += 1


def _end() -> None:
    global _active, _waited
    with _lock:
        _active -= 1
        if not _active:
            _waited += time.monotonic() - _since


def wait_out(
    what: str,
    attempt: Callable[[], T],
    *,
    transient: tuple[type[BaseException], ...] = (),
    keep_alive: Optional[Callable[[], None]] = None,
    give_up_s: Optional[float] = None,
    first_delay_s: float = 0.5,
    max_delay_s: float = 10.0,
    beat_s: float = 1.0,
) -> T:
    """``attempt()``, retried while ``what`` is unavailable (see the module docstring)."""
    retriable = (Outage, *transient)
    try:
        return attempt()
    except retriable as e:
        error: BaseException = e
    keeper = keep_alive if keep_alive is not None else run_keepers
    metrics.OUTAGE_WAITS.labels(what).inc()
    started = time.monotonic()
    delay = first_delay_s
    _begin()
    try:
        while True:
            waited = time.monotonic() - started
            if give_up_s is not None and waited >= give_up_s:
                log.error("%s still unavailable after %.0f s; giving up: %s", what, waited, error)
                raise error
            log.warning("%s unavailable (%s); retrying in %.1f s", what, error, delay)
            health.waiting(f"{what} unavailable: {error}", retry_in_s=delay)
            _sleep(delay, keeper, beat_s)
            metrics.OUTAGE_RETRIES.labels(what).inc()
            try:
                value = attempt()
            except retriable as e:
                error = e
                delay = min(delay * 2, max_delay_s)
                continue
            log.info("%s is back after %.1f s", what, time.monotonic() - started)
            return value
    finally:
        _end()
        health.resumed()
        metrics.OUTAGE_WAIT_SECONDS.labels(what).inc(time.monotonic() - started)


def _sleep(seconds: float, keeper: Callable[[], None], beat_s: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        keeper()
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, beat_s))
