"""Deny by default over HTTP (issue 15): every route of the application, taken from its
own route table, refuses every credential that does not hold (401) and every caller whose
grants do not cover it (403), and no refusal carries patient data.  Then the callers that
may: a viewer reads, an uploader stores but does not read, an admin gets /metrics.

Real parts: a test OIDC issuer on a loopback port (tests/helpers/oidc.py), kho's HTTP
server on 127.0.0.1:0 with the fast path (httpx and dicomweb-client with a bearer
session), and the same application without the fast path (FastAPI's router alone), so the
fast path and the routers are held to the same rule.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from fastapi import APIRouter
from fastapi.testclient import TestClient
from pydicom.uid import UID, generate_uid
from starlette.requests import Request
from starlette.responses import Response

from kho.access.callers import Caller, CallerKind, Grant, Role
from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.errors import AccessDeniedError, AuthenticationError
from kho.storage.peer import PEER_SPOOL_PATH
from kho.viewer_api.app import PREFIX, create_app
from kho.viewer_api.multipart import join_parts
from kho.viewer_api.security import (
    CALLER_KEY,
    GuardedRoute,
    UnguardedRouteError,
    authorize_scope,
    check_routes,
    requires,
)
from kho.viewer_api.server import HttpServer
from tests.conftest import SAMPLES_DIR
from tests.helpers.oidc import HOSTILE_TOKENS, OidcIssuer
from tests.helpers.part10 import part10_bytes
from tests.viewer_api.conftest import fill

#: the sample the test study is made from (one frame: frame 1, tile 0/0/0 exist)
SAMPLE = "MR2_J2KR.dcm"
CORS_ORIGIN = "https://viewer.example"
OTHER = "hosp-b"
STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=KhoTestBoundary'


# --- a study with recognisable patient data ----------------------------------------------


@dataclass(frozen=True)
class Study:
    patient_name: str
    patient_id: str
    study: str
    series: str
    sop: str
    data: bytes

    @property
    def secrets(self) -> list[str]:
        """What must never appear in a refusal: the patient and the UIDs."""
        family, given = self.patient_name.split("^")
        return [family, given, self.patient_id, self.study, self.series, self.sop]

    def path_values(self) -> dict[str, str]:
        return {
            "study": self.study,
            "series": self.series,
            "instance": self.sop,
            "frame": "1",
            "frames": "1",
            "level": "0",
            "x": "0",
            "y": "0",
            "tag": "7FE00010",
            "link_id": "0123456789ab",
            "name": "start.js",
        }

    def stow_body(self) -> bytes:
        return join_parts("KhoTestBoundary", [(self.data, "application/dicom")])


def make_study(
    patient_name: str,
    patient_id: str,
    *,
    uids: tuple[str, str, str] | None = None,
) -> Study:
    """The sample with new UIDs (or ``uids``: study, series, SOP) and this patient."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(SAMPLES_DIR / SAMPLE)
    study, series, sop = uids or (str(generate_uid()), str(generate_uid()), str(generate_uid()))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    return Study(patient_name, patient_id, study, series, sop, part10_bytes(ds))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def bearer_session(token: str) -> requests.Session:
    session = requests.Session()
    session.headers.update(bearer(token))
    return session


def secured_settings(data_dir: Path, issuer: OidcIssuer, **more: Any) -> Settings:
    return Settings(
        data_dir=data_dir,
        fsync=False,
        dicom_port=0,
        http_port=0,
        auth="on",
        cors_origins=[CORS_ORIGIN],
        **issuer.settings_fields("url"),
        **more,
    )


# --- the secured archive ----------------------------------------------------------------


