"""Prometheus metrics: ingest and request latencies (this process) and what the archive
holds (from the catalog, read at scrape time, so every process reports the same totals)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

INGEST_SECONDS = Histogram(
    "kho_ingest_seconds",
    "Time to ingest one instance durably, until it can be acknowledged (parse, write, "
    "commit; encoding too when not left to the background finisher)",
    ["source"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
FINISH_SECONDS = Histogram(
    "kho_finish_seconds",
    "Time the background finisher takes for one instance (encode, derive, write, switch)",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
INGEST_OUTCOMES = Counter(
    "kho_ingest_total", "Ingest attempts by outcome", ["source", "outcome"], registry=REGISTRY
)
PEER_READS = Counter(
    "kho_peer_reads_total",
    "Reads of instances held in another host's ingest spool, by outcome (ok; absent: moved "
    "or deleted there; unavailable: that host out of reach or refusing)",
    ["outcome"],
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "kho_http_request_seconds",
    "HTTP request latency by route template and status",
    ["method", "route", "status"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)


class ArchiveCollector(Collector):
    """Counts and bytes per modality, read from the catalog when scraped (``stats``: the
    archive's statistics, as Archive.stats gives them)."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self.stats()
        counts = GaugeMetricFamily(
            "kho_objects", "Patients, studies, series, instances", labels=["level"]
        )
        for level in ("patients", "studies", "series", "instances"):
            counts.add_metric([level], stats[level])
        yield counts
        received = GaugeMetricFamily(
            "kho_received_bytes", "Bytes received per modality", labels=["modality"]
        )
        stored = GaugeMetricFamily(
            "kho_stored_bytes", "Bytes stored per modality (after compression)", labels=["modality"]
        )
        instances = GaugeMetricFamily(
            "kho_modality_instances", "Instances per modality", labels=["modality"]
        )
        for row in stats["by_modality"]:
            received.add_metric([row["modality"]], row["received_bytes"])
            stored.add_metric([row["modality"]], row["stored_bytes"])
            instances.add_metric([row["modality"]], row["instances"])
        yield received
        yield stored
        yield instances
        yield GaugeMetricFamily(
            "kho_unfinished_instances",
            "Instances acknowledged as received, not yet encoded at rest by the finisher",
            value=stats["unfinished"],
        )
        yield GaugeMetricFamily(
            "kho_spool_bytes",
            "Bytes in this host's ingest spool (segments not yet deleted)",
            value=stats["spool"]["bytes"],
        )


def exposition(stats: Callable[[], dict[str, Any]]) -> bytes:
    """The text exposition format: this process's histograms plus the archive's totals."""
    registry = CollectorRegistry()
    registry.register(ArchiveCollector(stats))
    return generate_latest(REGISTRY) + generate_latest(registry)
