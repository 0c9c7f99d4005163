"""The journal on SQLite and PostgreSQL: records chained in order, found by search;
records of a change commit with it; tampering with the SQL tables is found by verify."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import threading
import time
import xml.etree.ElementTree as ET

import pytest

from kho.access.callers import Caller, CallerKind
from kho.archive.catalog import Catalog, open_catalog
from kho.audit import journal
from kho.audit import messages as m
from kho.audit.journal import GENESIS, AuditRecord, search, statements_for, verify
from kho.audit.service import AuditLog

CT = "1.2.840.10008.5.1.4.1.1.2"
FIND = "1.2.840.10008.5.1.4.1.2.2.1"


def stored(caller: Caller, patient: str, study: str, sop: str) -> m.AuditEvent:
    return m.instances_stored(
        caller, patient=m.Patient(patient), study=m.one_instance(study, CT, sop)
    )


def records(catalog: Catalog) -> list[AuditRecord]:
    return journal.read_after(catalog, 0, limit=100_000)


def fill(catalog: Catalog, modality: Caller, radiologist: Caller, source) -> AuditLog:
    """Six records: stores of two patients' studies, a query, two reads, a failed login."""
    log = AuditLog(catalog, source=source)
    log.record(stored(modality, "PAT-1", "1.1", "1.1.1"))
    log.flush()
    log.record(stored(modality, "PAT-2", "2.1", "2.1.1"))
    log.record(m.query(radiologist, target="/dicom-web/studies", query="PatientID=PAT-1"))
    log.flush()
    log.record(m.instances_accessed(radiologist, patient=m.Patient("PAT-1"), study=m.Study("1.1")))
    log.record(m.instances_accessed(radiologist, patient=m.Patient("PAT-2"), study=m.Study("2.1")))
    log.record(m.user_authentication("mallory", success=False, address="203.0.113.9"))
    log.flush()
    return log


def test_records_are_chained_in_order(catalog: Catalog, modality, radiologist, source) -> None:
    fill(catalog, modality, radiologist, source)
    chain = records(catalog)
    assert [r.seq for r in chain] == [1, 2, 3, 4, 5, 6]
    assert chain[0].prev_hash == GENESIS
    for before, after in itertools.pairwise(chain):
        assert after.prev_hash == before.hash
    for record in chain:
        assert record.hash == record.computed_hash()
        assert len(record.hash) == 64
        ET.fromstring(record.message)  # the DICOM Audit Message, well-formed
    assert [r.event_kind for r in chain] == [
        "instances-transferred",
        "instances-transferred",
        "query",
        "instances-accessed",
        "instances-accessed",
        "user-authentication",
    ]
    assert chain[0].user_id == "CT_SCANNER_1"
    assert chain[0].address == "10.20.30.40"
    assert chain[0].tenant == "hosp-a"
    assert chain[0].patient_ids == ["PAT-1"]
    assert chain[0].study_uids == ["1.1"]
    assert verify(catalog) == []
    assert journal.pending_count(catalog) == 0


def test_search(catalog: Catalog, modality, radiologist, source) -> None:
    fill(catalog, modality, radiologist, source)
    by_patient = search(catalog, patient_id="PAT-1")
    assert [(r.event_kind, r.user_id) for r in by_patient] == [
        ("instances-accessed", "dr.house"),  # newest first
        ("instances-transferred", "CT_SCANNER_1"),
    ]
    assert [r.seq for r in search(catalog, study_uid="2.1")] == [5, 2]
    assert {r.seq for r in search(catalog, user="dr.house")} == {3, 4, 5}
    assert [r.seq for r in search(catalog, event="query")] == [3]
    assert [r.seq for r in search(catalog, event=m.EventKind.USER_AUTHENTICATION)] == [6]
    assert [r.seq for r in search(catalog, outcome=4)] == [6]
    assert [r.seq for r in search(catalog, patient_id="PAT-1", user="dr.house")] == [4]
    assert len(search(catalog, limit=2)) == 2
    assert search(catalog, patient_id="nobody") == []
    first, last = records(catalog)[0], records(catalog)[-1]
    assert search(catalog, since=last.event_time + 1) == []
    assert len(search(catalog, until=last.event_time)) == 6
    assert [r.seq for r in search(catalog, until=first.event_time)] == [1]
    result = search(catalog, patient_id="PAT-2", event="instances-transferred")[0].as_dict()
    assert result["patients"] == ["PAT-2"]
    assert result["user"] == "CT_SCANNER_1"
    assert "<AuditMessage>" in result["message"]
    json.dumps(result)  # ready for an HTTP route


