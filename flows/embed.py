"""The main job: document events in, vector records out, bad input to the dead-letter topic.

    Kafka source → [decode → fetch → extract → chunk → embed → encode] → Kafka sink

The bracketed part is one stateless step over each micro-batch the source hands
over, so nothing waits in a buffer outside the recovery snapshot. Configured by
``EMBEDSTREAM_*`` variables (see ``operators.config.Settings``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import bytewax.operators as op
from bytewax.dataflow import Dataflow

from operators import runtime
from operators.config import Settings
from operators.kafka_io import KafkaInput, KafkaOutput
from operators.topics import max_message_bytes


def build(settings: Optional[Settings] = None) -> Dataflow:
    settings = settings or Settings.from_env()
    settings = dataclasses.replace(settings, batch_size=settings.micro_batch_size())
    kafka = settings.kafka_common()
    # Records must fit the output topics; the producer must not refuse what they accept.
    outputs = [settings.output_topic, settings.dlq_topic, settings.image_output_topic]
    limit = min(max_message_bytes(settings, t) for t in outputs if t)
    flow = Dataflow("embedstream")
    events = op.input(
        "documents",
        flow,
        KafkaInput(
            {**kafka, "group.id": settings.group_id},
            settings.input_topic,
            start_from=settings.start_from,
            tail=settings.tail,
            batch_size=settings.batch_size,
            batch_bytes=settings.batch_bytes,
            poll_ms=settings.poll_ms,
        ),
    )
    records = op.flat_map_batch("embed", events, runtime.processor(settings, limit))
    sink_config = {"message.max.bytes": str(max(limit, 1_000_000)), **kafka}
    op.output("kafka", records, KafkaOutput(sink_config, group_id=settings.group_id))
    return flow


def __getattr__(name: str) -> Dataflow:
    # `python -m bytewax.run flows.embed:flow` builds from the environment; importing
    # `build` alone (as `embedstream run` does) touches no broker.
    if name == "flow":
        return build()
    raise AttributeError(name)
