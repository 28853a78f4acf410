"""Exactly-once into the output topics (``--exactly-once``, group mode only): each group
member writes its micro-batches through a transactional producer of its own.

One micro-batch is one transaction. It opens once the batch is computed, so a long
extraction never runs inside it, and holds the batch's vector records, manifests,
delete markers and dead letters, incremental mode's chunk-state changelog writes, and
the batch's input offsets (``send_offsets_to_transaction``). Those offsets go with the
consumer-group metadata the member had when it handed the batch over, so a member the
group has moved on from (a zombie) is refused by the group coordinator (KIP-447) and
its transaction aborted. A consumer reading with ``isolation.level=read_committed``
sees a batch's outputs all at once, once, or not at all.

The ``transactional.id`` is ``<group id>.<member name>.<worker index>``, stable
across restarts (never the member id the group generates): a member restarted after
``kill -9`` fences its predecessor at once, and the broker aborts the transaction that
predecessor left open, instead of read_committed consumers stalling until
``transaction.timeout.ms`` (KIP-98).

:meth:`Transactions.run` either commits or raises :class:`Aborted` (nothing of the
batch is visible: the member processes it again) or :class:`Fenced` (the producer
is unusable: the member opens a new one, which fences any older instance of its id).
Broker outages inside a transaction are waited out, the member polling meanwhile, as
long as the flush timeout allows, which must stay under ``transaction.timeout.ms``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any, Callable, Optional, TypeVar

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka import TopicPartition as KafkaTopicPartition

from flows import metrics, outage
from flows.kafka.delivery import Delivery, DeliveryError
from flows.kafka.io import OutputMessage

log = logging.getLogger("embedstream.transactions")

T = TypeVar("T")

#: librdkafka's default, and ours: how long a transaction may stay open before the
#: broker aborts it (what read_committed consumers wait at most for a member that
#: died mid-transaction and does not come back under its name).
DEFAULT_TRANSACTION_TIMEOUT_MS = 60_000
#: Longest a transactional call may take (librdkafka retries within it): past it the
#: offsets' or the commit's call fails, and is retried or the transaction aborted.
CALL_TIMEOUT_S = 30.0
#: How much longer than its own timeout a call may block before it counts as stuck.
STUCK_GRACE_S = 10.0
#: Aborts in a row, each because Kafka did not confirm the batch's records, after which
#: the worker stops (as at-least-once does at once) instead of trying the batch again.
MAX_DELIVERY_ABORTS = 3


class Aborted(Exception):
    """The batch's transaction was aborted: nothing of it is visible to read_committed
    consumers, and its events are processed again by whoever owns their partitions."""


class Fenced(Exception):
    """The producer was fenced (``ProducerFenced``, ``InvalidProducerEpoch``): a newer
    producer holds its transactional.id, or the broker aborted a transaction that ran
    past ``transaction.timeout.ms``. It can never produce again."""


class Stuck(Fenced):
    """A transactional call of librdkafka never returned: the producer is given up as
    if fenced (a new one aborts its transaction), though nobody else holds its id."""


def transactional_id(group_id: str, member_name: str, worker_index: int) -> str:
    """The stable transactional.id of one worker of one member."""
    return f"{group_id}.{member_name}.{worker_index}"


class Transactions:
    """A member's transactional producer: one transaction per micro-batch.

    ``config`` is the producer's librdkafka configuration without the transactional
    settings, which are ours; ``flush_timeout_s`` is how long a transaction waits for
    Kafka to confirm its records (riding out a broker outage) before it is aborted."""

    def __init__(
        self,
        config: dict,
        transactional_id: str,
        *,
        flush_timeout_s: float,
        timeout_ms: int = DEFAULT_TRANSACTION_TIMEOUT_MS,
    ) -> None:
        self.transactional_id = transactional_id
        self.config = {
            "acks": "all",
            "linger.ms": "5",
            "compression.type": "lz4",
            **config,
            "enable.idempotence": "true",
            "transactional.id": transactional_id,
            "transaction.timeout.ms": str(timeout_ms),
        }
        self.timeout_s = timeout_ms / 1000
        self.flush_timeout_s = flush_timeout_s
        self.producer: Optional[Producer] = None
        #: Input partitions of the transaction open now (empty: none is open).
        self.partitions: frozenset[int] = frozenset()
        #: Why the open transaction must not commit (set by a rebalance callback).
        self.doomed: Optional[str] = None
        self._aborted = False
        self._delivery_aborts = 0

    # --- lifecycle -----------------------------------------------------------------------

    def start(self, keep_alive: Optional[Callable[[], None]] = None) -> None:
        """Opens the producer and registers its transactional.id with the broker, which
        fences every older producer of that id and aborts what it left open. A broker
        that is down or still loading its transaction log is waited out."""
        self.producer = Producer(self.config)
        started = time.monotonic()
        self._waited("init_transactions", lambda: self.producer.init_transactions(30), keep_alive)
        log.info(
            "transactional producer %s ready in %.2f s (transaction.timeout.ms=%d)",
            self.transactional_id,
            time.monotonic() - started,
            self.timeout_s * 1000,
        )

    def close(self) -> None:
        if self.producer is None:
            return
        if self.partitions:
            self._abort("closing")
        self.producer = None

    # --- one micro-batch -----------------------------------------------------------------

    def run(
        self,
        items: Sequence[OutputMessage],
        offsets: Sequence[KafkaTopicPartition],
        group_metadata: object,
        keep_alive: Optional[Callable[[], None]] = None,
    ) -> None:
        """Produces ``items`` and commits them with the input ``offsets`` as one
        transaction; raises :class:`Aborted` or :class:`Fenced` when it did not commit."""
        assert self.producer is not None, "start() first"
        started = time.monotonic()
        self.partitions = frozenset(tp.partition for tp in offsets)
        self.doomed, self._aborted = None, False
        try:
            try:
                self.producer.begin_transaction()
            except KafkaException:
                self._aborted = True  # nothing to abort: none began
                raise
            self._produce(items)
            self._send_offsets(offsets, group_metadata, keep_alive)
            self._commit(keep_alive)
        except KafkaException as e:
            self._failed(e.args[0] if e.args else KafkaError(KafkaError._FAIL))
        finally:
            self.partitions = frozenset()
        metrics.TRANSACTIONS.labels("committed").inc()
        metrics.TRANSACTION_SECONDS.observe(time.monotonic() - started)
        self._delivery_aborts = 0

    def doom(self, reason: str) -> None:
        """The open transaction must not commit (its partitions were revoked or lost):
        called from a rebalance callback, so it is aborted before the callback returns
        where the broker answers, and otherwise never committed."""
        if not self.partitions or self.doomed:
            return
        self.doomed = reason
        try:
            # Inside a rebalance callback: no keep-alive (it would poll the consumer again).
            self._abort(reason, patience_s=5.0, keep_alive=lambda: None, call_timeout_s=5.0)
        except Exception as e:  # the broker is away: run() aborts it once it is back
            log.warning("abort of the transaction of %s deferred: %s", self.transactional_id, e)

    def _produce(self, items: Sequence[OutputMessage]) -> None:
        delivery = Delivery(self.producer, "records")
        try:
            for item in items:
                delivery.produce(
                    item.topic, item.value, item.key, headers=item.headers, partition=item.partition
                )
            # A broker outage is waited out here, the member polling (outage keepers).
            delivery.confirm(self.flush_timeout_s)
        except (KafkaException, SystemError) as e:
            # A fatal error (fenced) surfaces from produce() or flush(); confluent-kafka
            # may wrap it in a SystemError raised from within a delivery callback.
            cause = e if isinstance(e, KafkaException) else e.__cause__
            if not isinstance(cause, KafkaException):
                raise
            error = cause.args[0] if cause.args else KafkaError(KafkaError._FAIL)
            if _fenced(error):
                self._failed(error)
            self._not_delivered(error.str(), cause)
        except DeliveryError as e:
            if self.doomed:
                self._refuse_if_doomed()
            self._not_delivered(str(e), e)

    def _not_delivered(self, why: str, cause: BaseException) -> None:
        """Aborts a transaction whose records Kafka did not take: the batch is processed
        again, and after a few such aborts in a row the worker stops, as at-least-once
        does at once (a cause that lasts must not loop for ever)."""
        self._delivery_aborts += 1
        self._abort(f"records not confirmed: {why}")
        if self._delivery_aborts >= MAX_DELIVERY_ABORTS:
            raise DeliveryError(
                f"{why} ({self._delivery_aborts} transactions in a row aborted for this; nothing of "
                "them is visible, and the batch is processed again when the worker restarts)"
            ) from cause
        raise Aborted(why) from cause

    def _send_offsets(
        self,
        offsets: Sequence[KafkaTopicPartition],
        group_metadata: object,
        keep_alive: Optional[Callable[[], None]],
    ) -> None:
        """The batch's input offsets into the transaction, under the group generation
        that handed the batch over: the coordinator refuses them if the group has moved
        on (ILLEGAL_GENERATION, UNKNOWN_MEMBER_ID), and the transaction aborts."""
        self._refuse_if_doomed()
        self._waited(
            "send_offsets_to_transaction",
            lambda: self._bounded(
                "send_offsets_to_transaction",
                lambda t: self.producer.send_offsets_to_transaction(list(offsets), group_metadata, t),
            ),
            keep_alive,
        )

    def _commit(self, keep_alive: Optional[Callable[[], None]]) -> None:
        self._refuse_if_doomed()
        committing = time.monotonic()
        self._waited(
            "commit_transaction",
            lambda: self._bounded("commit_transaction", self.producer.commit_transaction),
            keep_alive,
        )
        metrics.TRANSACTION_COMMIT_SECONDS.observe(time.monotonic() - committing)

    def _refuse_if_doomed(self) -> None:
        if self.doomed:
            if not self._aborted:
                self._abort(self.doomed)
            raise Aborted(f"partitions moved: {self.doomed}")

    def _failed(self, error: KafkaError) -> None:
        """Sorts a transactional call's error into Fenced or Aborted (after aborting)."""
        if _fenced(error):
            metrics.TRANSACTIONS.labels("aborted").inc()
            metrics.PRODUCER_FENCED.inc()
            self.producer = None
            raise Fenced(error.str())
        if not self._aborted:
            self._abort(error.str())
        raise Aborted(error.str())

    def _abort(
        self,
        reason: str,
        patience_s: Optional[float] = None,
        keep_alive: Optional[Callable[[], None]] = None,
        call_timeout_s: float = 30.0,
    ) -> None:
        """Aborts the open transaction (waiting out a broker that is down); raises
        :class:`Fenced` if the producer was fenced meanwhile."""
        if self._aborted:
            return
        if self.producer is None:  # given up while aborting from a rebalance callback
            raise Stuck(f"the producer was given up before it could abort ({reason})")
        log.warning("aborting the transaction of %s: %s", self.transactional_id, reason)
        try:
            self._waited(
                "abort_transaction",
                lambda: self._bounded("abort_transaction", self.producer.abort_transaction, call_timeout_s),
                keep_alive,
                patience_s,
            )
        except KafkaException as e:
            error = e.args[0]
            if _fenced(error):
                metrics.TRANSACTIONS.labels("aborted").inc()
                metrics.PRODUCER_FENCED.inc()
                self._aborted = True
                self.producer = None
                raise Fenced(error.str()) from e
            raise
        self._aborted = True
        metrics.TRANSACTIONS.labels("aborted").inc()

    def _bounded(self, what: str, call: Callable[[float], T], timeout_s: Optional[float] = None) -> T:
        """``call(timeout_s)``, a transactional call of librdkafka, made on a thread of its
        own and given up past its timeout: send_offsets_to_transaction can block for
        good after a coordinator went away (librdkafka#5456, #5511). The producer is
        then unusable: :class:`Stuck`, and the member opens a new one, whose
        init_transactions aborts what this one left open."""
        timeout_s = min(self.flush_timeout_s, CALL_TIMEOUT_S) if timeout_s is None else timeout_s
        outcome: dict[str, Any] = {}
        done = threading.Event()

        def run() -> None:
            try:
                outcome["value"] = call(timeout_s)
            except BaseException as e:  # handed to the caller
                outcome["error"] = e
            finally:
                done.set()

        threading.Thread(target=run, name=f"embedstream-{what}", daemon=True).start()
        if not done.wait(timeout_s + STUCK_GRACE_S):
            self.producer = None  # never called again; the new producer fences it
            metrics.TRANSACTIONS.labels("aborted").inc()
            raise Stuck(f"{what} did not return in {timeout_s + STUCK_GRACE_S:.0f} s")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def _waited(
        self,
        what: str,
        call: Callable[[], T],
        keep_alive: Optional[Callable[[], None]],
        patience_s: Optional[float] = None,
    ) -> T:
        """``call()``, retried while its error is retriable (the broker or a coordinator
        away, a concurrent transaction still ending): an outage, waited out."""

        def attempt() -> T:
            try:
                return call()
            except KafkaException as e:
                error = e.args[0] if e.args else None
                if isinstance(error, KafkaError) and error.retriable() and not error.txn_requires_abort():
                    raise outage.Outage(f"{what}: {error.str()}") from e
                raise

        try:
            return outage.wait_out("broker", attempt, keep_alive=keep_alive, give_up_s=patience_s)
        except outage.Outage as e:  # given up (patience_s): the cause is what counts
            if isinstance(e.__cause__, KafkaException):
                raise e.__cause__ from None
            raise


def _fenced(error: KafkaError) -> bool:
    """Whether the producer is done for: fenced (librdkafka reports ProducerFenced and
    InvalidProducerEpoch both as _FENCED) or any other fatal error."""
    return error.code() in (KafkaError._FENCED, KafkaError.PRODUCER_FENCED) or error.fatal()
