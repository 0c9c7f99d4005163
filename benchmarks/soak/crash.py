"""Crash campaign: SIGKILL ``kho serve`` at random moments during ingest, restart it,
check that nothing acknowledged was lost and nothing is left over; repeat.

    python -m benchmarks.soak.crash --engine sqlite --kills 1000
    python -m benchmarks.soak.crash --engine postgresql --kills 100 --associations 4

Each cycle: ``kho serve`` starts (its start-up recovery runs), the previous cycle's checks
run against it while it is idle, then ``--associations`` DIMSE associations and
``--stow`` STOW-RS clients send new instances until a random moment (``--window``
seconds) when the server gets SIGKILL.  The checks after each restart:

- the finisher resumes: the unfinished queue drains to 0;
- every instance acknowledged so far is catalogued; those of the cycle before are read
  back through the archive, SHA-256 of the Part 10 against the row's, dataset against what
  was sent (all of them again at the end);
- no row points at a missing object, and no object (or temporary file) is left that no
  row, pending ingest or garbage entry refers to;
- every acknowledged instance has its audit record (``kho serve`` has the trail on).

The two-way store audit (rows against objects) lists every object, so its cost grows with
the archive; ``--audit-every N`` runs it after every Nth restart and the last.  Nothing
deletes an object that no row or journal names, and a missing object does not come back,
so what any kill left is still there for the next audit to see.

PostgreSQL + S3: a fresh database on the local server (tests/helpers/postgres.py) and a
SeaweedFS started for the run (tests/helpers/seaweedfs.py).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pynetdicom import _config

from benchmarks.common import machine
from benchmarks.soak import harness, report
from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.archive.finish.finisher import reclaim_spool, spool_segments_in_use
from tests.helpers.dcmtk import free_port, wait_for_port
from tests.helpers.server import kho_serve


@dataclass
class CrashResult:
    engine: str
    kills: int = 0
    kills_mid_ingest: int = 0  # kills with at least one store still unanswered
    acknowledged: int = 0
    acknowledged_dimse: int = 0
    acknowledged_stow: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    unanswered: int = 0
    catalogued: int = 0
    lost: list[str] = field(default_factory=list)  # acknowledged, not catalogued
    corrupt: list[str] = field(default_factory=list)  # catalogued, wrong bytes
    missing_objects: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    # unreferenced in a check's listing, deleted by its second look: garbage the server
    # collected meanwhile (not orphans; counted to show the check is not blind to them)
    collected_during_check: int = 0
    store_audits: int = 0  # two-way store audits run (after every --audit-every restart)
    unaudited: list[str] = field(default_factory=list)
    finisher_stalls: list[str] = field(default_factory=list)  # queue not drained in 120 s
    max_finish_drain_s: float = 0.0
    max_restart_s: float = 0.0
    leftover_spool_segments: int = 0  # after a forced reclaim, referenced by nothing
    duration_s: float = 0.0
    seconds_per_kill: float = 0.0
    # where the run's time went: restart, drain, each check, ingest (seconds, summed)
    phase_s: dict[str, float] = field(default_factory=dict)

    def timed(self, phase: str, since: float) -> float:
        now = time.monotonic()
        self.phase_s[phase] = round(self.phase_s.get(phase, 0.0) + now - since, 2)
        return now

    @property
    def clean(self) -> bool:
        return not (
            self.leftover_spool_segments
            or self.finisher_stalls
            or self.lost
            or self.corrupt
            or self.missing_objects
            or self.orphans
            or self.unaudited
        )


@contextlib.contextmanager
def engine_env(engine: str, workdir: Path) -> Iterator[dict[str, str]]:
    """KHO_* environment of ``kho serve`` (and of this process's checks) for ``engine``."""
    if engine == "sqlite":
        yield {}
        return
    from tests.helpers.postgres import postgres_database
    from tests.helpers.seaweedfs import run_seaweedfs

    with postgres_database() as url, run_seaweedfs(workdir / "weed") as s3:
        s3.client().make_bucket("kho-soak")
        yield {"KHO_CATALOG_URL": url, "KHO_STORAGE_URL": s3.url("kho-soak")}


def _settings(data_dir: Path, env: dict[str, str]) -> Settings:
    return Settings(
        data_dir=data_dir,
        catalog_url=env.get("KHO_CATALOG_URL", ""),
        storage_url=env.get("KHO_STORAGE_URL", ""),
    )


def run_campaign(
    engine: str,
    kills: int,
    workdir: Path,
    *,
    seed: int = 20,
    associations: int = 3,
    stow_clients: int = 1,
    window: tuple[float, float] = (0.2, 2.0),
    audit_every: int = 1,
    log: Any = None,
) -> CrashResult:
    rng = random.Random(seed)
    result = CrashResult(engine)
    corpus = harness.Corpus(workdir / "corpus", seed=seed)
    data_dir = workdir / "data"
    ledger = harness.Ledger()
    previous_cycle: list[harness.Sent] = []
    started = time.monotonic()
    _config.STORE_SEND_CHUNKED_DATASET = True
    with engine_env(engine, workdir) as env:
        checker: Archive | None = None
        try:
            for cycle in range(kills + 1):
                http_port = free_port()
                t0 = time.monotonic()
                serving = kho_serve(data_dir, env=env, args=("--http-port", str(http_port)))
                proc, port = serving.__enter__()
                try:
                    wait_for_port(http_port, timeout=60, proc=proc)
                    result.max_restart_s = max(result.max_restart_s, time.monotonic() - t0)
                    result.timed("restart", t0)
                    if checker is None:  # the schema exists now
                        checker = Archive(_settings(data_dir, env))
                    full_audit = cycle % audit_every == 0 or cycle == kills
                    _check_after_restart(checker, ledger, previous_cycle, result, full_audit)
                    if cycle == kills:
                        break
                    before = set(ledger.acked)
                    t0 = time.monotonic()
                    _ingest_and_kill(
                        proc, port, http_port, corpus, ledger, result,
                        associations=associations, stow_clients=stow_clients,
                        seconds=rng.uniform(*window),
                    )  # fmt: skip
                    result.timed("ingest_and_kill", t0)
                    previous_cycle = [ledger.acked[s] for s in set(ledger.acked) - before]
                finally:
                    serving.__exit__(None, None, None)  # SIGTERM if still alive
                if log and (cycle + 1) % 10 == 0:
                    print(
                        f"[{engine}] {cycle + 1}/{kills} kills, {len(ledger.acked)} "
                        f"acknowledged, lost {len(result.lost)}, orphans "
                        f"{len(result.orphans)}, {time.monotonic() - started:.0f} s; "
                        f"{result.phase_s}",
                        file=log,
                        flush=True,
                    )
            assert checker is not None
            # the end (server stopped): every acknowledged instance read back, every row
            # verified
            result.corrupt += harness.check_retrievable(checker, ledger.acked.values())
            result.corrupt += [f"{r.sop_uid}: {p}" for r, p in checker.verify() if p]
        finally:
            if checker is not None:
                checker.close()
            _config.STORE_SEND_CHUNKED_DATASET = False
        # whatever spool segment nothing refers to goes now
        with Archive(_settings(data_dir, env)) as final:
            reclaim_spool(final, final.spool_reader, force=True)
            on_disk = set(final.spool_reader.segment_names())
            result.leftover_spool_segments = len(on_disk - spool_segments_in_use(final))
    result.acknowledged = len(ledger.acked)
    result.acknowledged_dimse = sum(1 for s in ledger.acked.values() if s.path is not None)
    result.acknowledged_stow = result.acknowledged - result.acknowledged_dimse
    result.refused = dict(ledger.refused)
    result.unanswered = ledger.unanswered
    result.duration_s = round(time.monotonic() - started, 1)
    result.seconds_per_kill = round(result.duration_s / max(1, result.kills), 2)
    return result


def _ingest_and_kill(
    proc: Any,
    port: int,
    http_port: int,
    corpus: harness.Corpus,
    ledger: harness.Ledger,
    result: CrashResult,
    *,
    associations: int,
    stow_clients: int,
    seconds: float,
) -> None:
    """Senders on every door; SIGKILL after ``seconds``."""
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=harness.dimse_sender,
            args=(port, corpus, ledger, stop),
            kwargs={"timeout": 3.0},
            daemon=True,
        )
        for _ in range(associations)
    ] + [
        threading.Thread(
            target=harness.stow_sender,
            args=(http_port, corpus, ledger, stop),
            kwargs={"timeout": 3.0},
            daemon=True,
        )
        for _ in range(stow_clients)
    ]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    unanswered_before = ledger.unanswered
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    stop.set()
    for thread in threads:
        thread.join(10)
    result.kills += 1
    if ledger.unanswered > unanswered_before:
        result.kills_mid_ingest += 1


