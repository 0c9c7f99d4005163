"""Opening images from an EMR: IHE Invoke Image Display, the launch token, the browser's
session, and what that session can reach.

Real parts: kho's HTTP server over a small corpus (two patients, three studies), API keys
in its catalog, httpx for the EMR's back end, headless Chromium for the clinician's
browser (screenshots checked for image pixels)."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from kho.access.api_keys import ApiKeys
from tests.helpers.browser import Browser, Site, shared_browser, site_settings, viewer_site

IID = "/IHEInvokeImageDisplay"
HTML = {"Accept": "text/html,application/xhtml+xml"}
#: the text over OHIF's viewport: the shown series' date and description
VIEWPORT_TEXT = "return document.querySelector('[data-cy=\"viewport-pane\"]')?.innerText || ''"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with viewer_site(site_settings(tmp_path_factory.mktemp("launch") / "data")) as served:
        yield served


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """The same corpus with authentication on."""
    settings = site_settings(tmp_path_factory.mktemp("launch-auth") / "data", auth="on")
    with viewer_site(settings) as served:
        yield served


@pytest.fixture(scope="module")
def emr_key(secured: Site) -> str:
    """The EMR back end's API key (viewer role in the hospital)."""
    _, key = ApiKeys(secured.archive.catalog, ["default"]).create("emr", ["viewer@default"])
    return key


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Browser:
    return shared_browser(tmp_path_factory.mktemp("screenshots-launch"))


def studies_of(location: str) -> list[str]:
    query = parse_qs(urlsplit(location).query)
    return query["StudyInstanceUIDs"][0].split(",")


def assert_names_nobody(site: Site, text: str) -> None:
    for study in site.studies.values():
        for secret in (study.patient_id, study.study, study.accession, "DOE", "ROE"):
            assert secret not in text, secret


# --- resolution (authentication off: the browser opens the IID URL itself) ------------------


def test_study_by_uid_accession_and_patient(site: Site) -> None:
    ct, mr, nm = site.studies["ct"], site.studies["mr"], site.studies["nm"]
    with httpx.Client(base_url=site.base, headers=HTML) as client:
        r = client.get(IID, params={"requestType": "STUDY", "studyUID": ct.study})
        assert r.status_code == 303
        assert r.headers["location"] == site.url(f"/viewer/viewer?StudyInstanceUIDs={ct.study}")
        r = client.get(IID, params={"requestType": "STUDY", "accessionNumber": mr.accession})
        assert studies_of(r.headers["location"]) == [mr.study]
        both = f"{mr.study},{ct.study}"
        profile = {"viewerType": "IHE_BIR", "diagnosticQuality": "true", "keyImagesOnly": "false"}
        r = client.get(IID, params={"requestType": "STUDY", "studyUID": both, **profile})
        assert studies_of(r.headers["location"]) == [ct.study, mr.study]  # most recent first
        # the patient in the request must be the studies' patient
        r = client.get(IID, params={"requestType": "STUDY", "studyUID": nm.study,
                                    "patientID": "PAT-A^^^&1.2.3&ISO"})  # fmt: skip
        assert r.status_code == 404
        r = client.get(IID, params={"requestType": "PATIENT", "patientID": "PAT-A^^^&1.2.3&ISO"})
        assert studies_of(r.headers["location"]) == [ct.study, mr.study]
        for narrowing, expected in (
            ({"mostRecentResults": "1"}, [ct.study]),
            ({"modalitiesInStudy": "MR"}, [mr.study]),
            ({"lowerDateTime": "2023-01-01T00:00:00Z", "upperDateTime": "2023-12-31"}, [mr.study]),
        ):
            params = {"requestType": "PATIENT", "patientID": "PAT-A", **narrowing}
            r = client.get(IID, params=params)
            assert studies_of(r.headers["location"]) == expected, narrowing
    # a back end asking for JSON gets the URL to open
    r = httpx.get(site.url(IID), params={"requestType": "STUDY", "studyUID": ct.study})
    assert r.status_code == 200
    assert r.json()["url"] == site.url(f"/viewer/viewer?StudyInstanceUIDs={ct.study}")


def test_a_study_not_yet_arrived_is_a_clear_page(site: Site) -> None:
    ct = site.studies["ct"]
    absent = "1.2.826.0.1.3680043.8.498.1"
    with httpx.Client(base_url=site.base, headers=HTML) as client:
        r = client.get(IID, params={"requestType": "STUDY", "studyUID": absent})
        assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")
        assert "not in the archive yet" in r.text and "try again" in r.text.lower()
        assert "/viewer/viewer" not in r.text  # no viewer on nothing
        r = client.get(IID, params={"requestType": "STUDY", "studyUID": f"{absent},{ct.study}"})
        assert r.status_code == 404
        assert "1 of the 2 requested studies is not in the archive yet" in r.text
        assert "Open the 1 study that arrived" in r.text
        r = client.get(IID, params={"requestType": "STUDY", "accessionNumber": "NO-SUCH"})
        assert r.status_code == 404
        r = client.get(IID, params={"requestType": "PATIENT", "patientID": "NOBODY"})
        assert r.status_code == 404 and "no images for this patient" in r.text
        assert_names_nobody(site, r.text)
    r = httpx.get(site.url(IID), params={"requestType": "STUDY", "studyUID": absent})
    assert r.status_code == 404 and r.json()["missing"] == 1


