"""Outages: the object store (SeaweedFS S3) or the catalog (PostgreSQL) goes away and comes
back while one ``kho serve`` ingests, finishes or serves; kho is never restarted.

    python -m benchmarks.soak.outage --outage-s 8 --rounds 3

The S3 outage stops the SeaweedFS process this run started and starts it again on the same
ports and data.  The PostgreSQL outage cuts a TCP proxy this run owns between kho and the
machine's PostgreSQL (every connection reset, new ones refused) and restores it: the
machine's PostgreSQL service itself is never stopped (other work uses it).

Each scenario (service x phase), in turn, on the same server:

- ingest: a DIMSE association and a STOW-RS client send new instances through the outage;
  what they are told while the service is away must be a refusal (C-STORE 0xA7xx, HTTP
  503), a success only for what is really stored; after it, stores succeed again;
- finishing: instances are acknowledged, the service goes away once the finisher has
  begun on them; after it the finisher drains the queue by itself;
- retrieval: WADO-RS (instance, metadata), QIDO-RS and C-FIND during the outage answer
  503 / 0xA7xx (or succeed where the answer needs nothing from the absent service), and
  200 / success after it.

After every scenario: every acknowledged instance is catalogued and reads back with its
SHA-256; the queue drains; at the end no row points at a missing object and nothing is
left that no row, pending ingest or garbage entry refers to.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from pydicom.dataset import Dataset
from pynetdicom import AE, _config

from benchmarks.common import machine
from benchmarks.soak import harness, report
from kho.archive.archive import Archive
from kho.archive.config import Settings
from tests.helpers.dcmtk import free_port, wait_for_port
from tests.helpers.server import kho_serve
from tests.helpers.tcp_proxy import TcpProxy

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
SERVICES = ("s3", "postgresql")
PHASES = ("ingest", "finishing", "retrieval")
#: what a client may be told while a service is away: refusals that say "try later"
REFUSALS = {"0xA700", "0xA701", "0xA702", "http-503", "http-507"}


@dataclass
class ScenarioResult:
    service: str
    phase: str
    outage_s: float = 0.0
    during: dict[str, int] = field(default_factory=dict)  # answers while away
    after: dict[str, int] = field(default_factory=dict)  # answers once it is back
    acknowledged: int = 0
    unfinished_at_outage: int = 0
    finisher_drain_s: float | None = None  # after the service is back
    first_success_after_s: float | None = None  # first successful answer once back
    problems: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems


@dataclass
class OutageRun:
    scenarios: list[ScenarioResult] = field(default_factory=list)
    acknowledged: int = 0
    lost: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    missing_objects: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    server_restarts: int = 0  # kho serve died and had to be started again (target 0)
    duration_s: float = 0.0

    @property
    def clean(self) -> bool:
        return not (
            self.lost
            or self.corrupt
            or self.missing_objects
            or self.orphans
            or self.server_restarts
            or any(not s.clean for s in self.scenarios)
        )


class Services:
    """The two services an outage takes away, and how."""

    def __init__(self, seaweedfs: Any, proxy: TcpProxy) -> None:
        self.seaweedfs = seaweedfs
        self.proxy = proxy

    def down(self, service: str) -> None:
        if service == "s3":
            self.seaweedfs.stop()
        else:
            self.proxy.cut()

    def up(self, service: str) -> None:
        if service == "s3":
            self.seaweedfs.start()
        else:
            self.proxy.restore()


@contextlib.contextmanager
def outage_env(workdir: Path) -> Iterator[tuple[dict[str, str], dict[str, str], Services]]:
    """A fresh PostgreSQL database reached through a proxy, a SeaweedFS of the run's own:
    (kho serve's environment, the checks' own: PostgreSQL without the proxy, services)."""
    from tests.helpers.postgres import postgres_database
    from tests.helpers.seaweedfs import run_seaweedfs

    with postgres_database() as url, run_seaweedfs(workdir / "weed") as s3:
        s3.client().make_bucket("kho-outage")
        parts = urlsplit(url)
        with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
            netloc = f"{parts.username}@127.0.0.1:{proxy.port}"
            proxied = urlunsplit(parts._replace(netloc=netloc))
            env = {"KHO_CATALOG_URL": proxied, "KHO_STORAGE_URL": s3.url("kho-outage")}
            yield env, {**env, "KHO_CATALOG_URL": url}, Services(s3, proxy)


def _settings(data_dir: Path, env: dict[str, str]) -> Settings:
    return Settings(
        data_dir=data_dir, catalog_url=env["KHO_CATALOG_URL"], storage_url=env["KHO_STORAGE_URL"]
    )


def run_outages(
    workdir: Path,
    *,
    outage_s: float = 8.0,
    rounds: int = 1,
    services: tuple[str, ...] = SERVICES,
    phases: tuple[str, ...] = PHASES,
    seed: int = 3,
    log: Any = None,
) -> OutageRun:
    run = OutageRun()
    started = time.monotonic()
    corpus = harness.Corpus(workdir / "corpus", seed=seed, size=64)
    ledger = harness.Ledger()
    data_dir = workdir / "data"
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        with outage_env(workdir) as (env, direct, svc):
            http_port = free_port()
            with kho_serve(data_dir, env=env, args=("--http-port", str(http_port))) as (
                proc,
                port,
            ):
                wait_for_port(http_port, timeout=60, proc=proc)
                with Archive(_settings(data_dir, direct)) as checker:
                    for n in range(rounds):
                        for service in services:
                            for phase in phases:
                                scenario = SCENARIOS[phase](
                                    svc, service, port, http_port, corpus, ledger, checker,
                                    outage_s=outage_s,
                                )  # fmt: skip
                                run.scenarios.append(scenario)
                                if proc.poll() is not None:
                                    scenario.problems.append("kho serve died")
                                    run.server_restarts += 1
                                    return run
                                if log:
                                    print(
                                        f"[round {n + 1}] {service} / {phase}: during "
                                        f"{scenario.during}, after {scenario.after}, "
                                        f"problems {scenario.problems}",
                                        file=log,
                                        flush=True,
                                    )
                    # the end: everything acknowledged reads back, the store is consistent
                    harness.wait_finished(checker)
                    present = harness.catalogued(checker)
                    run.lost = [s for s in ledger.acked if s not in present]
                    run.corrupt = harness.check_retrievable(checker, ledger.acked.values())
                    # what failed ingests journalled is rolled back by the server's sweep;
                    # run that pass now instead of waiting a minute for it
                    checker.recover(grace_s=-1)
                    audit = harness.audit_store(checker)
                    run.missing_objects, run.orphans = audit.missing, audit.orphans
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        run.acknowledged = len(ledger.acked)
        run.duration_s = round(time.monotonic() - started, 1)
    return run


# --- the scenarios ----------------------------------------------------------------------


class _Tally:
    """Answers counted into ``during`` while the service is away, ``after`` once back."""

    def __init__(self, result: ScenarioResult) -> None:
        self.result = result
        self.lock = threading.Lock()
        self.away = False
        self.back_at: float | None = None

    def count(self, answer: str) -> None:
        with self.lock:
            into = self.result.during if self.away else self.result.after
            into[answer] = into.get(answer, 0) + 1
            if (
                not self.away
                and self.back_at is not None
                and answer in ("0x0000", "http-200")
                and self.result.first_success_after_s is None
            ):
                self.result.first_success_after_s = round(time.monotonic() - self.back_at, 2)


def _outage(
    svc: Services, service: str, tally: _Tally, outage_s: float, during: Callable[[], None]
) -> None:
    with tally.lock:
        tally.away = True
    svc.down(service)
    try:
        during()
        time.sleep(outage_s)
    finally:
        svc.up(service)
        with tally.lock:
            tally.away = False
            tally.back_at = time.monotonic()


def ingest_scenario(
    svc: Services,
    service: str,
    port: int,
    http_port: int,
    corpus: harness.Corpus,
    ledger: harness.Ledger,
    checker: Archive,
    *,
    outage_s: float,
) -> ScenarioResult:
    result = ScenarioResult(service, "ingest", outage_s)
    tally = _Tally(result)
    stop = threading.Event()
    before = set(ledger.acked)
    senders = [
        threading.Thread(target=_dimse_loop, args=(port, corpus, ledger, tally, stop)),
        threading.Thread(target=_stow_loop, args=(http_port, corpus, ledger, tally, stop)),
    ]
    for thread in senders:
        thread.start()
    time.sleep(1.0)  # stores under way
    _outage(svc, service, tally, outage_s, lambda: None)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and result.after.get("0x0000", 0) < 5:
        time.sleep(0.2)  # until stores succeed again, on both doors
    time.sleep(1.0)
    stop.set()
    for thread in senders:
        thread.join(120)
    _judge(result, ledger, before, checker, need_success_after=True)
    return result


def finishing_scenario(
    svc: Services,
    service: str,
    port: int,
    http_port: int,
    corpus: harness.Corpus,
    ledger: harness.Ledger,
    checker: Archive,
    *,
    outage_s: float,
    count: int = 30,
) -> ScenarioResult:
    result = ScenarioResult(service, "finishing", outage_s)
    tally = _Tally(result)
    before = set(ledger.acked)
    harness.wait_finished(checker)
    batch = [corpus.make() for _ in range(count)]
    # one association: the finisher waits while instances arrive, and starts once they stop
    harness.dimse_sender(port, corpus, ledger, threading.Event(), instances=batch, timeout=60)
    # the outage lands once the finisher is under way (or after 10 s)
    deadline = time.monotonic() + 10
    while checker.catalog.unfinished_count() >= count and time.monotonic() < deadline:
        time.sleep(0.02)
    result.unfinished_at_outage = checker.catalog.unfinished_count()
    _outage(svc, service, tally, outage_s, lambda: None)
    try:
        result.finisher_drain_s = round(harness.wait_finished(checker, timeout=180), 2)
    except AssertionError as exc:
        result.problems.append(str(exc))
    if result.unfinished_at_outage == 0:
        result.problems.append("the finisher was done before the outage: nothing tested")
    _judge(result, ledger, before, checker, need_success_after=False)
    return result


def retrieval_scenario(
    svc: Services,
    service: str,
    port: int,
    http_port: int,
    corpus: harness.Corpus,
    ledger: harness.Ledger,
    checker: Archive,
    *,
    outage_s: float,
) -> ScenarioResult:
    result = ScenarioResult(service, "retrieval", outage_s)
    tally = _Tally(result)
    harness.wait_finished(checker)
    if not ledger.acked:
        harness.dimse_sender(port, corpus, ledger, threading.Event(), instances=[corpus.make()])
    sent = next(reversed(ledger.acked.values()))
    base = f"http://127.0.0.1:{http_port}/dicom-web"
    instance_url = (
        f"{base}/studies/{sent.study_uid}/series/{sent.series_uid}/instances/{sent.sop_uid}"
    )
    requests = [
        (instance_url, 'multipart/related; type="application/dicom"; transfer-syntax=*'),
        (f"{base}/studies/{sent.study_uid}/metadata", "application/dicom+json"),
        (f"{base}/studies?StudyInstanceUID={sent.study_uid}", "application/dicom+json"),
    ]

    def ask_all() -> None:
        with httpx.Client(timeout=60) as client:
            for url, accept in requests:
                try:
                    answer = client.get(url, headers={"Accept": accept})
                    tally.count(f"http-{answer.status_code}")
                except httpx.HTTPError as exc:
                    tally.count(f"http-{type(exc).__name__}")
        tally.count(_c_find(port, sent.study_uid))

    ask_all()  # before: all answer
    result.after, before_answers = {}, dict(result.after)
    if set(before_answers) != {"http-200", "0x0000"}:
        result.problems.append(f"before the outage: {before_answers}")

    def during() -> None:
        time.sleep(min(2.0, outage_s / 2))  # connections the server held find it gone
        ask_all()
        ask_all()

    _outage(svc, service, tally, outage_s, during)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        result.after = {}
        ask_all()
        if set(result.after) == {"http-200", "0x0000"}:
            break
        time.sleep(1.0)
    _judge(result, ledger, set(ledger.acked), checker, need_success_after=True)
    return result


SCENARIOS: dict[str, Callable[..., ScenarioResult]] = {
    "ingest": ingest_scenario,
    "finishing": finishing_scenario,
    "retrieval": retrieval_scenario,
}


def _judge(
    result: ScenarioResult,
    ledger: harness.Ledger,
    before: set[str],
    checker: Archive,
    *,
    need_success_after: bool,
) -> None:
    """Refusals only while away, successes after, nothing acknowledged lost."""
    odd = {a: n for a, n in result.during.items() if a not in REFUSALS | {"0x0000", "http-200"}}
    if odd:
        result.problems.append(f"answers while away that are no refusal: {odd}")
    if not any(a in REFUSALS for a in result.during) and result.phase != "finishing":
        result.problems.append(f"nothing was refused while away: {result.during}")
    if need_success_after and result.first_success_after_s is None:
        result.problems.append(f"no success once back: {result.after}")
    bad_after = {a: n for a, n in result.after.items() if a not in ("0x0000", "http-200")}
    if bad_after and result.phase == "retrieval":
        result.problems.append(f"still failing once back: {bad_after}")
    new = [ledger.acked[s] for s in set(ledger.acked) - before]
    result.acknowledged = len(new)
    try:
        harness.wait_finished(checker)
    except AssertionError as exc:
        result.problems.append(str(exc))
    present = harness.catalogued(checker)
    lost = [s.sop_uid for s in new if s.sop_uid not in present]
    if lost:
        result.problems.append(f"{len(lost)} acknowledged instances lost, e.g. {lost[:3]}")
    corrupt = harness.check_retrievable(checker, new)
    if corrupt:
        result.problems.append(f"{len(corrupt)} unreadable or altered: {corrupt[:3]}")


def _dimse_loop(
    port: int,
    corpus: harness.Corpus,
    ledger: harness.Ledger,
    tally: _Tally,
    stop: threading.Event,
) -> None:
    """New associations as needed (a refusal may end one), one C-STORE at a time."""
    ae = AE(ae_title="OUTAGE")
    ae.add_requested_context(harness.CT, "1.2.840.10008.1.2.1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    while not stop.is_set():
        assoc = ae.associate("127.0.0.1", port, ae_title="KHO")
        if not assoc.is_established:
            tally.count("association-refused")
            time.sleep(0.5)
            continue
        try:
            while not stop.is_set() and assoc.is_established:
                sent = corpus.make()
                assert sent.path is not None
                status = assoc.send_c_store(sent.path)
                sent.path.unlink(missing_ok=True)
                if "Status" not in status:
                    tally.count("no-answer")
                    break
                answer = f"0x{int(status.Status):04X}"
                tally.count(answer)
                if answer == "0x0000":
                    ledger.ack(sent)
                time.sleep(0.05)
        finally:
            if assoc.is_established:
                assoc.release()


def _stow_loop(
    http_port: int,
    corpus: harness.Corpus,
    ledger: harness.Ledger,
    tally: _Tally,
    stop: threading.Event,
) -> None:
    base = f"http://127.0.0.1:{http_port}"
    with httpx.Client(timeout=60) as client:
        while not stop.is_set():
            sent = corpus.make(to_file=False)
            try:
                response = harness.stow(client, base, [sent.data])
            except httpx.HTTPError as exc:
                tally.count(f"http-{type(exc).__name__}")
                continue
            tally.count(f"http-{response.status_code}")
            if response.status_code == 200:
                ledger.ack(sent)
            time.sleep(0.05)


def _c_find(port: int, study_uid: str) -> str:
    ae = AE(ae_title="OUTAGE")
    ae.add_requested_context(STUDY_ROOT_FIND)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", port, ae_title="KHO")
    if not assoc.is_established:
        return "association-refused"
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    try:
        last = "no-answer"
        for status, _identifier in assoc.send_c_find(query, STUDY_ROOT_FIND):
            if "Status" not in status:
                return "no-answer"
            code = int(status.Status)
            if code not in (0xFF00, 0xFF01):
                last = f"0x{code:04X}"
        return last
    finally:
        if assoc.is_established:
            assoc.release()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outage-s", type=float, default=8.0, help="how long a service is away")
    parser.add_argument("--rounds", type=int, default=1, help="times every scenario runs")
    parser.add_argument("--services", nargs="+", choices=SERVICES, default=list(SERVICES))
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--no-results", action="store_true", help="do not write results")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="kho-outage-", dir=args.workdir))
    outcome = run_outages(
        workdir,
        outage_s=args.outage_s,
        rounds=args.rounds,
        services=tuple(args.services),
        phases=tuple(args.phases),
        log=sys.stderr,
    )
    summary = {k: v for k, v in asdict(outcome).items() if not isinstance(v, list)}
    print({**summary, **{k: len(v) for k, v in asdict(outcome).items() if isinstance(v, list)}})
    if outcome.clean:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"kept {workdir} (server log: serve-*.log)", file=sys.stderr)
    if not args.no_results:
        report.record(
            "outages",
            {
                **asdict(outcome),
                "clean": outcome.clean,
                "machine": machine(),
                "settings": {"outage_s": args.outage_s, "rounds": args.rounds},
            },
        )
    return 0 if outcome.clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
