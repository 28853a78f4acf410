"""The main job: document events in, vector records out, bad input to the dead-letter topic.

    Kafka source → decode → fetch_extract → chunk → embed → encode → Kafka sink

Each step is a named Bytewax step (``python -m bytewax.visualize flows.embed:flow``
draws them) over one whole micro-batch: the first step turns the batch the source
hands over into a single item, so the embed step makes one model call per source
batch and no event waits in a buffer outside the recovery snapshot. Dead letters
leave through the same sink as the records, routed by topic, so offsets are
committed in input order.

The source depends on ``scaling``: in group mode (the default) each worker is a
member of the consumer group (:mod:`flows.kafka.group`) and commits its offsets
itself; in cluster mode a fixed Bytewax cluster shares the partitions
(:class:`flows.kafka.io.KafkaInput`) and resumes from its recovery store. With
``exactly_once`` (group mode only) each member commits a batch's outputs and its
offsets in one Kafka transaction (:mod:`flows.kafka.transactions`). Configured
by ``EMBEDSTREAM_*`` variables (see :class:`flows.settings.Settings`); the steps live
in :mod:`flows.embed_steps`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import bytewax.operators as op
from bytewax.dataflow import Dataflow

from flows import health, runtime
from flows.embed_steps import Pipeline
from flows.kafka import group
from flows.kafka.group import GroupInput
from flows.kafka.io import KafkaInput, KafkaOutput, ReadOptions
from flows.kafka.transactions import Transactions, transactional_id
from flows.settings import Settings


def build(settings: Optional[Settings] = None) -> Dataflow:
    settings = settings or Settings.from_env()
    settings = dataclasses.replace(settings, batch_size=settings.micro_batch_size())
    kafka = settings.kafka_common()

    def pipeline() -> Pipeline:
        # Built on first use in each worker process (the model loads there), never here:
        # defining the flow touches neither the model nor the broker.
        return runtime.pipeline(settings)

    def sink_limits() -> dict[str, str]:
        # The producer must not refuse what the output topics accept.
        return {"message.max.bytes": str(max(runtime.output_limit(settings), 1_000_000))}

    consumer = {**kafka, "group.id": settings.group_id}
    options = ReadOptions.of(settings, settings.batch_size)
    group_mode = settings.scaling_mode() == "group"
    exactly_once = settings.exactly_once
    if exactly_once and not group_mode:
        raise ValueError("exactly_once needs scaling=group (a Bytewax cluster cannot run it)")
    member = settings.member() if exactly_once else ""  # fails now, clearly, without a stable name

    def transactions(worker_index: int) -> Transactions:
        # Made in each worker as it starts, like the sink's producer (the limits need the broker).
        return Transactions(
            {**sink_limits(), **kafka},
            transactional_id(settings.group_id, member, worker_index),
            flush_timeout_s=settings.flush_timeout(),
            timeout_ms=settings.transaction_timeout_ms(),
        )

    if group_mode:
        source = GroupInput(
            consumer,
            settings.input_topic,
            options,
            on_moved=runtime.forget_state,
            transactions=transactions if exactly_once else None,
        )
    else:
        source = KafkaInput(consumer, settings.input_topic, options)

    flow = Dataflow("embedstream")
    events = op.input("documents", flow, health.watched(source))
    batches = op.flat_map_batch("decode", events, lambda messages: pipeline().decode(messages))
    batches = op.map("fetch_extract", batches, lambda batch: pipeline().fetch_and_extract(batch))
    batches = op.map("chunk", batches, lambda batch: pipeline().chunk(batch))
    batches = op.map("embed", batches, lambda batch: pipeline().embed(batch))
    records = op.flat_map("encode", batches, lambda batch: pipeline().encode(batch))
    flush_s = settings.flush_timeout()
    if exactly_once:
        sink = KafkaOutput(kafka, flush_s, transact=group.transact)
    elif group_mode:
        sink = KafkaOutput(kafka, flush_s, runtime_config=sink_limits, commit=group.commit)
    else:
        sink = KafkaOutput(kafka, flush_s, group_id=settings.group_id, runtime_config=sink_limits)
    op.output("kafka", records, sink)
    return flow


def __getattr__(name: str) -> Dataflow:
    # `python -m bytewax.run flows.embed:flow` builds from the environment; importing
    # `build` alone (as `embedstream run` does) touches no broker.
    if name == "flow":
        return build()
    raise AttributeError(name)
