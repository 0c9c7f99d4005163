"""Two hospitals on one archive, over HTTP (issue 15): both send a study with the same UIDs,
each with its own token; each sees only its own in QIDO and WADO (also through
``/tenants/<t>/dicom-web``); a platform admin sees both through the tenant paths; /metrics
shows each hospital its own series.

Real parts: a test OIDC issuer on a loopback port, kho's HTTP server on 127.0.0.1:0,
dicomweb-client with bearer sessions, httpx.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid

from kho.archive.archive import Archive
from kho.viewer_api.app import PREFIX
from kho.viewer_api.fastpath import FastPath
from kho.viewer_api.server import HttpServer
from tests.helpers.oidc import OidcIssuer
from tests.viewer_api.test_access import (
    Study,
    bearer,
    bearer_session,
    make_study,
    secured_settings,
)

HOSPITALS = ("hosp-a", "hosp-b")
PATIENTS = {"hosp-a": ("Alphaville^Anna", "PID-A-1"), "hosp-b": ("Betatown^Bruno", "PID-B-1")}


@dataclass
class Shared:
    issuer: OidcIssuer
    archive: Archive
    server: HttpServer
    #: each hospital's study: the same UIDs, another patient
    studies: dict[str, Study]
    #: "hosp-a", "hosp-b" (every role there), "platform" (admin@*)
    tokens: dict[str, str]

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def client(self, who: str, tenant: str | None = None) -> DICOMwebClient:
        prefix = f"/tenants/{tenant}" if tenant else ""
        return DICOMwebClient(
            f"{self.origin}{prefix}{PREFIX}", session=bearer_session(self.tokens[who])
        )


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    data_dir = tmp_path_factory.mktemp("shared") / "data"
    with OidcIssuer() as issuer:
        settings = secured_settings(data_dir, issuer, tenants=list(HOSPITALS))
        with Archive(settings) as archive, HttpServer(archive, host="127.0.0.1", port=0) as server:
            roles = ["viewer", "uploader", "admin"]
            tokens = {h: issuer.mint({"roles": roles, "tenant": h}) for h in HOSPITALS}
            tokens["platform"] = issuer.mint({"roles": ["admin@*"], "tenant": None})
            uids = (generate_uid(), generate_uid(), generate_uid())
            studies = {h: make_study(*PATIENTS[h], uids=uids) for h in HOSPITALS}
            running = Shared(issuer, archive, server, studies, tokens)
            for hospital, study in studies.items():  # each with its own token, same UIDs
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ds = pydicom.dcmread(io.BytesIO(study.data))
                stored = running.client(hospital).store_instances([ds])
                assert "FailedSOPSequence" not in stored
            yield running


def patient_names(found: list[dict]) -> list[str]:
    return [str(pydicom.Dataset.from_json(f).PatientName) for f in found]


def test_the_same_uids_are_two_studies(shared: Shared) -> None:
    a, b = shared.studies["hosp-a"], shared.studies["hosp-b"]
    assert (a.study, a.series, a.sop) == (b.study, b.series, b.sop)
    assert a.data != b.data


@pytest.mark.parametrize("hospital", HOSPITALS)
def test_each_hospital_finds_only_its_own(shared: Shared, hospital: str) -> None:
    name = PATIENTS[hospital][0]
    for tenant in (None, hospital):  # its home, and its tenant named
        client = shared.client(hospital, tenant)
        assert patient_names(client.search_for_studies()) == [name]
        instances = client.search_for_instances()
        assert [i["00080018"]["Value"] for i in instances] == [[shared.studies[hospital].sop]]
        # a search naming the other hospital's patient finds nothing
        other = next(p for h, p in PATIENTS.items() if h != hospital)
        assert client.search_for_studies(search_filters={"PatientID": other[1]}) == []


@pytest.mark.parametrize("hospital", HOSPITALS)
def test_each_hospital_retrieves_only_its_own(shared: Shared, hospital: str) -> None:
    study = shared.studies[hospital]
    for tenant in (None, hospital):
        client = shared.client(hospital, tenant)
        instance = client.retrieve_instance(study.study, study.series, study.sop)
        assert str(instance.PatientName) == PATIENTS[hospital][0]
        metadata = client.retrieve_series_metadata(study.study, study.series)
        assert metadata[0]["00100010"]["Value"] == [{"Alphabetic": PATIENTS[hospital][0]}]
        frames = client.retrieve_instance_frames(study.study, study.series, study.sop, [1])
        assert len(frames) == 1


def test_series_metadata_is_cached_per_hospital(shared: Shared) -> None:
    """One URL (/dicom-web/...), one series UID, two hospitals: the cached document of
    one is never the other's answer (the fast path serves series metadata)."""
    study = shared.studies["hosp-a"]
    path = f"{PREFIX}/studies/{study.study}/series/{study.series}/metadata"
    with httpx.Client(base_url=shared.origin) as web:
        for hospital in (*HOSPITALS, *HOSPITALS):
            response = web.get(path, headers=bearer(shared.tokens[hospital]))
            assert response.status_code == 200
            assert response.json()[0]["00100020"]["Value"] == [PATIENTS[hospital][1]]


