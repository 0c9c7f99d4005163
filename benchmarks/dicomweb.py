"""DICOMweb latency for EMR viewers: kho against Orthanc (+ DICOMweb plugin) on the same data.

Data: a 300-slice 512x512 CT series (kho.bench.phantom), a 3000x2500 radiograph
(generated here) and, when the PyPI package ``deid-data`` is installed, its real 2614x3072
DX.  Requests, each at 1 and 8 concurrent clients (processes, one persistent HTTP/1.1
connection each), with the CPU time per request of the server and of the clients:

- series metadata (300 instances, DICOM JSON, no gzip);
- one 512x512 frame in the stored syntax (``transfer-syntax=*``) and decoded
  (``application/octet-stream``), and a radiograph's frame decoded;
- a thumbnail (kho: ``/thumbnail``; Orthanc: ``/rendered?viewport=128,128``, since its
  DICOMweb plugin has no thumbnail resource);
- a 256x256 tile of the radiograph (kho: ``/frames/1/tiles/0/x/y``; Orthanc:
  ``/frames/1/rendered?viewport=256,256,sx,sy,256,256``);
- ``/rendered`` JPEGs on both: a CT slice at full size and within 256 and 128 pixels, the
  radiograph within 256 pixels.

Before those, one client walks a quarter of the CT series once, slice after slice, on a
freshly started server, as decoded frames (the first quarter) and as ``/rendered`` JPEGs
(the last quarter): what a viewer's first scroll through a series costs, with kho's caches
empty (its read-ahead decoding the next slices beside the walk).  The later workloads
revisit slices, which kho's caches serve.  ``--runs N`` repeats everything with
fresh server processes; the table gives the median over runs of each run's median and the
range.  Also reported: the bytes each server stores for the corpus, and (in-process) the
decode time of one radiograph frame on 1, 2 and all threads and what its restart
intervals cost in compression.

Both servers run as child processes.  Orthanc 1.10 binds every interface, so the whole
benchmark runs in a private network namespace (``unshare -n``) whose only interface is
loopback.  Usage: ``python -m benchmarks.dicomweb [--slices 300] [--requests 400] [--runs 3]``.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from benchmarks.common import RESULTS_DIR, machine, summary, write_results
from benchmarks.common import cpu_seconds as common_cpu_seconds

ORTHANC_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
TARGETS_MS = {"series metadata": 30.0, "frame (stored)": 3.0, "thumbnail": 3.0, "tile 256": 10.0}
#: kho's median at most this times Orthanc's (issue 13), with kho storing <= 1/3 of the bytes
TARGET_RATIOS = {
    "CT first walk (octet-stream)": 0.8,
    "CT first walk (rendered)": 0.8,
    "frame (octet-stream)": 0.8,
    "radiograph frame (octet-stream)": 0.8,
    "real DX frame (octet-stream)": 0.8,
    "rendered CT": 0.8,
    "rendered CT 256": 0.3,
    "rendered CT 128": 0.3,
    "rendered radiograph 256": 0.3,
}
TARGET_STORED_RATIO = 1 / 3
#: requests per kind are divided by this for the radiograph's decoded frame (15 MB each)
RADIOGRAPH_DIVISOR = 4
STORED = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
DECODED = 'multipart/related; type="application/octet-stream"'


# --- data -------------------------------------------------------------------------------


def write_radiograph(path: Path, rows: int = 2500, cols: int = 3000, seed: int = 1) -> Path:
    """A 12-bit DX-like image: smooth anatomy-scale structure, edges and quantum noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    img = 1800 + 600 * np.sin(yy / 310.0) * np.cos(xx / 420.0)
    for _ in range(40):  # bones and soft-tissue blobs
        cy, cx = rng.uniform(0, rows), rng.uniform(0, cols)
        ry, rx = rng.uniform(40, 400), rng.uniform(40, 400)
        img += rng.uniform(-500, 900) * (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1)
    img += rng.normal(0, 18, size=img.shape).astype(np.float32)
    pixels = np.clip(img, 0, 4095).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "Bench^Radiograph", "BENCH-DX", "DX"
    ds.StudyDate, ds.SeriesNumber, ds.InstanceNumber = "20260101", 1, 1
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2000, 3000
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def real_dx() -> Path | None:
    """The real 2614x3072 DX of the PyPI package deid-data, if installed."""
    try:
        import deid_data  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    path = Path(deid_data.__file__).parent / "data" / "animals" / "cat.dcm"
    return path if path.exists() else None


