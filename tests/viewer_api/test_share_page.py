"""The patient's share page in a real browser on a phone-sized screen (issue 17): headless
Chromium at 390x844 with touch, as a phone shows it.  The link a doctor made opens the
study's images (screenshots checked for image pixels, not only for a 200); a swipe moves
to the next slice and to the next series, a preset changes the window; a PIN link asks for
its PIN first; expired, withdrawn and unknown links show a page saying so; and the page's
session reaches its own study only.

Real parts: kho's HTTP server with authentication on (API keys for the doctor), a CT series
(kho's phantom: slices that differ) and a real MR image in one study, another patient's
study beside it, Chromium driven by selenium (tests/helpers/browser.py), touch events sent
through the DevTools protocol as a finger would make them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from kho.archive.archive import Archive
from kho.bench.phantom import ct_series_datasets
from kho.viewer_api.server import HttpServer
from tests.helpers.browser import Browser, Pixels, image_pixels, site_settings
from tests.viewer_api.test_access import Study, make_study

PHONE = {"width": 390, "height": 844}
SLICES = 12


@dataclass
class Phone:
    archive: Archive
    server: HttpServer
    browser: Browser
    doctor_key: str
    study: str  # the shared study: a CT series and an MR series
    ct_series: str
    other: Study  # another patient's study

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def make_link(self, **body: object) -> dict[str, str]:
        response = httpx.post(
            f"{self.origin}/api/shares",
            json={"study": self.study, **body},
            headers={"X-API-Key": self.doctor_key},
        )
        assert response.status_code == 201, response.text
        made: dict[str, str] = response.json()
        return made

    def open(self, url: str) -> None:
        self.browser.driver.delete_all_cookies()
        self.browser.get(url)


def shared_study(archive: Archive) -> tuple[str, str]:
    """A CT series of SLICES phantom slices and a real MR image, in one study."""
    ct = ct_series_datasets(SLICES, rows=256, cols=256, patient="PHONE^PATIENT")
    study = series = ""
    for data in ct:
        result = archive.ingest_part10(data)
        study, series = result.study_uid, result.series_uid
    mr = make_study("PHONE^PATIENT", "PH000000", uids=(study, _uid(), _uid()))
    archive.ingest_part10(mr.data)
    return study, series


def _uid() -> str:
    return str(generate_uid())


@pytest.fixture(scope="module")
def phone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Phone]:
    root = tmp_path_factory.mktemp("share-page")
    settings = site_settings(root / "data", auth="on")
    with Archive(settings) as archive:
        study, ct_series = shared_study(archive)
        other = make_study("Otherova^Neighbora", "PID-OTHER-2")
        archive.ingest_part10(other.data)
        server = HttpServer(archive, host="127.0.0.1", port=0)
        _, doctor_key = server.app.state.viewer.access.api_keys.create("doctor", ["viewer@default"])
        browser = Browser(root / "screenshots", width=PHONE["width"], height=PHONE["height"])
        try:
            # a phone: its screen's size, a mobile viewport, touch events
            browser.driver.execute_cdp_cmd(
                "Emulation.setDeviceMetricsOverride",
                {**PHONE, "deviceScaleFactor": 1, "mobile": True},
            )
            browser.driver.execute_cdp_cmd(
                "Emulation.setTouchEmulationEnabled", {"enabled": True, "maxTouchPoints": 5}
            )
            with server:
                yield Phone(archive, server, browser, doctor_key, study, ct_series, other)
        finally:
            browser.close()


def swipe(browser: Browser, dx: float, dy: float) -> None:
    """One finger across the image, as the DevTools protocol delivers a real touch."""
    box = browser.box("#stage")
    assert box is not None
    x, y = box[0] + box[2] / 2, box[1] + box[3] / 2
    send = browser.driver.execute_cdp_cmd
    send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": x, "y": y}]})
    for step in range(1, 6):
        point = {"x": x + dx * step / 5, "y": y + dy * step / 5}
        send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [point]})
    send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})


def shown_image(phone: Phone, name: str) -> tuple[Pixels, Path, str]:
    """Once the page's image has loaded and shows an image: its pixels, the screenshot
    and the image's URL."""
    browser = phone.browser
    browser.wait(
        lambda: browser.run(
            "const i = document.getElementById('image');"
            "return i && i.complete && i.naturalWidth > 0 && document.body.dataset.loaded;"
        ),
        what="the image loaded",
    )
    pixels, path = browser.wait_for_image("#image", name)
    src = str(browser.run("return document.getElementById('image').getAttribute('src')"))
    return pixels, path, src


def position(browser: Browser) -> str:
    return str(browser.run("return document.getElementById('position').textContent"))


def region(path: Path, browser: Browser) -> np.ndarray:
    box = browser.box("#image")
    assert box is not None
    left, top, width, height = (round(v) for v in box)
    with Image.open(path) as image:
        return np.asarray(image.convert("L").crop((left, top, left + width, top + height)))


