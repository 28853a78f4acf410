"""Prometheus metrics of a worker or sink process, served on ``--metrics-port`` as
``/metrics``, next to the probes' ``/healthz`` and ``/readyz`` (:mod:`flows.health`)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

EVENTS = Counter("embedstream_events", "Input events by outcome", ["outcome"])
DOCUMENTS = Counter("embedstream_documents", "Documents embedded")
CHUNKS = Counter("embedstream_chunks", "Chunks embedded")
TOKENS = Counter("embedstream_tokens", "Model tokens embedded")
AUDIO_SECONDS = Counter("embedstream_audio_seconds", "Seconds of audio transcribed")
CHUNKS_REUSED = Counter(
    "embedstream_chunks_reused", "Chunks an incremental update kept without embedding them again"
)
STATE_RESTORES = Counter(
    "embedstream_state_restores", "Input partitions whose chunk state was read back from the changelog"
)
STATE_DOCUMENTS = Gauge("embedstream_state_documents", "Documents in the incremental chunk state")
STATE_BYTES = Gauge(
    "embedstream_state_bytes",
    "Memory of the incremental chunk state (bounded by EMBEDSTREAM_STATE_MAX_BYTES)",
)
STATE_EVICTIONS = Counter(
    "embedstream_state_evictions",
    "Documents the chunk state forgot to stay under its bound (embedded in full next)",
)
STATE_RESTORE_FAILURES = Counter(
    "embedstream_state_restore_failures",
    "Input partitions whose chunk state could not be read back in time (they start empty)",
)
DEAD_LETTERS = Counter("embedstream_dead_letters", "Dead letters by stage and reason", ["stage", "reason"])
S3_RECORDS_SKIPPED = Counter(
    "embedstream_s3_records_skipped",
    "Records of S3 event notifications not embedded (test events, types other than object "
    "created or removed), by family of event type",
    ["kind"],
)
BATCH_EVENTS = Histogram(
    "embedstream_batch_events", "Events per micro-batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
BATCH_FILL = Histogram(
    "embedstream_batch_fill", "Micro-batch size over its maximum", buckets=(0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
)
BATCH_EVENTS_LEFT = Counter(
    "embedstream_batch_events_left",
    "Events a micro-batch left to the next one because its time budget was spent (group mode)",
)
STAGE_SECONDS = Histogram(
    "embedstream_stage_seconds", "Time per stage of a micro-batch", ["stage"], buckets=_LATENCY
)
END_TO_END_SECONDS = Histogram(
    "embedstream_end_to_end_seconds",
    "From event_time to output produced",
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600),
)
CONSUMER_LAG = Gauge(
    "embedstream_consumer_lag", "Messages not yet handed over, per input partition", ["topic", "partition"]
)
# Group mode (`--scaling group`)
ASSIGNED_PARTITIONS = Gauge("embedstream_assigned_partitions", "Input partitions this process owns")
REBALANCES = Counter(
    "embedstream_partition_moves",
    "Input partitions assigned to, revoked from or lost by this process",
    ["kind"],
)
# Exactly-once (`--exactly-once`): one Kafka transaction per micro-batch
TRANSACTIONS = Counter(
    "embedstream_transactions",
    "Micro-batch transactions by outcome: committed, or aborted (nothing of the batch visible "
    "to read_committed consumers; it is processed again)",
    ["outcome"],
)
TRANSACTION_SECONDS = Histogram(
    "embedstream_transaction_seconds",
    "From opening a micro-batch's transaction to its commit (records confirmed, offsets sent, committed)",
    buckets=_LATENCY,
)
TRANSACTION_COMMIT_SECONDS = Histogram(
    "embedstream_transaction_commit_seconds",
    "Time of the commit of a micro-batch's transaction",
    buckets=_LATENCY,
)
PRODUCER_FENCED = Counter(
    "embedstream_producer_fenced",
    "Transactional producers fenced (a newer one holds the transactional.id, or the broker aborted "
    "a transaction past transaction.timeout.ms): the member rejoins with a new one",
)

# Outage waits (flows.outage): a dependency down blocks the batch instead of failing it
OUTAGE_WAITS = Counter("embedstream_outage_waits", "Waits for an unavailable dependency", ["what"])
OUTAGE_WAIT_SECONDS = Counter(
    "embedstream_outage_wait_seconds", "Seconds spent waiting for an unavailable dependency", ["what"]
)
OUTAGE_RETRIES = Counter(
    "embedstream_outage_retries", "Attempts retried while a dependency was unavailable", ["what"]
)

# Fetches of documents named by URI (flows.fetch), by scheme (file, s3, gs, az, https, …)
FETCH_SECONDS = Histogram(
    "embedstream_fetch_seconds", "Seconds per fetch of a document by URI", ["scheme"], buckets=_LATENCY
)
FETCH_BYTES = Counter("embedstream_fetch_bytes", "Bytes of documents fetched by URI", ["scheme"])
FETCHES = Counter(
    "embedstream_fetches",
    "Fetches by outcome: ok, unavailable, or the dead letter's reason",
    ["scheme", "outcome"],
)
FETCH_RETRIES = Counter(
    "embedstream_fetch_retries", "Fetches tried again after the store or server did not answer", ["scheme"]
)
FETCHES_IN_FLIGHT = Gauge("embedstream_fetches_in_flight", "Fetches of documents by URI in progress")


def forget_lag(topic: str, partition: int) -> None:
    """Stops reporting lag for a partition this process no longer owns."""
    try:
        CONSUMER_LAG.remove(topic, str(partition))
    except KeyError:
        pass


# `embedstream sink`
SINK_MESSAGES = Counter("embedstream_sink_messages", "Vector-topic messages written, by type", ["type"])
SINK_DEAD_LETTERS = Counter("embedstream_sink_dead_letters", "Sink dead letters by reason", ["reason"])
SINK_BATCH_SECONDS = Histogram(
    "embedstream_sink_batch_seconds", "Time to plan and write one batch into the store", buckets=_LATENCY
)
