"""Prometheus collectors, registered on an injected registry."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter


@dataclass(frozen=True)
class Metrics:
    steps_ingested: Counter
    batches_ingested: Counter
    ingest_rejected: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> Metrics:
        return cls(
            steps_ingested=Counter(
                "gradsentry_steps_ingested", "Step records stored", registry=registry
            ),
            batches_ingested=Counter(
                "gradsentry_batches_ingested", "Step batches stored", registry=registry
            ),
            ingest_rejected=Counter(
                "gradsentry_requests_rejected",
                "Requests answered with a 4xx, by error",
                ["error"],
                registry=registry,
            ),
        )
