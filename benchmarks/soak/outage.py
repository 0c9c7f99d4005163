"""Outages: the object store (SeaweedFS S3) or the catalog (PostgreSQL) goes away and comes
back while one ``kho serve`` ingests, finishes or serves; kho is never restarted.

    python -m benchmarks.soak.outage --outage-s 8 --rounds 3
    python -m benchmarks.soak.outage --phases retrieval upload --no-results

The S3 outage stops the SeaweedFS process this run started and starts it again on the same
ports and data.  The PostgreSQL outage cuts a TCP proxy this run owns between kho and the
machine's PostgreSQL (every connection reset, new ones refused) and restores it: the
machine's PostgreSQL service itself is never stopped (other work uses it).  The partition
(``--services partition``, root and iptables) drops every packet on that proxy's port
instead (tests/helpers/partition.py): refusals come once kho's catalog bounds have passed
(15-25 s, kho.archive.catalog.postgresql.NETWORK_BOUNDS), so give it ``--outage-s 30``.

Each scenario (service x phase), in turn, on the same server:

- ingest: a DIMSE association and a STOW-RS client send new instances through the outage;
  what they are told while the service is away must be a refusal (C-STORE 0xA7xx, HTTP
  503), a success only for what is really stored; after it, stores succeed again;
- finishing: instances are acknowledged, the service goes away once the finisher has
  begun on them; after it the finisher drains the queue by itself;
- retrieval: WADO-RS (instance, metadata), QIDO-RS, C-FIND, C-GET and C-MOVE (to a
  storage SCP the run starts) during the outage answer 503 / 0xA7xx / 0xB000 (or succeed
  where the answer needs nothing from the absent service), and 200 / success after it.  A
  C-GET or C-MOVE answer must agree with what arrived: success only when every instance
  came, failed sub-operations listed, and what came is bit-identical to what was sent;
- upload: two large multipart STOW-RS requests side by side, streamed slowly, during
  which the service goes away: it comes back before one body ends, after the other.  An
  answer is 200 with every part stored, or 202 / 503 / 507 / 409 with each failed part in
  FailedSOPSequence; a part reported failed is not in the catalog, and sending it again
  once the service is back stores it.

After every scenario: every acknowledged instance is catalogued and reads back with its
SHA-256; the queue drains; at the end no row points at a missing object and nothing is
left that no row, pending ingest or garbage entry refers to.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
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
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, build_role, evt

from benchmarks.common import machine
from benchmarks.soak import harness, report
from kho.archive.archive import Archive
from kho.archive.config import Settings
from tests.helpers.dcmtk import free_port, wait_for_port
from tests.helpers.partition import dropped
from tests.helpers.server import kho_serve
from tests.helpers.tcp_proxy import TcpProxy

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
MOVE_DESTINATION = "OUTAGEDEST"
SERVICES = ("s3", "postgresql")  # what a plain run takes away
ALL_SERVICES = (*SERVICES, "partition")
PHASES = ("ingest", "finishing", "retrieval", "upload")
#: what a client may be told while a service is away: refusals that say "try later"
REFUSALS = {"0xA700", "0xA701", "0xA702", "http-503", "http-507"}
#: a C-GET / C-MOVE may also end with some sub-operations failed (listed)
RETRIEVE_PARTIAL = "0xB000"
SUCCESSES = {"0x0000", "http-200"}


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
    slowest_retrieve_s: float | None = None  # the longest C-GET / C-MOVE while away
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
        self.partition = contextlib.ExitStack()

    def down(self, service: str) -> None:
        if service == "s3":
            self.seaweedfs.stop()
        elif service == "partition":
            self.partition.enter_context(dropped(self.proxy.port))
        else:
            self.proxy.cut()

    def up(self, service: str) -> None:
        if service == "s3":
            self.seaweedfs.start()
        elif service == "partition":
            self.partition.close()
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
    upload_shape: tuple[int, int] = (6, 2048),
    log: Any = None,
) -> OutageRun:
    run = OutageRun()
    started = time.monotonic()
    corpus = harness.Corpus(workdir / "corpus", seed=seed, size=64)
    ledger = harness.Ledger()
    data_dir = workdir / "data"
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        with outage_env(workdir) as (env, direct, svc), StorageDestination() as destination:
            http_port = free_port()
            moves = {MOVE_DESTINATION: f"127.0.0.1:{destination.port}"}
            env = {**env, "KHO_MOVE_DESTINATIONS": json.dumps(moves)}
            with kho_serve(data_dir, env=env, args=("--http-port", str(http_port))) as (
                proc,
                port,
            ):
                wait_for_port(http_port, timeout=60, proc=proc)
                with Archive(_settings(data_dir, direct)) as checker:
                    for n in range(rounds):
                        for service in services:
                            for phase in phases:
                                extra: dict[str, Any] = {}
                                if phase == "retrieval":
                                    extra["destination"] = destination
                                elif phase == "upload":
                                    extra["parts"], extra["side"] = upload_shape
                                scenario = SCENARIOS[phase](
                                    svc, service, port, http_port, corpus, ledger, checker,
                                    outage_s=outage_s, **extra,
                                )  # fmt: skip
                                run.scenarios.append(scenario)
                                if proc.poll() is not None:
                                    scenario.problems.append("kho serve died")
                                    run.server_restarts += 1
                                    return run
                                if log:
                                    print(
                                        f"[round {n + 1}] {service} / {phase}: during "
                                        f"{scenario.during}, after {scenario.after} (first "
                                        f"success {scenario.first_success_after_s} s after), "
                                        f"slowest C-GET/C-MOVE while away "
                                        f"{scenario.slowest_retrieve_s} s, "
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


def _code(answer: str) -> str:
    """An answer's status without the service naming it ("C-GET 0xA702" -> "0xA702")."""
    return answer.rsplit(" ", 1)[-1]


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
                and _code(answer) in SUCCESSES
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
    destination: StorageDestination,
) -> ScenarioResult:
    result = ScenarioResult(service, "retrieval", outage_s)
    tally = _Tally(result)
    harness.wait_finished(checker)
    # a study of its own: C-GET and C-MOVE must bring back exactly these
    study, series = generate_uid(harness.ROOT + "."), generate_uid(harness.ROOT + ".")
    study_instances = [
        corpus.instance(study, series, n, corpus.rng.integers(0, 4096, (64, 64), dtype=np.uint16))
        for n in range(3)
    ]
    harness.dimse_sender(port, corpus, ledger, threading.Event(), instances=study_instances)
    for sent in study_instances:
        assert sent.path is not None
        sent.path.unlink(missing_ok=True)
    if any(s.sop_uid not in ledger.acked for s in study_instances):
        result.problems.append("the retrieval study was not stored before the outage")
        return result
    expected = {s.sop_uid: s.dataset_sha256 for s in study_instances}
    sent = study_instances[-1]
    base = f"http://127.0.0.1:{http_port}/dicom-web"
    instance_url = (
        f"{base}/studies/{sent.study_uid}/series/{sent.series_uid}/instances/{sent.sop_uid}"
    )
    requests = [
        (instance_url, 'multipart/related; type="application/dicom"; transfer-syntax=*'),
        (f"{base}/studies/{sent.study_uid}/metadata", "application/dicom+json"),
        (f"{base}/studies?StudyInstanceUID={sent.study_uid}", "application/dicom+json"),
    ]

    def ask_web_and_find() -> None:
        with httpx.Client(timeout=60) as client:
            for url, accept in requests:
                try:
                    answer = client.get(url, headers={"Accept": accept})
                    tally.count(f"http-{answer.status_code}")
                except httpx.HTTPError as exc:
                    tally.count(f"http-{type(exc).__name__}")
        tally.count(f"C-FIND {_c_find(port, study)}")

    def retrieve(name: str, how: Callable[..., RetrieveAnswer]) -> None:
        asked = time.monotonic()
        answer = how(port, study, destination)
        took = round(time.monotonic() - asked, 1)
        tally.count(f"{name} {answer.status}")
        problems = [f"{name} {answer.status}: {p}" for p in answer.check(expected)]
        with tally.lock:
            result.problems += problems
            if tally.away:
                result.slowest_retrieve_s = max(result.slowest_retrieve_s or 0.0, took)

    def ask_all() -> None:
        # side by side: while S3 is away each C-GET / C-MOVE sub-operation waits out the
        # store's retries (about 3 s), and the outage lasts as long as the asking
        askers = [
            threading.Thread(target=ask_web_and_find),
            threading.Thread(target=retrieve, args=("C-GET", _c_get)),
            threading.Thread(target=retrieve, args=("C-MOVE", _c_move)),
        ]
        for thread in askers:
            thread.start()
        for thread in askers:
            thread.join()

    def all_succeeded(answers: dict[str, int]) -> bool:
        return bool(answers) and {_code(a) for a in answers} == SUCCESSES

    ask_all()  # before: all answer
    result.after, before_answers = {}, dict(result.after)
    if not all_succeeded(before_answers):
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
        if all_succeeded(result.after):
            break
        time.sleep(1.0)
    _judge(result, ledger, set(ledger.acked), checker, need_success_after=True)
    return result


