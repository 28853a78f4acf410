"""All settings of a worker in one typed place: defaults, ``EMBEDSTREAM_*`` environment
variables, then command-line flags. Any librdkafka setting passes through
(``EMBEDSTREAM_KAFKA_SECURITY_PROTOCOL=SASL_SSL`` or ``--kafka security.protocol=SASL_SSL``);
secrets are masked whenever settings are shown."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

_SECRET_WORDS = ("password", "secret", "token", "key")

#: librdkafka's own log lines (connection errors, purges at exit) arrive here.
CLIENT_LOG = logging.getLogger("embedstream.librdkafka")


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


#: Default events per micro-batch on each kind of device. bench/e2e.py on 2 CPU cores:
#: the flow reached 0.76x the raw embedding throughput at 64, 0.89x at 256, 0.95x at
#: 512. Under light load batches close after poll_ms, so latency stays low.
CPU_BATCH_SIZE = 512
GPU_BATCH_SIZE = 2048


@dataclass(frozen=True)
class Settings:
    #: Kafka bootstrap servers (comma-separated).
    brokers: str = "127.0.0.1:29092"
    input_topic: str = "documents"
    output_topic: str = "vectors"
    dlq_topic: str = "documents.dlq"
    #: The consumer group: in group mode the workers are its members; in cluster mode
    #: processed offsets are committed under it (for lag tooling).
    group_id: str = "embedstream"
    #: "group": each process is an independent member of the consumer group (start and
    #: stop any number; Kafka moves partitions). "cluster": a fixed-size Bytewax cluster.
    #: None: cluster when cluster addresses are given (-a, BYTEWAX_ADDRESSES, or a
    #: StatefulSet's), else group.
    scaling: Optional[str] = None
    #: Where to start without saved progress: "committed" (the group's committed offsets,
    #: else the beginning), "beginning", "latest", or epoch milliseconds. Saved progress
    #: is the recovery store in cluster mode and the group's committed offsets in group
    #: mode, where this applies to partitions the group never committed.
    start_from: str = "committed"
    #: Keep reading for new events (True) or stop at the end offsets seen at start.
    tail: bool = True
    model: str = "default"
    device: str = "cpu"
    dtype: str = "f32"
    #: A CLIP directory: image documents become vectors (modality "image") instead of dead letters.
    image_model: Optional[str] = None
    #: Where image vectors go (None: the output topic).
    image_output_topic: Optional[str] = None
    #: Embed text documents with the image model's text tower too, so one space holds both.
    text_with_image_model: bool = False
    #: A Whisper directory: audio documents are transcribed, and the transcript chunked
    #: (at segment boundaries) and embedded like text, instead of dead-lettered.
    audio_model: Optional[str] = None
    #: The language of the audio (a code such as "en"; None: detected per recording).
    audio_language: Optional[str] = None
    #: The model's prompt for documents (e.g. "document", "passage"; None: the model's
    #: default prompt, if it has one).
    prompt_name: Optional[str] = None
    #: Keep the first dimensions of every vector (Matryoshka models; None: all).
    truncate_dim: Optional[int] = None
    #: A sparse model directory (SPLADE, BGE-M3): each text chunk's VectorRecord also
    #: gets its sparse vector, for `embedstream search --mode sparse|hybrid`, which (as
    #: `serve`) encodes queries with it (default there: the table's, from its lineage).
    sparse_model: Optional[str] = None
    #: Chunk size in model tokens (None: the model's limit).
    max_tokens: Optional[int] = None
    overlap_tokens: int = 0
    #: Re-embed only the chunks an UPSERT changed: VectorRecords for new chunk ids only,
    #: and a DocManifest listing every chunk. Consumers must apply the newest manifest.
    incremental: bool = False
    #: Where chunks are cut: "greedy" (as full as possible) or "stable" (an edit changes
    #: the chunks near it only). None: stable in incremental mode, else greedy.
    chunking: Optional[str] = None
    #: Incremental mode's compacted changelog of per-document chunk ids, one partition per
    #: input partition (None: "<group_id>.chunk-state"; created if missing).
    state_topic: Optional[str] = None
    #: Most bytes of memory the chunk state of a worker process holds (about 660 per
    #: document of 38 chunks); past it the least recently used documents are forgotten,
    #: and embedded in full on their next update.
    state_max_bytes: int = 256 * 1024 * 1024
    #: Longest time, in seconds, for reading one partition's chunk state back from the
    #: changelog; past it (or on an error) the partition starts with an empty state.
    state_restore_deadline_s: float = 120.0
    #: Most events the source hands over as one micro-batch, per partition (None: 512 on
    #: the CPU, 2048 on a GPU, whose larger batches keep it busy).
    batch_size: Optional[int] = None
    #: Most payload bytes in one micro-batch (the rest waits for the next).
    batch_bytes: int = 16 * 1024 * 1024
    #: Longest wait for a batch to fill, in milliseconds.
    poll_ms: int = 100
    #: Group mode: seconds of work a micro-batch may take. Once they are spent the batch
    #: takes in no more events (the rest go back to the source for the next batch), so it
    #: ends well inside librdkafka's max.poll.interval.ms and the member is not evicted.
    #: Outage waits do not count. None: a fifth of max.poll.interval.ms (60 s by default).
    batch_max_s: Optional[float] = None
    #: Group mode: exactly-once into the output topics. Each member writes a micro-batch's
    #: records, manifests, delete markers and dead letters, its input offsets and (in
    #: incremental mode) its chunk-state changelog writes in one Kafka transaction, so
    #: consumers reading with isolation.level=read_committed see every record once
    #: (docs/guarantees.md). Needs a stable member name (member_name or POD_NAME).
    exactly_once: bool = False
    #: Exactly-once: this member's name, unique in the group and the same after a
    #: restart (a StatefulSet pod's name); its transactional.id is
    #: "<group_id>.<member_name>.<worker index>". None: POD_NAME, or HOSTNAME inside
    #: Kubernetes.
    member_name: Optional[str] = None
    #: Seconds a batch's records may take to be confirmed by Kafka (a broker outage is
    #: waited out this long). Past it an at-least-once worker stops with nothing of the
    #: batch committed; an exactly-once member aborts the batch's transaction and
    #: processes it again. Exactly-once needs it under transaction.timeout.ms (checked at
    #: start). None: 300 s; with exactly_once, 4/5 of transaction.timeout.ms (librdkafka's
    #: default 60 s gives 48 s).
    flush_timeout_s: Optional[float] = None
    #: Largest document accepted (inline or fetched).
    max_document_bytes: int = 64 * 1024 * 1024
    #: Most chunks of one document; more becomes a dead letter.
    max_chunks: int = 10_000
    #: Dead letters carry the original payload up to this size, else only its coordinates.
    dlq_payload_max_bytes: int = 1024 * 1024
    #: What the input topic carries: "documents" (DocumentEvents), "s3" (S3 event
    #: notifications, as AWS and MinIO write them: one document per record), or "auto"
    #: (each message recognised by its shape).
    input_events: str = "auto"
    #: Output encoding: "avro" (single-object), "json", or "confluent" (needs a registry).
    output_format: str = "avro"
    schema_registry_url: Optional[str] = None
    #: Directories that file:// URIs may point into; empty means no URIs allowed.
    allowed_roots: tuple[str, ...] = ()
    #: URI prefixes that s3://, gs://, az://, abfs[s]:// and https:// URIs must start with,
    #: by whole path segments (s3://docs allows bucket docs, never docs-private); plain
    #: http:// only where a prefix names it. Separated by commas: URIs hold colons. Empty
    #: means no such URI is fetched (docs/object-stores.md).
    allowed_uris: tuple[str, ...] = ()
    #: Fetches of documents by URI in flight at once per worker process: a micro-batch's
    #: fetches run concurrently, overlapping extraction.
    fetch_concurrency: int = 32
    #: Seconds one fetch by URI may take (answer and body); one that runs out is retried.
    fetch_timeout_s: float = 60.0
    #: object_store settings passed through as KEY=VALUE (comma-separated in the
    #: variable): aws_… keys to s3:// stores, google_… to gs://, azure_… to az:// and
    #: abfs[s]://, HTTP client keys (timeout, proxy_url, allow_http, …) to all. Credentials
    #: and endpoints otherwise come from each cloud's standard variables and chain
    #: (AWS_ENDPOINT_URL, AWS_REGION, IRSA, instance metadata, …). Values of keys naming a
    #: secret are masked in the settings the worker logs.
    object_store: tuple[str, ...] = ()
    #: Extraction child processes per worker process.
    extract_workers: int = 2
    #: Bytewax recovery store (a directory every process can reach); None: no snapshots,
    #: resume from the committed offsets.
    recovery_dir: Optional[str] = None
    #: Recovery partitions created in a new store (fixed for the store's lifetime).
    recovery_partitions: int = 4
    #: Seconds between snapshots (Bytewax epochs).
    snapshot_s: float = 10.0
    #: Seconds an old snapshot is kept for a lagging backup of the store.
    backup_s: float = 0.0
    #: Port of the Prometheus /metrics endpoint and the probes' /healthz and /readyz;
    #: 0 turns it off.
    metrics_port: int = 9400
    #: Address the metrics and probe endpoints listen on: the loopback for a local run;
    #: the image sets 0.0.0.0 for probes and Prometheus from outside the container.
    metrics_host: str = "127.0.0.1"
    #: Seconds a batch loop may go without progress (a batch that does not end) before
    #: /healthz fails; waits for an outage do not count. Longer than the slowest batch.
    stall_s: float = 300.0
    #: "text" or "json" (one object per line).
    log_format: str = "text"
    #: In a Kubernetes StatefulSet: the number of pods, the headless Service's name and
    #: the cluster port; with them each pod derives its process id and the addresses.
    replicas: Optional[int] = None
    service: Optional[str] = None
    cluster_port: int = 2101
    #: Seconds between throughput lines in the log.
    report_every_s: float = 10.0
    #: `embedstream sink` and `search`: the vector store (postgresql://… or lancedb:DIR).
    store: str = "lancedb:embedstream-vectors"
    #: Consumer group of the sink (its committed offsets are where it resumes).
    sink_group_id: str = "embedstream-sink"
    #: Dead letters of the sink (None: "<output topic>.sink-dlq").
    sink_dlq_topic: Optional[str] = None
    #: Most records the sink writes to the store in one batch (one transaction).
    sink_batch_size: int = 2000
    #: `embedstream sink`: the language of the full-text index on chunk text: a PostgreSQL
    #: text search configuration (english, simple, german…), which LanceDB's index follows
    #: (simple: no stemming, no stop words). Fixed for a table when the sink creates it.
    text_search_language: str = "english"
    #: `embedstream search`, `serve`: hybrid mode's reciprocal rank fusion constant: a
    #: chunk scores the sum of 1/(rrf_k + rank) over the result lists it is in.
    rrf_k: int = 60
    #: `embedstream search`, `serve`: how hybrid mode fuses its result lists: rrf (reciprocal
    #: rank) or relative (each list's scores min-max normalised to [0, 1], a missing hit 0,
    #: averaged over the lists with equal weights).
    fusion: str = "rrf"
    #: `embedstream search`, `serve`: candidates each signal contributes to hybrid fusion,
    #: and how many of the best a reranker (--rerank) scores again.
    rerank_k: int = 50
    #: `embedstream serve`: the address the HTTP API listens on (the loopback: only this
    #: machine; 0.0.0.0 in a container, behind a NetworkPolicy).
    serve_host: str = "127.0.0.1"
    #: `embedstream serve`: the port of the HTTP API.
    serve_port: int = 8080
    #: `embedstream serve`: when set, every request but the probes and /metrics needs
    #: `Authorization: Bearer <key>` (compared in constant time).
    serve_api_key: Optional[str] = None
    #: `embedstream serve`: most inputs in one embeddings request.
    serve_max_inputs: int = 2048
    #: `embedstream serve`: most characters in one input (longer inputs are refused).
    serve_max_input_chars: int = 65536
    #: `embedstream serve`: largest request body.
    serve_max_body_bytes: int = 8 * 1024 * 1024
    #: `embedstream serve`: most tokens the batcher hands the model in one call, from
    #: the requests waiting (None: 4 times the model's max_batch_tokens).
    serve_batch_tokens: Optional[int] = None
    #: `embedstream serve`: most tokens waiting for the model; past it requests get 429
    #: with Retry-After instead of queueing (None: 16 times serve_batch_tokens: about 18 s of
    #: MiniLM's work on 2 CPU cores, well under a second on a GPU).
    serve_queue_tokens: Optional[int] = None
    #: `embedstream serve`: seconds a request may wait and run before it gets 503.
    serve_timeout_s: float = 30.0
    #: `embedstream serve`: an input longer than the model's tokens is truncated (a
    #: response header counts them); false: it is refused with 413.
    serve_truncate_input: bool = True
    #: `embedstream serve`: origins browsers may call the API from (CORS), comma-separated,
    #: as https://app.example.com; None: no CORS headers at all.
    serve_cors_origins: Optional[str] = None
    #: `embedstream serve`: whether `dimensions` may shorten vectors (Matryoshka models).
    #: None: when the model card (README.md) names Matryoshka or MRL.
    serve_matryoshka: Optional[bool] = None
    #: Extra librdkafka settings for consumer and producer.
    kafka: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Optional[dict[str, str]] = None, **overrides: Any) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = f"EMBEDSTREAM_{f.name.upper()}"
            if f.name == "kafka" or name not in env:
                continue
            values[f.name] = _parse(f, env[name])
        kafka = {
            k[len("EMBEDSTREAM_KAFKA_") :].lower().replace("_", "."): v
            for k, v in env.items()
            if k.startswith("EMBEDSTREAM_KAFKA_")
            and k not in ("EMBEDSTREAM_KAFKA_HOME",)
            and not k.startswith(("EMBEDSTREAM_KAFKA_PORT", "EMBEDSTREAM_KAFKA_CONTROLLER_PORT"))
        }
        kafka.update(overrides.pop("kafka", None) or {})
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values, kafka=kafka)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.start_from not in ("committed", "beginning", "latest") and not self.start_from.isdigit():
            raise ValueError("start_from must be 'committed', 'beginning', 'latest' or epoch milliseconds")
        if self.input_events not in ("auto", "documents", "s3"):
            raise ValueError("input_events must be auto, documents or s3")
        if self.output_format not in ("avro", "json", "confluent"):
            raise ValueError("output_format must be avro, json or confluent")
        if self.log_format not in ("text", "json"):
            raise ValueError("log_format must be text or json")
        if self.audio_language and not self.audio_model:
            raise ValueError("audio_language needs audio_model (a Whisper directory)")
        if self.text_with_image_model and not self.image_model:
            raise ValueError("text_with_image_model needs image_model")
        if self.text_with_image_model and (self.prompt_name or self.truncate_dim):
            raise ValueError("prompt_name and truncate_dim apply to the text model, not to CLIP's text tower")
        if self.truncate_dim is not None and self.truncate_dim <= 0:
            raise ValueError("truncate_dim must be positive")
        if self.rrf_k < 0 or self.rerank_k < 1:
            raise ValueError("rrf_k must be 0 or more, rerank_k 1 or more")
        if self.fusion not in ("rrf", "relative"):
            raise ValueError(f"fusion must be rrf or relative, not {self.fusion!r}")
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", self.text_search_language):
            raise ValueError(
                "text_search_language must name a text search configuration such as english or simple"
            )
        if self.scaling not in (None, "group", "cluster"):
            raise ValueError("scaling must be group or cluster")
        if self.scaling == "group" and self.recovery_dir:
            raise ValueError(
                "recovery_dir is for scaling=cluster: group-mode workers resume from the "
                "consumer group's committed offsets"
            )
        for name in ("serve_batch_tokens", "serve_queue_tokens"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if not 0 <= self.serve_port <= 65535:
            raise ValueError("serve_port must be between 0 and 65535")
        if self.chunking not in (None, "greedy", "stable"):
            raise ValueError("chunking must be greedy or stable")
        if self.output_format == "confluent" and not self.schema_registry_url:
            raise ValueError("output_format 'confluent' needs schema_registry_url")
        if self.batch_size is not None and self.batch_size <= 0:
            raise ValueError("batch_size must be positive")
        if self.batch_max_s is not None and self.batch_max_s <= 0:
            raise ValueError("batch_max_s must be positive")
        if self.flush_timeout_s is not None and self.flush_timeout_s <= 0:
            raise ValueError("flush_timeout_s must be positive")
        if self.exactly_once:
            self._validate_exactly_once()
        from flows.allowlist import UriAllowlist

        UriAllowlist(self.allowed_uris)  # a bad prefix fails here, naming it
        from flows.object_store import parse_options

        parse_options(self.object_store_options())  # an unknown key fails here, naming it
        for name in (
            "batch_bytes",
            "poll_ms",
            "max_document_bytes",
            "max_chunks",
            "extract_workers",
            "fetch_concurrency",
            "fetch_timeout_s",
            "state_max_bytes",
            "state_restore_deadline_s",
            "stall_s",
            "serve_max_inputs",
            "serve_max_input_chars",
            "serve_max_body_bytes",
            "serve_timeout_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")

    def object_store_options(self) -> dict[str, str]:
        """``object_store`` as a mapping; raises ValueError on an entry without ``=``."""
        options = {}
        for entry in self.object_store:
            key, sep, value = entry.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"object_store entries are KEY=VALUE, not {entry.split('=')[0]!r}")
            options[key.strip()] = value.strip()
        return options

    def chunk_strategy(self) -> str:
        """How the flow cuts chunks: the setting, else stable cuts for incremental mode."""
        return self.chunking or ("stable" if self.incremental else "greedy")

    def chunk_state_topic(self) -> str:
        return self.state_topic or f"{self.group_id}.chunk-state"

    def sink_dlq(self) -> str:
        return self.sink_dlq_topic or f"{self.output_topic}.sink-dlq"

    def _validate_exactly_once(self) -> None:
        if self.scaling == "cluster":
            raise ValueError(
                "exactly_once needs scaling=group: a Bytewax cluster resumes from its recovery "
                "snapshots, which a Kafka transaction cannot commit together with the outputs; "
                "run group-mode members (drop -a/-i and --scaling cluster)"
            )
        if "transactional.id" in self.kafka:
            raise ValueError(
                "transactional.id is derived from the member name with exactly_once "
                "(<group_id>.<member_name>.<worker index>): leave it out of the Kafka settings"
            )
        timeout_ms = self.transaction_timeout_ms()
        if self.flush_timeout() * 1000 >= timeout_ms:
            raise ValueError(
                f"transaction.timeout.ms ({timeout_ms}) must exceed the flush timeout "
                f"({self.flush_timeout() * 1000:.0f} ms): a transaction would be aborted by the broker "
                "while its records are still being confirmed. Raise it (--kafka "
                "transaction.timeout.ms=N, at most the broker's transaction.max.timeout.ms) or "
                "lower flush_timeout_s"
            )

    def transaction_timeout_ms(self) -> int:
        """Exactly-once: how long a member's transaction may stay open before the broker
        aborts it (``transaction.timeout.ms``; librdkafka's default, 60 s)."""
        return int(self.kafka.get("transaction.timeout.ms", 60_000))

    def flush_timeout(self) -> float:
        """Seconds the output waits for Kafka to confirm a batch (``flush_timeout_s``)."""
        if self.flush_timeout_s is not None:
            return self.flush_timeout_s
        return self.transaction_timeout_ms() / 1000 * 0.8 if self.exactly_once else 300.0

    def member(self, environ: Optional[dict[str, str]] = None) -> str:
        """Exactly-once's stable member name: ``member_name``, else the pod's name
        (``POD_NAME``, or ``HOSTNAME`` inside Kubernetes). Raises ValueError without one:
        a name that changes on restart would leave the last transaction of a killed
        member open until transaction.timeout.ms, and one shared by two members would
        fence them in turn."""
        env = os.environ if environ is None else environ
        in_kubernetes = bool(env.get("KUBERNETES_SERVICE_HOST"))
        name = self.member_name or env.get("POD_NAME") or (env.get("HOSTNAME") if in_kubernetes else None)
        if not name:
            raise ValueError(
                "exactly_once needs a stable member name: --member-name NAME (EMBEDSTREAM_MEMBER_NAME), "
                "unique in the group and the same after a restart, or POD_NAME in Kubernetes"
            )
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,200}", name):
            raise ValueError(f"member name {name!r}: use letters, digits, '.', '_' and '-' only")
        return name

    def batch_budget_s(self) -> float:
        """Seconds of work a group-mode micro-batch may take: ``batch_max_s``, else a fifth
        of the poll interval Kafka allows a member (``max.poll.interval.ms``)."""
        if self.batch_max_s is not None:
            return self.batch_max_s
        return int(self.kafka.get("max.poll.interval.ms", 300_000)) / 1000 / 5

    def micro_batch_size(self) -> int:
        """Events per micro-batch: ``batch_size`` when set, else by device. Resolving
        the device fails early, with a clear error, if it cannot be used here."""
        if self.batch_size is not None:
            return self.batch_size
        from operators.embed import resolve_device

        return GPU_BATCH_SIZE if resolve_device(self.device).startswith("cuda") else CPU_BATCH_SIZE

    def cluster(self, pod_name: Optional[str] = None) -> tuple[Optional[int], Optional[list[str]]]:
        """(process id, addresses) of a StatefulSet pod: ``name-3`` is process 3 of
        ``replicas``, reachable as ``name-3.<service>:<cluster_port>``. (None, None)
        outside one."""
        if not self.replicas or not self.service:
            return None, None
        pod = pod_name or os.environ.get("POD_NAME") or os.environ.get("HOSTNAME", "")
        base, _, ordinal = pod.rpartition("-")
        if not base or not ordinal.isdigit():
            raise ValueError(f"pod name {pod!r} does not end in a StatefulSet ordinal")
        if int(ordinal) >= self.replicas:
            raise ValueError(f"pod {pod} is outside replicas={self.replicas}")
        addresses = [f"{base}-{i}.{self.service}:{self.cluster_port}" for i in range(self.replicas)]
        return int(ordinal), addresses

    def scaling_mode(self, addresses: Optional[list[str]] = None) -> str:
        """``scaling`` if set, else cluster when cluster addresses are given (``addresses``,
        ``BYTEWAX_ADDRESSES``, or a StatefulSet's) and group otherwise."""
        if self.scaling:
            return self.scaling
        if addresses or os.environ.get("BYTEWAX_ADDRESSES") or self.cluster()[0] is not None:
            return "cluster"
        return "group"

    def kafka_common(self) -> dict[str, Any]:
        """Client settings every consumer, producer and admin client starts from. Their
        own log lines go through our logging at librdkafka's level, not raw to stderr."""
        return {"bootstrap.servers": self.brokers, "logger": CLIENT_LOG, **self.kafka}

    def redacted(self) -> dict[str, Any]:
        """The settings with secrets masked, for logs and ``--help``-style output."""
        shown = dataclasses.asdict(self)
        shown["kafka"] = {
            k: ("***" if any(w in k.lower() for w in _SECRET_WORDS) else v) for k, v in self.kafka.items()
        }
        if self.schema_registry_url:
            shown["schema_registry_url"] = redact_url(self.schema_registry_url, keep_user=False)
        shown["store"] = redact_url(self.store)
        if self.serve_api_key:
            shown["serve_api_key"] = "***"
        shown["object_store"] = [
            e
            if not any(w in e.partition("=")[0].lower() for w in _SECRET_WORDS)
            else e.partition("=")[0] + "=***"
            for e in self.object_store
        ]
        return shown

    def sink_view(self) -> dict[str, Any]:
        """What the sink runs with (the redacted subset that concerns it), for its log."""
        shown = self.redacted()
        keys = (
            "brokers",
            "output_topic",
            "store",
            "sink_group_id",
            "start_from",
            "tail",
            "sink_batch_size",
            "text_search_language",
            "kafka",
        )
        return {**{k: shown[k] for k in keys}, "sink_dlq_topic": self.sink_dlq()}