class Rollback(Exception):
    pass


def change(catalog: Catalog, sop: str) -> list[tuple[str, tuple]]:
    """A stand-in for an ingest's catalog rows: one row of the finisher's queue."""
    return [
        (
            "INSERT INTO unfinished (sop_uid, object_prefix, queued_at) VALUES (?, ?, ?)",
            (sop, f"i/{sop}", time.time()),
        )
    ]


def test_a_record_commits_with_its_change_and_rolls_back_with_it(
    catalog: Catalog, modality, source
) -> None:
    log = AuditLog(catalog, source=source)
    with catalog.transaction():
        catalog.execute_batch(
            change(catalog, "9.9.1") + log.statements_for(stored(modality, "P", "1.1", "9.9.1"))
        )
    with pytest.raises(Rollback), catalog.transaction():
        catalog.execute_batch(
            change(catalog, "9.9.2") + log.statements_for(stored(modality, "P", "1.1", "9.9.2"))
        )
        raise Rollback
    assert journal.pending_count(catalog) == 1  # only the committed change's record
    log.record(m.query(modality, target=FIND, query=b""))
    log.flush()
    chain = records(catalog)
    assert [r.seq for r in chain] == [1, 2]  # no hole where the rolled back one was
    assert '"9.9.1"' in chain[0].message and '"9.9.2"' not in chain[0].message
    assert catalog.fetchall("SELECT sop_uid FROM unfinished") == [("9.9.1",)]
    assert verify(catalog) == []


def test_a_change_in_flight_while_the_chain_grows_leaves_no_hole(
    catalog_url: str, modality, source
) -> None:
    """A change holds its (uncommitted) record while other records are chained; it then
    rolls back.  The chain never gave it a number, so it has no gap."""
    with contextlib.ExitStack() as stack:
        ingest = stack.enter_context(contextlib.closing(open_catalog(catalog_url)))
        other = stack.enter_context(contextlib.closing(open_catalog(catalog_url)))
        log = AuditLog(other, source=source)
        statements = statements_for(stored(modality, "P", "1.1", "1.1.9"), source)
        chained = threading.Thread(
            target=lambda: (log.record(m.query(modality, target=FIND, query=b"")), log.flush())
        )
        with pytest.raises(Rollback), ingest.transaction():
            ingest.execute_batch(statements)
            chained.start()
            chained.join(2)  # PostgreSQL: done meanwhile; SQLite: waits for the lock
            raise Rollback
        chained.join(30)
        assert not chained.is_alive()
        log.record(m.query(modality, target=FIND, query=b"again"))
        log.flush()
        assert [r.seq for r in records(other)] == [1, 2]
        assert all("1.1.9" not in r.message for r in records(other))
        assert verify(other) == []


def test_an_edited_record_is_found(catalog: Catalog, modality, radiologist, source) -> None:
    fill(catalog, modality, radiologist, source)
    catalog.execute("UPDATE audit_journal SET user_id = ? WHERE seq = 4", ("someone.else",))
    problems = verify(catalog)
    assert [(p.seq, p.kind) for p in problems] == [(4, "altered")]
    assert "does not match its hash" in str(problems[0])


def test_an_edited_message_is_found(catalog: Catalog, modality, radiologist, source) -> None:
    fill(catalog, modality, radiologist, source)
    catalog.execute(
        "UPDATE audit_journal SET message = replace(message, 'dr.house', 'nobody') WHERE seq = 3"
    )
    assert [(p.seq, p.kind) for p in verify(catalog)] == [(3, "altered")]


def test_an_edit_with_a_recomputed_hash_breaks_the_chain(
    catalog: Catalog, modality, radiologist, source
) -> None:
    """Whoever edits a record and recomputes its hash still breaks the link to the next
    record (and would have to rewrite every later one, and the head)."""
    fill(catalog, modality, radiologist, source)
    edited = records(catalog)[1]
    forged = AuditRecord.from_row([*edited.values()[:7], "someone.else", *edited.values()[8:]])
    catalog.execute(
        "UPDATE audit_journal SET user_id = ?, hash = ? WHERE seq = 2",
        ("someone.else", forged.computed_hash()),
    )
    assert [(p.seq, p.kind) for p in verify(catalog)] == [(3, "out-of-order")]