def upload_scenario(
    svc: Services,
    service: str,
    port: int,
    http_port: int,
    corpus: harness.Corpus,
    ledger: harness.Ledger,
    checker: Archive,
    *,
    outage_s: float,
    parts: int = 6,
    side: int = 2048,
) -> ScenarioResult:
    """Two large STOW-RS requests side by side (each ``parts`` instances of ``side``²
    16-bit pixels: 6 x 8 MiB by default), their bodies streamed slowly; the service goes
    away 1 s into them.  One body ends once it is back (it lasts the outage + 3 s), the
    other while it is away (it lasts 2 s: kho stores its parts while the service is away,
    or as it comes back).  Each last chunk waits until the service is back (is away): a
    slow machine cannot turn one case into the other."""
    result = ScenarioResult(service, "upload", outage_s)
    tally = _Tally(result)
    before = set(ledger.acked)
    harness.wait_finished(checker)
    cases = {
        "back before the body ends": (outage_s + 3.0, lambda: tally.back_at is not None),
        "back after": (2.0, lambda: tally.away),
    }
    uploads: dict[str, list[harness.Sent]] = {}
    for when in cases:
        study, series = generate_uid(harness.ROOT + "."), generate_uid(harness.ROOT + ".")
        uploads[when] = [
            corpus.instance(
                study, series, n, corpus.rng.integers(0, 4096, (side, side), dtype=np.uint16),
                to_file=False,
            )
            for n in range(parts)
        ]  # fmt: skip
    outcomes: dict[str, tuple[set[str], set[str]]] = {}

    def upload(when: str) -> None:
        sents = uploads[when]
        body, content_type = harness.multipart([s.data for s in sents])
        answer = _slow_stow(http_port, body, content_type, *cases[when])
        stored, failed, problems = _stow_outcome(answer, sents)
        label = f"STOW {answer[0]}" + (f" ({len(stored)}/{parts} stored)" if failed else "")
        tally.count(f"{when}: {label}")  # while away or once back, as it came
        with tally.lock:
            result.problems += [f"{when}: {p}" for p in problems]
            outcomes[when] = stored, failed

    senders = [threading.Thread(target=upload, args=(when,)) for when in cases]
    for thread in senders:
        thread.start()
    time.sleep(1.0)  # the bodies are under way
    try:
        _outage(svc, service, tally, outage_s, lambda: None)
    finally:
        for thread in senders:
            thread.join(300)
    harness.wait_finished(checker)
    present = harness.catalogued(checker)
    for when, (stored, failed) in outcomes.items():
        for sent in uploads[when]:
            if sent.sop_uid in stored:
                ledger.ack(sent)
        shown = sorted(u for u in failed if u in present)
        if shown:
            result.problems.append(f"{when}: reported failed but catalogued: {shown[:3]}")
        # the client sends what failed again, once the service is back: it must store
        retry = [s for s in uploads[when] if s.sop_uid in failed]
        if not retry:
            continue
        with httpx.Client(timeout=120) as client:
            again = harness.stow(client, f"http://127.0.0.1:{http_port}", [s.data for s in retry])
        tally.count(f"{when}: STOW again {again.status_code}")
        if again.status_code == 200:
            for sent in retry:
                ledger.ack(sent)
        else:
            result.problems.append(f"{when}: sent again: {again.status_code} {again.text[:200]}")
    if len(outcomes) != len(cases):
        result.problems.append(f"uploads without an answer: {set(cases) - set(outcomes)}")
    _judge(result, ledger, before, checker, need_success_after=False)
    return result