def redact_url(url: str, *, keep_user: bool = True) -> str:
    """``url`` with its secrets masked, for logs: the password of ``scheme://user:secret@host``
    (``keep_user=False``: the whole user part), and the value of every query parameter
    named like a secret (``?password=…``, ``sslpassword``, ``token``…)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    # The user part ends at the last '@' before the query: a password may hold '@' and '/'.
    head, query_sep, query = rest.partition("?")
    if "@" in head:
        credentials, _, host = head.rpartition("@")
        user, colon, _secret = credentials.partition(":")
        shown = f"{user}:***" if keep_user and colon else (user if keep_user else "***")
        head = f"{shown}@{host}"
    return f"{scheme}://{head}{query_sep}" + _SECRET_PARAM.sub(r"\1***", query)


#: A query parameter whose name holds a secret word, up to the start of its value.
_SECRET_PARAM = re.compile(rf"((?:^|&)[^=&#]*(?:{'|'.join(_SECRET_WORDS)})[^=&#]*=)[^&#]*", re.I)


def _parse(f: dataclasses.Field, raw: str) -> Any:
    kind = str(f.type)
    if "tuple" in kind:
        if f.name in ("allowed_uris", "object_store"):  # they hold colons: split at commas
            return tuple(p.strip() for p in raw.split(",") if p.strip())
        return tuple(p for p in raw.split(os.pathsep) if p)
    if "bool" in kind:
        return _bool(raw)
    if "Optional[int]" in kind:
        return int(raw) if raw else None
    if "int" in kind:
        return int(raw)
    if "float" in kind:
        return float(raw)
    if "Optional" in kind:
        return raw or None
    return raw
