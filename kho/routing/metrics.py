"""Prometheus metrics of forwarding: what this process sent (counters and latencies, in
the archive's registry, so /metrics shows them with the rest) and the queue as the
catalog holds it, read when scraped (the same figures from every process), by tenant."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kho.archive.metrics import REGISTRY

_SEND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_DELAY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 86400)

SENT = Counter(
    "kho_forward_instances_total",
    "Instances forwarded by outcome (delivered, retry, dead, withheld)",
    ["destination", "outcome"],
    registry=REGISTRY,
)
SENT_BYTES = Counter(
    "kho_forward_bytes_total",
    "Bytes of instances delivered, as sent",
    ["destination"],
    registry=REGISTRY,
)
SEND_SECONDS = Histogram(
    "kho_forward_send_seconds",
    "Time to send one instance and have its answer (C-STORE or its share of a STOW-RS)",
    ["destination"],
    buckets=_SEND_BUCKETS,
    registry=REGISTRY,
)
DELAY_SECONDS = Histogram(
    "kho_forward_delay_seconds",
    "From an instance's queuing (its storage, or a stable group's release) to its delivery",
    ["destination"],
    buckets=_DELAY_BUCKETS,
    registry=REGISTRY,
)
DESTINATION_FAILURES = Counter(
    "kho_forward_destination_failures_total",
    "Batches a destination could not take (unreachable, refused, aborted)",
    ["destination"],
    registry=REGISTRY,
)


class QueueCollector(Collector):
    """The queue per tenant and destination, from Router.status()'s ``tenants``."""

    def __init__(self, status: Callable[[], Mapping[str, Mapping[str, Mapping[str, Any]]]]):
        self.status = status

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "kho_forward_queue",
            "Instances in the outbound queue by state",
            labels=["tenant", "destination", "state"],
        )
        lag = GaugeMetricFamily(
            "kho_forward_lag_seconds",
            "Age of the oldest instance not yet delivered",
            labels=["tenant", "destination"],
        )
        failing = GaugeMetricFamily(
            "kho_forward_destination_consecutive_failures",
            "Consecutive failed batches of a destination (0: healthy)",
            labels=["tenant", "destination"],
        )
        for tenant, destinations in self.status().items():
            for name, item in destinations.items():
                for state in ("waiting", "queued", "committing", "dead", "withheld"):
                    depth.add_metric([tenant, name, state], float(item.get(state, 0)))
                lag.add_metric([tenant, name], float(item.get("lag_s", 0.0)))
                failing.add_metric([tenant, name], float(item.get("failures", 0)))
        yield depth
        yield lag
        yield failing


def exposition(status: Callable[[], Mapping[str, Mapping[str, Mapping[str, Any]]]]) -> bytes:
    """The queue's gauges in the text format (for /metrics to append to the archive's):
    ``status`` gives the tenants the caller may see (Router.status(tenants)["tenants"])."""
    registry = CollectorRegistry()
    registry.register(QueueCollector(status))
    return generate_latest(registry)


__all__ = [
    "DELAY_SECONDS",
    "DESTINATION_FAILURES",
    "SEND_SECONDS",
    "SENT",
    "SENT_BYTES",
    "QueueCollector",
    "exposition",
]
