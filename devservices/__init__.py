"""Kafka and PostgreSQL for tests, the demo and benchmarks: given, containerised or embedded."""

from intentflow.devservices.embedded import EmbeddedKafka, EmbeddedPostgres
from intentflow.devservices.resolve import Services, services

__all__ = ["EmbeddedKafka", "EmbeddedPostgres", "Services", "services"]
