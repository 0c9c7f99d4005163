"""Share links over HTTP (issue 17): a doctor makes a link with POST /api/shares; the
patient's page at /s/<token> opens the study (its PIN first, when it has one), sets a
session cookie for the image reads, and shows clear pages for unknown, expired, withdrawn
and locked links; the QR code encodes the link.  A share caller -- its token as a bearer,
or the page's cookie -- reads every route of its study, lists only its study, and gets 403
for anything else; after revocation it gets 401 (and the page 410).  Launch tokens for an
EMR (POST /api/launch) are held to the same rule.

Real parts: kho's HTTP server on 127.0.0.1:0 (the fast path in front) and the same
application without the fast path (FastAPI's router alone), httpx with its cookie jar, API
keys for the doctors, the tenant catalogs and the audit journal.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import httpx
import imagecodecs
import numpy as np
import pytest
import segno
from fastapi.testclient import TestClient

from kho.access.callers import Caller, CallerKind, Grant, Role
from kho.access.links import MAX_PIN_FAILURES, ShareLinks
from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.audit import EventKind, chain_all, search
from kho.audit.auditor import Auditor
from kho.audit.journal import AuditRecord
from kho.errors import AccessDeniedError
from kho.viewer_api import share
from kho.viewer_api.app import PREFIX, create_app
from kho.viewer_api.security import (
    CALLER_KEY,
    NARROWED_KEY,
    SESSION_COOKIE,
    STUDY_SEARCHES,
    GuardedRoute,
    authorize_scope,
    check_routes,
)
from kho.viewer_api.server import HttpServer
from tests.viewer_api.conftest import fill
from tests.viewer_api.test_access import STOW_TYPE, Study, make_study

OTHER_HOSPITAL = "hosp-b"


@dataclass
class Shared:
    archive: Archive
    server: HttpServer
    auditor: Auditor
    mine: Study  # the patient's study, shared
    other: Study  # another patient's, in the same hospital
    keys: dict[str, str]

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def links(self) -> ShareLinks:
        return self.server.app.state.viewer.access.links

    @property
    def routes(self) -> list[GuardedRoute]:
        return check_routes(self.server.app)

    def records(
        self, kind: EventKind, tenant: str = "default", **criteria: object
    ) -> list[AuditRecord]:
        for audit_log in list(self.auditor._logs.values()):
            audit_log.flush()
        catalog = self.archive.for_tenant(tenant).catalog
        chain_all(catalog)
        return search(catalog, event=kind, limit=1000, **criteria)  # type: ignore[arg-type]


def key(text: str) -> dict[str, str]:
    return {"X-API-Key": text}


def bearer(text: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {text}"}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    data_dir = tmp_path_factory.mktemp("share") / "data"
    settings = Settings(
        data_dir=data_dir, fsync=False, dicom_port=0, http_port=0, auth="on",
        tenants=[OTHER_HOSPITAL],
    )  # fmt: skip
    with Archive(settings) as archive:
        auditor = Auditor(archive).start()
        mine = make_study("Sharova^Patientia", "PID-SHARE-1")
        other = make_study("Otherova^Neighbora", "PID-OTHER-2")
        for study in (mine, other):
            archive.ingest_part10(study.data)
        # the other hospital holds a study with the shared study's UIDs: not the same study
        twin = make_study(
            "Twinova^Elsewhere", "PID-TWIN-3", uids=(mine.study, mine.series, mine.sop)
        )
        archive.for_tenant(OTHER_HOSPITAL).ingest_part10(twin.data)
        server = HttpServer(archive, host="127.0.0.1", port=0)
        server.app.state.viewer.auditor = auditor
        keys_store = server.app.state.viewer.access.api_keys
        keys = {
            name: keys_store.create(name, grants)[1]
            for name, grants in (
                ("doctor", ["viewer@default"]),
                ("colleague", ["viewer@default"]),
                ("admin", ["admin@default"]),
                ("uploader", ["uploader@default"]),
                ("elsewhere", [f"viewer@{OTHER_HOSPITAL}"]),
            )
        }
        try:
            with server:
                yield Shared(archive, server, auditor, mine, other, keys)
        finally:
            auditor.close()


@pytest.fixture(params=["live server", "router only"])
def client(request: pytest.FixtureRequest, shared: Shared) -> Iterator[httpx.Client]:
    """A fresh client (its own cookie jar) on the live server (uvicorn, fast path) or, in
    process, the same application without the fast path, sharing one access service."""
    if request.param == "live server":
        with httpx.Client(base_url=shared.origin, timeout=30) as live:
            yield live
    else:
        app = create_app(
            shared.archive, fast_path=False, access=shared.server.app.state.viewer.access
        )
        check_routes(app)
        app.state.viewer.auditor = shared.auditor
        with TestClient(app, base_url=shared.origin) as routed:
            yield routed


def make_link(client: httpx.Client, shared: Shared, **body: object) -> dict[str, object]:
    response = client.post(
        "/api/shares", json={"study": shared.mine.study, **body}, headers=key(shared.keys["doctor"])
    )
    assert response.status_code == 201, response.text
    made: dict[str, object] = response.json()
    return made


def page_path(made: dict[str, object]) -> str:
    return "/s/" + str(made["token"])


def read_routes(shared: Shared) -> list[GuardedRoute]:
    routes = [r for r in shared.routes if r.role == Role.VIEWER and "{study}" in r.path]
    assert len(routes) > 15  # WADO, metadata, frames, rendered, thumbnails, tiles, QIDO
    return routes


def assert_silent_about(
    study: Study, response: httpx.Response, what: str, *, asked: str = ""
) -> None:
    """Neither the patient nor the study's UIDs in the body, except UIDs the request named
    itself (``asked``: a 404 says which UID it did not find)."""
    text = response.content.decode("utf-8", "replace")
    leaked = [s for s in study.secrets if s in text and s not in asked]
    assert not leaked, f"{what}: the body names {leaked}"


# --- making a link ------------------------------------------------------------------------


def test_a_doctor_makes_a_link_with_its_url_and_qr_codes(
    shared: Shared, client: httpx.Client
) -> None:
    made = make_link(client, shared, expires="2d", pin="4711")
    token = str(made["token"])
    assert token.startswith(f"kho_share_{made['id']}_")
    assert made["url"] == f"{shared.origin}/s/{token}"
    assert made["qr_svg"] == f"{made['url']}/qr.svg"
    assert made["qr_png"] == f"{made['url']}/qr.png"
    assert made["studies"] == [shared.mine.study]
    assert made["pin"] is True and made["tenant"] == "default"
    expires = time.mktime(time.strptime(str(made["expires"]), "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert abs(expires - (time.time() + 2 * 86400)) < 120
    info = shared.links.get(str(made["id"]))
    assert info is not None and info.created_by == "doctor" and info.has_pin


@pytest.mark.parametrize(
    ("who", "body", "status"),
    [
        (None, {}, 401),
        ("uploader", {}, 403),  # no read right
        ("elsewhere", {"tenant": "default"}, 403),  # another hospital's doctor
        ("elsewhere", {}, 404),  # in its own hospital the study is not there (a twin is)
        ("doctor", {"study": "1.2.826.0.1.3680043.8.498.999"}, 404),
        ("doctor", {"study": "1.2.*"}, 400),  # a wildcard is no study (never "everything")
        ("doctor", {"pin": "12"}, 400),
        ("doctor", {"pin": "abcd"}, 400),
        ("doctor", {"expires": "100d"}, 400),
        ("doctor", {"tenant": "no-such-hospital"}, 403),
    ],
)
def test_who_may_make_a_link_and_with_what(
    shared: Shared, client: httpx.Client, who: str | None, body: dict[str, str], status: int
) -> None:
    headers = key(shared.keys[who]) if who else {}
    if who == "elsewhere" and not body:
        # a link for the twin in hosp-b would work: ask for a study hosp-b lacks
        body = {"study": shared.other.study}
    before = len(shared.links.list())
    response = client.post(
        "/api/shares", json={"study": shared.mine.study, **body}, headers=headers
    )
    assert response.status_code == status, response.text
    assert len(shared.links.list()) == before
    assert_silent_about(shared.mine, response, f"POST /api/shares as {who}")


def test_an_admin_makes_links_and_the_other_hospital_shares_its_twin(
    shared: Shared, client: httpx.Client
) -> None:
    response = client.post(
        "/api/shares", json={"study": shared.mine.study}, headers=key(shared.keys["admin"])
    )
    assert response.status_code == 201
    twin = client.post(
        "/api/shares", json={"study": shared.mine.study}, headers=key(shared.keys["elsewhere"])
    ).json()
    assert twin["tenant"] == OTHER_HOSPITAL
    # the hospital named in the path, as for DICOMweb: its own doctor may, another may not
    named = f"/tenants/{OTHER_HOSPITAL}/api/shares"
    body = {"study": shared.mine.study}
    assert client.post(named, json=body, headers=key(shared.keys["elsewhere"])).status_code == 201
    assert client.post(named, json=body, headers=key(shared.keys["doctor"])).status_code == 403
    page = client.get(page_path(twin))
    assert page.status_code == 200
    # the same UIDs, the other hospital's patient: its images, not this hospital's
    rendered = re.search(r'<img id="image" src="([^"]+)"', page.text)
    assert rendered is not None
    assert client.get(rendered.group(1).replace("&amp;", "&")).status_code == 200


# --- the share caller: its study, nothing else ---------------------------------------------


def test_a_share_caller_reads_every_route_of_its_study(
    shared: Shared, client: httpx.Client
) -> None:
    made = make_link(client, shared)
    for route in read_routes(shared):
        path = fill(route.path, shared.mine.path_values())
        response = client.get(path, headers=bearer(str(made["token"])))
        assert response.status_code == 200, (route.path, response.text[:200])


def test_another_study_through_the_same_token_is_403(shared: Shared, client: httpx.Client) -> None:
    made = make_link(client, shared)
    for route in read_routes(shared):
        path = fill(route.path, shared.other.path_values())
        response = client.get(path, headers=bearer(str(made["token"])))
        assert response.status_code == 403, (route.path, response.status_code)
        assert response.json()["error"] == "forbidden"
        assert_silent_about(shared.other, response, f"GET {route.path}")


def test_the_other_study_s_series_under_the_shared_study_is_not_found(
    shared: Shared, client: httpx.Client
) -> None:
    made = make_link(client, shared)
    o = shared.other
    values = {**o.path_values(), "study": shared.mine.study}
    for route in read_routes(shared):
        if "{series}" not in route.path:
            continue
        path = fill(route.path, values)
        response = client.get(path, headers=bearer(str(made["token"])))
        assert response.status_code in (200, 404), (route.path, response.status_code)
        if route.path.endswith("/instances") and response.status_code == 200:
            assert response.json() == []  # a QIDO search under the shared study: nothing
        assert_silent_about(shared.other, response, route.path, asked=path)


def test_searches_list_only_its_study(shared: Shared, client: httpx.Client) -> None:
    token = str(make_link(client, shared)["token"])
    mine, other = shared.mine, shared.other
    found = client.get(f"{PREFIX}/studies", headers=bearer(token))
    assert found.status_code == 200
    assert [s["0020000D"]["Value"] for s in found.json()] == [[mine.study]]
    series = client.get(f"{PREFIX}/series", headers=bearer(token)).json()
    assert [s["0020000E"]["Value"] for s in series] == [[mine.series]]
    instances = client.get(f"{PREFIX}/instances", headers=bearer(token)).json()
    assert [i["00080018"]["Value"] for i in instances] == [[mine.sop]]
    # a search for the other patient finds nothing; one naming the other study is refused
    by_patient = client.get(
        f"{PREFIX}/studies", params={"PatientID": other.patient_id}, headers=bearer(token)
    )
    assert by_patient.status_code == 200 and by_patient.json() == []
    for name in (
        "StudyInstanceUID",
        "0020000D",
        "0020,000D",
        "0020000d",
        " 0020000D",
        "0020000D\n",
    ):
        for value in (other.study, f"{mine.study},{other.study}", "*", ""):
            refused = client.get(f"{PREFIX}/studies", params={name: value}, headers=bearer(token))
            assert refused.status_code == 403, (name, value, refused.text)
    own = client.get(
        f"{PREFIX}/series", params={"StudyInstanceUID": mine.study}, headers=bearer(token)
    )
    assert [s["0020000E"]["Value"] for s in own.json()] == [[mine.series]]
    # the doctor, for comparison, finds both patients
    doctor = client.get(f"{PREFIX}/studies", headers=key(shared.keys["doctor"])).json()
    assert {mine.study, other.study} <= {s["0020000D"]["Value"][0] for s in doctor}


def test_everything_else_is_403(shared: Shared, client: httpx.Client) -> None:
    token = str(make_link(client, shared)["token"])
    checked = 0
    for route in shared.routes:
        if route.role is None and route.path not in ("/openapi.json", "/docs"):
            continue  # the peer spool (its own token), the share page, public pages
        if route.role == Role.VIEWER and ("{study}" in route.path or route.path in STUDY_SEARCHES):
            continue  # the reads above
        for method in sorted(route.methods - {"HEAD"}):
            path = fill(route.path, {**shared.mine.path_values(), "link_id": "0123456789ab"})
            content, headers = None, bearer(token)
            if method == "POST" and path.startswith(PREFIX):
                content, headers = shared.mine.stow_body(), {**headers, "Content-Type": STOW_TYPE}
            response = client.request(method, path, content=content, headers=headers)
            assert response.status_code == 403, (method, route.path, response.status_code)
            checked += 1
    assert checked >= 6  # STOW (2), /metrics, the docs, /api/shares, /api/launch
    # under another hospital's prefix too
    response = client.get(f"/tenants/{OTHER_HOSPITAL}{PREFIX}/studies", headers=bearer(token))
    assert response.status_code == 403


def test_the_page_cookie_reads_its_study_and_nothing_else(
    shared: Shared, client: httpx.Client
) -> None:
    made = make_link(client, shared)
    page = client.get(page_path(made))
    assert page.status_code == 200
    cookies = page.headers.get_list("set-cookie")
    assert sorted(re.search(r"Path=([^;]+)", c).group(1) for c in cookies) == ["/dicom-web/", "/s/"]  # type: ignore[union-attr]
    for cookie in cookies:
        assert cookie.startswith(f"{SESSION_COOKIE}=kho_session_")
        lowered = cookie.lower()
        assert "httponly" in lowered and "samesite=strict" in lowered
        assert "secure" not in lowered  # plain HTTP here; Secure over HTTPS
    first = re.search(r'<img id="image" src="([^"]+)"', page.text)
    assert first is not None
    image = client.get(first.group(1).replace("&amp;", "&"))  # the cookie, no header
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    mine, other = shared.mine, shared.other
    assert client.get(f"{PREFIX}/studies/{mine.study}/series").status_code == 200
    assert client.get(f"{PREFIX}/studies/{other.study}/series").status_code == 403
    assert [s["0020000D"]["Value"] for s in client.get(f"{PREFIX}/studies").json()] == [
        [mine.study]
    ]
    # the cookie is read for reads under /dicom-web only: a write or /metrics has no caller
    stow = client.post(
        f"{PREFIX}/studies", content=mine.stow_body(), headers={"Content-Type": STOW_TYPE}
    )
    assert stow.status_code == 401
    assert client.get("/metrics").status_code == 401
    # a header, when present, speaks for the caller instead of the cookie
    doctor = client.get(
        f"{PREFIX}/studies/{other.study}/series", headers=key(shared.keys["doctor"])
    )
    assert doctor.status_code == 200


def test_after_revocation_the_token_is_401_and_the_page_410(
    shared: Shared, client: httpx.Client
) -> None:
    made = make_link(client, shared)
    token = str(made["token"])
    assert client.get(page_path(made)).status_code == 200  # the cookie jar holds a session
    series = f"{PREFIX}/studies/{shared.mine.study}/series"
    assert client.get(series).status_code == 200
    assert client.get(series, headers=bearer(token)).status_code == 200
    # only its maker or an admin revokes it; another hospital does not learn it exists
    link = f"/api/shares/{made['id']}"
    assert client.delete(link, headers=key(shared.keys["colleague"])).status_code == 403
    assert client.delete(link, headers=key(shared.keys["elsewhere"])).status_code == 404
    assert client.delete(link, headers=bearer(token)).status_code == 403
    assert client.delete(link, headers=key(shared.keys["doctor"])).status_code == 204
    assert client.delete(link, headers=key(shared.keys["admin"])).status_code == 204  # again
    refused = client.get(series, headers=bearer(token))
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith("Bearer")
    assert client.get(series).status_code == 401  # the session cookie died with the link
    page = client.get(page_path(made))
    assert page.status_code == 410
    assert "withdrawn" in page.text
    assert client.get(page_path(made) + "/qr.svg").status_code == 410


def test_an_admin_revokes_a_colleagues_link(shared: Shared, client: httpx.Client) -> None:
    made = make_link(client, shared)
    response = client.delete(f"/api/shares/{made['id']}", headers=key(shared.keys["admin"]))
    assert response.status_code == 204
    assert client.get(page_path(made)).status_code == 410


# --- the page's states ------------------------------------------------------------------


def test_unknown_expired_and_other_kinds_of_token_get_clear_pages(
    shared: Shared, client: httpx.Client
) -> None:
    made = make_link(client, shared)
    token = str(made["token"])
    unknown = client.get("/s/kho_share_0123456789ab_" + "x" * 43)
    assert unknown.status_code == 404 and "not valid" in unknown.text
    assert client.get("/s/" + "x" * 500).status_code == 404
    wrong_secret = token[:-1] + ("A" if token[-1] != "A" else "B")
    assert client.get("/s/" + wrong_secret).status_code == 404
    # a launch token is no share link
    launch = client.post(
        "/api/launch", json={"studies": [shared.mine.study]}, headers=key(shared.keys["doctor"])
    ).json()
    assert client.get("/s/" + launch["token"]).status_code == 404
    catalog = shared.archive.catalog
    with catalog.transaction():
        catalog.execute(
            "UPDATE share_links SET expires_at = ? WHERE link_id = ?", (time.time() - 1, made["id"])
        )
    expired = client.get(page_path(made))
    assert expired.status_code == 410
    assert "expired" in expired.text and "new link" in expired.text
    assert client.get(page_path(made) + "/qr.png").status_code == 410
    assert client.get(f"{PREFIX}/studies", headers=bearer(token)).status_code == 401
    for response in (unknown, expired):
        assert response.headers["content-type"].startswith("text/html")
        assert_silent_about(shared.mine, response, "a refusal page")


def test_the_pin_form_the_right_pin_and_the_lock(shared: Shared, client: httpx.Client) -> None:
    made = make_link(client, shared, pin="2468")
    path = page_path(made)
    form = client.get(path)
    assert form.status_code == 200
    assert 'name="pin"' in form.text and 'inputmode="numeric"' in form.text
    assert "set-cookie" not in form.headers
    assert_silent_about(shared.mine, form, "the PIN form")  # nothing of the study before it
    assert client.get(f"{PREFIX}/studies", headers=bearer(str(made["token"]))).status_code == 401
    wrong = client.post(path, data={"pin": "1111"})
    assert wrong.status_code == 403
    assert f"{MAX_PIN_FAILURES - 1} attempts left" in wrong.text
    assert_silent_about(shared.mine, wrong, "a wrong PIN")
    right = client.post(path, data={"pin": "2468"}, follow_redirects=False)
    assert right.status_code == 303 and right.headers["location"] == path
    assert len(right.headers.get_list("set-cookie")) == 2
    page = client.get(path)  # the cookie on /s/: no PIN again
    assert page.status_code == 200 and 'id="manifest"' in page.text
    assert client.get(f"{PREFIX}/studies/{shared.mine.study}/series").status_code == 200
    # a stranger with the link but not the PIN: five tries, then the link is locked
    stranger_pins = [f"{n:04d}" for n in range(MAX_PIN_FAILURES)]
    client.cookies.clear()
    statuses = [client.post(path, data={"pin": pin}).status_code for pin in stranger_pins]
    assert statuses == [403] * MAX_PIN_FAILURES
    locked = client.post(path, data={"pin": "2468"})
    assert locked.status_code == 403 and "locked" in locked.text
    assert client.get(path).status_code == 403
    alerts = shared.records(EventKind.SECURITY_ALERT, user=f"share:{made['id']}")
    assert len(alerts) >= MAX_PIN_FAILURES


def test_the_page_is_not_cached_framed_or_referred(shared: Shared, client: httpx.Client) -> None:
    page = client.get(page_path(make_link(client, shared)))
    headers = page.headers
    assert headers["cache-control"] == "no-store"
    assert headers["referrer-policy"] == "no-referrer"
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert "script-src 'self'" in headers["content-security-policy"]
    assert "unsafe-inline" not in headers["content-security-policy"]
    # the page names no patient: the study's description and date, then images
    assert shared.mine.patient_id not in page.text
    assert "Sharova" not in page.text
    script = client.get("/s/static/share.js")
    assert script.status_code == 200 and "text/javascript" in script.headers["content-type"]
    assert client.get("/s/static/../share.py").status_code == 404
    assert client.get("/s/static/app.py").status_code == 404


def test_the_manifest_lists_the_studys_images(shared: Shared, client: httpx.Client) -> None:
    page = client.get(page_path(make_link(client, shared)))
    manifest = re.search(r'<script id="manifest" type="application/json">(.*?)</script>', page.text)
    assert manifest is not None
    data = json.loads(manifest.group(1))
    assert data["base"] == PREFIX
    [series] = data["series"]
    assert series["study"] == shared.mine.study and series["uid"] == shared.mine.series
    assert series["images"] == [[shared.mine.sop, 1]]


def test_qr_codes_encode_the_link(shared: Shared, client: httpx.Client) -> None:
    made = make_link(client, shared)
    expected = segno.make(str(made["url"]), error="m", micro=False)
    svg = client.get(page_path(made) + "/qr.svg")
    assert svg.status_code == 200 and svg.headers["content-type"] == "image/svg+xml"
    assert svg.headers["cache-control"] == "no-store"
    root = ElementTree.fromstring(svg.content)
    assert root.tag.endswith("svg")
    png = client.get(page_path(made) + "/qr.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    pixels = np.asarray(imagecodecs.png_decode(png.content))
    if pixels.ndim == 3:
        pixels = pixels[..., 0]
    # scale 10, a border of 4 modules: one sample per module, dark = 1
    modules = len(expected.matrix)
    assert pixels.shape == ((modules + 8) * 10, (modules + 8) * 10)
    sampled = pixels[45::10, 45::10][:modules, :modules] < 128
    assert np.array_equal(sampled, np.array(expected.matrix, dtype=bool))


# --- launch tokens ---------------------------------------------------------------------


def test_a_launch_token_for_a_patient_sees_that_patient_only(
    shared: Shared, client: httpx.Client
) -> None:
    response = client.post(
        "/api/launch",
        json={"patient_id": shared.mine.patient_id},
        headers=key(shared.keys["doctor"]),
    )
    assert response.status_code == 201, response.text
    launch = response.json()
    assert launch["studies"] == [shared.mine.study]
    token = launch["token"]
    assert token.startswith("kho_launch_")
    mine, other = shared.mine, shared.other
    assert (
        client.get(f"{PREFIX}/studies/{mine.study}/metadata", headers=bearer(token)).status_code
        == 200
    )
    assert (
        client.get(f"{PREFIX}/studies/{other.study}/metadata", headers=bearer(token)).status_code
        == 403
    )
    found = client.get(f"{PREFIX}/studies", headers=bearer(token)).json()
    assert [s["0020000D"]["Value"] for s in found] == [[mine.study]]
    # opened once into a browser session (what the viewer's launch endpoint does)
    session = shared.links.open_session(token)
    assert session.caller.kind == CallerKind.LAUNCH
    assert client.get(f"{PREFIX}/studies", headers=bearer(token)).status_code == 401
    cookie = {"Cookie": f"{SESSION_COOKIE}={session.text}"}
    assert client.get(f"{PREFIX}/studies/{mine.study}/series", headers=cookie).status_code == 200
    assert client.get(f"{PREFIX}/studies/{other.study}/series", headers=cookie).status_code == 403


@pytest.mark.parametrize(
    ("who", "body", "status"),
    [
        ("doctor", {"patient_id": "PID-*"}, 400),  # a wildcard would reach other patients
        ("doctor", {"patient_id": "PID-NOBODY"}, 404),
        ("doctor", {}, 400),
        ("doctor", {"studies": ["1.2.3"], "ttl": "2h"}, 400),
        ("uploader", {"studies": ["1.2.3"]}, 403),
        ("elsewhere", {"studies": ["1.2.3"], "tenant": "default"}, 403),
        (None, {"studies": ["1.2.3"]}, 401),
    ],
)
def test_launch_tokens_are_made_for_exact_patients_by_viewers(
    shared: Shared, client: httpx.Client, who: str | None, body: dict[str, object], status: int
) -> None:
    headers = key(shared.keys[who]) if who else {}
    response = client.post("/api/launch", json=body, headers=headers)
    assert response.status_code == status, response.text


# --- the rule itself, and the record ----------------------------------------------------


def test_authorize_scope_checks_the_study_a_route_names(archive: Archive) -> None:
    app = create_app(archive)
    state = app.state.viewer
    caller = Caller(
        CallerKind.SHARE,
        "share:0123456789ab",
        frozenset({Grant(Role.VIEWER, "default")}),
        home_tenant="default",
        studies=frozenset({"1.2.3"}),
    )
    ok = authorize_scope(
        state, {CALLER_KEY: caller, "path_params": {"study": "1.2.3"}}, Role.VIEWER
    )
    assert ok.tenant == "default"
    for scope, role in (
        ({"path_params": {"study": "1.2.4"}}, Role.VIEWER),  # another study
        ({"path_params": {"series": "1.2.3"}}, Role.VIEWER),  # a route naming no study
        ({}, Role.VIEWER),
        ({NARROWED_KEY: True}, Role.UPLOADER),  # never a write
        ({"path_params": {"study": "1.2.3"}}, Role.ADMIN),
    ):
        with pytest.raises(AccessDeniedError):
            authorize_scope(state, {CALLER_KEY: caller, **scope}, role)
    assert authorize_scope(state, {CALLER_KEY: caller, NARROWED_KEY: True}, Role.VIEWER)


def test_the_share_routes_declare_their_guard(archive: Archive) -> None:
    app = create_app(archive)
    share.install(app)
    share.install(app)  # once
    table = {(r.path, m): r for r in check_routes(app) for m in r.methods}
    assert table[("/api/shares", "POST")].role == Role.VIEWER
    assert table[("/api/shares/{link_id}", "DELETE")].role == Role.VIEWER
    assert table[("/api/launch", "POST")].role == Role.VIEWER
    for path in ("/s/{token}", "/s/{token}/qr.svg", "/s/{token}/qr.png", "/s/static/{name}"):
        assert table[(path, "GET")].own_credential  # the token in the path is its credential
    assert table[("/s/{token}", "POST")].own_credential


def test_each_use_is_recorded(shared: Shared, client: httpx.Client) -> None:
    made = make_link(client, shared)
    user = f"share:{made['id']}"
    created = shared.records(EventKind.SECURITY_ALERT, user="doctor")
    assert any(str(made["id"]) in record.message for record in created)
    assert client.get(page_path(made)).status_code == 200
    opened = shared.records(EventKind.INSTANCES_ACCESSED, user=user, study_uid=shared.mine.study)
    assert opened, "opening the page is recorded as an access to the study"
    assert opened[0].study_uids == [shared.mine.study]
    assert shared.mine.patient_id in opened[0].patient_ids


def test_with_authentication_off_the_page_still_checks_its_link(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", fsync=False, dicom_port=0, http_port=0)
    with Archive(settings) as archive:
        study = make_study("Openova^Loopback", "PID-OPEN-1")
        archive.ingest_part10(study.data)
        app = create_app(archive)
        with TestClient(app) as web:
            made = web.post("/api/shares", json={"study": study.study, "pin": "1357"}).json()
            path = "/s/" + made["token"]
            assert web.get(path).status_code == 200 and 'name="pin"' in web.get(path).text
            assert web.post(path, data={"pin": "0000"}).status_code == 403
            assert web.post(path, data={"pin": "1357"}, follow_redirects=False).status_code == 303
            assert 'id="manifest"' in web.get(path).text
            app.state.viewer.access.links.revoke(made["id"])
            assert web.get(path).status_code == 410
