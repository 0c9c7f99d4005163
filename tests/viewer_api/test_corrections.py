"""Corrections over HTTP: an admin's reject and DELETE routes (deny by default: only an
admin of the study's tenant), rejection notes sent by STOW-RS, and what QIDO-RS and WADO-RS
(metadata, frames, rendered, thumbnails, the instance) show afterwards; each correction
audited (Instances Accessed with action D, or Study Deleted)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from kho.archive.archive import Archive
from kho.audit import EventKind, chain_all, search
from kho.audit.auditor import Auditor
from kho.viewer_api.app import PREFIX
from kho.viewer_api.multipart import join_parts
from kho.viewer_api.server import HttpServer
from tests.helpers.kos import Study, make_study, rejection_note
from tests.helpers.oidc import OidcIssuer
from tests.viewer_api.test_access import bearer, secured_settings

OTHER = "hosp-b"
STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=KhoCorrections'


@dataclass
class Setup:
    archive: Archive
    auditor: Auditor
    http: httpx.Client
    tokens: dict[str, str]

    def as_(self, who: str) -> dict[str, str]:
        return bearer(self.tokens[who])

    def records(self, kind: EventKind) -> list[object]:
        for audit_log in list(self.auditor._logs.values()):
            audit_log.flush()
        chain_all(self.archive.catalog)
        return list(search(self.archive.catalog, event=kind, limit=100))


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    with OidcIssuer() as issuer:
        settings = secured_settings(
            tmp_path / "data", issuer, tenants=[OTHER], rejected_purge_delay_s=0.3
        )
        with Archive(settings) as archive:
            auditor = Auditor(archive).start()
            archive.rejection_records.append(auditor.rejection_rows)
            server = HttpServer(archive, host="127.0.0.1", port=0)
            server.app.state.viewer.auditor = auditor
            home = {"tenant": settings.default_tenant}
            tokens = {
                role: issuer.mint({"roles": [role], "preferred_username": f"dr-{role}", **home})
                for role in ("viewer", "uploader", "admin")
            }
            tokens["other-admin"] = issuer.mint({"roles": ["admin"], "tenant": OTHER})
            with server, httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as c:
                try:
                    yield Setup(archive, auditor, c, tokens)
                finally:
                    auditor.close()


def _stored(setup: Setup) -> Study:
    study = make_study(series=2, per_series=2)
    for made in study.instances:
        setup.archive.ingest_part10(made.data)
    setup.archive.finisher.wait_idle(30)
    return study


def _qido(setup: Setup, path: str) -> list[dict[str, object]]:
    response = setup.http.get(PREFIX + path, headers=setup.as_("viewer"))
    assert response.status_code in (200, 204), response.text
    return response.json() if response.status_code == 200 else []


def _uids(answers: list[dict[str, object]], tag: str) -> set[str]:
    return {a[tag]["Value"][0] for a in answers}  # type: ignore[index]


READS = ("/metadata", "/frames/1", "/rendered", "/thumbnail", "")


def _reads(setup: Setup, study: Study, series: str, sop: str) -> set[int]:
    """The statuses of every WADO-RS read of one instance."""
    path = f"{PREFIX}/studies/{study.uid}/series/{series}/instances/{sop}"
    return {
        setup.http.get(path + tail, headers={**setup.as_("viewer"), "Accept": "*/*"}).status_code
        for tail in READS
    }


def test_only_an_admin_of_the_tenant_deletes(setup: Setup) -> None:
    study = _stored(setup)
    path = f"{PREFIX}/studies/{study.uid}"
    assert setup.http.delete(path).status_code == 401
    for who in ("viewer", "uploader"):
        assert setup.http.delete(path, headers=setup.as_(who)).status_code == 403, who
    # the other hospital's admin: in its own tenant there is no such study; in this one,
    # no grant
    other = setup.as_("other-admin")
    assert setup.http.delete(path, headers=other).status_code == 404
    assert setup.http.delete(f"/tenants/{OTHER}{path}", headers=other).status_code == 404
    assert setup.http.delete(f"/tenants/default{path}", headers=other).status_code == 403
    assert (
        setup.http.post(
            path + "/reject", json={"reason": "quality"}, headers=setup.as_("uploader")
        ).status_code
        == 403
    )
    assert _uids(_qido(setup, f"/studies/{study.uid}/instances"), "00080018") == {
        m.sop for m in study.instances
    }
    prefixes = [
        setup.archive.catalog.require_instance(m.sop).object_prefix for m in study.instances
    ]

    response = setup.http.delete(path, headers=setup.as_("admin"))

    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["rejected"] == 4 and answer["purged"] == 4 and answer["note"] is None
    assert answer["reason"]["code"] == "113039"
    assert _qido(setup, f"/studies?StudyInstanceUID={study.uid}") == []
    m = study.instances[0]
    assert _reads(setup, study, m.series, m.sop) == {404}
    assert not any(list(setup.archive.store.list(p + ".")) for p in prefixes)
    assert setup.http.delete(path, headers=setup.as_("admin")).status_code == 404
    [record] = setup.records(EventKind.STUDY_DELETED)
    assert record.action == "D" and record.user_id == "dr-admin"  # type: ignore[attr-defined]
    assert study.uid in record.study_uids  # type: ignore[attr-defined]
    assert "IOCM-1" in record.patient_ids  # type: ignore[attr-defined]


def test_an_admin_rejects_a_series_and_reads_stop_at_once(setup: Setup) -> None:
    study = _stored(setup)
    first, second = list(study.series.values())
    base = f"{PREFIX}/studies/{study.uid}/series/{first[0].series}"
    bad = setup.http.post(base + "/reject", json={"reason": "whim"}, headers=setup.as_("admin"))
    assert bad.status_code == 400
    assert _reads(setup, study, first[0].series, first[0].sop) == {200}

    response = setup.http.post(
        base + "/reject", json={"reason": "113001"}, headers=setup.as_("admin")
    )

    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["rejected"] == 2 and answer["purged"] == 0 and answer["note"]
    series = _uids(_qido(setup, f"/studies/{study.uid}/series"), "0020000E")
    assert first[0].series not in series and second[0].series in series
    assert _reads(setup, study, first[0].series, first[0].sop) == {404}
    assert _reads(setup, study, second[0].series, second[0].sop) == {200}
    metadata = setup.http.get(f"{PREFIX}/studies/{study.uid}/metadata", headers=setup.as_("viewer"))
    documents = _uids(metadata.json(), "00080018")
    # the rest, and the note (kept, in its own series)
    assert documents == {m.sop for m in second} | {answer["note"]}
    accessed = setup.records(EventKind.INSTANCES_ACCESSED)
    [record] = [r for r in accessed if r.action == "D"]  # type: ignore[attr-defined]
    assert record.user_id == "dr-admin"  # type: ignore[attr-defined]
    assert first[0].sop in record.message and "113001" in record.message  # type: ignore[attr-defined]
    # purged after the delay by the archive's housekeeping
    time.sleep(0.4)
    assert setup.archive.purge_rejected() == 2
    assert setup.archive.stats()["rejected"] == {"pending_purge": 0, "purged": 2}


def test_a_note_sent_by_stow_rejects_and_a_useless_one_is_refused(setup: Setup) -> None:
    study = _stored(setup)
    named = study.instances[:1]
    url = f"{PREFIX}/studies"
    headers = {**setup.as_("uploader"), "Content-Type": STOW_TYPE}

    def stow(data: bytes) -> httpx.Response:
        body = join_parts("KhoCorrections", [(data, "application/dicom")])
        return setup.http.post(url, content=body, headers=headers)

    unknown = make_study("IOCM-U", series=1, per_series=1)
    refused = stow(rejection_note(unknown.instances, patient_id="IOCM-U")[1])
    assert refused.status_code == 409, refused.text
    assert "FailedSOPSequence" in refused.text or "00081198" in refused.text
    note_uid, note = rejection_note(
        named, code="113038", meaning="Incorrect Modality Worklist Entry"
    )
    accepted = stow(note)
    assert accepted.status_code == 200, accepted.text
    m = named[0]
    assert _reads(setup, study, m.series, m.sop) == {404}
    assert m.sop not in _uids(_qido(setup, f"/studies/{study.uid}/instances"), "00080018")
    assert note_uid in _uids(_qido(setup, f"/studies/{study.uid}/instances"), "00080018")
