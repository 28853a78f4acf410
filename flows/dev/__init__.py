"""Developer services, not the runtime: the local Kafka broker (:mod:`flows.dev.kafka`),
the local schema registry (:mod:`flows.dev.registry`), the local PostgreSQL
(:mod:`flows.dev.postgres`) and the container tooling (:mod:`flows.dev.containers`) behind
``embedstream kafka``, ``registry``, ``postgres`` and ``image``."""