@dataclass
class Secured:
    issuer: OidcIssuer
    archive: Archive
    server: HttpServer
    study: Study
    tokens: dict[str, str]
    #: X-API-Key values: "viewer" valid, "revoked" revoked
    api_keys: dict[str, str] = field(default_factory=dict)
    #: tests/helpers/oidc.py's hostile tokens, each of which would be a platform admin
    hostile: dict[str, str] = field(default_factory=dict)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def routes(self) -> list[GuardedRoute]:
        return check_routes(self.server.app)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    data_dir = tmp_path_factory.mktemp("secured") / "data"
    with OidcIssuer() as issuer:
        settings = secured_settings(data_dir, issuer, tenants=[OTHER])
        with Archive(settings) as archive, HttpServer(archive, host="127.0.0.1", port=0) as server:
            home = {"tenant": settings.default_tenant}
            tokens = {
                "viewer": issuer.mint({"roles": ["viewer"], **home}),
                "uploader": issuer.mint({"roles": ["uploader"], **home}),
                "admin": issuer.mint({"roles": ["admin"], **home}),
                "viewer+uploader": issuer.mint({"roles": ["viewer", "uploader"], **home}),
                # an admin of the other hospital: every role, there
                "other": issuer.mint({"roles": ["viewer", "uploader", "admin"], "tenant": OTHER}),
            }
            study = make_study("Zzyzxova^Secretina", "PID-SECRET-4711")
            # stored as a modality's gateway would: STOW-RS with an uploader's token
            base = f"http://127.0.0.1:{server.port}{PREFIX}"
            uploader = DICOMwebClient(base, session=bearer_session(tokens["uploader"]))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                stored = uploader.store_instances([pydicom.dcmread(io.BytesIO(study.data))])
            assert stored.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == study.sop
            keys = server.app.state.viewer.access.api_keys
            _, viewer_key = keys.create("emr", ["viewer@default"])
            revoked_id, revoked_key = keys.create("old-script", ["admin@*"])
            assert keys.revoke(revoked_id)
            hostile = issuer.hostile_tokens({"roles": ["admin@*", "admin"], **home})
            yield Secured(
                issuer,
                archive,
                server,
                study,
                tokens,
                {"viewer": viewer_key, "revoked": revoked_key},
                hostile,
            )


@pytest.fixture(scope="module", params=["live server", "router only"])
def client(request: pytest.FixtureRequest, secured: Secured) -> Iterator[httpx.Client]:
    """The live server (uvicorn, fast path) and, in process, the same application without
    the fast path (every request through FastAPI's router), sharing one access service."""
    if request.param == "live server":
        with httpx.Client(base_url=secured.origin, timeout=30) as live:
            yield live
    else:
        app = create_app(
            secured.archive,
            fast_path=False,
            access=secured.server.app.state.viewer.access,
        )
        with TestClient(app, base_url=secured.origin) as routed:
            yield routed


# --- the matrix ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    status: int
    #: the request's credential headers
    headers: Callable[[Secured, GuardedRoute], dict[str, str]]
    #: which routes it applies to (default: all)
    applies: Callable[[GuardedRoute], bool] = lambda route: True
    #: the path under the tenant prefix of this tenant (None: as the route says)
    tenant: str | None = None
    method: str | None = None  # overrides the route's (HEAD for GET routes)


def _tenant_scoped(route: GuardedRoute) -> bool:
    return route.role is not None


def _role_too_low(secured: Secured, route: GuardedRoute) -> dict[str, str]:
    """A valid token of the right hospital with every role but the route's."""
    token = {
        Role.VIEWER: secured.tokens["uploader"],
        Role.UPLOADER: secured.tokens["viewer"],
        Role.ADMIN: secured.tokens["viewer+uploader"],
    }[route.role or Role.VIEWER]
    return bearer(token)


def _hostile(kind: str) -> Case:
    def headers(secured: Secured, _route: GuardedRoute) -> dict[str, str]:
        return bearer(secured.hostile[kind])

    return Case(kind, 401, headers)


