"""The HTTP door's audit trail (issue 16): each event type produced by a real client action
over HTTP, with its fields checked in the tenant's journal -- STOW (Instances Transferred,
committed with the instance), QIDO (Query, with the query), WADO reads (Instances Accessed,
one per caller and study per window), a bad token and a denied request (Security Alert),
a token's first use (User Authentication).

Real parts: a test OIDC issuer on loopback, kho's HTTP server on 127.0.0.1:0, httpx and
dicomweb-client with bearer sessions, the SQLite catalog of each tenant.
"""

from __future__ import annotations

import base64
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from kho.archive.archive import Archive
from kho.audit import EventKind, chain_all, search, verify
from kho.audit.auditor import Auditor
from kho.audit.journal import AuditRecord
from kho.viewer_api.app import PREFIX
from kho.viewer_api.server import HttpServer
from tests.helpers.oidc import OidcIssuer
from tests.viewer_api.test_access import Study, bearer, bearer_session, make_study, secured_settings

HOSPITALS = ("hosp-a", "hosp-b")


@dataclass
class Trail:
    issuer: OidcIssuer
    archive: Archive
    auditor: Auditor
    server: HttpServer
    tokens: dict[str, str]
    study: Study

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def client(self, who: str) -> DICOMwebClient:
        return DICOMwebClient(f"{self.origin}{PREFIX}", session=bearer_session(self.tokens[who]))

    def records(self, tenant: str, kind: EventKind, **criteria: object) -> list[AuditRecord]:
        """The tenant's records of one kind, once everything buffered is chained."""
        for audit_log in list(self.auditor._logs.values()):
            audit_log.flush()
        catalog = self.archive.for_tenant(tenant).catalog
        chain_all(catalog)
        return search(catalog, event=kind, limit=1000, **criteria)  # type: ignore[arg-type]


@pytest.fixture
def trail(tmp_path: Path) -> Iterator[Trail]:
    with OidcIssuer() as issuer:
        settings = secured_settings(tmp_path / "data", issuer, tenants=list(HOSPITALS))
        with Archive(settings) as archive:
            auditor = Auditor(archive).start()
            server = HttpServer(archive, host="127.0.0.1", port=0)
            server.app.state.viewer.auditor = auditor
            with server:
                tokens = {
                    "a-all": issuer.mint(
                        {
                            "roles": ["viewer", "uploader"],
                            "tenant": "hosp-a",
                            "preferred_username": "dr-a",
                        }
                    ),
                    "a-uploader": issuer.mint(
                        {
                            "roles": ["uploader"],
                            "tenant": "hosp-a",
                            "preferred_username": "modality-a",
                        }
                    ),
                }
                study = make_study("Auditee^Alma", "PID-AUDIT-1")
                try:
                    yield Trail(issuer, archive, auditor, server, tokens, study)
                finally:
                    auditor.close()


def _store(trail: Trail, who: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(trail.study.data))
    stored = trail.client(who).store_instances([ds])
    assert "FailedSOPSequence" not in stored


def test_stow_is_recorded_with_the_instance(trail: Trail) -> None:
    _store(trail, "a-uploader")
    # committed with the instance: in the outbox of hosp-a's catalog before any flush
    catalog = trail.archive.for_tenant("hosp-a").catalog
    [(queued,)] = catalog.fetchall("SELECT count(*) FROM audit_outbox")
    row = catalog.fetchone("SELECT count(*) FROM audit_journal")
    assert queued + (row[0] if row else 0) >= 1
    [record] = trail.records("hosp-a", EventKind.INSTANCES_TRANSFERRED)
    assert record.user_id == "modality-a"
    assert record.address == "127.0.0.1"
    assert record.via == "STOW-RS"
    assert trail.study.study in record.study_uids_json
    assert "PID-AUDIT-1" in record.patient_ids_json
    assert trail.study.sop in record.message  # the instance is named in the XML
    assert record.outcome == 0
    # nothing about it in the other hospital's journal, and the chain holds
    assert trail.records("hosp-b", EventKind.INSTANCES_TRANSFERRED) == []
    assert verify(catalog) == []


def test_qido_is_a_query_with_its_parameters(trail: Trail) -> None:
    _store(trail, "a-uploader")
    found = trail.client("a-all").search_for_studies(search_filters={"PatientID": "PID-AUDIT-1"})
    assert len(found) == 1
    [record] = trail.records("hosp-a", EventKind.QUERY)
    assert record.user_id == "dr-a"
    assert record.via == "QIDO-RS"
    # the query itself, base64 in ParticipantObjectQuery (PS3.15 A.5.3.3)
    query = ElementTree.fromstring(record.message).find(".//ParticipantObjectQuery")
    assert query is not None and query.text
    assert base64.b64decode(query.text) == b"PatientID=PID-AUDIT-1"


def test_reads_are_one_record_per_caller_and_study(trail: Trail) -> None:
    _store(trail, "a-uploader")
    client = trail.client("a-all")
    s = trail.study
    for _ in range(5):  # a viewer scrolling: metadata and frames, many requests
        client.retrieve_series_metadata(s.study, s.series)
        client.retrieve_instance_frames(s.study, s.series, s.sop, [1])
    [record] = trail.records("hosp-a", EventKind.INSTANCES_ACCESSED)
    assert record.user_id == "dr-a"
    assert s.study in record.study_uids_json
    assert "PID-AUDIT-1" in record.patient_ids_json  # the patient looked up once


def test_refusals_are_security_alerts(trail: Trail) -> None:
    base = f"{trail.origin}{PREFIX}/studies"
    bad = trail.issuer.expired({"roles": ["viewer"], "tenant": "hosp-a"})
    assert httpx.get(base, headers=bearer(bad)).status_code == 401
    # an uploader may not search: denied, and recorded under the caller's name
    assert httpx.get(base, headers=bearer(trail.tokens["a-uploader"])).status_code == 403
    alerts = trail.records("default", EventKind.SECURITY_ALERT)
    assert len(alerts) == 2
    by_outcome = sorted(alerts, key=lambda r: r.user_id)
    assert {r.address for r in by_outcome} == {"127.0.0.1"}
    assert any(r.user_id == "modality-a" for r in alerts)  # the denied one names the caller
    assert all("GET /dicom-web/studies" in r.message for r in alerts)


def test_a_tokens_first_use_is_a_user_authentication(trail: Trail) -> None:
    client = trail.client("a-all")
    for _ in range(3):
        client.search_for_studies()
    logins = trail.records("default", EventKind.USER_AUTHENTICATION)
    assert [r.user_id for r in logins] == ["dr-a"]
    assert logins[0].outcome == 0


def test_share_and_launch_tokens_never_reach_the_trail() -> None:
    from kho.viewer_api.audit import _without_secrets

    secret = "kho_share_0123456789ab_" + "x" * 43
    assert _without_secrets(f"/s/{secret}") == "/s/<token>"
    assert _without_secrets(f"/s/{secret}/qr.svg") == "/s/<token>/qr.svg"
    assert _without_secrets(f"/launch/{secret}") == "/launch/<token>"
    assert _without_secrets("/dicom-web/studies") == "/dicom-web/studies"
