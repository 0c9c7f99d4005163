"""Prometheus metrics: ingest and request latencies (this process) and what the archive
holds (from the catalog, read at scrape time, so every process reports the same totals)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kho.archive import memory

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
    """Counts and bytes per modality, read from the catalog when scraped.

    ``stats``: one archive's statistics, as Archive.stats gives them (no tenant label:
    the archive as before tenants); or ``tenants``: statistics by tenant, as
    Archive.platform_stats()["tenants"] gives them (for all tenants or for a caller's),
    each figure of a tenant then labelled ``tenant``, so /metrics can show a caller only
    its hospitals.  The host's spool (``host``: shown or not) is no tenant's: every
    tenant's instances wait in it."""

    def __init__(
        self,
        stats: Callable[[], dict[str, Any]] | None = None,
        *,
        tenants: Callable[[], Mapping[str, Mapping[str, Any]]] | None = None,
        host: bool = True,
    ) -> None:
        if (stats is None) == (tenants is None):
            raise ValueError("ArchiveCollector needs stats or tenants, not both")
        self.stats = stats
        self.tenants = tenants
        self.host = host

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.tenants is not None:
            by_tenant = self.tenants()
            tenant: list[str] = ["tenant"]
        else:
            assert self.stats is not None
            by_tenant = {"": self.stats()}
            tenant = []
        counts = GaugeMetricFamily(
            "kho_objects", "Patients, studies, series, instances", labels=["level", *tenant]
        )
        received = GaugeMetricFamily(
            "kho_received_bytes", "Bytes received per modality", labels=["modality", *tenant]
        )
        stored = GaugeMetricFamily(
            "kho_stored_bytes",
            "Bytes stored per modality (after compression)",
            labels=["modality", *tenant],
        )
        instances = GaugeMetricFamily(
            "kho_modality_instances", "Instances per modality", labels=["modality", *tenant]
        )
        unfinished = GaugeMetricFamily(
            "kho_unfinished_instances",
            "Instances acknowledged as received, not yet encoded at rest by the finisher",
            labels=tenant,
        )
        spool_bytes = 0
        for name, stats in by_tenant.items():
            named = [name] if tenant else []
            for level in ("patients", "studies", "series", "instances"):
                counts.add_metric([level, *named], stats[level])
            for row in stats["by_modality"]:
                received.add_metric([row["modality"], *named], row["received_bytes"])
                stored.add_metric([row["modality"], *named], row["stored_bytes"])
                instances.add_metric([row["modality"], *named], row["instances"])
            unfinished.add_metric(named, stats["unfinished"])
            spool_bytes = stats["spool"]["bytes"]
        yield counts
        yield received
        yield stored
        yield instances
        yield unfinished
        if self.host:
            yield GaugeMetricFamily(
                "kho_spool_bytes",
                "Bytes in this host's ingest spool (segments not yet deleted)",
                value=spool_bytes,
            )


class BoundedCache(Protocol):
    """A cache bounded in bytes (kho.archive.read.pixels.DecodedFrameCache,
    kho.archive.read.rendering.RenderCache)."""

    @property
    def held_bytes(self) -> int: ...

    @property
    def entries(self) -> int: ...

    max_bytes: int


class CacheCollector(Collector):
    """What this process's bounded caches hold, read when scraped: for each cache
    ``<name>`` (``decoded_frame``, ``rendered``), ``kho_<name>_cache_bytes``,
    ``kho_<name>_cache_max_bytes`` and ``kho_<name>_cache_entries``.  A process that
    grows by what its caches fill up to is not leaking; one that grows beyond them is."""

    def __init__(self, caches: Mapping[str, BoundedCache]) -> None:
        self.caches = caches

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, cache in self.caches.items():
            yield GaugeMetricFamily(
                f"kho_{name}_cache_bytes",
                f"Bytes the {name.replace('_', ' ')} cache holds in this process",
                value=cache.held_bytes,
            )
            yield GaugeMetricFamily(
                f"kho_{name}_cache_max_bytes",
                f"Bound of the {name.replace('_', ' ')} cache (least recently used out first)",
                value=cache.max_bytes,
            )
            yield GaugeMetricFamily(
                f"kho_{name}_cache_entries",
                f"Items the {name.replace('_', ' ')} cache holds in this process",
                value=cache.entries,
            )


class HeapCollector(Collector):
    """glibc's account of this process's C heap, read when scraped (kho.archive.memory):
    ``kho_malloc_in_use_bytes`` (allocated, in the arenas), ``kho_malloc_free_bytes``
    (free inside the arenas, resident until trimmed), ``kho_malloc_arena_bytes`` (what
    the arenas hold), ``kho_malloc_mapped_bytes`` (large blocks mapped on their own) and,
    part of what is in use, ``kho_sqlite_memory_bytes`` (the SQLite catalog, every
    connection's page cache).
    Resident memory that grows while in-use stays flat is the allocator's keeping, not a
    leak.  Nothing where the C library is not glibc."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        figures = memory.heap_figures()
        if figures is None:
            return
        for name, value, what in (
            ("in_use", figures.in_use, "Bytes allocated and not freed in the malloc arenas"),
            ("free", figures.free, "Bytes free inside the malloc arenas (kept for reuse)"),
            ("arena", figures.arenas, "Bytes the malloc arenas hold from the system"),
            ("mapped", figures.mapped, "Bytes in blocks malloc mapped on their own"),
        ):
            yield GaugeMetricFamily(f"kho_malloc_{name}_bytes", what, value=value)
        sqlite = memory.sqlite_bytes()
        if sqlite is not None:  # part of in-use: the SQLite catalog's page caches
            yield GaugeMetricFamily(
                "kho_sqlite_memory_bytes", "Bytes SQLite holds in this process", value=sqlite
            )


def exposition(
    stats: Callable[[], dict[str, Any]] | None = None,
    *,
    tenants: Callable[[], Mapping[str, Mapping[str, Any]]] | None = None,
    host: bool = True,
    caches: Mapping[str, BoundedCache] | None = None,
) -> bytes:
    """The text exposition format: this process's histograms plus the archive's totals
    (see ArchiveCollector: ``stats`` for one archive, unlabelled; ``tenants`` for some
    tenants, labelled ``tenant``; ``host``: with the host's spool) and, if given, what
    this process's caches hold (see CacheCollector)."""
    registry = CollectorRegistry()
    registry.register(ArchiveCollector(stats, tenants=tenants, host=host))
    if caches:  # the process's own figures (the platform view): its caches and C heap
        registry.register(CacheCollector(caches))
        registry.register(HeapCollector())
        registry.register(ProcessCollector(registry=None))  # process_resident_memory_bytes...
    return generate_latest(REGISTRY) + generate_latest(registry)
