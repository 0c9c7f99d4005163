"""A real browser for the pages a person sees: headless Chromium driven by selenium
(Debian ``chromium`` and ``chromium-driver``), the OHIF build the tests serve, and nginx as
a reverse proxy.

- :func:`ohif_build`: OHIF installed once per machine under ``~/.cache/kho-test-ohif``
  (``KHO_TEST_OHIF_CACHE`` to move it) by kho's own installer, from the pinned tarball
  downloaded there once from the npm registry (its integrity checked against kho's pin);
  later runs reuse both.  No registry and no cached copy is a test failure, never a skip:
  the viewer is part of what kho ships.
- :class:`Browser`: one Chromium (software WebGL, as a CI machine has), screenshots into a
  folder the test names, and the checks a screenshot is held to: the region an element
  covers is an image, not a blank colour (:func:`image_pixels`).
- :func:`nginx_proxy`: nginx with its own configuration on a free loopback port, its pid
  file in a temporary folder, stopped by that PID.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import os
import signal
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.viewer_api import ohif
from kho.viewer_api.server import HttpServer
from kho.viewer_api.viewer import ViewerFiles
from tests.conftest import SAMPLES_DIR
from tests.helpers.dcmtk import free_port, wait_for_port
from tests.helpers.part10 import part10_bytes

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
NGINX = "/usr/sbin/nginx"


def ohif_cache() -> Path:
    configured = os.environ.get("KHO_TEST_OHIF_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "kho-test-ohif"


def ohif_tarball() -> Path:
    """The pinned @ohif/app tarball, downloaded once into the cache (the registry's
    published integrity must be kho's pin, and the file must hash to it)."""
    path = _tarball_path()
    if _is_pinned(path):
        return path
    with _cache_turn(path.parent):  # one download at a time (pytest -n)
        return _tarball_held()


def _tarball_path() -> Path:
    return ohif_cache() / f"app-{ohif.PINNED_VERSION}.tgz"


def _is_pinned(path: Path) -> bool:
    expected = ohif.expected_sha512(ohif.PINNED_INTEGRITY)
    return path.is_file() and hashlib.sha512(path.read_bytes()).digest() == expected


def _tarball_held() -> Path:
    """:func:`ohif_tarball` for a caller holding the cache's lock."""
    path = _tarball_path()
    if _is_pinned(path):
        return path  # already there, or another process fetched it meanwhile
    expected = ohif.expected_sha512(ohif.PINNED_INTEGRITY)
    directory = path.parent
    try:
        url, published = ohif.registry_dist(ohif.PINNED_VERSION)
        if ohif.expected_sha512(published) != expected:
            raise ohif.ViewerInstallError(f"the registry publishes {published}, not kho's pin")
        partial = path.with_name(path.name + ".part")
        with partial.open("wb") as fh:
            got = ohif.download(url, fh, ohif.DOWNLOAD_TIMEOUT_S)
        if got != expected:
            raise ohif.ViewerInstallError(f"{url} does not hash to kho's pin")
        partial.replace(path)
    except ohif.ViewerInstallError as exc:
        pytest.fail(
            f"the OHIF {ohif.PINNED_VERSION} tarball is not in {directory} and could not be "
            f"downloaded: {exc} (put app-{ohif.PINNED_VERSION}.tgz there by hand)"
        )
    return path


def ohif_build() -> ohif.OhifBuild:
    """The pinned OHIF build, installed into the cache on first use by kho's installer
    (from the cached tarball, its hash checked against the pin).  Test processes running
    side by side (pytest -n) take turns: one downloads and installs, the others wait."""
    directory = ohif_cache()
    with _cache_turn(directory):
        build = ohif.installed(directory)
        if build is not None and build.version == ohif.PINNED_VERSION and build.current:
            return build
        return ohif.install(directory, tarball=_tarball_held(), progress=lambda message: None)


@contextlib.contextmanager
def _cache_turn(directory: Path) -> Iterator[None]:
    """The OHIF cache to this process alone (an exclusive lock on a file in it)."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# --- a small corpus: two patients, three studies, names and IDs the tests know -----------


@dataclass(frozen=True)
class StudyInfo:
    key: str
    patient_name: str
    patient_id: str
    accession: str
    date: str
    modality: str
    series_description: str
    study: str
    series: str
    sop: str
    #: the patient's other IDs (a citizen ID)
    other_ids: tuple[str, ...] = ()


#: (key, sample, patient name, ID, accession, date, other IDs, series description)
CORPUS = (
    ("ct", "693_UNCR.dcm", "DOE^ALICE", "PAT-A", "ACC-A1", "20240105", ("CIT-0001",), "Head CT"),
    ("mr", "MR2_J2KR.dcm", "DOE^ALICE", "PAT-A", "ACC-A2", "20230301", ("CIT-0001",), "Shoulder"),
    ("nm", "JPEG-LL.dcm", "ROE^BOB", "PAT-B", "ACC-B1", "20220610", (), "Bone scan"),
)  # fmt: skip


def corpus_file(
    sample: str,
    name: str,
    patient_id: str,
    accession: str,
    date: str,
    other_ids: tuple[str, ...],
    description: str,
) -> tuple[bytes, Dataset]:
    """A real sample's pixels under a new patient, study, series and instance."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(SAMPLES_DIR / sample)
    ds.PatientName = name
    ds.PatientID = patient_id
    ds.AccessionNumber = accession
    ds.StudyDate = ds.SeriesDate = date
    ds.StudyTime = "101500"
    ds.StudyDescription = f"{description} study"
    ds.SeriesDescription = description
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if other_ids:
        items = []
        for other in other_ids:
            item = Dataset()
            item.PatientID = other
            item.TypeOfPatientID = "TEXT"
            items.append(item)
        ds.OtherPatientIDsSequence = items
    return part10_bytes(ds), ds


def load_corpus(archive: Archive) -> dict[str, StudyInfo]:
    studies = {}
    for key, sample, name, patient, accession, date, others, description in CORPUS:
        data, ds = corpus_file(sample, name, patient, accession, date, others, description)
        archive.ingest_part10(data)
        studies[key] = StudyInfo(
            key,
            name,
            patient,
            accession,
            date,
            str(ds.Modality),
            description,
            str(ds.StudyInstanceUID),
            str(ds.SeriesInstanceUID),
            str(ds.SOPInstanceUID),
            others,
        )
    return studies


@dataclass
class Site:
    """kho's HTTP server over the corpus, with the cached OHIF build."""

    archive: Archive
    server: HttpServer
    studies: dict[str, StudyInfo] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def url(self, path: str) -> str:
        return self.base + path


@contextlib.contextmanager
def viewer_site(settings: Settings, *, corpus: bool = True) -> Iterator[Site]:
    build = ohif_build()
    archive = Archive(settings)
    try:
        studies = load_corpus(archive) if corpus else {}
        server = HttpServer(archive, host="127.0.0.1", port=0)
        server.app.state.viewer_files = ViewerFiles(build.root.parent)
        server.start()
        try:
            yield Site(archive, server, studies)
        finally:
            server.stop()
    finally:
        archive.close()


def site_settings(data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "fsync": False,
        "dicom_port": 0,
        "http_port": 0,
        # thumbnails and metadata made before the instance is acknowledged: the pages
        # are measured against the finished layout, as a viewer meets it in a hospital
        "finish_in_background": False,
    }
    values.update(overrides)
    return Settings(**values)


# --- pixels -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pixels:
    """What a screenshot region holds."""

    width: int
    height: int
    std: float  # of the grey levels
    distinct: int  # grey levels present
    lit: float  # share of pixels brighter than near-black

    def is_image(self) -> bool:
        """An image, not a blank area: varied grey levels, a good share of them lit."""
        return self.std > 8 and self.distinct > 16 and self.lit > 0.02


def image_pixels(png: Path, box: tuple[float, float, float, float] | None = None) -> Pixels:
    """The grey-level statistics of ``png`` within ``box`` (left, top, width, height in
    the screenshot's pixels; None: all of it)."""
    with Image.open(png) as image:
        grey = image.convert("L")
        if box is not None:
            left, top, width, height = (round(v) for v in box)
            grey = grey.crop((left, top, left + width, top + height))
        values = np.asarray(grey, dtype=np.float64)
    if values.size == 0:
        return Pixels(0, 0, 0.0, 0, 0.0)
    return Pixels(
        values.shape[1],
        values.shape[0],
        float(values.std()),
        int(np.unique(values).size),
        float((values > 24).mean()),
    )


# --- the browser --------------------------------------------------------------------------


class Browser:
    """One headless Chromium (selenium), for a module's tests."""

    def __init__(self, screenshots: Path, *, width: int = 1400, height: int = 900) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for argument in (
            "--headless=new",
            "--no-sandbox",  # root in a container
            "--disable-dev-shm-usage",
            "--use-angle=swiftshader",  # software WebGL, as a CI machine without a GPU
            "--enable-unsafe-swiftshader",
            "--ignore-gpu-blocklist",
            f"--window-size={width},{height}",
            "--force-device-scale-factor=1",
            "--no-first-run",
            "--disable-extensions",
        ):
            options.add_argument(argument)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        self.driver.set_page_load_timeout(60)
        self.screenshots = screenshots
        screenshots.mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        self.driver.quit()

    def get(self, url: str) -> None:
        self.driver.get(url)

    def run(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def wait(self, condition: Callable[[], Any], timeout: float = 30, what: str = "") -> Any:
        """``condition()``'s first truthy value, polled; AssertionError (with the page's
        console) after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = condition()
            except Exception as exc:  # the page is still changing: try again
                last = exc
            else:
                if last:
                    return last
            time.sleep(0.1)
        raise AssertionError(
            f"timed out after {timeout} s waiting for {what or condition}: last {last!r}\n"
            f"url: {self.driver.current_url}\nconsole:\n{self.console()}"
        )

    def console(self) -> str:
        try:
            entries = self.driver.get_log("browser")
        except Exception:  # not every driver keeps it
            return ""
        return "\n".join(f"{e.get('level')}: {e.get('message')}" for e in entries[-40:])

    def screenshot(self, name: str) -> Path:
        path = self.screenshots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def box(self, selector: str) -> tuple[float, float, float, float] | None:
        """The largest visible element matching ``selector``, as (left, top, width,
        height) in screenshot pixels (device scale 1); None when there is none."""
        found: list[float] | None = self.run(
            """
            let best = null;
            for (const e of document.querySelectorAll(arguments[0])) {
              const r = e.getBoundingClientRect();
              if (r.width < 2 || r.height < 2) continue;
              if (!best || r.width * r.height > best[2] * best[3]) {
                best = [r.left, r.top, r.width, r.height];
              }
            }
            return best;
            """,
            selector,
        )
        return tuple(found) if found else None  # type: ignore[return-value]

    def region_pixels(self, selector: str, name: str) -> tuple[Pixels, Path]:
        """A screenshot, and the pixels of the region ``selector`` covers in it."""
        box = self.box(selector)
        path = self.screenshot(name)
        if box is None:
            return Pixels(0, 0, 0.0, 0, 0.0), path
        return image_pixels(path, box), path

    def canvas_pixels(self, selector: str = ".cornerstone-canvas") -> Pixels | None:
        """The grey-level statistics of what the largest 2D canvas matching ``selector``
        holds (Cornerstone blits its WebGL rendering into such a canvas): the image itself,
        whatever the page draws over it.  None when there is no such canvas."""
        found = self.run(
            """
            const canvases = [...document.querySelectorAll(arguments[0])]
              .filter(c => c.width > 1 && c.height > 1)
              .sort((a, b) => b.width * b.height - a.width * a.height);
            if (!canvases.length) return null;
            const c = canvases[0];
            const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0, sum = 0, squares = 0, lit = 0;
            const levels = new Set();
            for (let i = 0; i < data.length; i += 4 * 7) {  // every 7th pixel
              const grey = Math.round((data[i] + data[i + 1] + data[i + 2]) / 3);
              n++; sum += grey; squares += grey * grey; levels.add(grey);
              if (grey > 24) lit++;
            }
            const mean = sum / n;
            return [c.width, c.height, Math.sqrt(Math.max(0, squares / n - mean * mean)),
                    levels.size, lit / n];
            """,
            selector,
        )
        if not found:
            return None
        width, height, std, distinct, lit = found
        return Pixels(int(width), int(height), float(std), int(distinct), float(lit))

    def dismiss(self, *labels: str) -> None:
        """Click the buttons with these labels, where present (OHIF's first-use tour and
        its notice), so a screenshot shows the image rather than them."""
        self.run(
            """
            for (const b of document.querySelectorAll('button, a, [role=button]')) {
              if (arguments[0].includes(b.innerText.trim())) b.click();
            }
            """,
            list(labels),
        )

    def wait_for_viewport(
        self, name: str, selector: str = ".cornerstone-canvas", timeout: float = 60
    ) -> tuple[Pixels, Path]:
        """Until the viewer's canvas holds an image (its own pixels, read from the page);
        then OHIF's tour and notice dismissed, a screenshot, whose region over the canvas
        must show an image too.  (the canvas's pixels, the screenshot)"""
        self.wait(
            lambda: (self.canvas_pixels(selector) or Pixels(0, 0, 0.0, 0, 0.0)).is_image(),
            timeout=timeout,
            what=f"an image in {selector} (last: {self.canvas_pixels(selector)})",
        )
        self.dismiss("Skip all", "Confirm and hide")
        time.sleep(0.3)  # the overlays' closing transitions
        pixels, path = self.region_pixels(selector, name)
        assert pixels.is_image(), f"the screenshot {path} shows no image over {selector}: {pixels}"
        canvas = self.canvas_pixels(selector)
        assert canvas is not None and canvas.is_image(), canvas
        return canvas, path

    def wait_for_image(self, selector: str, name: str, timeout: float = 60) -> tuple[Pixels, Path]:
        """Screenshots until the region ``selector`` covers shows an image."""
        result: list[tuple[Pixels, Path]] = []

        def shown() -> bool:
            pixels, path = self.region_pixels(selector, name)
            result[:] = [(pixels, path)]
            return pixels.is_image()

        try:
            self.wait(shown, timeout=timeout, what=f"an image in {selector}")
        except AssertionError as exc:
            last = result[0][0] if result else None
            raise AssertionError(f"{exc}\nlast pixels: {last}") from None
        return result[0]


_SHARED: list[Browser] = []


def shared_browser(screenshots: Path) -> Browser:
    """One Chromium for the whole test run (starting one costs a second or two); its
    screenshots go where the asking module says (under ``KHO_TEST_SCREENSHOTS`` when set,
    to keep them after the run).  Quit when the interpreter exits."""
    kept = os.environ.get("KHO_TEST_SCREENSHOTS")
    if kept:
        screenshots = Path(kept) / screenshots.name
    if not _SHARED:
        browser = Browser(screenshots)
        _SHARED.append(browser)
        atexit.register(browser.close)
    browser = _SHARED[0]
    browser.screenshots = screenshots
    screenshots.mkdir(parents=True, exist_ok=True)
    browser.driver.delete_all_cookies()
    return browser


# --- nginx ----------------------------------------------------------------------------------


@contextlib.contextmanager
def nginx_proxy(
    workdir: Path,
    upstream_port: int,
    *,
    prefix: str = "/pacs",
    bind: str = "127.0.0.2",
    proto: str = "$scheme",
) -> Iterator[int]:
    """nginx on 127.0.0.1:<free port> proxying ``<prefix>/`` to kho on ``upstream_port``
    (the prefix stripped, as hospitals' proxies usually do), with the standard forwarded
    headers, connecting from ``bind`` (so kho can tell the proxy from a direct client).
    ``proto``: the X-Forwarded-Proto it sends (``https``: as a proxy terminating TLS).
    Yields the port."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / sub).mkdir(exist_ok=True)
    config = workdir / "nginx.conf"
    pid_file = workdir / "nginx.pid"
    config.write_text(
        f"""
daemon on;
worker_processes 1;
pid {pid_file};
error_log {workdir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {workdir}/access.log;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    client_max_body_size 0;
    server {{
        listen 127.0.0.1:{port};
        server_name pacs.test;
        location = {prefix} {{ return 301 {prefix}/; }}
        location {prefix}/ {{
            proxy_pass http://127.0.0.1:{upstream_port}/;
            proxy_bind {bind};
            proxy_http_version 1.1;
            proxy_set_header Host 127.0.0.1:{upstream_port};
            proxy_set_header X-Forwarded-Proto {proto};
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_set_header X-Forwarded-Prefix {prefix};
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_buffering off;
        }}
    }}
}}
"""
    )
    subprocess.run([NGINX, "-c", str(config), "-p", str(workdir)], check=True, timeout=30)
    try:
        wait_for_port(port, timeout=15)
        yield port
    finally:
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text().strip())
            os.kill(pid, signal.SIGQUIT)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.05)
