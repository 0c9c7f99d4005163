"""Time to first image in a real browser: OHIF 3.13.2 against kho and against Orthanc.

The same OHIF build and the same hand-written data-source settings are served for both
servers from one origin (nginx on a free loopback port): ``/kho/viewer/`` reads
``/kho/dicom-web`` (proxied to kho), ``/orthanc/viewer/`` reads ``/orthanc/dicom-web``
(proxied to Orthanc 1.10 + its DICOMweb plugin).  The viewer's static files come from
nginx for both (gzip twins via ``gzip_static``), so only the DICOMweb server differs.

Data source (OHIF 3.13.2's DICOMweb data source, as a new user configures it for a
DICOMweb server): ``imageRendering: wadors`` (Cornerstone's Accept, ``transfer-syntax=*``:
frames as stored), ``thumbnailRendering: thumbnailDirect`` (an ``<img>`` on
``.../thumbnail``; Orthanc's DICOMweb plugin has no thumbnail resource: recorded as it
answers), ``enableStudyLazyLoad``, ``qidoSupportsIncludeField``, ``staticWado: false``.

Corpus: a CT series (kho.bench.phantom, 512x512, 12 bits), a 3000x2500 radiograph
(benchmarks.dicomweb.write_radiograph) and a 43-frame 512x512 8-bit XA (made here), each
its own study, in both servers before the first run (kho's finisher caught up).

Each run opens ``<viewer>/viewer?StudyInstanceUIDs=<study>`` in a fresh headless Chromium
(new profile: nothing cached; software WebGL, the flags of tests/helpers/browser.py).  A
script injected before the page's own reads the Cornerstone canvas every 40 ms
(``getImageData``) and notes when it first holds an image (varied, lit grey levels).
Times are from the first DICOMweb request (Performance resource timing: the first entry
whose URL has ``/dicom-web/``) to: the first non-blank viewport; every thumbnail answered;
every frame of the study's series answered (``/frames/`` entries reaching the frame
count).  Also: OHIF's own start-up (navigation to the first DICOMweb request), requests
and bytes (``transferSize``) by kind, and from nginx's log the upstream (server) time by
kind.  Servers stay up across runs (warm after run 1); each server goes first in turn.
Also: the first image from navigation, and the browser's own part (from the first frame's
answer to the first image: decode, OHIF's rendering start-up).

kho's own pages (start page at a desktop size, a share link's page in a phone-sized window:
390x844 asked, which headless Chromium widens to its 500-pixel minimum),
through the same proxy: time from navigation to the first ``<img>`` holding an image and
a frame drawn after it.

``--decoded-variant`` adds a second kho (same data) that answers OHIF's frame requests
with decoded frames (setting ``viewer_decoded_frame_max_bytes``), beside the default.

Orthanc runs with benchmarks.dicomweb's configuration, where its default
``HttpCompressionEnabled`` (true) gzips answers for a browser that accepts gzip: its
frames reach the browser gzipped (~250 KB of a 512 KB CT slice), kho's as JPEG-LS.

Orthanc binds every interface, so the whole benchmark runs in a private network
namespace (``unshare -n``) with loopback only.
Usage: ``python -m benchmarks.viewer [--slices 189] [--runs 3]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from benchmarks.common import RESULTS_DIR, machine, write_results
from benchmarks.dicomweb import (
    ORTHANC_PLUGIN,
    free_port,
    ingest_kho,
    start_orthanc,
    stop,
    wait_port,
    write_radiograph,
)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
NGINX = "/usr/sbin/nginx"
SERVERS = ("kho", "orthanc")
#: ``--decoded-variant``: a second kho that answers OHIF's "any syntax" frame requests with
#: decoded frames up to this size (setting viewer_decoded_frame_max_bytes; off in kho)
DECODED_VARIANT = ("kho-decoded", {"viewer_decoded_frame_max_bytes": 1 << 20})
#: kho's value at most this times Orthanc's (issue 17, item 4), medians
TARGETS = {
    "first_image_s": {"ct": 0.5, "radiograph": 0.5, "multiframe": 0.5},
    "all_frames_s": {"ct": 0.25},
}
#: kho's start page and share page: first image within this long of navigation
PAGE_TARGET_S = 1.0
#: give up on a run this long after the first DICOMweb request
RUN_TIMEOUT_S = 90.0

# --- data -------------------------------------------------------------------------------


def write_multiframe(path: Path, frames: int = 43, size: int = 512, seed: int = 3) -> Path:
    """An 8-bit XA cine: vessels (a moving dark tree) over a smooth background, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = 150 + 40 * np.sin(yy / 70.0) * np.cos(xx / 90.0)
    stack = np.empty((frames, size, size), dtype=np.uint8)
    for f in range(frames):
        img = base.copy()
        shift = 8 * np.sin(f / 6.0)
        for k in range(6):
            cx = 80 + 60 * k + shift
            img -= 70 * np.exp(-(((xx - cx - 0.3 * (yy - 256)) / 6.0) ** 2))
        img += rng.normal(0, 6, size=img.shape)
        stack[f] = np.clip(img, 0, 255).astype(np.uint8)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.12.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "Bench^Angio", "BENCH-XA", "XA"
    ds.StudyDate, ds.StudyTime, ds.SeriesNumber, ds.InstanceNumber = "20260101", "1000", 1, 1
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.NumberOfFrames = frames
    ds.FrameTime = "66.7"
    ds.FrameIncrementPointer = 0x00181063
    ds.PixelData = stack.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def make_corpus(folder: Path, slices: int) -> dict[str, dict[str, Any]]:
    """The three studies: their files, study UID and the frames their series hold."""
    import pydicom

    from kho.bench.phantom import write_ct_series

    ct = write_ct_series(folder / "ct", count=slices)
    dx = write_radiograph(folder / "dx.dcm")
    xa = write_multiframe(folder / "xa.dcm")
    studies: dict[str, dict[str, Any]] = {}
    for name, files, frames, what in (
        ("ct", ct, len(ct), f"CT, {len(ct)} slices 512x512, 12 bits"),
        ("radiograph", [dx], 1, "DX 3000x2500, 12 bits"),
        ("multiframe", [xa], 43, "XA, 43 frames 512x512, 8 bits"),
    ):
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        studies[name] = {
            "files": files,
            "study": str(ds.StudyInstanceUID),
            "frames": frames,
            "what": what,
            "bytes": sum(p.stat().st_size for p in files),
        }
    return studies


