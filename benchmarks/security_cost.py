"""The cost of access control, tenants and the audit trail (issues 15 and 16), same run.

Each variant is a fresh `kho serve` (SQLite + filesystem, its default) on an empty data
directory:

  open          auth off, audit off: the archive before issues 15/16
  audit         auth off, audit on (kho serve's default on loopback)
  secured       auth on: the sender a registered AE of tenant hosp-a, HTTP requests with
                an API key of hosp-a (viewer), every instance in hosp-a's own catalog,
                audit on (every store's record committed with it, reads recorded)
  tls           as audit, over TLS: storescu +tls (the BCP 195 profile, +px) to the DICOM
                TLS port, HTTPS for the requests (certificates made for the run)

Per round and variant: a CT series (kho.bench.phantom) sent by dcmtk storescu over 4
associations (instances/s until the last acknowledgement), the finisher's queue waited
for, then --requests HTTP requests of each kind a viewer makes most (series metadata, a
stored frame, a thumbnail) with httpx on one keep-alive connection: medians.  Variants
take turns within each round, so the machine's drift weighs on all alike.  Reports
medians, ranges over rounds, ratios (ingest) and differences (ms) against ``open``.

Targets (issues 15 and 16): ingest >= 0.9x and DICOMweb medians within +0.3 ms (secured and
audit against open); tls is reported, without a target (issue 16 asks for the figure).

    python -m benchmarks.security_cost [--slices 150] [--rounds 3] [--requests 300]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import machine, summary, write_results
from benchmarks.ingest import kho_target, send
from tests.helpers import dcmtk
from tests.helpers.certs import Pki, make_pki

VARIANTS = ("open", "audit", "secured", "tls")
TENANT = "hosp-a"
STORED_FRAME = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


def variant_env(variant: str, pki: Pki | None = None, tls_port: int = 0) -> dict[str, str]:
    env = {"KHO_AUDIT": "false" if variant == "open" else "true"}
    if variant == "tls" and pki is not None:
        env["KHO_TLS_CERT_FILE"] = str(pki.server.cert)
        env["KHO_TLS_KEY_FILE"] = str(pki.server.key)
        env["KHO_TLS_CA_FILE"] = str(pki.ca.cert)
        env["KHO_DICOM_TLS_PORT"] = str(tls_port)
        env["KHO_HTTP_TLS"] = "true"
    if variant == "secured":
        env["KHO_AUTH"] = "on"
        env["KHO_TENANTS"] = json.dumps([TENANT])
        env["KHO_DICOM_PEERS"] = json.dumps(
            {"STORESCU": {"tenant": TENANT, "services": ["echo", "store"]}}
        )
    return env


def make_key(data_dir: Path, env: dict[str, str]) -> str:
    """An API key of hosp-a (viewer), made with `kho keys create` before the server runs."""
    data_dir.mkdir(parents=True, exist_ok=True)
    made = subprocess.run(
        [
            *(sys.executable, "-m", "kho.cli", "keys", "create", "--data-dir", str(data_dir)),
            *("--name", "bench", "--grant", f"viewer@{TENANT}"),
        ],
        env={**_base_env(), **env},
        capture_output=True,
        check=True,
        text=True,
    )
    return made.stdout.strip()


def _base_env() -> dict[str, str]:
    return dict(os.environ)


@contextmanager
def http_client(port: int, key: str | None, pki: Pki | None = None) -> Iterator[httpx.Client]:
    headers = {"X-API-Key": key} if key else {}
    scheme = "https" if pki is not None else "http"
    verify: Any = str(pki.ca.cert) if pki is not None else True
    with httpx.Client(
        base_url=f"{scheme}://localhost:{port}", headers=headers, timeout=60, verify=verify
    ) as client:
        yield client


def send_tls(port: int, files: list[Path], associations: int, pki: Pki) -> float:
    """As benchmarks.ingest.send, over TLS (anonymous client, kho's certificate verified)."""
    chunks = [files[i::associations] for i in range(associations)]
    options = ["+tla", "+cf", str(pki.ca.cert), "+px"]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [dcmtk.tool("storescu"), "-xe", "-aec", "KHO", *options, "localhost", str(port)]
            + [str(f) for f in chunk],
            env=dcmtk.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for chunk in chunks
    ]
    errors = []
    for proc in procs:
        _out, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            errors.append(err.decode(errors="replace")[-500:])
    if errors:
        raise RuntimeError(f"storescu +tls failed: {errors[0]}")
    return time.perf_counter() - start


