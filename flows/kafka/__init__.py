"""Kafka for the flows: source and sink, topic tools, the local development broker."""
