"""Concurrency, in the shape of Orthanc's own tests.

- Same study: many clients store the same study at once, again and again; the archive
  ends with exactly one study, its series and its instances, each stored once.
- Upload and delete: a few clients each store a study and delete it (HTTP DELETE, kho's
  data-retention rejection), round after round, all on the same study; each client's last
  step is a delete, so the archive must end empty: no study, series or instance, no
  rejected instance awaiting its purge, no object outside the garbage list.

    python -m benchmarks.soak.concurrency --engine both --clients 20 --uploads 5 --instances 50
    python -m benchmarks.soak.concurrency --delete --clients 5 --uploads 10 --instances 50
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from pydicom.uid import generate_uid

from benchmarks.common import machine
from benchmarks.soak import harness, report
from benchmarks.soak.crash import _settings, engine_env
from kho.archive.archive import Archive
from tests.helpers.dcmtk import free_port, wait_for_port
from tests.helpers.server import kho_serve


def _one_study(
    workdir: Path, instances: int, seed: int
) -> tuple[harness.Corpus, str, list[harness.Sent]]:
    """A study of one series of ``instances`` 64x64 CT slices (files): the corpus, its
    Study Instance UID, the instances."""
    corpus = harness.Corpus(workdir / "corpus", size=64)
    study, series = generate_uid(harness.ROOT + "."), generate_uid(harness.ROOT + ".")
    rng = np.random.default_rng(seed)
    study_files = [
        corpus.instance(study, series, n, rng.integers(0, 4096, (64, 64), dtype=np.uint16))
        for n in range(instances)
    ]
    return corpus, study, study_files


def _run_clients(client: Callable[[], None], clients: int) -> None:
    """``clients`` threads running ``client`` at once; back when all are done."""
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def run_same_study(
    engine: str, workdir: Path, *, clients: int = 20, uploads: int = 5, instances: int = 50
) -> dict[str, Any]:
    corpus, _study, study_files = _one_study(workdir, instances, seed=11)
    ledger = harness.Ledger()
    started = time.monotonic()
    with engine_env(engine, workdir) as env, kho_serve(workdir / "data", env=env) as (_p, port):

        def client() -> None:
            for _ in range(uploads):  # one association per upload of the whole study
                harness.dimse_sender(
                    port, corpus, ledger, threading.Event(), instances=study_files, timeout=60
                )

        _run_clients(client, clients)
        elapsed = time.monotonic() - started
        with Archive(_settings(workdir / "data", env)) as archive:
            drain = harness.wait_finished(archive)
            counts = archive.catalog.counts()
            store = harness.audit_store(archive)
            corrupt = harness.check_retrievable(archive, study_files)
            objects_live = store.objects - store.garbage
            referenced = sum(
                len(harness.referenced_keys(r)) for r in archive.catalog.iter_instances()
            )
    return {
        "engine": engine,
        "clients": clients,
        "uploads": uploads,
        "instances": instances,
        "stores_sent": clients * uploads * instances,
        "refused": ledger.refused,
        "unanswered": ledger.unanswered,
        "counts": counts,
        "objects": store.objects,
        "objects_not_garbage": objects_live,
        "objects_referenced": referenced,
        "orphans": store.orphans,
        "missing_objects": store.missing,
        "corrupt": corrupt,
        "upload_s": round(elapsed, 1),
        "finish_drain_s": round(drain, 2),
    }


def run_upload_delete(
    engine: str, workdir: Path, *, clients: int = 5, uploads: int = 10, instances: int = 50
) -> dict[str, Any]:
    """``clients`` threads, each ``uploads`` times: the study over one association, then
    ``DELETE /dicom-web/studies/{study}``; what is left when all are done."""
    corpus, study, study_files = _one_study(workdir, instances, seed=13)
    ledger = harness.Ledger()
    deletes: dict[str, int] = {}
    lock = threading.Lock()
    http_port = free_port()
    started = time.monotonic()
    with (
        engine_env(engine, workdir) as env,
        kho_serve(workdir / "data", env=env, args=("--http-port", str(http_port))) as (proc, port),
    ):
        wait_for_port(http_port, timeout=60, proc=proc)
        base = f"http://127.0.0.1:{http_port}/dicom-web"

        def client() -> None:
            with httpx.Client(base_url=base, timeout=120) as http:
                for _ in range(uploads):
                    harness.dimse_sender(
                        port, corpus, ledger, threading.Event(), instances=study_files, timeout=60
                    )
                    answer = http.delete(f"/studies/{study}")
                    with lock:  # 404: another client's delete emptied it first
                        key = str(answer.status_code)
                        deletes[key] = deletes.get(key, 0) + 1

        _run_clients(client, clients)
        elapsed = time.monotonic() - started
        with Archive(_settings(workdir / "data", env)) as archive:
            drain = harness.wait_finished(archive)
            archive.purge_rejected()
            counts = archive.catalog.counts()
            pending_purge = archive.catalog.fetchone(
                "SELECT COUNT(*) FROM rejected_instances WHERE purged_at = 0"
            )
            store = harness.audit_store(archive)
    return {
        "engine": engine,
        "clients": clients,
        "uploads": uploads,
        "instances": instances,
        "stores_sent": clients * uploads * instances,
        "refused": ledger.refused,
        "unanswered": ledger.unanswered,
        "deletes": deletes,
        "counts": counts,
        "rejected_pending_purge": int(pending_purge[0]) if pending_purge else 0,
        "objects": store.objects,
        "objects_outside_garbage": store.outside_garbage,
        "orphans": store.orphans,
        "missing_objects": store.missing,
        "run_s": round(elapsed, 1),
        "finish_drain_s": round(drain, 2),
    }


def ended_empty(outcome: dict[str, Any]) -> bool:
    counts = outcome["counts"]
    return (
        not counts.get("studies")
        and not counts.get("series")
        and not counts.get("instances")
        and not outcome["rejected_pending_purge"]
        and not outcome["refused"]
        and not outcome["unanswered"]
        and not outcome["orphans"]
        and not outcome["missing_objects"]
        and not outcome["objects_outside_garbage"]
        and set(outcome["deletes"]) <= {"200", "404"}
    )


def clean(outcome: dict[str, Any]) -> bool:
    counts = outcome["counts"]
    return (
        counts.get("studies") == 1
        and counts.get("series") == 1
        and counts.get("instances") == outcome["instances"]
        and not outcome["refused"]
        and not outcome["unanswered"]
        and not outcome["orphans"]
        and not outcome["missing_objects"]
        and not outcome["corrupt"]
        and outcome["objects_not_garbage"] <= outcome["objects_referenced"]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--uploads", type=int, default=5)
    parser.add_argument("--instances", type=int, default=50)
    parser.add_argument(
        "--delete", action="store_true", help="the upload-and-delete campaign instead"
    )
    parser.add_argument("--no-results", action="store_true")
    args = parser.parse_args(argv)
    if args.delete:
        return _campaign(args, run_upload_delete, ended_empty, "upload_delete", "upload-delete")
    return _campaign(args, run_same_study, clean, "concurrency", "concurrency")


def _campaign(
    args: argparse.Namespace,
    run: Callable[..., dict[str, Any]],
    verdict: Callable[[dict[str, Any]], bool],
    section: str,
    prefix: str,
) -> int:
    """``run`` on each engine asked for, judged by ``verdict`` (recorded as "clean"), and
    the outcomes merged into ``section`` of reliability.json."""
    outcomes = {}
    for engine in ["sqlite", "postgresql"] if args.engine == "both" else [args.engine]:
        workdir = Path(tempfile.mkdtemp(prefix=f"kho-{prefix}-{engine}-"))
        try:
            outcome = run(
                engine,
                workdir,
                clients=args.clients,
                uploads=args.uploads,
                instances=args.instances,
            )
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        outcome["clean"] = verdict(outcome)
        outcomes[engine] = outcome
        print(engine, outcome)
    if not args.no_results:
        previous = report.load().get(section, {}).get("runs", {})
        report.record(section, {"machine": machine(), "runs": {**previous, **outcomes}})
    return 0 if all(o["clean"] for o in outcomes.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
