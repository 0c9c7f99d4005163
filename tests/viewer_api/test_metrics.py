"""GET /metrics: Prometheus text with the archive's totals and request latencies."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from kho.archive import memory
from kho.archive.archive import Archive
from kho.archive.read.pixels import FRAME_CACHE
from kho.bench.phantom import ct_series_datasets
from kho.viewer_api.app import create_app
from tests.archive.test_ingest import make_instance


def test_metrics_exposes_counts_bytes_and_latencies(archive: Archive) -> None:
    archive.ingest_part10(make_instance())
    client = TestClient(create_app(archive))
    assert client.get("/dicom-web/studies").status_code == 200
    body = client.get("/metrics").text
    assert 'kho_objects{level="instances"} 1.0' in body
    assert 'kho_received_bytes{modality="CT"}' in body
    assert 'kho_stored_bytes{modality="CT"}' in body
    assert "kho_ingest_seconds_count" in body
    assert 'route="/dicom-web/studies"' in body  # by route template, never by UID


def test_metrics_show_the_finishers_queue(archive: Archive) -> None:
    archive.finisher.stop()  # hold the queue: the instance stays as received
    archive.ingest_part10(make_instance(), defer=True)
    client = TestClient(create_app(archive))
    waiting = client.get("/metrics").text
    assert "kho_unfinished_instances 1.0" in waiting
    assert re.search(r"^kho_spool_bytes [1-9]", waiting, re.MULTILINE)  # in the spool
    assert archive.finisher.drain() == 1
    body = client.get("/metrics").text
    assert "kho_unfinished_instances 0.0" in body
    assert "kho_finish_seconds_count" in body


def _gauge(body: str, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", body, re.MULTILINE)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def test_metrics_show_what_the_caches_hold(archive: Archive) -> None:
    (dataset,) = ct_series_datasets(1, rows=64, cols=64)
    record = archive.ingest_part10(dataset)
    assert archive.finisher.wait_idle(timeout=120)
    FRAME_CACHE.wait_idle()
    FRAME_CACHE.clear()
    client = TestClient(create_app(archive))
    before = client.get("/metrics").text
    assert _gauge(before, "kho_decoded_frame_cache_bytes") == 0
    assert _gauge(before, "kho_decoded_frame_cache_entries") == 0
    assert _gauge(before, "kho_rendered_cache_bytes") == 0
    assert _gauge(before, "kho_decoded_frame_cache_max_bytes") == FRAME_CACHE.max_bytes
    assert _gauge(before, "kho_rendered_cache_max_bytes") > 0

    path = (
        f"/dicom-web/studies/{record.study_uid}/series/{record.series_uid}"
        f"/instances/{record.sop_uid}"
    )
    frame = client.get(
        f"{path}/frames/1",
        headers={"Accept": 'multipart/related; type="application/octet-stream"'},
    )
    assert frame.status_code == 200
    assert client.get(f"{path}/rendered").status_code == 200
    FRAME_CACHE.wait_idle()
    after = client.get("/metrics").text
    # the 64x64 16-bit slice, decoded once from its compressed form at rest
    assert _gauge(after, "kho_decoded_frame_cache_bytes") == 64 * 64 * 2
    assert _gauge(after, "kho_decoded_frame_cache_entries") == 1
    assert _gauge(after, "kho_rendered_cache_bytes") > 0  # the encoded image answered
    assert _gauge(after, "kho_rendered_cache_entries") >= 1


def test_metrics_show_the_c_heap(archive: Archive) -> None:
    """glibc's figures (kho.archive.memory): in use against kept free, so an admin can
    tell a leak (in use rising) from the allocator's keeping (free rising)."""
    body = TestClient(create_app(archive)).get("/metrics").text
    in_use = _gauge(body, "kho_malloc_in_use_bytes")
    arenas = _gauge(body, "kho_malloc_arena_bytes")
    assert 0 < in_use <= arenas
    assert _gauge(body, "kho_malloc_free_bytes") == arenas - in_use
    assert _gauge(body, "kho_malloc_mapped_bytes") >= 0
    assert "process_resident_memory_bytes" in body


def test_metrics_show_sqlite_memory_under_its_limit(archive: Archive) -> None:
    """The SQLite catalog's memory, all connections' page caches together, is shown and
    bounded process-wide (kho.archive.catalog.sqlite.MEMORY_LIMIT_BYTES)."""
    from kho.archive.catalog.sqlite import MEMORY_LIMIT_BYTES

    archive.ingest_part10(make_instance())
    limit = archive.catalog.connection.execute("PRAGMA soft_heap_limit").fetchone()[0]
    assert limit == MEMORY_LIMIT_BYTES
    body = TestClient(create_app(archive)).get("/metrics").text
    if memory.sqlite_bytes() is None:  # Python's SQLite linked in statically: not readable
        assert "kho_sqlite_memory_bytes" not in body
        return
    held = _gauge(body, "kho_sqlite_memory_bytes")
    assert 0 < held <= MEMORY_LIMIT_BYTES
    assert held <= _gauge(body, "kho_malloc_in_use_bytes") + _gauge(body, "kho_malloc_mapped_bytes")