# --- servers ----------------------------------------------------------------------------

_KHO_SERVER = """
import signal, sys, threading
from pathlib import Path
from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.viewer_api.server import HttpServer
import json
settings = Settings(data_dir=Path(sys.argv[1]), fsync=False)
# URLs kho writes name the proxy's address; a variant's settings (JSON) on top
update = {"public_url": sys.argv[3], **json.loads(sys.argv[4] if len(sys.argv) > 4 else "{}")}
settings = settings.model_copy(update=update)
archive = Archive(settings)
try:
    from kho.archive.read.pixels import warm_up_codecs
    warm_up_codecs()
except ImportError:
    pass
server = HttpServer(archive, host="127.0.0.1", port=int(sys.argv[2])).start()
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
stop.wait()
server.stop()
archive.close()
"""


def serve_kho(
    data_dir: Path, public_url: str, settings: dict[str, Any] | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _KHO_SERVER,
            str(data_dir),
            str(port),
            public_url,
            json.dumps(settings or {}),
        ]
    )
    wait_port(port, proc)
    return proc, port


def app_config(prefix: str) -> str:
    """OHIF's configuration: the same data-source settings for both servers, the roots
    under ``prefix`` at the page's origin."""
    config = {
        "routerBasename": f"{prefix}/viewer",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 3,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "groupEnabledModesFirst": True,
        "maxNumRequests": {"interaction": 100, "thumbnail": 75, "prefetch": 25},
        "defaultDataSourceName": "dicomweb",
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "dicomweb",
                "configuration": {
                    "friendlyName": "DICOMweb",
                    "name": "dicomweb",
                    "qidoSupportsIncludeField": True,
                    "supportsReject": False,
                    "imageRendering": "wadors",
                    "thumbnailRendering": "thumbnailDirect",
                    "enableStudyLazyLoad": True,
                    "supportsFuzzyMatching": True,
                    "supportsWildcard": True,
                    "staticWado": False,
                    "singlepart": "bulkdata,video,pdf",
                    "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
                    "omitQuotationForMultipartRequest": True,
                },
            }
        ],
    }
    return (
        "(function () {\n"
        f"  var root = window.location.origin + {json.dumps(prefix + '/dicom-web')};\n"
        f"  var config = {json.dumps(config, indent=2)};\n"
        "  var source = config.dataSources[0].configuration;\n"
        "  source.qidoRoot = source.wadoRoot = source.wadoUriRoot = root;\n"
        "  window.config = config;\n"
        "})();\n"
    )


