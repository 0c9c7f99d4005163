"""GET /metrics: Prometheus text with the archive's totals and request latencies."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from kho.archive.archive import Archive
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