def _slow_stow(
    http_port: int,
    body: bytes,
    content_type: str,
    body_s: float,
    last_chunk_once: Callable[[], bool],
    chunk: int = 1 << 20,
) -> tuple[str, dict[str, Any]]:
    """POST ``body`` as a stream of ``chunk`` bytes spread over ``body_s`` seconds, the last
    one sent once ``last_chunk_once()`` (or after 120 s): (status code or the transport
    error's name, the JSON answer)."""
    pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)]
    pause = body_s / len(pieces)

    def stream() -> Iterator[bytes]:
        for n, piece in enumerate(pieces):
            if n == len(pieces) - 1:
                deadline = time.monotonic() + 120
                while not last_chunk_once() and time.monotonic() < deadline:
                    time.sleep(0.05)
            yield piece
            time.sleep(pause)

    try:
        with httpx.Client(timeout=120) as client:
            response = client.post(
                f"http://127.0.0.1:{http_port}/dicom-web/studies",
                content=stream(),
                headers={"Content-Type": content_type, "Accept": "application/dicom+json"},
            )
    except httpx.HTTPError as exc:
        return type(exc).__name__, {}
    try:
        answer = response.json()
    except ValueError:
        answer = {}
    return str(response.status_code), answer if isinstance(answer, dict) else {}


