"""Producing with every message accounted for, the one way every producer of embedstream
works (the flow's sink, the sink's dead letters, ``publish``, ``redrive``).

A message counts once Kafka confirmed it. One whose delivery report is an error, or
that ``flush`` still holds when the wait is over, raises :class:`DeliveryError`:
the caller then commits nothing after it.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

from confluent_kafka import Producer

from flows import outage

log = logging.getLogger("embedstream.kafka")


class DeliveryError(RuntimeError):
    """Kafka did not confirm a message; nothing after it may be committed."""


class Delivery:
    """Messages produced through ``producer`` and checked: :meth:`produce` waits while
    the producer's queue is full (backpressure) instead of raising, and :meth:`confirm`
    returns once Kafka confirmed every message produced so far. ``what`` names the
    messages in errors ("records", "dead letters")."""

    def __init__(self, producer: Producer, what: str = "records") -> None:
        self.producer = producer
        self.what = what
        self.failures: list[str] = []

    def produce(
        self,
        topic: str,
        value: Optional[bytes],
        key: Optional[bytes] = None,
        *,
        headers: tuple[tuple[str, bytes], ...] = (),
        partition: Optional[int] = None,
    ) -> None:
        extra = {} if partition is None else {"partition": partition}
        blocked_since = time.monotonic()
        while True:
            try:
                self.producer.produce(
                    topic, value, key, headers=list(headers), on_delivery=self._on_delivery, **extra
                )
                return
            except BufferError:
                # The local queue is full: wait for the broker instead of growing memory.
                self.producer.poll(0.1)
                if time.monotonic() - blocked_since > 1.0:  # a broker down, not a busy one
                    outage.run_keepers()

    def confirm(self, timeout_s: float) -> None:
        """Waits up to ``timeout_s`` for Kafka to confirm every message produced; raises
        :class:`DeliveryError` if any was not delivered or is not confirmed by then."""
        deadline = time.monotonic() + timeout_s
        while self.producer.flush(1.0) > 0:
            if time.monotonic() > deadline:
                raise DeliveryError(
                    f"{len(self.producer)} {self.what} not confirmed by Kafka in {timeout_s:.0f} s"
                )
            log.warning("waiting for Kafka to confirm %d %s", len(self.producer), self.what)
            # A broker that is down for long must not get this group member evicted.
            outage.run_keepers()
        if self.failures:
            failures, self.failures = self.failures, []
            raise DeliveryError(f"{len(failures)} {self.what} were not delivered: {failures[:3]}")

    def _on_delivery(self, err, msg) -> None:
        if err is not None:
            self.failures.append(f"{msg.topic()}: {err}")