def make_data(folder: Path, slices: int) -> tuple[list[Path], Path]:
    from kho.bench.phantom import write_ct_series

    ct = write_ct_series(folder / "ct", count=slices)
    return ct, write_radiograph(folder / "dx.dcm")


def tree_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder`` (what a server stores: objects and catalog)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# --- servers ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


_KHO_SERVER = """
import signal, sys, threading
from pathlib import Path
from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.viewer_api.server import HttpServer
archive = Archive(Settings(data_dir=Path(sys.argv[1]), fsync=False))
try:  # as `kho serve` does at start: numba kernels loaded before the first request
    from kho.archive.read.pixels import warm_up_codecs
    warm_up_codecs()
except ImportError:
    pass
server = HttpServer(
    archive, host="127.0.0.1", port=int(sys.argv[2]), reuse_port=sys.argv[3] == "1"
).start()
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
stop.wait()
server.stop()
archive.close()
"""


def ingest_kho(data_dir: Path, files: list[Path]) -> float:
    """Ingest and wait for the finisher; seconds taken."""
    from kho.archive.archive import Archive
    from kho.archive.config import Settings

    started = time.perf_counter()
    with Archive(Settings(data_dir=data_dir, fsync=False)) as archive:
        for path in files:
            archive.ingest_part10(path.read_bytes())
        # serve what a viewer finds once the archive has caught up: every instance encoded
        # at rest, with its thumbnail (and a tile pyramid for the radiograph), and no
        # finisher threads competing with the server for the cores
        finisher = getattr(archive, "finisher", None)
        if finisher is not None and not finisher.wait_idle(timeout=1800):
            raise RuntimeError("the finisher did not catch up within 30 minutes")
    return time.perf_counter() - started


def kho_stored_bytes(data_dir: Path) -> dict[str, int]:
    """The objects and catalog kho keeps; the ingest spool apart (its segments hold the
    received bytes until garbage collection deletes them, after a grace period, once every
    instance in them was moved to the object store)."""
    spool = data_dir / "spool"
    spooled = tree_bytes(spool) if spool.exists() else 0
    return {"kho": tree_bytes(data_dir) - spooled, "kho_spool_not_yet_collected": spooled}


def serve_kho(data_dir: Path, workers: int = 1) -> tuple[list[subprocess.Popen[bytes]], int]:
    """``workers`` server processes on one port (SO_REUSEPORT, as ``kho serve --workers N``)."""
    port = free_port()
    shared = "1" if workers > 1 else "0"
    procs = []
    for _ in range(workers):
        procs.append(
            subprocess.Popen([sys.executable, "-c", _KHO_SERVER, str(data_dir), str(port), shared])
        )
        wait_port(port, procs[-1])
    time.sleep(1.0 if workers > 1 else 0)  # every process listening, not just the first
    return procs, port


def start_kho(
    data_dir: Path, files: list[Path], workers: int = 1
) -> tuple[list[subprocess.Popen[bytes]], int, float]:
    """Ingest, wait for the finisher, then serve."""
    ingest_s = ingest_kho(data_dir, files)
    procs, port = serve_kho(data_dir, workers)
    return procs, port, ingest_s


def start_orthanc(work: Path, files: list[Path]) -> tuple[subprocess.Popen[bytes], int, float]:
    """Orthanc on a fresh port; the files are uploaded unless its storage holds them
    already (a later run's fresh process)."""
    port, dicom_port = free_port(), free_port()
    storage = work / "orthanc-storage"
    upload = not storage.exists()
    storage.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "bench",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": port,
        "DicomPort": dicom_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpThreadsCount": 16,
        "KeepAlive": True,
        "TcpNoDelay": True,
        "SaveJobs": False,
        "Plugins": [str(ORTHANC_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
    }
    config_path = work / "orthanc.json"
    config_path.write_text(json.dumps(config))
    log = open(work / "orthanc.log", "ab")  # noqa: SIM115 (lives as long as the process)
    proc = subprocess.Popen(
        [shutil.which("Orthanc") or "Orthanc", str(config_path)], stdout=log, stderr=log
    )
    wait_port(port, proc)
    started = time.perf_counter()
    if upload:
        conn = http.client.HTTPConnection("127.0.0.1", port)
        for path in files:
            conn.request("POST", "/instances", body=path.read_bytes())
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"Orthanc refused {path.name}: {response.status}")
        conn.close()
    return proc, port, time.perf_counter() - started


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- load -------------------------------------------------------------------------------