def stage_site(site: Path, dist: Path, servers: tuple[str, ...] = SERVERS) -> None:
    """``site/<server>/viewer/``: links to every file of the build, and per server an
    index.html (its URLs under the prefix) and an app-config.js."""
    import re

    original = (dist / "index.html").read_text(encoding="utf-8")
    for server in servers:
        folder = site / server / "viewer"
        folder.mkdir(parents=True)
        for path in dist.rglob("*"):
            if path.is_file() and path.name.removesuffix(".gz") not in (
                "index.html",
                "app-config.js",
            ):
                target = folder / path.relative_to(dist)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(path)
        base = f"/{server}/viewer/"
        html = re.sub(r"<script[^>]*init-service-worker\.js[^>]*>\s*</script>", "", original)
        html = html.replace('window.PUBLIC_URL="/"', f"window.PUBLIC_URL={json.dumps(base)}")
        html = re.sub(
            r'(\s(?:href|src|content))="/(?!/)', lambda m, b=base: f'{m.group(1)}="{b}', html
        )
        (folder / "index.html").write_text(html)
        (folder / "app-config.js").write_text(app_config(f"/{server}"))


def start_nginx(work: Path, site: Path, ports: dict[str, int], port: int) -> tuple[Path, Path]:
    """nginx on loopback ``port``; (pid file, access log)."""
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (work / sub).mkdir(exist_ok=True)
    pid_file, log = work / "nginx.pid", work / "access.log"
    upstreams = "\n".join(
        f"    upstream {s} {{ server 127.0.0.1:{p}; keepalive 16; }}" for s, p in ports.items()
    )
    locations = "\n".join(
        f"""
        location /{s}/dicom-web/ {{
            proxy_pass http://{s}/dicom-web/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-Prefix /{s};
        }}
        location /{s}/viewer/ {{
            root {site};
            gzip_static on;
            try_files $uri /{s}/viewer/index.html;
        }}"""
        for s in ports
    )
    # kho's own pages (start page, share links), under the prefix its public_url names
    locations += "\n".join(
        f"""
        location /{s}/ {{
            proxy_pass http://{s}/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
        }}"""
        for s in ports
        if s != "orthanc"
    )
    # the build and the folders are private to this user: workers run as it too
    user = "user root;\n" if os.geteuid() == 0 else ""
    config = work / "nginx.conf"
    config.write_text(
        f"""
daemon on;
{user}worker_processes 1;
pid {pid_file};
error_log {work}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    include /etc/nginx/mime.types;
    log_format bench '$msec "$request_uri" $status $body_bytes_sent $request_time '
                     '"$upstream_response_time"';
    access_log {log} bench;
    client_body_temp_path {work}/client_body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    sendfile on;
    tcp_nodelay on;
    keepalive_requests 100000;
{upstreams}
    server {{
        listen 127.0.0.1:{port};
        {locations}
    }}
}}
"""
    )
    subprocess.run([NGINX, "-c", str(config), "-p", str(work)], check=True, timeout=30)
    deadline = time.monotonic() + 15
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return pid_file, log


def stop_nginx(pid_file: Path) -> None:
    import signal

    with contextlib.suppress(OSError, ValueError):
        os.kill(int(pid_file.read_text().strip()), signal.SIGQUIT)


# --- the browser ------------------------------------------------------------------------

#: runs before the page's own scripts: room for every resource entry, and the canvas
#: watched for its first image
_PROBE = """
try { performance.setResourceTimingBufferSize(100000); } catch (e) {}
window.__bench = {firstImage: null, polls: 0, canvas: null};
(function poll() {
  window.__bench.polls++;
  let best = null;
  for (const c of document.querySelectorAll('canvas.cornerstone-canvas')) {
    if (c.width > 8 && c.height > 8 && (!best || c.width * c.height > best.width * best.height))
      best = c;
  }
  if (best) {
    try {
      const data = best.getContext('2d').getImageData(0, 0, best.width, best.height).data;
      let n = 0, sum = 0, squares = 0, lit = 0;
      const levels = new Set();
      for (let i = 0; i < data.length; i += 4 * 13) {
        const g = Math.round((data[i] + data[i + 1] + data[i + 2]) / 3);
        n++; sum += g; squares += g * g; levels.add(g); if (g > 24) lit++;
      }
      const mean = sum / n, std = Math.sqrt(Math.max(0, squares / n - mean * mean));
      if (std > 8 && levels.size > 16 && lit / n > 0.02) {
        window.__bench.firstImage = performance.now();
        window.__bench.canvas = [best.width, best.height, std, levels.size, lit / n];
        return;
      }
    } catch (e) {}
  }
  setTimeout(poll, 40);
})();
"""

_ENTRIES = """
return performance.getEntriesByType('resource').map(e => [
  e.name, e.startTime, e.responseStart, e.responseEnd, e.transferSize, e.encodedBodySize,
  e.responseStatus || 0, e.initiatorType]);
"""


