"""The start page at /: find a study, see its thumbnails, open it in the viewer.

Real parts: kho's HTTP server over a small corpus (two patients, three studies from real
samples), the cached OHIF build, headless Chromium; screenshots checked for image pixels."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from kho.access.api_keys import ApiKeys
from tests.helpers.browser import Browser, Site, shared_browser, site_settings, viewer_site


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with viewer_site(site_settings(tmp_path_factory.mktemp("start") / "data")) as served:
        yield served


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Browser:
    return shared_browser(tmp_path_factory.mktemp("screenshots-start"))


def rows(browser: Browser) -> list[str]:
    texts: list[str] = browser.run(
        "return [...document.querySelectorAll('tr.study')].map(r => r.innerText)"
    )
    return texts


def search(browser: Browser, **fields: str) -> list[str]:
    """Fill the form (name -> value), submit, and the result rows once they came."""
    browser.run(
        """
        const form = document.getElementById('search');
        form.reset();
        for (const [name, value] of Object.entries(arguments[0])) form.elements[name].value = value;
        document.getElementById('status').textContent = '';
        form.requestSubmit();
        """,
        fields,
    )
    answered = (
        "return /stud(y|ies) *(\\(|$)|No studies/"
        ".test(document.getElementById('status').textContent)"
    )
    browser.wait(lambda: browser.run(answered), what="the search's answer")
    return rows(browser)


def test_the_page_and_its_files(site: Site) -> None:
    with httpx.Client(base_url=site.base) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy
        assert '<meta name="kho-base" content="">' in page.text
        assert client.get("/start/start.js").headers["content-type"].startswith("text/javascript")
        assert client.get("/start/start.css").status_code == 200
        assert client.get("/start/nothing.js").status_code == 404
        # the page is a shell: no patient data in it
        for study in site.studies.values():
            assert study.patient_id not in page.text


def test_search_thumbnails_and_open_in_the_viewer(site: Site, browser: Browser) -> None:
    ct, mr, nm = site.studies["ct"], site.studies["mr"], site.studies["nm"]
    browser.get(site.url("/"))
    browser.wait(lambda: len(rows(browser)) == 3, what="the latest studies")
    first_image_ms = browser.wait(
        lambda: browser.run("return window.khoFirstImageMs"), what="a first thumbnail"
    )
    print(f"start page: first image {first_image_ms:.0f} ms after navigation")
    listed = rows(browser)
    assert ct.accession in listed[0] and nm.accession in listed[2]  # most recent first
    pixels, _ = browser.wait_for_image("tr.study img.thumb", "start-list")
    assert pixels.width >= 60

    assert [r for r in search(browser, name="doe") if "PAT-A" in r] and len(rows(browser)) == 2
    assert len(search(browser, name="ROE^B*")) == 1
    assert nm.accession in search(browser, patient="PAT-B")[0]
    (only,) = search(browser, accession=mr.accession)
    assert "Shoulder" in only or "MR" in only
    assert len(search(browser, citizen="CIT-0001")) == 2  # Other Patient IDs
    assert search(browser, citizen="CIT-9999") == []
    (dated,) = search(browser, **{"from": "2024-01-01", "to": "2024-12-31"})
    assert ct.accession in dated
    (by_modality,) = search(browser, modality="NM")
    assert nm.accession in by_modality

    # the study's series, with their thumbnails
    search(browser, accession=ct.accession)
    browser.run("document.querySelector('tr.study').click()")
    browser.wait(lambda: browser.run("return document.querySelectorAll('a.series-item').length"))
    pixels, _ = browser.wait_for_image("a.series-item img.thumb", "start-series")
    assert pixels.width >= 120
    # and the study in OHIF
    href = browser.run("return document.querySelector('tr.study a.open').href")
    assert href.endswith(f"/viewer/viewer?StudyInstanceUIDs={ct.study}")
    browser.run("document.querySelector('tr.study a.open').click()")
    pixels, png = browser.wait_for_viewport("start-to-viewer")
    assert pixels.width > 300, pixels
    assert ct.series_description in browser.run("return document.body.innerText")
    assert png.is_file()


def test_with_auth_on_it_asks_for_a_credential_and_uses_one(
    tmp_path_factory: pytest.TempPathFactory, browser: Browser
) -> None:
    settings = site_settings(tmp_path_factory.mktemp("start-auth") / "data", auth="on")
    with viewer_site(settings) as served:
        browser.get(served.url("/"))
        browser.wait(lambda: browser.run("return !document.getElementById('signin').hidden"))
        assert rows(browser) == []
        _, key = ApiKeys(served.archive.catalog, ["default"]).create("ward", ["viewer@default"])
        # a token in the fragment: kept for the tab, taken off the address
        browser.get(served.url(f"/#token={key}"))
        browser.wait(lambda: len(rows(browser)) == 3, what="the studies, with the token")
        assert "token" not in browser.driver.current_url
        pixels, _ = browser.wait_for_image("tr.study img.thumb", "start-auth")
        assert pixels.is_image()
        browser.get(served.url("/"))  # the same tab later: the token is still there
        browser.wait(lambda: len(rows(browser)) == 3)
        browser.run("sessionStorage.clear()")
