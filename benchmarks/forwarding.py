"""Forwarding (issue 19): throughput to a local dcmtk storescp against storescu sending the
same files directly, and last-slice-to-destination latency of a series forwarded as it
arrives.  Same run, same machine, rounds alternating.

throughput   A CT series (kho.bench.phantom, 512x512, 12 bits) is stored in kho (SQLite,
             filesystem; ``as-received``: waiting for the finisher in the spool, as just
             after a modality sent it (the finisher is stopped, so they stay so while
             measured); ``at-rest``: encoded JPEG-LS, so each forwarded instance is
             rebuilt bit for bit from its header and frames: a JPEG-LS decode each).
             ``kho routes send``'s path (Router.send) queues the study for a storescp;
             timed from the queuing to the last file written by storescp.  The reference:
             dcmtk storescu sending the same files from disk over one association.
             Forwarding uses one association too (``concurrency`` 1), then 2.
latency      storescu sends a series to kho's DICOM port (DicomServer in this process, the
             router's rows committed with each instance, a per-instance rule to a
             storescp); the time from storescu's exit (its last slice acknowledged) to the
             destination holding every slice.

Target (issue 19): forwarding throughput >= 0.8x storescu's.  Reported: medians, and
best-of-rounds ratios (on a shared machine the medians measure the neighbours too).

    python -m benchmarks.forwarding [--slices 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydicom import dcmread

from benchmarks.common import machine, write_results
from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.routing import Router, RoutingConfig
from tests.helpers import dcmtk


def wait_for_files(folder: Path, count: int, timeout: float = 600.0) -> float:
    """Seconds until ``folder`` holds ``count`` files (polled every millisecond or so)."""
    start = time.perf_counter()
    deadline = start + timeout
    while time.perf_counter() < deadline:
        try:
            if len(os.listdir(folder)) >= count:
                return time.perf_counter() - start
        except FileNotFoundError:
            pass
        time.sleep(0.001)
    raise TimeoutError(f"{folder} did not receive {count} files")


@contextmanager
def storescp(work: Path, name: str) -> Iterator[dcmtk.StoreSCP]:
    with dcmtk.run_storescp(work / name) as scp:
        yield scp


def direct(work: Path, files: list[Path], round_number: int) -> float:
    with storescp(work, f"direct-{round_number}") as scp:
        start = time.perf_counter()
        done = dcmtk.storescu(scp.port, files, aec=scp.ae_title, proposal="-xe", timeout=600)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-500:])
        elapsed = time.perf_counter() - start
        wait_for_files(scp.folder, len(files))
    shutil.rmtree(scp.folder, ignore_errors=True)  # what storescp wrote: out of the way
    return elapsed


def stored_archive(work: Path, files: list[Path], *, at_rest: bool) -> tuple[Archive, str]:
    settings = Settings(data_dir=work / ("at-rest" if at_rest else "as-received"))
    archive = Archive(settings)
    archive.derivers = []  # thumbnails and metadata are not what is measured
    for path in files:
        archive.ingest_part10(path.read_bytes(), defer=not at_rest)
    # a deferred ingest wakes the finisher, which would encode the instances at rest
    # (and take a core) while they are measured "as received"
    archive.finisher.stop()
    study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    return archive, study


def forward(
    work: Path, archive: Archive, study: str, count: int, concurrency: int, label: str
) -> float:
    with storescp(work, label) as scp:
        config = RoutingConfig(
            destinations={
                "scp": {
                    "url": f"dicom://{scp.ae_title}@127.0.0.1:{scp.port}",
                    "concurrency": concurrency,
                    "batch": max(1, count // concurrency),
                }
            },
            threads=max(2, concurrency),
        )
        with Router(archive, config) as router:
            start = time.perf_counter()
            router.send(archive.tenant, "scp", study_uid=study)
            wait_for_files(scp.folder, count)
            elapsed = time.perf_counter() - start
    shutil.rmtree(scp.folder, ignore_errors=True)
    return elapsed


def latency(work: Path, files: list[Path], round_number: int) -> dict[str, float]:
    """storescu -> kho (forwarding each instance as it is stored) -> storescp."""
    from kho.dicom_scp.server import DicomServer

    settings = Settings(data_dir=work / f"latency-{round_number}", dicom_port=0, http_port=0)
    with Archive(settings) as archive, storescp(work, f"latency-dest-{round_number}") as scp:
        config = RoutingConfig(
            rules=[{"name": "ai", "destination": "scp"}],
            destinations={"scp": {"url": f"dicom://{scp.ae_title}@127.0.0.1:{scp.port}"}},
        )
        archive.finisher.start()
        with Router(archive, config) as router:
            server = DicomServer(archive).start()
            # what the lead wires in the door: the router's rows with each instance
            server.door.stored_rows = lambda session: router.stored_rows(  # type: ignore[method-assign]
                session.caller, session.archive.tenant, "C-STORE", "STORESCU"
            )
            try:
                start = time.perf_counter()
                done = dcmtk.storescu(server.port, files, proposal="-xe", timeout=600)
                sent = time.perf_counter() - start
                if done.returncode != 0:
                    raise RuntimeError(done.stderr[-500:])
                tail = wait_for_files(scp.folder, len(files))
            finally:
                server.stop()
        archive.finisher.stop()
        shutil.rmtree(scp.folder, ignore_errors=True)
    return {"storescu_s": sent, "last_slice_to_destination_s": tail, "total_s": sent + tail}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--results-name", default="forwarding")
    args = parser.parse_args(argv)
    from kho.bench.phantom import write_ct_series

    results: dict[str, Any] = {"direct": [], "latency": []}
    with tempfile.TemporaryDirectory(prefix="kho-forwarding-") as tmp:
        work = Path(tmp)
        files = sorted(write_ct_series(work / "series", args.slices))
        size = sum(p.stat().st_size for p in files)
        archives = {
            "as-received": stored_archive(work, files, at_rest=False),
            "at-rest": stored_archive(work, files, at_rest=True),
        }
        try:
            for round_number in range(args.rounds):
                results["direct"].append(direct(work, files, round_number))
                for name, (archive, study) in archives.items():
                    for concurrency in (1, 2):
                        key = f"{name}-c{concurrency}"
                        elapsed = forward(
                            work,
                            archive,
                            study,
                            len(files),
                            concurrency,
                            f"{key}-{round_number}",
                        )
                        results.setdefault(key, []).append(elapsed)
                results["latency"].append(latency(work, files, round_number))
        finally:
            for archive, _study in archives.values():
                archive.close()
    direct_s = statistics.median(results["direct"])
    direct_best = min(results["direct"])
    summary: dict[str, Any] = {
        "storescu_direct": {
            "seconds": direct_s,
            "best_seconds": direct_best,
            "instances_per_s": args.slices / direct_s,
            "mb_per_s": size / direct_s / 1e6,
        }
    }
    for key, values in results.items():
        if key in ("direct", "latency"):
            continue
        seconds = statistics.median(values)
        summary[f"forward_{key}"] = {
            "seconds": seconds,
            "best_seconds": min(values),
            "instances_per_s": args.slices / seconds,
            "mb_per_s": size / seconds / 1e6,
            "ratio_to_storescu": direct_s / seconds,
            # best of the rounds against storescu's best: on a busy machine the medians
            # measure the neighbours as much as the two senders
            "best_ratio_to_storescu": direct_best / min(values),
        }
    latencies = [r["last_slice_to_destination_s"] for r in results["latency"]]
    summary["latency"] = {
        "last_slice_to_destination_s_median": statistics.median(latencies),
        "last_slice_to_destination_s_max": max(latencies),
        "storescu_to_kho_s_median": statistics.median(r["storescu_s"] for r in results["latency"]),
    }
    payload = {
        "benchmark": "forwarding",
        "machine": machine(),
        "slices": args.slices,
        "bytes": size,
        "rounds": args.rounds,
        "summary": summary,
        "raw": results,
    }
    path = write_results(args.results_name, payload)
    print(f"machine: {payload['machine']['cpu']} x{payload['machine']['cores']}")
    for key, item in summary.items():
        print(key, {k: round(v, 3) for k, v in item.items()})
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