Request = tuple[str, dict[str, str]]


class LeanConnection:
    """A persistent HTTP/1.1 connection that does little more than the socket calls: GET,
    status line, headers, a Content-Length or chunked body read into one buffer.

    ``http.client`` spends about as much CPU per response as the server does on a frame
    (its header parser, buffered reads); on a machine with two cores the clients' CPU is
    part of what bounds the latency at eight clients, so the benchmark keeps it small.
    """

    def __init__(self, host: str, port: int, timeout: float = 120) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.sock: socket.socket | None = None
        self.buf = bytearray()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.buf = sock, bytearray()
        return sock

    def _fill(self, sock: socket.socket) -> None:
        chunk = sock.recv(262144)
        if not chunk:
            raise ConnectionError("server closed the connection mid-response")
        self.buf += chunk

    def _read(self, sock: socket.socket, n: int) -> memoryview:
        """Exactly ``n`` bytes (buffered ones first, then straight into one buffer)."""
        out = bytearray(n)
        view = memoryview(out)
        have = min(n, len(self.buf))
        view[:have] = self.buf[:have]
        del self.buf[:have]
        while have < n:
            got = sock.recv_into(view[have:])
            if not got:
                raise ConnectionError("server closed the connection mid-body")
            have += got
        return view

    def _line(self, sock: socket.socket) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            self._fill(sock)
        line = bytes(self.buf[:end])
        del self.buf[: end + 2]
        return line

    def get(self, path: str, headers: dict[str, str]) -> tuple[int, int]:
        """(status, body length) of ``GET path``."""
        sock = self.sock or self._connect()
        lines = [f"GET {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._fill(sock)
        head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        del self.buf[: end + 4]
        status = int(head[0].split(" ", 2)[1])
        fields: dict[str, str] = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        if "content-length" in fields:
            size = len(self._read(sock, int(fields["content-length"])))
        elif "chunked" in fields.get("transfer-encoding", "").lower():
            size = 0
            while (chunk := int(self._line(sock).split(b";")[0], 16)) > 0:
                size += len(self._read(sock, chunk + 2)) - 2  # data and its CRLF
            while self._line(sock):  # trailers up to the empty line
                pass
        else:  # the body runs to the end of the connection
            while data := sock.recv(262144):
                self.buf += data
            size, self.buf = len(self.buf), bytearray()
            fields["connection"] = "close"
        if fields.get("connection", "").lower() == "close":
            self.close()
        return status, size

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None


Connection = LeanConnection | http.client.HTTPConnection


def connect(port: int, client: str = "lean") -> Connection:
    if client == "http.client":
        return http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    return LeanConnection("127.0.0.1", port)


def fetch(conn: Connection, request: Request) -> tuple[int, int]:
    path, headers = request
    if isinstance(conn, LeanConnection):
        return conn.get(path, headers)
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    body = response.read()
    return response.status, len(body)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its reaped children (from /proc)."""
    return common_cpu_seconds(pid, reaped_children=True)


def _client(
    port: int,
    make: Callable[[int], Request],
    client: int,
    count: int,
    warmup: int,
    start: Any,
    out: Any,
    kind: str,
) -> None:
    """One viewer: its own process and persistent connection (a process, not a thread, so
    that eight clients are not serialised by one interpreter lock)."""
    conn = connect(port, kind)
    for i in range(warmup):
        fetch(conn, make(client * 7919 + i))
    start.wait()
    cpu0 = time.process_time()
    mine: list[float] = []
    statuses: dict[int, int] = {}
    sizes: list[int] = []
    for i in range(count):
        request = make(client * 7919 + warmup + i)
        started = time.perf_counter()
        status, size = fetch(conn, request)
        mine.append((time.perf_counter() - started) * 1000)
        statuses[status] = statuses.get(status, 0) + 1
        sizes.append(size)
    cpu = time.process_time() - cpu0
    conn.close()
    out.put((mine, statuses, sizes, cpu))


def measure(
    port: int,
    make: Callable[[int], Request],
    clients: int,
    total: int,
    warmup: int = 3,
    server_pids: list[int] | None = None,
    client: str = "lean",
) -> dict[str, Any]:
    """Latencies (ms) of ``total`` requests spread over ``clients`` processes, and the CPU
    time per request of the clients and of the server: on a small machine the clients
    share the cores with the server, and when the two together keep every core busy the
    latency at several clients is set by throughput, not by the server alone."""
    ctx = multiprocessing.get_context("fork")
    per_client = max(1, total // clients)
    start, out = ctx.Barrier(clients + 1, timeout=300), ctx.Queue()
    procs = [
        ctx.Process(target=_client, args=(port, make, c, per_client, warmup, start, out, client))
        for c in range(clients)
    ]
    for proc in procs:
        proc.start()
    start.wait()  # every client connected and warmed up
    server_cpu0 = sum(cpu_seconds(pid) for pid in server_pids) if server_pids else None
    started = time.perf_counter()
    results = [out.get(timeout=600) for _ in procs]
    wall = time.perf_counter() - started
    server_cpu = None
    if server_pids and server_cpu0 is not None:
        server_cpu = sum(cpu_seconds(pid) for pid in server_pids) - server_cpu0
    for proc in procs:
        proc.join()
    latencies = [v for r in results for v in r[0]]
    statuses: dict[int, int] = {}
    for r in results:
        for status, n in r[1].items():
            statuses[status] = statuses.get(status, 0) + n
    sizes = [v for r in results for v in r[2]]
    client_cpu = sum(r[3] for r in results)
    stats = summary(latencies)
    n = len(latencies)
    cores = os.cpu_count() or 1
    return {
        **{k: round(v, 3) if isinstance(v, float) else v for k, v in stats.items()},
        "throughput_rps": round(n / wall, 1),
        "statuses": statuses,
        "mean_bytes": int(sum(sizes) / max(1, len(sizes))),
        "client_cpu_ms_per_request": round(client_cpu * 1000 / n, 3),
        "server_cpu_ms_per_request": (
            round(server_cpu * 1000 / n, 3) if server_cpu is not None else None
        ),
        # share of all cores that the clients and the server kept busy (other work on the
        # machine comes on top of this)
        "cpu_busy": round((client_cpu + (server_cpu or 0)) / (wall * cores), 2),
    }


def first_request_ms(port: int, request: Request, client: str = "lean") -> dict[str, Any]:
    conn = connect(port, client)
    started = time.perf_counter()
    status, size = fetch(conn, request)
    conn.close()
    return {"ms": round((time.perf_counter() - started) * 1000, 3), "status": status, "bytes": size}


def workloads(server: str, ids: dict[str, Any]) -> dict[str, Callable[[int], Request]]:
    study, series, sops = ids["study"], ids["series"], ids["sops"]
    dx_study, dx_series, dx_sop = ids["dx"]
    root = "/dicom-web"
    series_url = f"{root}/studies/{study}/series/{series}"
    dx_instance = f"{root}/studies/{dx_study}/series/{dx_series}/instances/{dx_sop}"
    dx_frame = f"{dx_instance}/frames/1"
    tiles = [(x, y) for x in range(3000 // 256) for y in range(2500 // 256)]

    def instance(i: int) -> str:
        return f"{series_url}/instances/{sops[i % len(sops)]}"

    def tile(i: int) -> Request:
        x, y = tiles[i % len(tiles)]
        if server == "kho":
            return f"{dx_frame}/tiles/0/{x}/{y}", {"Accept": "image/jpeg"}
        viewport = f"256,256,{x * 256},{y * 256},256,256"
        return f"{dx_frame}/rendered?viewport={viewport}", {"Accept": "image/jpeg"}

    def thumbnail(i: int) -> Request:
        if server == "kho":
            return f"{instance(i)}/thumbnail", {"Accept": "image/jpeg"}
        return f"{instance(i)}/rendered?viewport=128,128", {"Accept": "image/jpeg"}

    json_accept = {"Accept": "application/dicom+json"}
    jpeg = {"Accept": "image/jpeg"}
    kinds: dict[str, Callable[[int], Request]] = {
        "series metadata": lambda i: (f"{series_url}/metadata", json_accept),
        "frame (stored)": lambda i: (f"{instance(i)}/frames/1", {"Accept": STORED}),
        "frame (octet-stream)": lambda i: (f"{instance(i)}/frames/1", {"Accept": DECODED}),
        "radiograph frame (octet-stream)": lambda i: (dx_frame, {"Accept": DECODED}),
    }
    if ids.get("real_dx"):
        real_study, real_series, real_sop = ids["real_dx"]
        real_frame = f"{root}/studies/{real_study}/series/{real_series}/instances/{real_sop}"
        kinds["real DX frame (octet-stream)"] = lambda i: (
            f"{real_frame}/frames/1",
            {"Accept": DECODED},
        )
    kinds.update(
        {
            "thumbnail": thumbnail,
            "tile 256": tile,
            "rendered CT": lambda i: (f"{instance(i)}/rendered", jpeg),
            "rendered CT 256": lambda i: (f"{instance(i)}/rendered?viewport=256,256", jpeg),
            "rendered CT 128": lambda i: (f"{instance(i)}/rendered?viewport=128,128", jpeg),
            "rendered radiograph 256": lambda i: (f"{dx_instance}/rendered?viewport=256,256", jpeg),
        }
    )
    return kinds


def first_walk(
    port: int, ids: dict[str, Any], kind: str = "decoded", client: str = "lean"
) -> dict[str, Any]:
    """One viewer's first scroll: each slice of the walk's part of the CT series, in order,
    once each, on one connection, as decoded frames (the first quarter) or ``/rendered``
    JPEGs (the last quarter)."""
    root = "/dicom-web"
    series_url = f"{root}/studies/{ids['study']}/series/{ids['series']}"
    conn = connect(port, client)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    sops = ids["walk"] if kind == "decoded" else ids["walk_rendered"]
    for sop in sops:
        if kind == "decoded":
            request = (f"{series_url}/instances/{sop}/frames/1", {"Accept": DECODED})
        else:
            request = (f"{series_url}/instances/{sop}/rendered", {"Accept": "image/jpeg"})
        started = time.perf_counter()
        status, _size = fetch(conn, request)
        latencies.append((time.perf_counter() - started) * 1000)
        statuses[status] = statuses.get(status, 0) + 1
    conn.close()
    stats = summary(latencies)
    return {
        **{k: round(v, 3) if isinstance(v, float) else v for k, v in stats.items()},
        "statuses": statuses,
    }


def bench_server(
    server: str,
    port: int,
    ids: dict[str, Any],
    total: int,
    clients_list: list[int],
    server_pids: list[int] | None = None,
    client: str = "lean",
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind, name in (
        ("decoded", "CT first walk (octet-stream)"),
        ("rendered", "CT first walk (rendered)"),
    ):
        walk = first_walk(port, ids, kind, client)
        out[name] = {"c1": walk}
        print(f"  {server:8} {name:32} c=1: median {walk['median']:.2f} ms", flush=True)
    for name, make in workloads(server, ids).items():
        out[name] = {"first": first_request_ms(port, make(10_000), client)}
        for clients in clients_list:
            count = total
            if name == "series metadata":
                count = max(20, total // 4)
            elif "frame (octet-stream)" in name and name != "frame (octet-stream)":
                count = max(2 * clients, total // RADIOGRAPH_DIVISOR)
            m = out[name][f"c{clients}"] = measure(
                port, make, clients, count, 3, server_pids, client
            )
            print(
                f"  {server:8} {name:32} c={clients}: median {m['median']:.2f} ms, "
                f"p95 {m['p95']:.2f} ms, {m['throughput_rps']} req/s, CPU/request: "
                f"server {m['server_cpu_ms_per_request']} ms, "
                f"clients {m['client_cpu_ms_per_request']} ms, cores busy {m['cpu_busy']}",
                flush=True,
            )
    return out


# --- decode threads and restart intervals (in-process) -----------------------------------


def decode_threads_report(files: dict[str, Path], repeats: int = 7) -> dict[str, Any]:
    """Per radiograph (and one CT slice): the at-rest stream's size with and without
    restart intervals, and its decode time (median of ``repeats``, alternating) on 1, 2 and
    all threads.  Where the kho under test has no threaded decoder, says so."""
    import pydicom

    from kho.codecs import jpegls

    threads_list = sorted({1, 2, os.cpu_count() or 1})
    out: dict[str, Any] = {"cores": os.cpu_count(), "threads": threads_list}
    if not hasattr(jpegls, "at_rest_restart_interval"):
        out["note"] = "this kho has no restart intervals nor threaded decoding"
        return out
    for name, path in files.items():
        ds = pydicom.dcmread(path)
        image = ds.pixel_array
        bits = int(ds.BitsStored)
        rows, cols = image.shape[:2]
        interval = jpegls.at_rest_restart_interval(rows, cols)
        plain = jpegls.encode(image, bits_stored=bits)
        banded = jpegls.encode(image, bits_stored=bits, restart_interval=interval)
        times: dict[int, list[float]] = {t: [] for t in threads_list}
        jpegls.decode(banded)
        for _ in range(repeats):
            for t in threads_list:
                started = time.perf_counter()
                jpegls.decode(banded, threads=t)
                times[t].append((time.perf_counter() - started) * 1000)
        out[name] = {
            "size": f"{rows}x{cols}",
            "bits_stored": bits,
            "restart_interval_lines": interval,
            "bands": -(-rows // interval) if interval else 1,
            "bytes_without_restarts": len(plain),
            "bytes_with_restarts": len(banded),
            "restart_cost_percent": round(100 * (len(banded) - len(plain)) / len(plain), 3),
            "compression_ratio": round(image.nbytes / len(banded), 3),
            "decode_ms_median": {
                str(t): round(sorted(v)[len(v) // 2], 1) for t, v in times.items()
            },
            "decode_ms_min": {str(t): round(min(v), 1) for t, v in times.items()},
        }
    return out


# --- several runs: medians and ranges ----------------------------------------------------


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per request kind and clients: the median over runs of each run's median, the range,
    and the CPU per request (median over runs)."""
    out: dict[str, Any] = {}
    for name in runs[0]:
        for key in runs[0][name]:
            if not key.startswith("c"):
                continue
            medians = [r[name][key]["median"] for r in runs if key in r.get(name, {})]
            cpu = [
                r[name][key].get("server_cpu_ms_per_request")
                for r in runs
                if r[name][key].get("server_cpu_ms_per_request") is not None
            ]
            ok = all(set(map(int, r[name][key]["statuses"])) == {200} for r in runs)
            firsts = [r[name]["first"]["ms"] for r in runs if "first" in r.get(name, {})]
            out.setdefault(name, {})[key] = {
                "median": statistics.median(medians),
                "range": [min(medians), max(medians)],
                "run_medians": medians,
                "server_cpu_ms_per_request": statistics.median(cpu) if cpu else None,
                "all_200": ok,
                # the kind's first request on a fresh server, per run
                "first_ms": firsts,
            }
    return out


def table(results: dict[str, Any], clients_list: list[int]) -> str:
    kho, orthanc = results["kho"], results.get("orthanc") or {}
    runs = results.get("runs", 1)
    lines = [
        f"Medians over {runs} run(s) of each run's median latency (range over runs in brackets); "
        "kho/Orthanc is the ratio of those medians (range: per-run ratios).",
        "",
        "| request | clients | kho ms | Orthanc ms | kho/Orthanc | target | met | "
        "kho server CPU ms/req | Orthanc server CPU ms/req | first request ms: kho / Orthanc |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in kho:
        for key in sorted(kho[name], key=lambda k: int(k[1:])):
            k = kho[name][key]
            o: dict[str, Any] = (orthanc.get(name) or {}).get(key) or {}
            o_ok = bool(o) and o["all_200"]
            ratio, ratio_range, met = "n/a", "", ""
            if o_ok and o["median"]:
                value = k["median"] / o["median"]
                pairs = zip(k["run_medians"], o["run_medians"], strict=False)
                per_run = [a / b for a, b in pairs if b]
                ratio = f"{value:.2f}"
                ratio_range = f" [{min(per_run):.2f}-{max(per_run):.2f}]" if per_run else ""
            target = TARGET_RATIOS.get(name)
            target_text = f"<= {target:g}x" if target else ""
            if name in TARGETS_MS:
                target_text += ("; " if target_text else "") + f"<= {TARGETS_MS[name]:g} ms"
            if target and ratio != "n/a":
                met = "yes" if float(ratio) <= target else "no"

            def ms(m: dict[str, Any]) -> str:
                low, high = m["range"]
                return f"{m['median']:.2f} [{low:.2f}-{high:.2f}]"

            def cpu(m: dict[str, Any] | None) -> str:
                value = (m or {}).get("server_cpu_ms_per_request")
                return "n/a" if value is None else f"{value:.2f}"

            first = ""
            if key == "c1" and k.get("first_ms"):
                first = f"{statistics.median(k['first_ms']):.1f}"
                if o.get("first_ms"):
                    first += f" / {statistics.median(o['first_ms']):.1f}"
            lines.append(
                f"| {name} | {key[1:]} | {ms(k) if k['all_200'] else 'errors'} | "
                f"{ms(o) if o_ok else 'n/a'} | {ratio}{ratio_range} | {target_text} | {met} | "
                f"{cpu(k)} | {cpu(o) if o_ok else 'n/a'} | {first} |"
            )
    stored = results.get("stored_bytes") or {}
    if stored.get("kho") and stored.get("orthanc"):
        share = stored["kho"] / stored["orthanc"]
        lines += [
            "",
            f"Stored bytes for the corpus ({results['data']['received_bytes']:,} bytes "
            f"received): kho {stored['kho']:,} (objects and catalog; plus "
            f"{stored.get('kho_spool_not_yet_collected', 0):,} in ingest spool segments that "
            f"garbage collection deletes later), Orthanc {stored['orthanc']:,} "
            f"(kho/Orthanc {share:.3f}; target <= {TARGET_STORED_RATIO:.3f}: "
            f"{'met' if share <= TARGET_STORED_RATIO else 'not met'}).",
        ]
    threads = results.get("decode_threads") or {}
    rows = [(n, v) for n, v in threads.items() if isinstance(v, dict)]
    if rows:
        lines += [
            "",
            f"Decode of one frame in process (ms: median of 7, fastest in brackets) on 1, 2 "
            f"and all ({threads['cores']}) threads, and what the at-rest restart intervals "
            "cost (other work on the machine takes cores from the threads):",
            "",
            "| image | size | bands | ms by threads | restart cost | ratio |",
            "|---|---|---|---|---|---|",
        ]
        for name, v in rows:
            by_threads = ", ".join(
                f"{t}: {ms} ({v['decode_ms_min'][t]})" for t, ms in v["decode_ms_median"].items()
            )
            lines.append(
                f"| {name} | {v['size']} | {v['bands']} | {by_threads} | "
                f"{v['restart_cost_percent']:.3f}% | {v['compression_ratio']} |"
            )
    load = results.get("load_average_at_start"), results.get("load_average_at_end")
    lines += [
        "",
        f"Machine: {results['machine']['cores']} cores ({results['machine']['cpu']}); "
        f"load average at start {_load(load[0])}, at end {_load(load[1])} "
        "(other work on the machine shares the cores). "
        f"kho: {results.get('kho_workers', 1)} server process(es), HTTP parsed by "
        f"{results.get('kho_http_parser', 'n/a')}; clients: {results.get('client', 'n/a')}; "
        f"{results.get('orthanc_version', '')}.",
        "",
        "Clients are separate processes (one persistent connection each) on the same "
        "cores as the server. Where clients plus server (plus the machine's other work, "
        "see the load average) keep the cores busy, the latency at 8 clients is bounded by "
        "throughput, about 8 / (requests per second). The 'CT first walk' rows are one "
        "client's first pass, slice after slice, over 70 slices no request touched before "
        "(decoded frames: the first quarter of the series; rendered: the last), on a "
        "freshly started server: nothing cached, kho's read-ahead decoding the next slices "
        "beside it. The other CT rows revisit the middle 150 slices 400 times (at 1 client "
        "each about 2.7 times), which kho then serves from its decoded-frame and "
        "rendered-image caches (memory bounded, 256 MiB each).",
    ]
    return "\n".join(lines)


def _load(value: Any) -> str:
    return "n/a" if not value else "/".join(f"{v:.1f}" for v in value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--requests", type=int, default=400, help="per request kind")
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--runs", type=int, default=1, help="fresh server processes each run")
    parser.add_argument("--no-orthanc", action="store_true")
    parser.add_argument(
        "--client",
        choices=["lean", "http.client"],
        default="lean",
        help="HTTP client of the load processes (lean: LeanConnection, less client CPU)",
    )
    parser.add_argument(
        "--kho-workers",
        type=int,
        default=1,
        help="kho server processes sharing the port (as kho serve --workers N)",
    )
    parser.add_argument("--results-name", default="dicomweb", help="results file stem")
    parser.add_argument("--no-netns", action="store_true", help="do not isolate the network")
    args = parser.parse_args(argv)
    use_orthanc = not args.no_orthanc and ORTHANC_PLUGIN.exists() and shutil.which("Orthanc")
    if use_orthanc and not args.no_netns and os.environ.get("KHO_BENCH_NETNS") != "1":
        # Orthanc binds all interfaces: give it a network with loopback only
        command = " ".join(
            [
                sys.executable,
                "-m",
                "benchmarks.dicomweb",
                *[f"'{a}'" for a in (argv or sys.argv[1:])],
            ]
        )
        os.execvp(
            "unshare",
            ["unshare", "-n", "sh", "-c", f"ip link set lo up && KHO_BENCH_NETNS=1 exec {command}"],
        )
    clients_list = [int(c) for c in args.clients.split(",")]
    random.seed(0)
    with tempfile.TemporaryDirectory(prefix="kho-dicomweb-") as tmp:
        work = Path(tmp)
        print("generating data ...", flush=True)
        ct, dx = make_data(work / "data", args.slices)
        real = real_dx()
        import pydicom

        first = pydicom.dcmread(ct[0], stop_before_pixels=True)
        dx_ds = pydicom.dcmread(dx, stop_before_pixels=True)
        sops = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in ct]
        quarter = len(sops) // 4
        ids: dict[str, Any] = {
            "study": first.StudyInstanceUID,
            "series": first.SeriesInstanceUID,
            "sops": sops[quarter : 3 * quarter],
            # first walks, clear of the read-ahead into (and out of) the middle half
            "walk": sops[: max(1, quarter - 5)],
            "walk_rendered": sops[3 * quarter + 5 :] or sops[-1:],
            "dx": (dx_ds.StudyInstanceUID, dx_ds.SeriesInstanceUID, dx_ds.SOPInstanceUID),
        }
        corpus = [*ct, dx]
        if real is not None:
            real_ds = pydicom.dcmread(real, stop_before_pixels=True)
            ids["real_dx"] = (
                real_ds.StudyInstanceUID,
                real_ds.SeriesInstanceUID,
                real_ds.SOPInstanceUID,
            )
            corpus.append(real)
        results: dict[str, Any] = {
            "machine": machine(),
            "data": {
                "ct_slices": len(ct),
                "ct_size": "512x512",
                "radiograph": "3000x2500",
                "real_dx": "deid-data cat.dcm 2614x3072" if real else None,
                "received_bytes": sum(p.stat().st_size for p in corpus),
            },
            "requests_per_kind": args.requests,
            "runs": args.runs,
            "clients": clients_list,
            "client": args.client,
            "kho_workers": args.kho_workers,
            # what uvicorn parses HTTP with in kho's server (kho.viewer_api.server)
            "kho_http_parser": "httptools" if importlib.util.find_spec("httptools") else "h11",
            "targets_ms_median": TARGETS_MS,
            "target_ratios": TARGET_RATIOS,
            # other work on the machine skews latencies: say how loaded it was
            "load_average_at_start": os.getloadavg(),
        }
        print("decode threads and restart intervals ...", flush=True)
        threads_files = {"CT slice": ct[len(ct) // 2], "radiograph 3000x2500": dx}
        if real is not None:
            threads_files["real DX 2614x3072"] = real
        results["decode_threads"] = decode_threads_report(threads_files)
        print("kho: ingest ...", flush=True)
        results["kho_ingest_until_finished_s"] = round(ingest_kho(work / "kho", corpus), 2)
        results["stored_bytes"] = kho_stored_bytes(work / "kho")
        oproc = None
        if use_orthanc:
            print("Orthanc: upload ...", flush=True)
            oproc, _oport, upload_s = start_orthanc(work, corpus)
            stop(oproc)
            results["orthanc_upload_s"] = round(upload_s, 2)
            results["orthanc_version"] = "Orthanc 1.10.1 + DICOMweb plugin 1.7 (Debian 12)"
            results["stored_bytes"]["orthanc"] = tree_bytes(work / "orthanc-storage")
        per_run: dict[str, list[dict[str, Any]]] = {"kho": [], "orthanc": []}
        for run in range(args.runs):
            print(f"run {run + 1} of {args.runs}: kho ...", flush=True)
            procs, port = serve_kho(work / "kho", args.kho_workers)
            try:
                per_run["kho"].append(
                    bench_server(
                        "kho",
                        port,
                        ids,
                        args.requests,
                        clients_list,
                        [p.pid for p in procs],
                        args.client,
                    )
                )
            finally:
                for proc in procs:
                    stop(proc)
            if use_orthanc:
                print(f"run {run + 1} of {args.runs}: Orthanc ...", flush=True)
                oproc, oport, _ = start_orthanc(work, corpus)
                try:
                    per_run["orthanc"].append(
                        bench_server(
                            "orthanc",
                            oport,
                            ids,
                            args.requests,
                            clients_list,
                            [oproc.pid],
                            args.client,
                        )
                    )
                finally:
                    stop(oproc)
        results["per_run"] = per_run
        results["kho"] = aggregate(per_run["kho"])
        if per_run["orthanc"]:
            results["orthanc"] = aggregate(per_run["orthanc"])
        results["load_average_at_end"] = os.getloadavg()
        results["table"] = table(results, clients_list)
    path = write_results(args.results_name, results)
    (RESULTS_DIR / f"{args.results_name}.md").write_text(results["table"] + "\n")
    print(results["table"])
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