def new_driver(width: int = 1400, height: int = 900) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--use-angle=swiftshader",
        "--enable-unsafe-swiftshader",
        "--ignore-gpu-blocklist",
        f"--window-size={width},{height}",
        "--force-device-scale-factor=1",
        "--no-first-run",
        "--disable-extensions",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    return driver


#: kho's own pages (start page, share page): when the first <img> holding an image has
#: loaded and a frame has been drawn after it, from navigation (performance.now()'s origin)
_PAGE_PROBE = """
window.__page = {firstImage: null, what: null};
document.addEventListener('load', function (event) {
  const el = event.target;
  if (window.__page.firstImage !== null || !el || el.tagName !== 'IMG') return;
  if (!(el.naturalWidth > 8 && el.naturalHeight > 8)) return;
  requestAnimationFrame(function () {
    if (window.__page.firstImage !== null) return;
    window.__page.firstImage = performance.now();
    window.__page.what = el.currentSrc.split('?')[0].split('/').slice(-2).join('/');
  });
}, true);
"""


def page_run(url: str, shots: Path, tag: str, width: int, height: int) -> dict[str, Any]:
    """Open one of kho's own pages in a fresh browser: navigation to its first image."""
    driver = new_driver(width, height)
    try:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": _PAGE_PROBE})
        driver.get(url)
        deadline = time.monotonic() + 30
        page: dict[str, Any] = {}
        while time.monotonic() < deadline:
            page = driver.execute_script("return window.__page;") or {}
            if page.get("firstImage") is not None:
                break
            time.sleep(0.05)
        timing = driver.execute_script(
            "const n = performance.getEntriesByType('navigation')[0];"
            "return [n.responseEnd, n.domContentLoadedEventEnd,"
            " performance.getEntriesByType('resource').length];"
        )
        driver.save_screenshot(str(shots / f"{tag}.png"))
    finally:
        driver.quit()
    first = page.get("firstImage")
    return {
        "first_image_s": round(first / 1000, 3) if first is not None else None,
        "image": page.get("what"),
        "html_answered_s": round(timing[0] / 1000, 3),
        "dom_ready_s": round(timing[1] / 1000, 3),
        "requests": int(timing[2]) + 1,
    }