def _check_after_restart(
    archive: Archive,
    ledger: harness.Ledger,
    previous: list[harness.Sent],
    result: CrashResult,
    full_audit: bool = True,
) -> None:
    t0 = time.monotonic()
    try:
        drain = harness.wait_finished(archive)
    except AssertionError as exc:  # a finding: record what the queue holds, go on
        rows = archive.catalog.fetchall(
            "SELECT u.sop_uid, u.owner, u.attempts, u.claimed_at, i.derived FROM unfinished u "
            "LEFT JOIN instances i ON i.sop_uid = u.sop_uid LIMIT 5"
        )
        result.finisher_stalls.append(f"kill {result.kills}: {exc}; e.g. {rows}")
        drain = 120.0
    result.max_finish_drain_s = max(result.max_finish_drain_s, round(drain, 2))
    t0 = result.timed("check_drain", t0)
    present = harness.catalogued(archive)
    result.catalogued = len(present)
    result.lost += [sop for sop in ledger.acked if sop not in present and sop not in result.lost]
    t0 = result.timed("check_catalogued", t0)
    result.corrupt += harness.check_retrievable(archive, previous)
    t0 = result.timed("check_read_back", t0)
    if full_audit:
        # an orphan or a row's missing object stays until something is done about it, so
        # an audit every few restarts sees what any kill left (``--audit-every``)
        audit = harness.audit_store(archive)
        result.store_audits += 1
        result.missing_objects += [k for k in audit.missing if k not in result.missing_objects]
        result.orphans += [k for k in audit.orphans if k not in result.orphans]
        result.collected_during_check += len(audit.collected_meanwhile)
        t0 = result.timed("check_store_audit", t0)
    # the restarted server chains what the dead one queued: look until it has
    deadline = time.monotonic() + 10
    missing = harness.check_audited(archive, ledger.acked)
    while missing and time.monotonic() < deadline:
        time.sleep(0.2)
        missing = harness.check_audited(archive, missing)
    result.unaudited += [s for s in missing if s not in result.unaudited]
    result.timed("check_audited", t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--kills", type=int, default=1000, help="SIGKILLs per engine")
    parser.add_argument("--associations", type=int, default=3)
    parser.add_argument("--stow", type=int, default=1, help="STOW-RS clients")
    parser.add_argument("--window", type=float, nargs=2, default=(0.2, 2.0),
                        help="the kill lands this many seconds after sending starts")  # fmt: skip
    parser.add_argument("--seed", type=int, default=20)
    parser.add_argument("--audit-every", type=int, default=1,
                        help="the two-way store audit after every Nth restart and the last "
                             "(the other checks run after every restart)")  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--no-results", action="store_true", help="do not write results")
    args = parser.parse_args(argv)
    engines = ["sqlite", "postgresql"] if args.engine == "both" else [args.engine]
    outcomes = []
    for engine in engines:
        workdir = Path(tempfile.mkdtemp(prefix=f"kho-crash-{engine}-", dir=args.workdir))
        try:
            outcome = run_campaign(
                engine,
                args.kills,
                workdir,
                seed=args.seed,
                associations=args.associations,
                stow_clients=args.stow,
                window=tuple(args.window),
                audit_every=max(1, args.audit_every),
                log=sys.stderr,
            )
        except BaseException:
            print(f"kept {workdir} (server logs: serve-*.log)", file=sys.stderr)
            raise
        if outcome.clean:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir} (server logs: serve-*.log)", file=sys.stderr)
        outcomes.append(outcome)
        summary = {k: v for k, v in asdict(outcome).items() if not isinstance(v, list)}
        print({**summary, **{k: len(v) for k, v in asdict(outcome).items() if isinstance(v, list)}})
    if not args.no_results:  # per engine: runs of one engine at a time add up
        engines_done = report.load().get("crash", {}).get("engines", {})
        for o in outcomes:
            engines_done[o.engine] = {
                **asdict(o),
                **_examples(o),
                "machine": machine(),
                "settings": {
                    "associations": args.associations,
                    "stow_clients": args.stow,
                    "window_s": list(args.window),
                    "seed": args.seed,
                    "audit_every": args.audit_every,
                },
            }
        report.record("crash", {"engines": engines_done})
    return 0 if all(o.clean for o in outcomes) else 1


def _examples(outcome: CrashResult) -> dict[str, Any]:
    """The finding lists cut to a few examples (counts stay whole)."""
    out: dict[str, Any] = {}
    for name in ("lost", "corrupt", "missing_objects", "orphans", "unaudited", "finisher_stalls"):
        values = getattr(outcome, name)
        out[name] = len(values)
        out[f"{name}_examples"] = values[:10]
    return out


if __name__ == "__main__":
    raise SystemExit(main())