def test_bad_requests_are_400_and_no_query_explains_the_endpoint(site: Site) -> None:
    with httpx.Client(base_url=site.base, headers=HTML) as client:
        usage = client.get(IID)
        assert usage.status_code == 200 and "requestType=STUDY" in usage.text
        for params in (
            {"requestType": "SERIES", "studyUID": site.studies["ct"].study},
            {"requestType": "STUDY"},
            {"requestType": "PATIENT"},
            {"requestType": "PATIENT", "patientID": "PAT-*"},  # a wildcard widens: refused
            {"requestType": "STUDY", "accessionNumber": "ACC-?1"},
            {"requestType": "STUDY", "studyUID": "*"},
            {"requestType": "PATIENT", "patientID": "PAT-A", "mostRecentResults": "-1"},
            {"requestType": "PATIENT", "patientID": "PAT-A", "lowerDateTime": "yesterday"},
        ):
            assert client.get(IID, params=params).status_code == 400, params


# --- authentication on: the EMR's back end, the launch token, the browser session -----------


def test_the_emr_needs_a_credential_and_gets_a_launch_url(secured: Site, emr_key: str) -> None:
    ct = secured.studies["ct"]
    params = {"requestType": "STUDY", "studyUID": ct.study}
    assert httpx.get(secured.url(IID), params=params).status_code == 401
    r = httpx.get(secured.url(IID), params=params, headers={"X-API-Key": emr_key})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["studies"] == [ct.study] and answer["expires_in"] <= 3600
    assert answer["url"].startswith(secured.url("/launch/kho_launch_"))
    # an EMR-side proxy adding the key to the clinician's own request: a redirect
    r = httpx.get(secured.url(IID), params=params, headers={"X-API-Key": emr_key, **HTML})
    assert r.status_code == 303 and "/launch/kho_launch_" in r.headers["location"]


def test_a_launch_opens_once_and_reaches_its_study_only(secured: Site, emr_key: str) -> None:
    ct, mr, nm = secured.studies["ct"], secured.studies["mr"], secured.studies["nm"]
    params = {"requestType": "STUDY", "studyUID": ct.study}
    url = httpx.get(secured.url(IID), params=params, headers={"X-API-Key": emr_key}).json()["url"]
    with httpx.Client() as browser_like:
        opened = browser_like.get(url, headers=HTML)
        assert opened.status_code == 303
        assert opened.headers["location"] == f"/viewer/viewer?StudyInstanceUIDs={ct.study}"
        assert "kho_session" in opened.headers["set-cookie"]
        assert "httponly" in opened.headers["set-cookie"].lower()
        # the session (its cookie, sent by the client like a browser) reads its study
        series = browser_like.get(secured.url(f"/dicom-web/studies/{ct.study}/series"))
        assert series.status_code == 200
        found = browser_like.get(secured.url("/dicom-web/studies")).json()
        assert [s["0020000D"]["Value"][0] for s in found] == [ct.study]
        # and nothing else: another study of the same patient, another patient's
        for other in (mr, nm):
            for path in (
                f"/dicom-web/studies/{other.study}/series",
                f"/dicom-web/studies/{other.study}/series/{other.series}/metadata",
                f"/dicom-web/studies/{other.study}/thumbnail",
                f"/dicom-web/studies?StudyInstanceUID={other.study}",
            ):
                assert browser_like.get(secured.url(path)).status_code == 403, path
        assert browser_like.get(secured.url(IID), params=params).status_code == 401
    # the link opens once: a second browser gets a clear page
    again = httpx.get(url, headers=HTML)
    assert again.status_code == 410 and "already been used" in again.text
    assert httpx.get(secured.url("/launch/kho_launch_0123456789ab_" + "x" * 43)).status_code == 404


# --- in a browser --------------------------------------------------------------------------


def test_the_iid_url_opens_the_viewer_on_the_right_study(site: Site, browser: Browser) -> None:
    mr, ct = site.studies["mr"], site.studies["ct"]
    browser.get(site.url(f"{IID}?requestType=STUDY&accessionNumber={mr.accession}"))
    browser.wait(lambda: "/viewer/viewer" in browser.driver.current_url)
    assert studies_of(browser.driver.current_url) == [mr.study]
    pixels, _ = browser.wait_for_viewport("iid-mr")
    assert pixels.width > 300
    # the viewport shows the study asked for (OHIF's side panel may list the patient's others)
    shown = browser.wait(lambda: browser.run(VIEWPORT_TEXT), what="the viewport's overlay")
    assert mr.series_description in shown and ct.series_description not in shown
    # a study not yet here: the page says so, no viewer
    browser.get(site.url(f"{IID}?requestType=STUDY&studyUID=1.2.826.0.1.3680043.8.498.1"))
    assert "not in the archive yet" in browser.run("return document.body.innerText")
    browser.screenshot("iid-not-arrived")


def test_a_launched_browser_shows_its_study_and_cannot_reach_another(
    secured: Site, emr_key: str, browser: Browser
) -> None:
    ct, nm = secured.studies["ct"], secured.studies["nm"]
    params = {"requestType": "PATIENT", "patientID": ct.patient_id, "mostRecentResults": "1"}
    url = httpx.get(secured.url(IID), params=params, headers={"X-API-Key": emr_key}).json()["url"]
    browser.get(url)
    browser.wait(lambda: "/viewer/viewer" in browser.driver.current_url)
    pixels, _ = browser.wait_for_viewport("launch-ct")
    assert pixels.width > 300
    # from the launched page, the session asks for another patient's study: 403
    fetch = """
        const done = arguments[arguments.length - 1];
        fetch(arguments[0], {headers: {Accept: 'application/dicom+json'}})
          .then(r => done(r.status), e => done(String(e)));
    """
    other = f"/dicom-web/studies/{nm.study}/series/{nm.series}/metadata"
    assert browser.driver.execute_async_script(fetch, other) == 403
    own = f"/dicom-web/studies/{ct.study}/series/{ct.series}/metadata"
    assert browser.driver.execute_async_script(fetch, own) == 200
    # and the launch link, opened again, is spent
    browser.get(url)
    assert "already been used" in browser.run("return document.body.innerText")
