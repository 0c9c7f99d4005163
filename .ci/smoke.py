#!/usr/bin/env python3
"""Smoke session on a plain install: what a new user gets from `pip install . && kho serve`.

    python3 .ci/smoke.py

Installs the project with `pip install .` (no extras) into a fresh virtual environment in a
temporary directory, starts that environment's `kho serve` on free loopback ports with a
temporary data directory, sends a CT study (one native and one JPEG 2000 lossless instance)
with dcmtk's storescu, then fetches over HTTP the series metadata, frame 1, /rendered (JPEG
and PNG) and /thumbnail of each instance: every answer must be 200 with the right content
type and plausible content.  Exits 1, loudly, on the first failure (with the server log).

Stdlib only and run by the system python on purpose: the HTTP side must not borrow anything
from the venv or from the test extras, so the only thing under test is the plain install.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# CI runs in a clean clone with shared/ beside it, as tests/conftest.py expects
SAMPLES = next(
    (
        p
        for p in (ROOT.parent / "shared" / "dicom-samples", Path("/work/shared/dicom-samples"))
        if p.is_dir()
    ),
    ROOT.parent / "shared" / "dicom-samples",
)
# one study, one series: a native CT slice and a JPEG 2000 lossless one (different SOP UIDs),
# so both kho's own codec path and the pylibjpeg decoders of a plain install are exercised
STUDY_FILES = [("693_UNCI.dcm", None), ("693_J2KR.dcm", "-xv")]
STORESCU = "/usr/bin/storescu"  # pynetdicom installs a Python storescu that may shadow it
HTTP_TIMEOUT_S = 120  # a first request compiles numba kernels in the fresh venv
STARTUP_TIMEOUT_S = 90

STARTED = time.monotonic()


class SmokeError(Exception):
    pass


def step(message: str) -> None:
    print(f"[smoke {time.monotonic() - STARTED:6.1f}s] {message}", flush=True)


def free_port(taken: set[int]) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in taken:
            taken.add(port)
            return port


def run(command: list[str], *, timeout: float, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=env, cwd=tempfile.gettempdir()
    )
    if done.returncode != 0:
        raise SmokeError(
            f"{' '.join(command[:4])} ... exited {done.returncode}\n{done.stdout}\n{done.stderr}"
        )
    return done.stdout + done.stderr


def get(url: str, accept: str | None = None) -> tuple[str, bytes]:
    """(content type, body) of a 200 answer; SmokeError for anything else."""
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            return response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()[:500].decode("utf-8", "replace")
        raise SmokeError(f"GET {url} (Accept: {accept}) -> {exc.code}: {body}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise SmokeError(f"GET {url} (Accept: {accept}) failed: {exc}") from None


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeError(message)


def uid(dataset: dict[str, Any], tag: str) -> str:
    return str(dataset[tag]["Value"][0])


def install(venv: Path) -> Path:
    step(f"python3 -m venv {venv}")
    run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    python = venv / "bin" / "python"
    step(f"pip install {ROOT} (no extras)")
    run([str(python), "-m", "pip", "install", "-q", str(ROOT)], timeout=600)
    # a plain install: nothing from the test extra may have come along
    for module in ("pytest", "dicomweb_client", "hypothesis"):
        found = subprocess.run(
            [str(python), "-c", f"import importlib.util as u; print(u.find_spec('{module}'))"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        expect(found == "None", f"{module} is installed in the plain venv: not a plain install")
    return venv / "bin" / "kho"


def wait_until_serving(server: subprocess.Popen[bytes], base: str, dicom_port: int) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SmokeError(f"kho serve exited with {server.returncode} while starting")
        try:
            with socket.create_connection(("127.0.0.1", dicom_port), 0.5):
                pass
            with urllib.request.urlopen(f"{base}/studies", timeout=5) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.2)
    raise SmokeError(f"kho serve did not answer within {STARTUP_TIMEOUT_S} s")


def send_study(dicom_port: int) -> None:
    env = {**os.environ, "TCP_NODELAY": "1"}  # else Nagle adds 40-90 ms per round trip
    for name, proposal in STUDY_FILES:
        path = SAMPLES / name
        expect(path.is_file(), f"sample {path} is missing (../shared/dicom-samples)")
        command = [STORESCU, "-aet", "SMOKE", "-aec", "KHO"]
        command += [proposal] if proposal else []
        command += ["127.0.0.1", str(dicom_port), str(path)]
        output = run(command, timeout=60, env=env)
        expect("E:" not in output, f"storescu reported an error for {name}:\n{output}")
    step(f"storescu sent {len(STUDY_FILES)} instances")


def check_retrieval(base: str) -> None:
    content_type, body = get(f"{base}/studies", "application/dicom+json")
    studies = json.loads(body)
    expect(len(studies) == 1, f"QIDO found {len(studies)} studies, expected 1")
    study = uid(studies[0], "0020000D")
    _, body = get(f"{base}/studies/{study}/series", "application/dicom+json")
    series_list = json.loads(body)
    expect(len(series_list) == 1, f"QIDO found {len(series_list)} series, expected 1")
    series = uid(series_list[0], "0020000E")
    series_url = f"{base}/studies/{study}/series/{series}"

    content_type, body = get(f"{series_url}/metadata", "application/dicom+json")
    expect(content_type.startswith("application/dicom+json"), f"metadata is {content_type}")
    metadata = json.loads(body)
    expect(len(metadata) == len(STUDY_FILES), f"metadata lists {len(metadata)} instances")
    step(f"series metadata: 200 {content_type}, {len(metadata)} instances")

    for instance in metadata:
        sop = uid(instance, "00080018")
        rows, cols = int(uid(instance, "00280010")), int(uid(instance, "00280011"))
        frame_bytes = rows * cols * int(uid(instance, "00280100")) // 8
        url = f"{series_url}/instances/{sop}"

        content_type, body = get(
            f"{url}/frames/1", 'multipart/related; type="application/octet-stream"'
        )
        expect(content_type.startswith("multipart/related"), f"frame is {content_type}")
        expect(len(body) >= frame_bytes, f"frame body {len(body)} B < {frame_bytes} B of pixels")
        step(f"{sop[-12:]} frame 1: 200 {content_type.split(';')[0]}, {len(body)} B")

        content_type, body = get(f"{url}/rendered", "image/jpeg")
        expect(content_type.startswith("image/jpeg"), f"rendered is {content_type}")
        expect(body[:3] == b"\xff\xd8\xff" and body[-2:] == b"\xff\xd9", "rendered is not a JPEG")
        step(f"{sop[-12:]} rendered: 200 {content_type}, {len(body)} B")

        content_type, body = get(f"{url}/rendered", "image/png")
        expect(content_type.startswith("image/png"), f"rendered PNG is {content_type}")
        expect(body[:8] == b"\x89PNG\r\n\x1a\n", "rendered PNG is not a PNG")
        step(f"{sop[-12:]} rendered: 200 {content_type}, {len(body)} B")

        content_type, body = get(f"{url}/thumbnail", "image/jpeg")
        expect(content_type.startswith("image/jpeg"), f"thumbnail is {content_type}")
        expect(body[:3] == b"\xff\xd8\xff", "thumbnail is not a JPEG")
        step(f"{sop[-12:]} thumbnail: 200 {content_type}, {len(body)} B")


def stop(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def check_viewer(origin: str, timeout_s: float = 240.0) -> None:
    """The start page answers at once; the OHIF viewer once kho serve has installed it
    (downloaded from the npm registry, integrity checked, in the background on first
    start): the README's first command brings up a working viewer."""
    content_type, body = get(f"{origin}/", "text/html")
    expect(content_type.startswith("text/html"), f"the start page is {content_type}")
    step(f"start page: 200 {content_type.split(';')[0]}, {len(body)} B")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{origin}/viewer/", timeout=HTTP_TIMEOUT_S) as response:
                page = response.read()
                break
        except urllib.error.HTTPError as exc:
            expect(exc.code == 503, f"/viewer/ answered {exc.code} while installing")
        expect(time.monotonic() < deadline, f"/viewer/ not installed within {timeout_s:.0f} s")
        time.sleep(2)
    expect(b"app-config.js" in page, "/viewer/ is not OHIF's page")
    content_type, config = get(f"{origin}/viewer/app-config.js")
    expect(b"dicom-web" in config, "the viewer's app-config.js does not point at kho's DICOMweb")
    step(f"OHIF viewer: 200, app-config.js {len(config)} B")