def test_with_a_key_a_recomputed_sha256_is_still_found(
    catalog: Catalog, modality, radiologist, source
) -> None:
    log = AuditLog(catalog, source=source, key=b"k" * 32)
    log.record(stored(modality, "P", "1.1", "1.1.1"))
    log.record(stored(radiologist, "P", "1.1", "1.1.2"))
    log.flush()
    assert verify(catalog, key=b"k" * 32) == []
    assert verify(catalog)  # without the key nothing matches
    record = records(catalog)[-1]
    forged = AuditRecord.from_row([*record.values()[:7], "x", *record.values()[8:]])
    catalog.execute(
        "UPDATE audit_journal SET user_id = 'x', hash = ? WHERE seq = ?",
        (hashlib.sha256(record.prev_hash.encode() + b"\n" + forged.canonical()).hexdigest(), 2),
    )
    problems = verify(catalog, key=b"k" * 32)
    assert (2, "altered") in [(p.seq, p.kind) for p in problems]


def test_a_removed_record_is_found(catalog: Catalog, modality, radiologist, source) -> None:
    fill(catalog, modality, radiologist, source)
    catalog.execute("DELETE FROM audit_journal WHERE seq = 3")
    problems = verify(catalog)
    assert (3, "missing") in [(p.seq, p.kind) for p in problems]
    assert any("3 were removed" in str(p) for p in problems)


def test_removed_records_with_their_index_entries_are_found(
    catalog: Catalog, modality, radiologist, source
) -> None:
    fill(catalog, modality, radiologist, source)
    for table in ("audit_journal", "audit_subjects"):
        catalog.execute(f"DELETE FROM {table} WHERE seq IN (2, 3)")
    assert [(p.seq, p.kind, p.detail) for p in verify(catalog)] == [
        (2, "missing", "record(s) 2..3 were removed")
    ]


def test_swapped_records_are_found(catalog: Catalog, modality, radiologist, source) -> None:
    fill(catalog, modality, radiologist, source)
    with catalog.transaction():
        for old, new in ((2, -2), (3, 2), (-2, 3)):
            for table in ("audit_journal", "audit_subjects"):
                catalog.execute(f"UPDATE {table} SET seq = ? WHERE seq = ?", (new, old))
    found = {(p.seq, p.kind) for p in verify(catalog)}
    assert {(2, "out-of-order"), (3, "out-of-order")} <= found
    assert {(2, "altered"), (3, "altered")} <= found  # each names its own number


def test_a_removed_tail_is_found(catalog: Catalog, modality, radiologist, source) -> None:
    fill(catalog, modality, radiologist, source)
    catalog.execute("DELETE FROM audit_journal WHERE seq >= 5")
    catalog.execute("DELETE FROM audit_subjects WHERE seq >= 5")
    assert [(p.seq, p.kind) for p in verify(catalog)] == [(5, "truncated")]


def test_a_hidden_search_entry_is_found(catalog: Catalog, modality, radiologist, source) -> None:
    fill(catalog, modality, radiologist, source)
    catalog.execute("DELETE FROM audit_subjects WHERE kind = 'patient' AND seq = 4")
    assert search(catalog, patient_id="PAT-1", user="dr.house") == []
    assert [(p.seq, p.kind) for p in verify(catalog)] == [(4, "index")]


def test_instance_records_of_a_study_fold_into_few(catalog: Catalog, modality, source) -> None:
    """A 250-instance series sent by one modality: every instance named once, in records
    of at most 200 instances; another sender's instance gets its own record."""
    log = AuditLog(catalog, source=source)
    sops = [f"1.1.{i}" for i in range(250)]
    for sop in sops:
        with catalog.transaction():
            catalog.execute_batch(log.statements_for(stored(modality, "P", "1.1", sop)))
    other = Caller(modality.kind, "MR_SCANNER", home_tenant="hosp-a", address="10.0.0.2")
    log.record(stored(other, "P", "1.1", "1.1.999"))
    log.flush()
    chain = records(catalog)
    transferred = [r for r in chain if r.user_id == "CT_SCANNER_1"]
    named = []
    for record in transferred:
        root = ET.fromstring(record.message)
        for sop_class in root.iter("SOPClass"):
            uids = [i.get("UID") for i in sop_class.iter("Instance")]
            assert int(sop_class.get("NumberOfInstances", "0")) == len(uids)
            named += uids
    assert sorted(named) == sorted(sops)
    assert [len(list(ET.fromstring(r.message).iter("Instance"))) for r in transferred] == [
        200,
        50,
    ]
    assert [r.user_id for r in chain if "1.1.999" in r.message] == ["MR_SCANNER"]
    assert verify(catalog) == []