CASES = [
    Case("no credential", 401, lambda s, r: {}),
    Case("no credential, HEAD", 401, lambda s, r: {}, lambda r: "GET" in r.methods, None, "HEAD"),
    Case("no credential, tenant path", 401, lambda s, r: {}, _tenant_scoped, OTHER),
    *(_hostile(kind) for kind in HOSTILE_TOKENS),
    Case("basic authentication", 401, lambda s, r: {"Authorization": "Basic YWRtaW46YWRtaW4="}),
    Case("revoked API key", 401, lambda s, r: {"X-API-Key": s.api_keys["revoked"]}),
    Case("revoked API key as bearer", 401, lambda s, r: bearer(s.api_keys["revoked"])),
    Case("made-up API key", 401, lambda s, r: {"X-API-Key": "kho_0123456789ab_" + "x" * 43}),
    Case("role too low", 403, _role_too_low, _tenant_scoped),
    Case("role too low, API key", 403, lambda s, r: {"X-API-Key": s.api_keys["viewer"]},
         lambda r: r.role in (Role.UPLOADER, Role.ADMIN)),
    # another hospital's admin naming this hospital's tenant
    Case("other hospital's token", 403, lambda s, r: bearer(s.tokens["other"]), _tenant_scoped,
         "default"),
    Case("undeclared tenant", 403, lambda s, r: bearer(s.tokens["admin"]), _tenant_scoped,
         "no-such-hospital"),
]  # fmt: skip


def request_for(
    secured: Secured, route: GuardedRoute, method: str, tenant: str | None
) -> tuple[str, str, bytes | None, dict[str, str]]:
    path = fill(route.path, secured.study.path_values())
    if tenant is not None:
        path = f"/tenants/{tenant}{path}"
    if method == "POST":  # STOW-RS: the real study, as an upload would send it
        return method, path, secured.study.stow_body(), {"Content-Type": STOW_TYPE}
    return method, path, None, {}


def assert_no_patient_data(
    secured: Secured, response: httpx.Response, what: str, *, asked: str = ""
) -> None:
    """Neither the patient nor the study's UIDs in the body, except UIDs the request
    itself named (``asked``: its path; a 404 says which UID it did not find)."""
    text = response.content.decode("utf-8", "replace")
    leaked = [s for s in secured.study.secrets if s in text and s not in asked]
    assert not leaked, f"{what}: the body names {leaked}: {text[:300]}"


def routes_under_test(secured: Secured) -> list[GuardedRoute]:
    # public routes (the start page's and the viewer's shells) hold no patient data
    routes = [r for r in secured.routes if not r.own_credential and not r.public]
    # the table covers every kind of route there is: a new one is in it without a word here
    assert {r.role for r in routes} == {None, Role.VIEWER, Role.UPLOADER, Role.ADMIN}
    assert sum(1 for r in routes if r.path.startswith(PREFIX)) >= 25
    return routes


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_route_refuses(secured: Secured, client: httpx.Client, case: Case) -> None:
    failures = []
    checked = 0
    for route in routes_under_test(secured):
        if not case.applies(route):
            continue
        for route_method in sorted(route.methods - {"HEAD"}):
            method = case.method or route_method
            verb, path, body, headers = request_for(secured, route, method, case.tenant)
            response = client.request(
                verb, path, content=body, headers={**headers, **case.headers(secured, route)}
            )
            checked += 1
            what = f"{verb} {route.path} ({case.name})"
            if response.status_code != case.status:
                failures.append(f"{what}: {response.status_code} {response.text[:120]}")
                continue
            assert_no_patient_data(secured, response, what)
            if case.status == 401:
                assert response.headers["www-authenticate"].startswith("Bearer"), what
            if verb != "HEAD":
                assert response.json()["error"] in ("unauthorized", "forbidden"), what
    assert checked, f"{case.name} applies to no route"
    assert not failures, "\n".join(failures)