def http_port_of(log: Path) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if "HTTP (DICOMweb) on http" in line:
                return int(line.rsplit(":", 1)[1].split("/")[0])
        time.sleep(0.1)
    raise TimeoutError("no HTTP port in the log")


def measure_http(client: httpx.Client, requests: int) -> dict[str, float]:
    """Median milliseconds of each kind over ``requests`` requests."""
    found = client.get("/dicom-web/instances", params={"limit": "1000"})
    found.raise_for_status()
    instances = found.json()
    middle = sorted(instances, key=lambda i: i["00200013"]["Value"][0])[len(instances) // 2]
    study = middle["0020000D"]["Value"][0]
    series = middle["0020000E"]["Value"][0]
    sop = middle["00080018"]["Value"][0]
    base = f"/dicom-web/studies/{study}/series/{series}"
    kinds = {
        "series metadata": (f"{base}/metadata", {"Accept": "application/dicom+json"}),
        "frame (stored)": (f"{base}/instances/{sop}/frames/1", {"Accept": STORED_FRAME}),
        "thumbnail": (f"{base}/instances/{sop}/thumbnail", {"Accept": "image/jpeg"}),
    }
    out = {}
    for name, (url, headers) in kinds.items():
        for _ in range(10):  # warm: caches, connection
            client.get(url, headers=headers).raise_for_status()
        times = []
        for _ in range(requests):
            start = time.perf_counter()
            response = client.get(url, headers=headers)
            times.append(time.perf_counter() - start)
            response.raise_for_status()
        out[name] = 1e3 * statistics.median(times)
    return out


def run_variant(
    variant: str, files: list[Path], work: Path, requests: int, pki: Pki
) -> dict[str, Any]:
    tls_port = dcmtk.free_port()
    env = variant_env(variant, pki, tls_port)
    data = work / "kho-data"
    key = make_key(data, env) if variant == "secured" else None
    tls = pki if variant == "tls" else None
    with kho_target(work, env) as (port, _pids):
        if tls is not None:
            seconds = send_tls(tls_port, files, 4, tls)
        else:
            seconds = send(port, files, 4, "KHO")
        http = http_port_of(work / f"serve-{port}.log")
        with http_client(http, key, tls) as client:
            # the finisher's queue: polled through the catalog file of the tenant
            tenant_file = f"catalog-{TENANT}.sqlite3" if variant == "secured" else "catalog.sqlite3"
            catalog = data / tenant_file
            _wait_unfinished(catalog)
            medians = measure_http(client, requests)
    return {"instances_per_s": len(files) / seconds, **medians}


def _wait_unfinished(catalog: Path, timeout_s: float = 600) -> None:
    import sqlite3

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with sqlite3.connect(catalog) as db:
            (left,) = db.execute("SELECT count(*) FROM unfinished").fetchone()
        if left == 0:
            return
        time.sleep(0.5)
    raise TimeoutError("the finisher did not catch up")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = parser.parse_args(argv)
    from kho.bench.phantom import write_ct_series

    results: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory(prefix="kho-security-cost-") as tmp:
        root = Path(tmp)
        files = write_ct_series(root / "corpus", args.slices)
        pki = make_pki(root / "pki")
        for round_number in range(args.rounds):
            for variant in args.variants:
                work = root / f"{variant}-{round_number}"
                work.mkdir()
                got = run_variant(variant, files, work, args.requests, pki)
                results[variant].append(got)
                print(f"round {round_number + 1} {variant}: {got}", flush=True)
    report: dict[str, Any] = {"machine": machine(), "slices": args.slices, "variants": {}}
    # what each variant adds: auth and tenants or the audit trail to the open archive; TLS
    # to the audited one (the same server but for the transport)
    baselines = {"audit": "open", "secured": "open", "tls": "audit"}
    for variant, runs in results.items():
        entry: dict[str, Any] = {}
        for measure in runs[0]:
            entry[measure] = summary([r[measure] for r in runs])
        base_name = baselines.get(variant)
        reference = results.get(base_name) if base_name else None
        if reference:
            ingest = statistics.median(r["instances_per_s"] for r in runs)
            base = statistics.median(r["instances_per_s"] for r in reference)
            entry[f"ingest_ratio_vs_{base_name}"] = ingest / base
            entry[f"ms_vs_{base_name}"] = {
                m: statistics.median(r[m] for r in runs)
                - statistics.median(r[m] for r in reference)
                for m in runs[0]
                if m != "instances_per_s"
            }
        report["variants"][variant] = entry
    path = write_results("security_cost", report)
    print(json.dumps(report["variants"], indent=2))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