def test_an_unreadable_outbox_row_is_kept_in_the_chain(catalog: Catalog, source) -> None:
    log = AuditLog(catalog, source=source)
    with catalog.transaction():
        catalog.execute(
            "INSERT INTO audit_outbox (id, queued_at, event) VALUES ('x', ?, ?)",
            (time.time(), "{not json"),
        )
    log.flush()
    (record,) = records(catalog)
    assert record.event_kind == "unreadable"
    assert record.message == "{not json"
    assert verify(catalog) == []


def test_hostile_text_is_stored_and_the_message_stays_xml(catalog: Catalog, source) -> None:
    """An AE title with NUL and control bytes, markup in a patient name: stored (NUL is
    no PostgreSQL text, control bytes no XML), escaped, verified."""
    caller = Caller(CallerKind.DICOM, "EVIL\x00AE\x07", home_tenant="hosp-a", address="::1")
    log = AuditLog(catalog, source=source)
    log.record(
        m.instances_accessed(
            caller, patient=m.Patient("<PAT>&1", "</ParticipantObjectName>"), study=m.Study("1")
        )
    )
    log.flush()
    (record,) = records(catalog)
    root = ET.fromstring(record.message)
    assert root.findtext(".//ParticipantObjectName") == "</ParticipantObjectName>"
    assert record.user_id == "EVIL\ufffdAE\ufffd"
    assert [r.seq for r in search(catalog, patient_id="<PAT>&1")] == [1]
    participant = root.find("ActiveParticipant")
    assert participant is not None and participant.get("NetworkAccessPointTypeCode") == "2"
    assert verify(catalog) == []


def test_several_writers_make_one_unbroken_chain(catalog_url: str, modality, source) -> None:
    """Four catalogs on one database (as four kho processes would open it), each
    recording and chaining at once: one chain, every record once, no gap."""
    per_writer = 40

    def write(number: int) -> None:
        with contextlib.closing(open_catalog(catalog_url)) as catalog:
            log = AuditLog(catalog, source=source, flush_interval_s=0.01).start()
            for i in range(per_writer):
                log.record(m.query(modality, target=FIND, query=f"{number}-{i}".encode()))
                if i % 7 == 0:
                    with catalog.transaction():
                        catalog.execute_batch(
                            log.statements_for(stored(modality, "P", f"{number}.{i}", f"{i}"))
                        )
            log.close()

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    with contextlib.closing(open_catalog(catalog_url)) as catalog:
        journal.chain_all(catalog)
        chain = records(catalog)
        assert [r.seq for r in chain] == list(range(1, len(chain) + 1))
        queries = [r for r in chain if r.event_kind == "query"]
        assert len(queries) == 4 * per_writer
        assert len([r for r in chain if r.event_kind != "query"]) == 4 * 6  # i = 0, 7 .. 35
        assert verify(catalog) == []


def test_each_tenant_catalog_keeps_its_own_chain(catalog_url: str, modality, source) -> None:
    """One journal per hospital: a tenant's records live in its own catalog (a schema of
    the same PostgreSQL database, a file beside the SQLite one), chained and verified
    apart from the default tenant's."""
    with contextlib.ExitStack() as stack:
        default = stack.enter_context(contextlib.closing(open_catalog(catalog_url)))
        other = stack.enter_context(contextlib.closing(open_catalog(catalog_url, tenant="hosp-b")))
        for catalog, patient in ((default, "PAT-A"), (other, "PAT-B")):
            log = AuditLog(catalog, source=source)
            log.record(stored(modality, patient, f"{patient}.1", f"{patient}.1.1"))
            log.record(m.query(modality, target=FIND, query=patient.encode()))
            log.flush()
        assert [r.seq for r in records(default)] == [1, 2]
        assert [r.seq for r in records(other)] == [1, 2]
        assert [r.patient_ids for r in search(other, patient_id="PAT-B")] == [["PAT-B"]]
        assert search(other, patient_id="PAT-A") == []
        assert search(default, patient_id="PAT-B") == []
        assert verify(default) == [] and verify(other) == []