def test_another_hospitals_token_sees_nothing_of_this_one(
    secured: Secured, client: httpx.Client
) -> None:
    """Without a tenant in the path, the other hospital's caller acts in its own tenant,
    where this study does not exist: empty searches, 404 (as for a UID that exists
    nowhere), never this hospital's patient."""
    headers = bearer(secured.tokens["other"])
    statuses = set()
    for route in routes_under_test(secured):
        if route.role not in (Role.VIEWER, Role.ADMIN) or "GET" not in route.methods:
            continue
        path = fill(route.path, secured.study.path_values())
        response = client.get(path, headers=headers)
        statuses.add(response.status_code)
        assert response.status_code in (200, 404), (route.path, response.status_code)
        assert_no_patient_data(secured, response, f"GET {route.path} (other hospital)", asked=path)
        if route.path == f"{PREFIX}/studies":
            assert response.json() == []
        if route.path == "/metrics":
            assert 'tenant="default"' not in response.text
            assert f'tenant="{OTHER}"' in response.text
    assert statuses == {200, 404}


def test_unknown_paths_need_a_credential_too(secured: Secured, client: httpx.Client) -> None:
    for path in ("/nothing-here", f"{PREFIX}/nothing", "/tenants/default/nothing"):
        response = client.get(path)
        assert response.status_code == 401, path
    assert client.get("/nothing-here", headers=bearer(secured.tokens["viewer"])).status_code == 404


# --- the callers that may ---------------------------------------------------------------


def test_a_viewer_reads_every_read_route(secured: Secured, client: httpx.Client) -> None:
    """The allowed half of the matrix: the refusals above are decisions about the caller,
    not routes that fail anyway.  Also under the tenant prefix."""
    viewer = bearer(secured.tokens["viewer"])
    api_key = {"X-API-Key": secured.api_keys["viewer"]}
    reads = [r for r in routes_under_test(secured) if r.role == Role.VIEWER and "GET" in r.methods]
    assert len(reads) > 20
    for route in reads:
        path = fill(route.path, secured.study.path_values())
        for prefix, headers in (("", viewer), ("/tenants/default", viewer), ("", api_key)):
            response = client.get(prefix + path, headers=headers)
            assert response.status_code == 200, (prefix + route.path, response.text[:200])


def test_documentation_pages_need_any_valid_caller(secured: Secured, client: httpx.Client) -> None:
    docs = [r for r in routes_under_test(secured) if r.role is None]
    assert {r.path for r in docs} >= {"/openapi.json", "/docs"}
    for route in docs:
        assert client.get(route.path).status_code == 401
        assert client.get(route.path, headers=bearer(secured.tokens["uploader"])).status_code == 200
    document = client.get("/openapi.json", headers=bearer(secured.tokens["viewer"])).json()
    operation = document["paths"][f"{PREFIX}/studies"]["get"]
    # the OpenAPI document says which credentials and which role each operation takes
    assert {"HTTPBearer": ["viewer"]} in operation["security"]
    assert {"APIKeyHeader": ["viewer"]} in operation["security"]


def test_a_viewer_searches_with_dicomweb_client(secured: Secured) -> None:
    base = f"{secured.origin}{PREFIX}"
    viewer = DICOMwebClient(base, session=bearer_session(secured.tokens["viewer"]))
    studies = viewer.search_for_studies(search_filters={"PatientID": secured.study.patient_id})
    assert len(studies) == 1
    found = pydicom.Dataset.from_json(studies[0])
    assert found.StudyInstanceUID == secured.study.study
    assert str(found.PatientName) == secured.study.patient_name
    metadata = viewer.retrieve_series_metadata(secured.study.study, secured.study.series)
    assert metadata[0]["00100020"]["Value"] == [secured.study.patient_id]
    frames = viewer.retrieve_instance_frames(
        secured.study.study, secured.study.series, secured.study.sop, [1]
    )
    assert len(frames) == 1 and len(frames[0]) > 100
    # and without the token, dicomweb-client gets the refusal
    anonymous = DICOMwebClient(base)
    with pytest.raises(requests.HTTPError) as refused:
        anonymous.search_for_studies()
    assert refused.value.response is not None and refused.value.response.status_code == 401