def kho_pages(kho_url: str, study: str, shots: Path, runs: int, base: str) -> dict[str, Any]:
    """kho's start page (a desktop window) and a share link's page for ``study`` (a phone's
    390x844), each opened ``runs`` times through the proxy at ``base``: time from
    navigation to the first image."""
    import urllib.request

    request = urllib.request.Request(
        f"{kho_url}/api/shares",
        data=json.dumps({"study": study, "expires": "1d"}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        share_url = json.load(response)["url"]
    out: dict[str, Any] = {}
    for name, url, size in (
        ("start page", f"{base}/kho/", (1400, 900)),
        ("share page", share_url, (390, 844)),
    ):
        items = [
            page_run(url, shots, f"page-{name.replace(' ', '-')}-run{n + 1}", *size)
            for n in range(runs)
        ]
        values = [r["first_image_s"] for r in items if r["first_image_s"] is not None]
        out[name] = {
            "first_image_s": {
                "median": statistics.median(values) if values else None,
                "range": [min(values), max(values)] if values else None,
                "values": values,
                "runs_without": len(items) - len(values),
            },
            "target_s": PAGE_TARGET_S,
            "runs": items,
        }
    return out


def kind_of(url: str) -> str:
    path = url.split("?", 1)[0]
    if "/dicom-web/" not in path:
        return "viewer files"
    if "/frames/" in path:
        return "frames"
    if path.endswith("/thumbnail"):
        return "thumbnail"
    if path.endswith("/metadata"):
        return "metadata"
    if "/rendered" in path:
        return "rendered"
    if path.endswith("/studies"):
        return "qido studies"
    if path.endswith("/series"):
        return "qido series"
    if path.endswith("/instances"):
        return "qido instances"
    return "other dicom-web"


def one_run(base: str, server: str, study: dict[str, Any], shots: Path, tag: str) -> dict[str, Any]:
    """Open the study in a fresh browser; the times, requests and bytes."""
    driver = new_driver()
    try:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": _PROBE})
        wall_start = time.time()
        driver.get(f"{base}/{server}/viewer/viewer?StudyInstanceUIDs={study['study']}")
        expected = study["frames"]
        deadline = time.monotonic() + RUN_TIMEOUT_S + 30
        last_count, last_change = -1, time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.25)
            state = driver.execute_script(
                "const r = performance.getEntriesByType('resource');"
                "const f = new Set(r.filter(e => e.name.includes('/frames/') && e.responseEnd > 0"
                " && (e.responseStatus || 200) < 400).map(e => e.name));"
                "const t = r.filter(e => e.name.includes('/thumbnail'));"
                "return [f.size, t.length, window.__bench.firstImage, r.length];"
            )
            frames, thumbs, first, count = state
            if count != last_count:
                last_count, last_change = count, time.monotonic()
            if frames >= expected and first is not None and thumbs >= 1:
                time.sleep(0.5)  # late thumbnails, the last entries
                break
            if first is not None and time.monotonic() - last_change > 15:
                break  # nothing more comes
        entries = driver.execute_script(_ENTRIES)
        bench = driver.execute_script("return window.__bench;")
        with_thumbs = driver.execute_script(
            "return Array.from(document.querySelectorAll('img')).filter(i => "
            "i.src.includes('/thumbnail')).map(i => [i.complete, i.naturalWidth]);"
        )
        driver.save_screenshot(str(shots / f"{tag}.png"))
        wall_end = time.time()
    finally:
        driver.quit()
    return summarise(entries, bench, with_thumbs, expected) | {"wall": [wall_start, wall_end]}


def summarise(
    entries: list[list[Any]], bench: dict[str, Any], thumbs_dom: list[Any], expected: int
) -> dict[str, Any]:
    dicomweb = [e for e in entries if "/dicom-web/" in e[0]]
    t0 = min((e[1] for e in dicomweb), default=None)
    out: dict[str, Any] = {
        "ohif_startup_s": round(t0 / 1000, 3) if t0 is not None else None,
        "canvas": bench.get("canvas"),
    }
    if t0 is None:
        return out | {"error": "no DICOMweb request"}

    def since(ms: float | None) -> float | None:
        return None if ms is None else round((ms - t0) / 1000, 3)

    out["first_image_s"] = since(bench.get("firstImage"))
    if bench.get("firstImage") is not None:
        out["first_image_from_navigation_s"] = round(bench["firstImage"] / 1000, 3)
    first_answer = min(
        (e[3] for e in dicomweb if kind_of(e[0]) == "frames" and e[3] > 0), default=None
    )
    if first_answer is not None and bench.get("firstImage") is not None:
        # the browser's own work on the first frame: decode (its codec's start-up), render
        out["browser_after_first_frame_s"] = round((bench["firstImage"] - first_answer) / 1000, 3)
    thumbs = [e for e in dicomweb if kind_of(e[0]) == "thumbnail"]
    out["thumbnails"] = {
        "requests": len(thumbs),
        "statuses": sorted({int(e[6]) for e in thumbs}),
        "all_answered_s": since(max(e[3] for e in thumbs)) if thumbs else None,
        "shown_in_page": sum(1 for c, w in thumbs_dom if c and w > 0),
    }
    frames: dict[str, float] = {}
    for e in dicomweb:
        if kind_of(e[0]) == "frames" and e[3] > 0 and (e[6] or 200) < 400:
            frames[e[0]] = min(frames.get(e[0], e[3]), e[3])
    ends = sorted(frames.values())
    out["frames_loaded"] = len(ends)
    out["frames_expected"] = expected
    out["all_frames_s"] = since(ends[expected - 1]) if len(ends) >= expected else None
    if out["all_frames_s"] is not None and out["first_image_s"] is not None:
        out["all_frames_after_first_image_s"] = round(out["all_frames_s"] - out["first_image_s"], 3)
    kinds: dict[str, dict[str, Any]] = {}
    for e in entries:
        k = kinds.setdefault(kind_of(e[0]), {"requests": 0, "bytes": 0, "statuses": set()})
        k["requests"] += 1
        k["bytes"] += int(e[4])
        k["statuses"].add(int(e[6]))
        # times relative to the first DICOMweb request (viewer files before it: negative)
        first_end = k.get("first_end_s")
        end = since(e[3])
        k["first_start_s"] = min(k.get("first_start_s", 1e9), since(e[1]) or 0)
        k["last_end_s"] = max(k.get("last_end_s", -1e9), end or 0)
        k["first_end_s"] = end if first_end is None else min(first_end, end or 0)
    for k in kinds.values():
        k["statuses"] = sorted(k["statuses"])
    out["by_kind"] = kinds
    out["dicomweb_requests"] = len(dicomweb)
    out["dicomweb_bytes"] = sum(int(e[4]) for e in dicomweb)
    # the opening waterfall: the DICOMweb requests before the first frame answered
    first_frame = min((e[1] for e in dicomweb if kind_of(e[0]) == "frames"), default=None)
    out["waterfall_to_first_frame"] = [
        [kind_of(e[0]), since(e[1]), since(e[3]), int(e[4]), int(e[6])]
        for e in sorted(dicomweb, key=lambda e: e[1])
        if first_frame is None or e[1] <= first_frame
    ][:30]
    return out


def server_times(log: Path, offset: int, prefix: str) -> dict[str, Any]:
    """From nginx's log after ``offset``: per kind of request under ``prefix``, the count
    and the median and total upstream (server) seconds."""
    per: dict[str, list[float]] = {}
    with log.open("rb") as fh:
        fh.seek(offset)
        for raw in fh.read().decode(errors="replace").splitlines():
            try:
                parts = raw.split('"')
                uri, upstream = parts[1], parts[3]
            except IndexError:
                continue
            if not uri.startswith(prefix + "/dicom-web/") or upstream in ("", "-"):
                continue
            try:
                seconds = float(upstream.split(",")[0])
            except ValueError:
                continue
            per.setdefault(kind_of(uri), []).append(seconds)
    return {
        k: {"n": len(v), "median_ms": round(1000 * statistics.median(v), 1),
            "total_s": round(sum(v), 3)}
        for k, v in per.items()
    }  # fmt: skip


# --- the report -------------------------------------------------------------------------

METRICS = (
    ("ohif_startup_s", "OHIF start-up (navigation -> first DICOMweb request)"),
    ("metadata_answered_s", "series metadata answered"),
    ("viewer_files_done_s", "last viewer file (chunks, codecs) answered"),
    ("first_frame_request_s", "first frame requested"),
    ("first_frame_answered_s", "first frame answered"),
    ("first_image_s", "first image"),
    ("browser_after_first_frame_s", "first frame answered -> first image (browser)"),
    ("first_image_from_navigation_s", "first image, from navigation"),
    ("thumbnails_s", "all thumbnails answered"),
    ("all_frames_s", "every frame of the series"),
    ("all_frames_after_first_image_s", "every frame, after the first image"),
    ("dicomweb_requests", "DICOMweb requests"),
    ("dicomweb_mb", "DICOMweb MB transferred"),
)


def metric(run: dict[str, Any], name: str) -> float | None:
    if name == "thumbnails_s":
        value = (run.get("thumbnails") or {}).get("all_answered_s")
        return float(value) if value is not None else None
    kinds = run.get("by_kind") or {}
    picked = {
        "metadata_answered_s": ("metadata", "last_end_s"),
        "viewer_files_done_s": ("viewer files", "last_end_s"),
        "first_frame_request_s": ("frames", "first_start_s"),
        "first_frame_answered_s": ("frames", "first_end_s"),
    }.get(name)
    if picked is not None:
        found = (kinds.get(picked[0]) or {}).get(picked[1])
        return float(found) if found is not None else None
    if name == "dicomweb_mb":
        return round(run.get("dicomweb_bytes", 0) / 1e6, 3)
    value = run.get(name)
    return float(value) if value is not None else None


def aggregate(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for study, per_server in runs.items():
        for server, items in per_server.items():
            row: dict[str, Any] = {}
            for name, _ in METRICS:
                values = [v for v in (metric(r, name) for r in items) if v is not None]
                row[name] = {
                    "median": statistics.median(values) if values else None,
                    "range": [min(values), max(values)] if values else None,
                    "values": values,
                    "runs_without": len(items) - len(values),
                }
            out.setdefault(study, {})[server] = row
    return out


def table(results: dict[str, Any]) -> str:
    summary = results["summary"]
    variant = DECODED_VARIANT[0]
    with_variant = any(variant in per for per in summary.values())
    extra_head = f" {variant} | {variant}/Orthanc |" if with_variant else ""
    lines = [
        f"OHIF {results['ohif_version']} in headless Chromium {results['chromium']} "
        "(software WebGL), one origin (nginx) for all servers; medians over "
        f"{results['runs']} runs, range in brackets; times in seconds from the first "
        "DICOMweb request.",
        "",
        f"| study | measure | kho | Orthanc | kho/Orthanc | target | met |{extra_head}",
        "|---|---|---|---|---|---|---|" + ("---|---|" if with_variant else ""),
    ]
    for study, per_server in summary.items():
        for name, label in METRICS:
            k, o = per_server["kho"][name], per_server.get("orthanc", {}).get(name, {})
            v = per_server.get(variant, {}).get(name, {})

            def cell(m: dict[str, Any]) -> str:
                if not m or m.get("median") is None:
                    return "n/a"
                low, high = m["range"]
                missing = f" ({m['runs_without']} run(s) without)" if m["runs_without"] else ""
                return f"{m['median']:.3g} [{low:.3g}-{high:.3g}]{missing}"

            ratio, target_text, met = "", "", ""
            if k.get("median") is not None and o and o.get("median"):
                value = k["median"] / o["median"]
                ratio = f"{value:.2f}"
                target = TARGETS.get(name, {}).get(study)
                if target is not None:
                    target_text = f"<= {target:g}x"
                    met = "met" if value <= target else "unmet"
            extra = ""
            if with_variant:
                v_ratio = ""
                if v.get("median") is not None and o and o.get("median"):
                    v_ratio = f"{v['median'] / o['median']:.2f}"
                extra = f" {cell(v)} | {v_ratio} |"
            lines.append(
                f"| {study} | {label} | {cell(k)} | {cell(o)} | {ratio} | {target_text} | {met} |"
                + extra
            )
    lines += ["", "Corpus: " + "; ".join(f"{s}: {v}" for s, v in results["corpus"].items())]
    pages = results.get("kho_pages") or {}
    if pages:
        lines += [
            "",
            "kho's own pages (no Orthanc counterpart): first image from navigation, seconds, "
            f"median [range] over {results['runs']} fresh browsers (start page 1400x900: the "
            "first study thumbnail; share page in a 390x844 window, drawn 500 px wide by "
            "headless Chromium: the first rendered image)",
            "",
            "| page | first image | HTML answered | requests | target | met |",
            "|---|---|---|---|---|---|",
        ]
        for name, page in pages.items():
            m = page["first_image_s"]
            runs = page["runs"]
            html_s = statistics.median(r["html_answered_s"] for r in runs)
            requests = statistics.median(r["requests"] for r in runs)
            if m["median"] is None:
                lines.append(f"| {name} | n/a | {html_s:.3g} | {requests:g} | < 1 s | unmet |")
                continue
            low, high = m["range"]
            met = "met" if m["median"] < page["target_s"] else "unmet"
            lines.append(
                f"| {name} | {m['median']:.3g} [{low:.3g}-{high:.3g}] | {html_s:.3g} | "
                f"{requests:g} | < {page['target_s']:g} s | {met} |"
            )
    lines += [
        "",
        "Server time (nginx upstream_response_time), median ms per request and requests per "
        "run, by kind (first run of each study):",
        "",
        "| study | server | kind | requests | median ms | total s |",
        "|---|---|---|---|---|---|",
    ]
    for study, per_server in results["runs_detail"].items():
        for server, items in per_server.items():
            if not items:
                continue
            for kind, v in sorted(items[0].get("server_time", {}).items()):
                lines.append(
                    f"| {study} | {server} | {kind} | {v['n']} | {v['median_ms']} | "
                    f"{v['total_s']} |"
                )
    m = results["machine"]
    lines += [
        "",
        f"Machine: {m['cores']} cores ({m['cpu']}), {m['memory_gb']} GB; load average at start "
        f"{results['load_average_at_start']}, at end {results['load_average_at_end']} (other "
        "work on the machine shares the cores). "
        f"{results['orthanc_version']}. Thumbnails: {results['thumbnail_note']}",
    ]
    if with_variant:
        lines += [
            "",
            f"{variant}: kho with the setting viewer_decoded_frame_max_bytes = 1 MiB (OHIF's "
            "`transfer-syntax=*` frame requests answered decoded, Explicit VR Little Endian, "
            "for lossless frames up to 1 MiB decoded: the CT and XA frames, not the "
            "radiograph); kho's default answers them as stored (JPEG-LS).",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=189)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--studies", default="ct,radiograph,multiframe")
    parser.add_argument("--results-name", default="viewer")
    parser.add_argument("--no-netns", action="store_true")
    parser.add_argument(
        "--decoded-variant",
        action="store_true",
        help=f"also run {DECODED_VARIANT[0]}: kho answering transfer-syntax=* with decoded frames",
    )
    args = parser.parse_args(argv)
    if not args.no_netns and os.environ.get("KHO_BENCH_NETNS") != "1":
        # the OHIF download needs the network the namespace below takes away: fetch it first
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests.helpers.browser import ohif_tarball

        ohif_tarball()
        # Orthanc binds all interfaces: give it a network with loopback only
        command = " ".join(
            [sys.executable, "-m", "benchmarks.viewer", *[f"'{a}'" for a in (argv or sys.argv[1:])]]
        )
        os.execvp(
            "unshare",
            ["unshare", "-n", "sh", "-c", f"ip link set lo up && KHO_BENCH_NETNS=1 exec {command}"],
        )
    if not (ORTHANC_PLUGIN.exists() and shutil.which("Orthanc")):
        raise SystemExit("Orthanc with its DICOMweb plugin is needed (Debian orthanc-dicomweb)")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.helpers.browser import ohif_build

    build = ohif_build()
    chromium = subprocess.run(
        [CHROMIUM, "--version"], capture_output=True, text=True, check=False
    ).stdout.split()
    wanted = args.studies.split(",")
    with tempfile.TemporaryDirectory(prefix="kho-viewer-bench-") as tmp:
        work = Path(tmp)
        print("generating data ...", flush=True)
        studies = {k: v for k, v in make_corpus(work / "data", args.slices).items() if k in wanted}
        files = [p for s in studies.values() for p in s["files"]]
        print("kho: ingest ...", flush=True)
        ingest_s = ingest_kho(work / "kho", files)
        print("Orthanc: upload ...", flush=True)
        oproc, oport, upload_s = start_orthanc(work, files)
        servers = SERVERS + ((DECODED_VARIANT[0],) if args.decoded_variant else ())
        site = work / "site"
        stage_site(site, build.dist, servers)
        nginx_port = free_port()
        kproc = None
        variant_proc = None
        pid_file = None
        shots = Path(tempfile.gettempdir()) / "kho-viewer-bench-screenshots"
        shots.mkdir(parents=True, exist_ok=True)
        results: dict[str, Any] = {
            "machine": machine(),
            "ohif_version": build.version,
            "chromium": chromium[1] if len(chromium) > 1 else "?",
            "orthanc_version": "Orthanc 1.10.1 + DICOMweb plugin 1.7 (Debian 12)",
            "runs": args.runs,
            "corpus": {k: v["what"] for k, v in studies.items()},
            "kho_ingest_until_finished_s": round(ingest_s, 2),
            "orthanc_upload_s": round(upload_s, 2),
            "targets": TARGETS,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "data_source": json.loads(
                app_config("").split("var config = ", 1)[1].split(";\n", 1)[0]
            )["dataSources"][0]["configuration"],
        }
        detail: dict[str, dict[str, list[dict[str, Any]]]] = {
            s: {v: [] for v in servers} for s in studies
        }
        try:
            kproc, kport = serve_kho(work / "kho", f"http://127.0.0.1:{nginx_port}/kho")
            ports = {"kho": kport, "orthanc": oport}
            if args.decoded_variant:
                name, settings = DECODED_VARIANT
                shutil.copytree(work / "kho", work / name)  # its own copy of the same data
                variant_proc, ports[name] = serve_kho(
                    work / name, f"http://127.0.0.1:{nginx_port}/{name}", settings
                )
            pid_file, log = start_nginx(work, site, ports, nginx_port)
            base = f"http://127.0.0.1:{nginx_port}"
            for run in range(args.runs):
                # each server goes first in turn
                shift = run % len(servers)
                order = servers[shift:] + servers[:shift]
                for study_name, study in studies.items():
                    for server in order:
                        offset = log.stat().st_size if log.exists() else 0
                        tag = f"{study_name}-{server}-run{run + 1}"
                        print(f"run {run + 1}: {study_name} on {server} ...", flush=True)
                        result = one_run(base, server, study, shots, tag)
                        time.sleep(0.3)  # nginx writes its log lines
                        result["server_time"] = server_times(log, offset, f"/{server}")
                        detail[study_name][server].append(result)
                        print(
                            f"  first image {result.get('first_image_s')} s, thumbnails "
                            f"{(result.get('thumbnails') or {}).get('all_answered_s')} s, "
                            f"frames {result.get('frames_loaded')}/{study['frames']} at "
                            f"{result.get('all_frames_s')} s, start-up "
                            f"{result.get('ohif_startup_s')} s, "
                            f"{result.get('dicomweb_requests')} requests",
                            flush=True,
                        )
            if "ct" in studies:
                print("kho's start page and share page ...", flush=True)
                results["kho_pages"] = kho_pages(
                    f"http://127.0.0.1:{kport}", studies["ct"]["study"], shots, args.runs, base
                )
        finally:
            if pid_file is not None:
                stop_nginx(pid_file)
            if kproc is not None:
                stop(kproc)
            if variant_proc is not None:
                stop(variant_proc)
            stop(oproc)
        results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        results["runs_detail"] = detail
        results["summary"] = aggregate(detail)
        thumb_status = {
            server: sorted(
                {
                    s
                    for per in detail.values()
                    for r in per[server]
                    for s in (r.get("thumbnails") or {}).get("statuses", [])
                }
            )
            for server in SERVERS
        }
        results["thumbnail_note"] = (
            f"HTTP statuses of /thumbnail: kho {thumb_status['kho']}, Orthanc "
            f"{thumb_status['orthanc']} (times count answers, whatever their status)."
        )
        results["table"] = table(results)
    path = write_results(args.results_name, results)
    (RESULTS_DIR / f"{args.results_name}.md").write_text(results["table"] + "\n")
    print(results["table"])
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