def _stow_outcome(
    answer: tuple[str, dict[str, Any]], sents: list[harness.Sent]
) -> tuple[set[str], set[str], list[str]]:
    """(parts the answer says are stored, parts it says failed, what is wrong with it) by
    PS3.18 10.5.3: 200 every part in ReferencedSOPSequence; 202 each part in one of the
    two sequences; 409 / 503 / 507 every part in FailedSOPSequence."""
    status, body = answer

    def uids(tag: str) -> list[str]:
        return [item["00081155"]["Value"][0] for item in body.get(tag, {}).get("Value", [])]

    stored, failed = uids("00081199"), uids("00081198")
    everything = {s.sop_uid for s in sents}
    problems = []
    if len(set(stored)) != len(stored) or set(stored) & set(failed):
        problems.append(f"{status}: a part named twice")
    if set(stored) | set(failed) != everything:
        problems.append(f"{status}: {len(everything - set(stored) - set(failed))} parts unanswered")
    if status == "200" and failed:
        problems.append("200 with failed parts")
    elif status in ("409", "503", "507") and stored:
        problems.append(f"{status} with stored parts")
    elif status not in ("200", "202", "409", "503", "507"):
        problems.append(f"an unclear answer: {status}")
    return set(stored), set(failed), problems


SCENARIOS: dict[str, Callable[..., ScenarioResult]] = {
    "ingest": ingest_scenario,
    "finishing": finishing_scenario,
    "retrieval": retrieval_scenario,
    "upload": upload_scenario,
}


def _judge(
    result: ScenarioResult,
    ledger: harness.Ledger,
    before: set[str],
    checker: Archive,
    *,
    need_success_after: bool,
) -> None:
    """Refusals only while away, successes after, nothing acknowledged lost.  (The upload
    phase judges its answers itself: they are whole-request answers with parts.)"""
    if result.phase != "upload":
        allowed = REFUSALS | SUCCESSES
        odd = {
            a: n
            for a, n in result.during.items()
            if _code(a) not in allowed
            and not (a.startswith(("C-GET", "C-MOVE")) and _code(a) == RETRIEVE_PARTIAL)
        }
        if odd:
            result.problems.append(f"answers while away that are no refusal: {odd}")
        if not any(_code(a) in REFUSALS for a in result.during) and result.phase != "finishing":
            result.problems.append(f"nothing was refused while away: {result.during}")
    if need_success_after and result.first_success_after_s is None:
        result.problems.append(f"no success once back: {result.after}")
    bad_after = {a: n for a, n in result.after.items() if _code(a) not in SUCCESSES}
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


class StorageDestination:
    """The C-MOVE destination: a storage SCP (pynetdicom) on a free loopback port that
    keeps the SHA-256 of each received dataset's bytes as they came over the wire."""

    def __init__(self) -> None:
        self.port = free_port()
        self.lock = threading.Lock()
        self.received: list[tuple[str, str]] = []  # (SOP Instance UID, dataset SHA-256)
        self.ae = AE(ae_title=MOVE_DESTINATION)
        self.ae.add_supported_context(harness.CT, ExplicitVRLittleEndian)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 60
        self.server: Any = None

    def __enter__(self) -> StorageDestination:
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()

    def _store(self, event: Any) -> int:
        with self.lock:
            self.received.append(_received(event))
        return 0x0000

    def take(self) -> list[tuple[str, str]]:
        with self.lock:
            out, self.received = self.received, []
        return out


def _received(event: Any) -> tuple[str, str]:
    """(SOP Instance UID, SHA-256 of the dataset bytes as received) of a C-STORE request."""
    data = event.encoded_dataset(include_meta=False)
    return str(event.request.AffectedSOPInstanceUID), hashlib.sha256(data).hexdigest()


