"""Memory under sustained load (issue 20, item 4): ``kho serve`` takes C-STOREs on many
associations (each a modality sending a short series, then releasing and coming back)
while DICOMweb readers search and retrieve what arrived; its resident memory (the whole
process tree) is sampled throughout.  Flat means: after the warm-up (caches filling,
kernels compiled) the RSS trend over the rest of the run is near zero.

    python -m benchmarks.soak.memory --minutes 30 --associations 50 --readers 8

Reported: RSS after the warm-up, at the end and its maximum; the slope of a least-squares
line through the samples after the warm-up (MB per hour); stores acknowledged, refused and
unanswered; reads by kind and their failures.  Results go into
``benchmarks/results/reliability.json`` (section ``memory``).

The bounded caches (decoded frames, rendered images: 256 MB each) fill for as long as the
readers ask for frames not yet seen, which can take longer than any warm-up.  So each
sample also scrapes ``/metrics`` for the bytes they hold, and the figure that must be flat
is RSS minus those bytes: growth the caches do not account for.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from benchmarks.common import machine
from benchmarks.soak import harness, report
from benchmarks.soak.crash import engine_env
from tests.helpers.dcmtk import free_port, wait_for_port
from tests.helpers.server import kho_serve

#: instances one association sends before it releases (a short series)
SERIES_LENGTH = 20


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants (from /proc)."""
    total = 0
    for one in [pid, *_descendants(pid)]:
        try:
            for line in Path(f"/proc/{one}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def _descendants(pid: int) -> list[int]:
    found = []
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return []
    for child in map(int, children):
        found += [child, *_descendants(child)]
    return found


#: the gauges of kho.archive.metrics.CacheCollector the soak follows
CACHE_GAUGES = ("kho_decoded_frame_cache_bytes", "kho_rendered_cache_bytes")
#: and of kho.archive.metrics.HeapCollector (glibc only): memory in use vs kept free,
#: and SQLite's share of what is in use
HEAP_GAUGES = ("kho_malloc_in_use_bytes", "kho_malloc_free_bytes", "kho_sqlite_memory_bytes")


def cache_bytes(client: httpx.Client) -> dict[str, int] | None:
    """What the server's bounded caches hold, from its /metrics (None: no answer), and
    its C heap's figures where it reports them."""
    try:
        response = client.get("/metrics")
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    found = {}
    for line in response.text.splitlines():
        name, _, value = line.partition(" ")
        if name in CACHE_GAUGES or name in HEAP_GAUGES:
            found[name] = int(float(value))
    return found if all(name in found for name in CACHE_GAUGES) else None


def slope_mb_per_hour(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of (seconds, bytes) samples, in MB per hour."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_b = sum(b for _, b in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    if var == 0:
        return 0.0
    cov = sum((t - mean_t) * (b - mean_b) for t, b in samples)
    return cov / var * 3600 / 1e6


class Readers:
    """DICOMweb readers: QIDO of recent studies, then metadata, a frame and a rendered
    image of one of them, over and over."""

    def __init__(self, base: str, stop: threading.Event) -> None:
        self.base = base
        self.stop = stop
        self.counts: dict[str, int] = {}
        self.failures: dict[str, int] = {}
        self.lock = threading.Lock()

    def note(self, kind: str, response: httpx.Response | None) -> None:
        with self.lock:
            if response is not None and response.status_code == 200:
                self.counts[kind] = self.counts.get(kind, 0) + 1
            else:
                code = "error" if response is None else str(response.status_code)
                key = f"{kind} {code}"
                self.failures[key] = self.failures.get(key, 0) + 1

    def run(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.base, timeout=60) as client:
            while not self.stop.is_set():
                try:
                    found = client.get("/studies", params={"limit": "50"})
                except httpx.HTTPError:
                    self.note("qido", None)
                    time.sleep(0.5)
                    continue
                self.note("qido", found)
                studies = found.json() if found.status_code == 200 else []
                if not studies:
                    time.sleep(0.5)
                    continue
                study = rng.choice(studies)["0020000D"]["Value"][0]
                try:
                    metadata = client.get(f"/studies/{study}/metadata")
                    self.note("metadata", metadata)
                    if metadata.status_code != 200 or not metadata.json():
                        continue
                    item = rng.choice(metadata.json())
                    series = item["0020000E"]["Value"][0]
                    sop = item["00080018"]["Value"][0]
                    path = f"/studies/{study}/series/{series}/instances/{sop}"
                    frame = client.get(
                        f"{path}/frames/1",
                        headers={"Accept": 'multipart/related; type="application/octet-stream"'},
                    )
                    self.note("frame", frame)
                    self.note("rendered", client.get(f"{path}/rendered"))
                except httpx.HTTPError:
                    self.note("read", None)


def sender(
    port: int,
    corpus: harness.Corpus,
    ledger: harness.Ledger,
    stop: threading.Event,
    rate_per_s: float,
) -> None:
    """One modality: a short series per association, paced, until ``stop``."""
    pause = 1.0 / rate_per_s if rate_per_s > 0 else 0.0
    while not stop.is_set():
        ae = AE(ae_title="SOAKMEM")
        ae.add_requested_context(harness.CT, ExplicitVRLittleEndian)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        try:
            assoc = ae.associate("127.0.0.1", port, ae_title="KHO")
        except Exception:
            ledger.lost_answer()
            time.sleep(1)
            continue
        if not assoc.is_established:
            ledger.refuse("association")
            time.sleep(1)
            continue
        try:
            for _ in range(SERIES_LENGTH):
                if stop.is_set():
                    break
                sent = corpus.make()
                status = assoc.send_c_store(sent.path)
                if sent.path:
                    sent.path.unlink(missing_ok=True)
                if not ledger.record(sent, status):
                    break
                if pause:
                    time.sleep(pause)
        finally:
            if assoc.is_established:
                assoc.release()


def run(
    engine: str,
    workdir: Path,
    *,
    minutes: float,
    associations: int,
    readers: int,
    rate_per_s: float,
    warmup_s: float,
    sample_s: float = 5.0,
    serve_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    corpus = harness.Corpus(workdir / "corpus", size=64)
    ledger = harness.Ledger()
    stop = threading.Event()
    samples: list[tuple[float, int]] = []
    caches: list[tuple[float, dict[str, int]]] = []  # at the same times, where /metrics answered
    http_port = free_port()
    with (
        engine_env(engine, workdir) as env,
        kho_serve(
            workdir / "data", env={**env, **(serve_env or {})}, args=("--http-port", str(http_port))
        ) as (proc, port),
    ):
        wait_for_port(http_port, timeout=60, proc=proc)
        reading = Readers(f"http://127.0.0.1:{http_port}/dicom-web", stop)
        threads = [
            threading.Thread(target=sender, args=(port, corpus, ledger, stop, rate_per_s))
            for _ in range(associations)
        ] + [threading.Thread(target=reading.run, args=(seed,)) for seed in range(readers)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        deadline = started + minutes * 60
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as scraper:
            while time.monotonic() < deadline and proc.poll() is None:
                at = time.monotonic() - started
                samples.append((at, rss_bytes(proc.pid)))
                held = cache_bytes(scraper)
                if held is not None:
                    caches.append((at, held))
                time.sleep(sample_s)
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
        elapsed = time.monotonic() - started
        alive = proc.poll() is None
    steady = [(t, b) for t, b in samples if t >= warmup_s]
    after_warmup = steady[0][1] if steady else 0
    rss_at = dict(samples)
    cache_at = dict(caches)
    held_at = {t: sum(held[name] for name in CACHE_GAUGES) for t, held in caches}
    steady_caches = [(t, held_at[t]) for t, _ in caches if t >= warmup_s]
    beyond_caches = [(t, rss_at[t] - held) for t, held in steady_caches]
    by_cache = {
        name: [(t, held[name]) for t, held in caches if t >= warmup_s] for name in CACHE_GAUGES
    }
    return {
        "engine": engine,
        "minutes": round(elapsed / 60, 1),
        "associations": associations,
        "readers": readers,
        "rate_per_association": rate_per_s,
        "server_alive_at_end": alive,
        "stores_acknowledged": len(ledger.acked),
        "stores_refused": ledger.refused,
        "stores_unanswered": ledger.unanswered,
        "reads": reading.counts,
        "read_failures": reading.failures,
        "rss_mb_after_warmup": round(after_warmup / 1e6, 1),
        "rss_mb_end": round(samples[-1][1] / 1e6, 1) if samples else 0,
        "rss_mb_max": round(max(b for _, b in samples) / 1e6, 1) if samples else 0,
        "rss_slope_mb_per_hour": round(slope_mb_per_hour(steady), 1),
        "cache_samples": len(caches),
        "caches_mb_after_warmup": {
            name: round(series[0][1] / 1e6, 1) if series else None
            for name, series in by_cache.items()
        },
        "caches_mb_end": {
            name: round(series[-1][1] / 1e6, 1) if series else None
            for name, series in by_cache.items()
        },
        "caches_slope_mb_per_hour": round(slope_mb_per_hour(steady_caches), 1),
        "rss_minus_caches_mb_after_warmup": (
            round(beyond_caches[0][1] / 1e6, 1) if beyond_caches else None
        ),
        "rss_minus_caches_mb_end": round(beyond_caches[-1][1] / 1e6, 1) if beyond_caches else None,
        "rss_minus_caches_slope_mb_per_hour": round(slope_mb_per_hour(beyond_caches), 1),
        # glibc's figures: in use flat and free rising is the allocator keeping memory
        **{
            f"{name.removeprefix('kho_').removesuffix('_bytes')}_mb_{when}": value
            for name in HEAP_GAUGES
            for when, value in _ends(
                [(t, h[name]) for t, h in caches if name in h and t >= warmup_s]
            )
        },
        **{
            f"{name.removeprefix('kho_').removesuffix('_bytes')}_slope_mb_per_hour": round(
                slope_mb_per_hour([(t, h[name]) for t, h in caches if name in h and t >= warmup_s]),
                1,
            )
            for name in HEAP_GAUGES
        },
        "serve_env": serve_env or {},
        "warmup_s": warmup_s,
        # (seconds, RSS MB, decoded-frame cache MB, rendered cache MB, malloc in use MB,
        # malloc free MB, SQLite MB); None: no scrape (or, for the last three, not glibc
        # or no SQLite library to read)
        "samples": [
            (
                round(t),
                round(b / 1e6, 1),
                *(
                    [
                        round(cache_at[t][name] / 1e6, 1) if name in cache_at[t] else None
                        for name in (*CACHE_GAUGES, *HEAP_GAUGES)
                    ]
                    if t in cache_at
                    else [None] * (len(CACHE_GAUGES) + len(HEAP_GAUGES))
                ),
            )
            for t, b in samples
        ],
    }


def _ends(series: list[tuple[float, int]]) -> list[tuple[str, float | None]]:
    """The first and last value of a series, in MB (None: no sample)."""
    if not series:
        return [("after_warmup", None), ("end", None)]
    return [("after_warmup", round(series[0][1] / 1e6, 1)), ("end", round(series[-1][1] / 1e6, 1))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--associations", type=int, default=50)
    parser.add_argument("--readers", type=int, default=8)
    parser.add_argument(
        "--rate", type=float, default=2.0, help="C-STOREs per second per association"
    )
    parser.add_argument("--warmup", type=float, default=120.0, help="seconds before the trend")
    parser.add_argument(
        "--serve-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for kho serve (A/B runs, e.g. KHO_TUNE_ALLOCATOR=false)",
    )
    parser.add_argument(
        "--label", default="", help="results key suffix (memory-<engine>[-<label>])"
    )
    parser.add_argument("--no-results", action="store_true")
    args = parser.parse_args(argv)
    serve_env = dict(item.split("=", 1) for item in args.serve_env)
    with tempfile.TemporaryDirectory(prefix="kho-soak-memory-") as tmp:
        outcome = run(
            args.engine,
            Path(tmp),
            minutes=args.minutes,
            associations=args.associations,
            readers=args.readers,
            rate_per_s=args.rate,
            warmup_s=args.warmup,
            serve_env=serve_env,
        )
    summary = {k: v for k, v in outcome.items() if k != "samples"}
    print(summary)
    if not args.no_results:
        key = f"memory-{args.engine}" + (f"-{args.label}" if args.label else "")
        report.record(key, {"machine": machine(), **outcome})
    flat = outcome["server_alive_at_end"] and not outcome["stores_unanswered"]
    return 0 if flat else 1


if __name__ == "__main__":
    raise SystemExit(main())
