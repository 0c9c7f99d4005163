"""Full disk: ``kho serve`` with its data directory (objects and spool), or its SQLite
catalog alone, on a small real filesystem (a size-limited tmpfs this script mounts; root
needed).  Stores go on until the filesystem is full; then:

- DIMSE C-STORE answers 0xA700 (out of resources) and STOW-RS 507 (Insufficient Storage;
  PS3.18 names 0xA700's HTTP twin so), not a crash and not a success;
- nothing half-written is visible: every catalogued instance reads back intact, nothing
  refused is catalogued, no object or temporary file is left that nothing refers to;
- once space is freed (a ballast file the run wrote first is deleted) stores succeed
  again, without restarting kho, and the finisher drains.

    python -m benchmarks.soak.disk --where data --size-mb 48
    python -m benchmarks.soak.disk --where catalog --size-mb 3
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import machine
from benchmarks.soak import harness, report
from kho.archive.archive import Archive
from kho.archive.config import Settings
from tests.helpers.dcmtk import free_port, wait_for_port
from tests.helpers.server import kho_serve


@contextlib.contextmanager
def small_filesystem(mount_point: Path, size_mb: int) -> Iterator[Path]:
    """A tmpfs of ``size_mb`` MiB at ``mount_point``, unmounted on exit."""
    mount_point.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mount_point)],
        check=True,
    )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _store_one(port: int, sent: harness.Sent, ledger: harness.Ledger) -> str:
    before = dict(ledger.refused)
    acked_before = len(ledger.acked)
    harness.dimse_sender(port, None, ledger, threading.Event(), instances=[sent])  # type: ignore[arg-type]
    if len(ledger.acked) > acked_before:
        return "0x0000"
    for status, count in ledger.refused.items():
        if before.get(status, 0) < count:
            return status
    return "no answer"


def run_full_disk(
    workdir: Path,
    *,
    where: str = "data",
    size_mb: int = 48,
    ballast_mb: int = 8,
    pixels: int = 512,
    max_instances: int = 2000,
    drain_timeout: float = 120.0,
    garbage_delay_s: float | None = None,
) -> dict[str, Any]:
    """Fill the data (or catalog) filesystem through kho serve; the outcome as a dict.
    ``garbage_delay_s``: kho's (None: its default, 60 s), which paces how soon finished
    instances' received bytes are freed."""
    corpus = harness.Corpus(workdir / "corpus", size=pixels, per_study=50)
    ledger = harness.Ledger()
    outcome: dict[str, Any] = {"where": where, "size_mb": size_mb, "pixels": pixels}
    started = time.monotonic()
    # the data directory is the mount point itself: kho serve's log (beside it) stays out
    mount_point = workdir / ("data" if where == "data" else "catalog")
    with small_filesystem(mount_point, size_mb) as small:
        env: dict[str, str] = {}
        if garbage_delay_s is not None:
            env["KHO_GARBAGE_DELAY_S"] = str(garbage_delay_s)
        if where == "data":
            data_dir = small
        else:
            data_dir = workdir / "data"
            env["KHO_CATALOG_URL"] = f"sqlite:///{small / 'catalog.sqlite'}"
        ballast = small / "ballast"
        ballast.write_bytes(b"\0" * (ballast_mb << 20))
        http_port = free_port()
        with kho_serve(data_dir, env=env, args=("--http-port", str(http_port))) as (proc, port):
            wait_for_port(http_port, timeout=60, proc=proc)
            base = f"http://127.0.0.1:{http_port}"
            statuses: dict[str, int] = {}
            refused: list[harness.Sent] = []
            # fill: one instance per association keeps the count exact
            for _ in range(max_instances):
                sent = corpus.make()
                status = _store_one(port, sent, ledger)
                statuses[status] = statuses.get(status, 0) + 1
                if status != "0x0000":
                    refused.append(sent)
                    if len(refused) >= 3:
                        break
            outcome["stored_before_full"] = len(ledger.acked)
            outcome["dimse_statuses_when_full"] = sorted({s for s in statuses if s != "0x0000"})
            with httpx.Client(timeout=30) as client:
                extra = corpus.make(to_file=False)
                response = harness.stow(client, base, [extra.data])
                outcome["stow_status_when_full"] = response.status_code
                if response.status_code in (200, 202):
                    ledger.ack(extra)
                else:
                    refused.append(extra)
                outcome["server_alive_when_full"] = proc.poll() is None
                with Archive(_settings(data_dir, env)) as checker:
                    present = harness.catalogued(checker)
                    outcome["refused_but_catalogued"] = [
                        s.sop_uid for s in refused if s.sop_uid in present
                    ]
                    outcome["lost_when_full"] = [s for s in ledger.acked if s not in present]
                    # free the space; kho goes on without a restart
                    ballast.unlink()
                    after: dict[str, int] = {}
                    for _ in range(5):
                        status = _store_one(port, corpus.make(), ledger)
                        after[status] = after.get(status, 0) + 1
                    freed = corpus.make(to_file=False)
                    response = harness.stow(client, base, [freed.data])
                    if response.status_code == 200:
                        ledger.ack(freed)
                    outcome["dimse_statuses_after_freeing"] = after
                    outcome["stow_status_after_freeing"] = response.status_code
                    try:
                        outcome["finish_drain_s"] = round(
                            harness.wait_finished(checker, drain_timeout), 2
                        )
                        outcome["finisher_stalled"] = ""
                    except AssertionError as exc:  # a finding: say how full it was
                        free = shutil.disk_usage(small).free
                        outcome["finisher_stalled"] = f"{exc} ({free >> 10} KiB free)"
                    outcome["lost"] = [
                        s for s in ledger.acked if s not in harness.catalogued(checker)
                    ]
                    outcome["corrupt"] = harness.check_retrievable(checker, ledger.acked.values())
                    outcome["corrupt"] += [f"{r.sop_uid}: {p}" for r, p in checker.verify() if p]
                    store = harness.audit_store(checker)
                    outcome["missing_objects"] = store.missing
                    outcome["orphans"] = store.orphans
    outcome["acknowledged"] = len(ledger.acked)
    outcome["duration_s"] = round(time.monotonic() - started, 1)
    return outcome