def test_an_uploader_stores_but_does_not_read(secured: Secured) -> None:
    base = f"{secured.origin}{PREFIX}"
    uploader = DICOMwebClient(base, session=bearer_session(secured.tokens["uploader"]))
    study = make_study("Uploadova^Only", "PID-UPLOAD-1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        response = uploader.store_instances([pydicom.dcmread(io.BytesIO(study.data))])
    assert response.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == study.sop
    with pytest.raises(requests.HTTPError) as refused:
        uploader.search_for_studies()
    assert refused.value.response is not None and refused.value.response.status_code == 403
    # stored in the uploader's hospital: a viewer there finds it
    viewer = DICOMwebClient(base, session=bearer_session(secured.tokens["viewer"]))
    assert len(viewer.search_for_studies(search_filters={"PatientID": "PID-UPLOAD-1"})) == 1


def test_an_admin_gets_metrics(secured: Secured, client: httpx.Client) -> None:
    response = client.get("/metrics", headers=bearer(secured.tokens["admin"]))
    assert response.status_code == 200
    assert 'kho_objects{level="studies",tenant="default"}' in response.text
    # an admin of one hospital: only its series, not the process-wide ones
    assert f'tenant="{OTHER}"' not in response.text
    assert "kho_spool_bytes" not in response.text
    assert "kho_http_request_seconds" not in response.text


def test_api_key_revocation_counts_at_once(secured: Secured, client: httpx.Client) -> None:
    keys = secured.server.app.state.viewer.access.api_keys
    key_id, text = keys.create("short-lived", ["viewer@default"])
    for headers in ({"X-API-Key": text}, bearer(text)):
        assert client.get(f"{PREFIX}/studies", headers=headers).status_code == 200
    assert keys.revoke(key_id)
    for headers in ({"X-API-Key": text}, bearer(text)):
        assert client.get(f"{PREFIX}/studies", headers=headers).status_code == 401


def test_urls_in_answers_keep_the_tenant_prefix(secured: Secured, client: httpx.Client) -> None:
    viewer = bearer(secured.tokens["viewer"])
    study = secured.study
    for prefix in ("", "/tenants/default"):
        base = f"{secured.origin}{prefix}{PREFIX}"
        found = client.get(
            f"{prefix}{PREFIX}/studies", params={"PatientID": study.patient_id}, headers=viewer
        ).json()
        assert found[0]["00081190"]["Value"] == [f"{base}/studies/{study.study}"]
        series = f"{prefix}{PREFIX}/studies/{study.study}/series/{study.series}"
        document = client.get(f"{series}/metadata", headers=viewer).json()[0]
        uri = document["7FE00010"]["BulkDataURI"]
        assert uri.startswith(f"{base}/studies/{study.study}/series/{study.series}/instances/")


def test_cors_preflight_is_answered_and_refusals_are_readable(
    secured: Secured, client: httpx.Client
) -> None:
    preflight = {"Origin": CORS_ORIGIN, "Access-Control-Request-Method": "GET"}
    answer = client.options(f"{PREFIX}/studies", headers=preflight)
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == CORS_ORIGIN
    # an OPTIONS that is no preflight is a request like any other
    assert client.options(f"{PREFIX}/studies").status_code == 401
    # a browser viewer may read the refusal, to send its user to log in
    refused = client.get(f"{PREFIX}/studies", headers={"Origin": CORS_ORIGIN})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == CORS_ORIGIN
    assert "WWW-Authenticate" in refused.headers["access-control-expose-headers"]


# --- the peer route keeps its own token -------------------------------------------------


def test_the_peer_spool_route_takes_its_own_token_only(tmp_path: Path) -> None:
    peer_token = "peer-token-" + "s" * 20
    with OidcIssuer() as issuer:
        settings = secured_settings(tmp_path / "data", issuer, peer_token=peer_token)
        with Archive(settings) as archive:
            archive.finisher.stop()  # the instance stays in this host's spool
            study = make_study("Spoolova^Peer", "PID-SPOOL-1")
            record = archive.catalog.require_instance(archive.ingest_part10(study.data).sop_uid)
            assert record.pixels_key.startswith("spool/")
            path = PEER_SPOOL_PATH + record.pixels_key.removeprefix("spool/")
            admin = issuer.mint({"roles": ["admin@*"]})
            with TestClient(create_app(archive)) as web:
                assert web.get(path, headers=bearer(peer_token)).status_code == 200
                # a user's credential is not the peer token, however much it grants
                assert web.get(path, headers=bearer(admin)).status_code == 401
                assert web.get(path).status_code == 401
                # and the peer token is no user's credential
                assert web.get(f"{PREFIX}/studies", headers=bearer(peer_token)).status_code == 401


# --- deny by default, by construction ---------------------------------------------------


def test_create_app_refuses_a_route_without_a_role(archive: Archive) -> None:
    app = create_app(archive)
    guarded = check_routes(app)
    assert {r.role for r in guarded if r.path == "/metrics"} == {Role.ADMIN}
    # storing is the uploader's; the other POSTs (share links, launch tokens) need a viewer
    posts = [r for r in guarded if "POST" in r.methods and r.path.startswith(PREFIX)]
    stores = [r for r in posts if not r.path.endswith(("/send", "/reject"))]
    assert {r.role for r in stores} == {Role.UPLOADER}
    # sending a study out of the archive (forwarding on demand), rejecting and deleting
    # (corrections) are an admin's
    assert {r.role for r in posts if r.path.endswith(("/send", "/reject"))} == {Role.ADMIN}
    deletes = [r for r in guarded if "DELETE" in r.methods and r.path.startswith(PREFIX)]
    assert len(deletes) == 3 and {r.role for r in deletes} == {Role.ADMIN}

    @app.get("/dicom-web/forgotten")
    async def forgotten() -> dict[str, str]:
        return {}

    with pytest.raises(UnguardedRouteError, match="forgotten declares no role"):
        check_routes(app)

    app = create_app(archive)
    router = APIRouter()
    router.add_api_route("/also-forgotten", forgotten)
    app.include_router(router, prefix=PREFIX)
    with pytest.raises(UnguardedRouteError, match="also-forgotten"):
        check_routes(app)

    app = create_app(archive)
    guarded_router = APIRouter(dependencies=[requires(Role.VIEWER)])
    guarded_router.add_api_route("/declared", forgotten)
    app.include_router(guarded_router, prefix=PREFIX)
    assert any(r.path == f"{PREFIX}/declared" for r in check_routes(app))

    app = create_app(archive)

    async def plain(_request: Request) -> Response:
        return Response("")

    app.add_route("/plain", plain)
    with pytest.raises(UnguardedRouteError, match="/plain"):
        check_routes(app)


def test_authorization_fails_closed(archive: Archive) -> None:
    state = create_app(archive).state.viewer
    with pytest.raises(AuthenticationError):  # the middleware did not run: no caller
        authorize_scope(state, {}, Role.VIEWER)
    # share and launch tokens (a later issue) reach no route until they are scoped
    share = Caller(
        CallerKind.SHARE,
        "share-link",
        frozenset({Grant(Role.VIEWER, "default")}),
        home_tenant="default",
        studies=frozenset({"1.2.3"}),
    )
    with pytest.raises(AccessDeniedError):
        authorize_scope(state, {CALLER_KEY: share}, Role.VIEWER)


def test_with_auth_off_tenant_paths_serve_the_open_caller(archive: Archive) -> None:
    with TestClient(create_app(archive)) as web:
        assert web.get(f"{PREFIX}/studies").json() == []
        assert web.get(f"/tenants/default{PREFIX}/studies").json() == []
        assert web.get(f"/tenants/no-such-hospital{PREFIX}/studies").status_code == 403
        assert web.get("/metrics").status_code == 200