@pytest.mark.parametrize("hospital", HOSPITALS)
def test_a_hospital_may_not_name_the_other(shared: Shared, hospital: str) -> None:
    other = next(h for h in HOSPITALS if h != hospital)
    study = shared.studies[other]
    paths = [
        f"/tenants/{other}{PREFIX}/studies",
        f"/tenants/{other}{PREFIX}/studies/{study.study}/series/{study.series}/metadata",
        f"/tenants/{other}{PREFIX}/studies/{study.study}/series/{study.series}"
        f"/instances/{study.sop}/frames/1",
        f"/tenants/{other}{PREFIX}/studies/{study.study}/series/{study.series}"
        f"/instances/{study.sop}/thumbnail",
        f"/tenants/{other}/metrics",
    ]
    with httpx.Client(base_url=shared.origin) as web:
        for path in paths:
            response = web.get(path, headers=bearer(shared.tokens[hospital]))
            assert response.status_code == 403, path
            for secret in (*PATIENTS[other], *PATIENTS[hospital]):
                assert secret not in response.text
        stow = web.post(
            f"/tenants/{other}{PREFIX}/studies",
            content=shared.studies[hospital].stow_body(),
            headers={
                **bearer(shared.tokens[hospital]),
                "Content-Type": 'multipart/related; type="application/dicom"; '
                "boundary=KhoTestBoundary",
            },
        )
        assert stow.status_code == 403


def test_a_platform_admin_sees_both_through_the_tenant_paths(shared: Shared) -> None:
    for hospital in HOSPITALS:
        client = shared.client("platform", hospital)
        found = client.search_for_studies()
        assert patient_names(found) == [PATIENTS[hospital][0]]
        study = shared.studies[hospital]
        # (dicomweb-client sends a Host header without the port: the path is compared)
        url = urlsplit(found[0]["00081190"]["Value"][0])
        assert url.path == f"/tenants/{hospital}{PREFIX}/studies/{study.study}"
        instance = client.retrieve_instance(study.study, study.series, study.sop)
        assert str(instance.PatientName) == PATIENTS[hospital][0]
    # its home (the default tenant) holds neither
    assert shared.client("platform").search_for_studies() == []


def _series(text: str, name: str) -> dict[str, float]:
    """``{labels: value}`` of one metric's samples."""
    out = {}
    for m in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.MULTILINE):
        out[m.group(1)] = float(m.group(2))
    return out


def test_metrics_show_each_hospital_its_own(shared: Shared) -> None:
    with httpx.Client(base_url=shared.origin) as web:
        for hospital in HOSPITALS:
            own = web.get("/metrics", headers=bearer(shared.tokens[hospital]))
            assert own.status_code == 200
            studies = _series(own.text, "kho_objects")
            assert studies == {
                f'level="{level}",tenant="{hospital}"': 1.0
                for level in ("patients", "studies", "series", "instances")
            }
            assert all(f'tenant="{hospital}"' in line for line in _sample_lines(own.text))
        platform = web.get("/metrics", headers=bearer(shared.tokens["platform"])).text
        for hospital in (*HOSPITALS, "default"):
            assert f'level="studies",tenant="{hospital}"' in platform
        assert "kho_spool_bytes" in platform  # the host's figures: the platform's admin only
        one = web.get("/tenants/hosp-b/metrics", headers=bearer(shared.tokens["platform"])).text
        assert _series(one, "kho_objects")['level="studies",tenant="hosp-b"'] == 1.0
        assert 'tenant="hosp-a"' not in one and "kho_spool_bytes" not in one


def _sample_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_the_fast_path_takes_tenant_paths() -> None:
    """A path under /tenants/<t> reaches the fast path with the prefix in the root path
    (the access middleware moved it there), and matches the same route."""
    fast = FastPath(lambda *_: None, None, PREFIX)  # type: ignore[arg-type]
    path = "/studies/1.2/series/1.3/instances/1.4/frames/1"
    scope = {
        "type": "http",
        "method": "GET",
        "path": f"/tenants/hosp-a{PREFIX}{path}",
        "root_path": "/tenants/hosp-a",
    }
    found = fast.match(scope)
    assert found is not None and found[0].template.endswith("/frames/{frames}")
    assert found[1] == ("1.2", "1.3", "1.4", "1")