def test_the_link_shows_the_study_on_a_phone_and_swipes_through_it(phone: Phone) -> None:
    browser = phone.browser
    made = phone.make_link()
    started = time.monotonic()
    phone.open(made["url"])
    pixels, _shot, first_src = shown_image(phone, "1-share-page")
    # reported, not asserted (timings vary with the machine): the target is < 1 s
    loaded = browser.run(
        "const e = performance.getEntriesByType('resource')"
        ".find(r => r.name.endsWith(arguments[0])); return e ? e.responseEnd : null;",
        first_src,
    )
    print(
        f"share page: first image received {loaded:.0f} ms after navigation start; "
        f"on screen (polled) within {time.monotonic() - started:.2f} s"
    )
    assert pixels.is_image(), pixels
    assert pixels.width > 300  # the image spans the phone's width
    # laid out for the phone: nothing wider than the screen
    assert browser.run("return document.documentElement.scrollWidth") <= PHONE["width"]
    # the series in their numbers' order: the MR (series 1), then the CT (series 2)
    assert position(browser) == "Image 1 of 1 · Series 1 of 2 · MR"
    assert phone.ct_series not in first_src and "/rendered" in first_src
    assert browser.run("return document.querySelectorAll('#series button').length") == 2

    swipe(browser, 0, -250)  # upwards: the next series, opened on its middle slice
    middle = (SLICES - 1) // 2 + 1
    expected = f"Image {middle} of {SLICES} · Series 2 of 2 · AXIAL 1.0"
    browser.wait(lambda: position(browser) == expected, what="the CT series")
    pixels, shot, ct_src = shown_image(phone, "2-ct-series")
    assert pixels.is_image() and phone.ct_series in ct_src
    before = region(shot, browser)

    swipe(browser, -200, 0)  # right to left: the next slice
    browser.wait(lambda: position(browser).startswith(f"Image {middle + 1} of"), what="slice")
    pixels, shot, src = shown_image(phone, "3-next-slice")
    assert pixels.is_image() and src != ct_src
    after = region(shot, browser)
    assert before.shape == after.shape and np.abs(before.astype(int) - after).mean() > 0.5

    # a CT: window presets; the lung window shows another picture of the same slice
    labels = browser.run(
        "return [...document.querySelectorAll('#presets button')].map(b => b.textContent)"
    )
    assert labels == ["Default", "Soft tissue", "Lung", "Bone", "Brain"]
    browser.run(
        "[...document.querySelectorAll('#presets button')].find(b => b.textContent === 'Lung')"
        ".click()"
    )
    browser.wait(
        lambda: "window=-600%2C1500" in browser.run("return document.getElementById('image').src"),
        what="the lung window asked for",
    )
    pixels, shot, _ = shown_image(phone, "4-lung-window")
    assert pixels.is_image()
    assert np.abs(region(shot, browser).astype(int) - after).mean() > 2

    swipe(browser, 0, 250)  # downwards: back to the MR, which has no presets
    browser.wait(lambda: "Series 1 of 2" in position(browser), what="the first series")
    pixels, _shot, src = shown_image(phone, "5-back-to-mr")
    assert pixels.is_image() and src == first_src
    assert browser.run("return document.querySelectorAll('#presets button').length") == 0


def test_a_pin_link_asks_for_its_pin(phone: Phone) -> None:
    browser = phone.browser
    made = phone.make_link(pin="864209")
    phone.open(made["url"])
    form = browser.wait(lambda: browser.driver.find_element("id", "pin"), what="the PIN form")
    assert browser.run("return document.getElementById('image')") is None
    browser.screenshot("6-pin-form")
    form.send_keys("111111")
    browser.driver.find_element("css selector", "form button").click()
    browser.wait(
        lambda: "attempts left" in browser.driver.find_element("css selector", ".error").text,
        what="the wrong-PIN message",
    )
    browser.screenshot("7-wrong-pin")
    browser.driver.find_element("id", "pin").send_keys("864209")
    browser.driver.find_element("css selector", "form button").click()
    pixels, _shot, _src = shown_image(phone, "8-after-pin")
    assert pixels.is_image()
    browser.get(made["url"])  # a reload in the session: no PIN again
    pixels, _shot, _src = shown_image(phone, "9-reload")
    assert pixels.is_image()


@pytest.mark.parametrize("case", ["expired", "revoked", "unknown"])
def test_dead_links_say_so(phone: Phone, case: str) -> None:
    browser = phone.browser
    made = phone.make_link()
    url = made["url"]
    if case == "expired":
        catalog = phone.archive.catalog
        with catalog.transaction():
            catalog.execute(
                "UPDATE share_links SET expires_at = ? WHERE link_id = ?",
                (time.time() - 1, made["id"]),
            )
    elif case == "revoked":
        response = httpx.delete(
            f"{phone.origin}/api/shares/{made['id']}", headers={"X-API-Key": phone.doctor_key}
        )
        assert response.status_code == 204
    else:
        url = url[:-4] + ("AAAA" if not url.endswith("AAAA") else "BBBB")
    phone.open(url)
    heading = browser.wait(lambda: browser.driver.find_element("tag name", "h1").text, what="h1")
    expected = {
        "expired": "This link has expired",
        "revoked": "This link has been withdrawn",
        "unknown": "Link not recognised",
    }[case]
    assert heading == expected
    assert browser.run("return document.querySelectorAll('img').length") == 0
    shot = browser.screenshot(f"10-{case}")
    # a readable page: text drawn on it, nothing else
    assert image_pixels(shot).distinct > 2


def test_the_page_session_reaches_its_study_only(phone: Phone) -> None:
    browser = phone.browser
    made = phone.make_link()
    phone.open(made["url"])
    shown_image(phone, "11-before-other-study")
    other = phone.other
    browser.get(
        f"{phone.origin}/dicom-web/studies/{other.study}/series/{other.series}"
        f"/instances/{other.sop}/frames/1/rendered"
    )
    body = browser.wait(lambda: browser.driver.find_element("tag name", "body").text, what="body")
    assert "forbidden" in body
    browser.screenshot("12-other-study")
    browser.get(f"{phone.origin}/dicom-web/studies")
    listed = browser.wait(lambda: browser.driver.find_element("tag name", "body").text, what="json")
    assert phone.study in listed and other.study not in listed
