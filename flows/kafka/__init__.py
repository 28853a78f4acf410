"""Kafka for the flows: source and sink, delivery checks, topic tools (the local
development broker is in :mod:`flows.dev.kafka`)."""
