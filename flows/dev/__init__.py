"""Developer services, not the runtime: the local Kafka broker (:mod:`flows.dev.kafka`),
the local PostgreSQL (:mod:`flows.dev.postgres`) and the container tooling
(:mod:`flows.dev.containers`) behind ``embedstream kafka``, ``postgres`` and ``image``."""