def _settings(data_dir: Path, env: dict[str, str]) -> Settings:
    return Settings(data_dir=data_dir, catalog_url=env.get("KHO_CATALOG_URL", ""))


def clean(outcome: dict[str, Any]) -> bool:
    return (
        outcome["dimse_statuses_when_full"] == ["0xA700"]
        and outcome["stow_status_when_full"] == 507
        and outcome["server_alive_when_full"]
        and not outcome["refused_but_catalogued"]
        and not outcome["lost"]
        and not outcome["corrupt"]
        and not outcome["missing_objects"]
        and not outcome["orphans"]
        and outcome["dimse_statuses_after_freeing"] == {"0x0000": 5}
        and outcome["stow_status_after_freeing"] == 200
        and not outcome["finisher_stalled"]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--where", choices=["data", "catalog", "both"], default="both")
    parser.add_argument("--size-mb", type=int, default=0, help="default: 48 data, 3 catalog")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--no-results", action="store_true")
    args = parser.parse_args(argv)
    outcomes = {}
    for where in ["data", "catalog"] if args.where == "both" else [args.where]:
        workdir = Path(tempfile.mkdtemp(prefix=f"kho-disk-{where}-", dir=args.workdir))
        size = args.size_mb or (48 if where == "data" else 3)
        try:
            outcomes[where] = run_full_disk(
                workdir,
                where=where,
                size_mb=size,
                ballast_mb=8 if where == "data" else 1,
                pixels=512 if where == "data" else 16,
            )
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        outcomes[where]["clean"] = clean(outcomes[where])
        print(where, outcomes[where])
    if not args.no_results:
        previous = report.load().get("full_disk", {}).get("runs", {})
        report.record("full_disk", {"machine": machine(), "runs": {**previous, **outcomes}})
    return 0 if all(o["clean"] for o in outcomes.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