def main() -> int:
    expect(Path(STORESCU).exists(), f"{STORESCU} is missing: apt-get install dcmtk")
    workdir = Path(tempfile.mkdtemp(prefix="kho-smoke-"))
    log_path = workdir / "serve.log"
    server: subprocess.Popen[bytes] | None = None
    ok = False
    try:
        kho = install(workdir / "venv")
        ports: set[int] = set()
        dicom_port, http_port = free_port(ports), free_port(ports)
        # the user's shell, not CI's: no KHO_* setting may leak into the plain session
        env = {k: v for k, v in os.environ.items() if not k.startswith("KHO_")}
        command = [str(kho), "serve", "--data-dir", str(workdir / "data"), "--host", "127.0.0.1"]
        command += ["--port", str(dicom_port), "--http-port", str(http_port)]
        step(f"kho serve: DICOM {dicom_port}, HTTP {http_port}")
        with open(log_path, "wb") as log:
            server = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir
            )
        base = f"http://127.0.0.1:{http_port}/dicom-web"
        wait_until_serving(server, base, dicom_port)
        step(f"kho serve (pid {server.pid}) answers")
        send_study(dicom_port)
        check_retrieval(base)
        check_viewer(f"http://127.0.0.1:{http_port}")
        log_text = log_path.read_text(errors="replace")
        expect("Traceback" not in log_text, "the server logged a traceback")
        ok = True
    except (SmokeError, subprocess.TimeoutExpired) as exc:
        print(f"\nSMOKE FAILED: {exc}", file=sys.stderr, flush=True)
    finally:
        if server is not None:
            stop(server)
            step(f"kho serve (pid {server.pid}) stopped, exit {server.returncode}")
        if not ok and log_path.exists():
            tail = log_path.read_text(errors="replace")[-6000:]
            print(f"--- {log_path} (tail) ---\n{tail}", file=sys.stderr, flush=True)
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept for inspection: {workdir}", file=sys.stderr, flush=True)
    if ok:
        step("plain install smoke session passed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
