"""The AuditLog: records without failing the caller, retries a failing write, coalesces
reads, writes what is left on close, chains in its thread."""

from __future__ import annotations

import logging
import time

import pytest

from kho.access.callers import Caller
from kho.archive.catalog import Catalog
from kho.audit import journal
from kho.audit import messages as m
from kho.audit.service import AuditLog

FIND = "1.2.840.10008.5.1.4.1.2.2.1"


def test_a_failing_write_never_reaches_the_caller_and_is_retried(
    catalog: Catalog, radiologist: Caller, source, caplog: pytest.LogCaptureFixture
) -> None:
    log = AuditLog(catalog, source=source)
    with catalog.transaction():  # the audit table gone: every write fails
        catalog.execute("ALTER TABLE audit_outbox RENAME TO audit_outbox_away")
    with caplog.at_level(logging.ERROR, logger="kho.audit"):
        log.record(m.query(radiologist, target="/dicom-web/studies", query="PatientID=1"))
        assert log.flush() is False
        assert log.flush() is False
    assert log.failed_writes == 2
    assert log.buffered == 1  # kept for the next try
    assert "not written yet" in caplog.text
    with catalog.transaction():
        catalog.execute("ALTER TABLE audit_outbox_away RENAME TO audit_outbox")
    assert log.flush() is True
    (record,) = journal.search(catalog, user="dr.house")
    assert record.event_kind == "query"
    assert journal.verify(catalog) == []
    assert log.stats()["written"] == 1


def test_record_swallows_what_cannot_be_recorded(sqlite_catalog: Catalog, source) -> None:
    log = AuditLog(sqlite_catalog, source=source)
    log.record(None)  # type: ignore[arg-type]  # a door's bug: logged, not raised
    assert log.recorded == 0
    assert log.record_access(None, patient=m.Patient("P"), study_uid="1") is False  # type: ignore[arg-type]


def test_reads_of_a_study_make_one_record_per_client(
    sqlite_catalog: Catalog, radiologist: Caller, source
) -> None:
    log = AuditLog(sqlite_catalog, source=source, access_window_s=600)
    patient = m.Patient("PAT-1", "DOE^JANE")
    made = [log.record_access(radiologist, patient=patient, study_uid="1.1") for _ in range(500)]
    assert made.count(True) == 1
    log.record_access(radiologist, patient=patient, study_uid="2.1", via="WADO-RS thumbnail")
    colleague = Caller(radiologist.kind, "dr.wilson", home_tenant="hosp-a", address="10.9.9.9")
    log.record_access(colleague, patient=patient, study_uid="1.1")
    log.flush()
    found = journal.search(sqlite_catalog, event="instances-accessed")
    assert sorted((r.user_id, r.study_uids[0]) for r in found) == [
        ("dr.house", "1.1"),
        ("dr.house", "2.1"),
        ("dr.wilson", "1.1"),
    ]
    assert {r.via for r in found} == {"WADO-RS", "WADO-RS thumbnail"}
    assert log.stats()["reads_coalesced"] == 499


def test_close_writes_what_is_buffered(sqlite_catalog: Catalog, radiologist, source) -> None:
    log = AuditLog(sqlite_catalog, source=source)  # never started
    for i in range(5):
        log.record(m.query(radiologist, target=FIND, query=bytes([i])))
    log.close()
    assert len(journal.search(sqlite_catalog, event="query")) == 5
    log.record(m.application_activity(started=False))  # after close: written at once
    assert len(journal.search(sqlite_catalog, event="application-activity")) == 1


def test_the_thread_writes_and_chains_without_being_asked(
    catalog: Catalog, radiologist, modality, source
) -> None:
    with AuditLog(catalog, source=source, flush_interval_s=0.05) as log:
        log.record(m.query(radiologist, target=FIND, query=b"q"))
        with catalog.transaction():  # a change's record, chained by the thread too
            catalog.execute_batch(
                log.statements_for(
                    m.instances_stored(
                        modality,
                        patient=m.Patient("P"),
                        study=m.one_instance("1.1", "1.2.840.10008.5.1.4.1.1.2", "1.1.1"),
                    )
                )
            )
        deadline = time.monotonic() + 30
        while len(journal.read_after(catalog, 0)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [r.event_kind for r in journal.read_after(catalog, 0)] in (
            ["query", "instances-transferred"],
            ["instances-transferred", "query"],
        )
    assert journal.verify(catalog) == []