@dataclass
class RetrieveAnswer:
    """A C-GET / C-MOVE as the requester saw it: its final status, the counts and Failed
    SOP Instance UID List the final response gave, and the instances that arrived."""

    status: str
    completed: int | None = None
    failed: int | None = None
    failed_uids: list[str] = field(default_factory=list)
    received: list[tuple[str, str]] = field(default_factory=list)

    def check(self, expected: dict[str, str]) -> list[str]:
        """What is wrong with this answer for a study of ``expected`` (SOP UID ->
        dataset SHA-256): PS3.4 C.4.2.1.5 / C.4.3.1.4 say success means every
        sub-operation completed, 0xB000 some failed, 0xA702 all failed, the failed ones in
        the Failed SOP Instance UID List; what arrived must be what was sent."""
        problems = []
        got = {uid for uid, _sha in self.received}
        altered = [uid for uid, sha in self.received if expected.get(uid) != sha]
        if altered:
            problems.append(f"unknown or altered instances arrived: {altered[:3]}")
        if self.status in ("no-answer", "association-refused"):
            return [*problems, f"no final status: {self.status}"]
        if self.completed is not None and self.completed != len(self.received):
            problems.append(f"{self.completed} completed, {len(self.received)} arrived")
        if self.status == "0x0000":
            if got != set(expected) or self.failed:
                problems.append(f"success with {len(got)} of {len(expected)} instances")
        elif self.status in ("0xB000", "0xA702"):
            if self.status == "0xA702" and got:
                problems.append(f"all failed, yet {len(got)} instances arrived")
            if set(self.failed_uids) | got != set(expected):
                problems.append(
                    f"{len(self.failed_uids)} listed failed + {len(got)} arrived, "
                    f"not the study's {len(expected)}"
                )
            if self.failed is not None and self.failed != len(self.failed_uids):
                problems.append(f"{self.failed} failed, {len(self.failed_uids)} listed")
        elif self.status not in REFUSALS:
            problems.append("an unclear status")
        elif got:
            problems.append(f"refused, yet {len(got)} instances arrived")
        return problems


def _retrieve_query(study_uid: str) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    return query


def _final(answer: RetrieveAnswer, responses: Iterator[tuple[Dataset, Any]]) -> None:
    """Read C-GET / C-MOVE responses into ``answer`` until the final one."""
    answer.status = "no-answer"  # a DIMSE timeout or abort leaves an empty status
    for status, identifier in responses:
        if "Status" not in status:
            answer.status = "no-answer"
            return
        code = int(status.Status)
        if code in (0xFF00, 0xFF01):
            continue
        answer.status = f"0x{code:04X}"
        answer.completed = status.get("NumberOfCompletedSuboperations")
        answer.failed = status.get("NumberOfFailedSuboperations")
        if identifier is not None and "FailedSOPInstanceUIDList" in identifier:
            value = identifier.FailedSOPInstanceUIDList
            answer.failed_uids = [str(v) for v in ([value] if isinstance(value, str) else value)]


def _c_get(port: int, study_uid: str, _destination: StorageDestination) -> RetrieveAnswer:
    """C-GET of a study, its C-STOREs taken on the same association (SCP role)."""
    answer = RetrieveAnswer("association-refused")
    lock = threading.Lock()

    def store(event: Any) -> int:
        with lock:
            answer.received.append(_received(event))
        return 0x0000

    ae = AE(ae_title="OUTAGE")
    ae.add_requested_context(STUDY_ROOT_GET)
    ae.add_requested_context(harness.CT, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate(
        "127.0.0.1", port, ae_title="KHO",
        ext_neg=[build_role(harness.CT, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, store)],
    )  # fmt: skip
    if not assoc.is_established:
        return answer
    try:
        _final(answer, assoc.send_c_get(_retrieve_query(study_uid), STUDY_ROOT_GET))
    finally:
        if assoc.is_established:
            assoc.release()
    return answer


def _c_move(port: int, study_uid: str, destination: StorageDestination) -> RetrieveAnswer:
    """C-MOVE of a study to the run's storage SCP."""
    answer = RetrieveAnswer("association-refused")
    destination.take()
    ae = AE(ae_title="OUTAGE")
    ae.add_requested_context(STUDY_ROOT_MOVE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", port, ae_title="KHO")
    if not assoc.is_established:
        return answer
    try:
        query = _retrieve_query(study_uid)
        _final(answer, assoc.send_c_move(query, MOVE_DESTINATION, STUDY_ROOT_MOVE))
    finally:
        if assoc.is_established:
            assoc.release()
    # the destination answered each C-STORE before kho counted it: all are in by now
    answer.received = destination.take()
    return answer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outage-s", type=float, default=8.0, help="how long a service is away")
    parser.add_argument("--rounds", type=int, default=1, help="times every scenario runs")
    parser.add_argument("--services", nargs="+", choices=ALL_SERVICES, default=list(SERVICES))
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument(
        "--upload-side", type=int, default=2048,
        help="upload phase: rows = columns of its 6 instances (2048: 48 MiB in all)",
    )  # fmt: skip
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
        upload_shape=(6, args.upload_side),
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
