"""Outages in small (benchmarks/soak/outage.py runs them longer): the object store
(SeaweedFS) stopped and started again, the catalog (PostgreSQL, through a TCP proxy the
test owns: the machine's PostgreSQL is never stopped) cut and restored, during ingest,
finishing and retrieval (C-GET and C-MOVE included) and in the middle of one large STOW-RS
upload, of one live ``kho serve`` that is never restarted.  Clients are refused with 0xA7xx
/ 503 while a service is away, nothing acknowledged is lost, and everything works again
once it is back."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from benchmarks.soak.outage import RetrieveAnswer, run_outages
from kho.archive.archive import Archive
from kho.archive.catalog import open_catalog
from kho.archive.catalog.base import Catalog
from kho.archive.config import Settings
from kho.errors import CatalogError
from tests.archive.test_ingest import make_instance
from tests.helpers.postgres import postgres_database
from tests.helpers.tcp_proxy import TcpProxy


@pytest.fixture
def proxied_postgres() -> Iterator[tuple[str, str, TcpProxy]]:
    """(the database's URL through a proxy the test can cut, its direct URL, the proxy)"""
    with postgres_database() as url:
        parts = urlsplit(url)
        with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
            netloc = f"{parts.username}@127.0.0.1:{proxy.port}"
            yield urlunsplit(parts._replace(netloc=netloc)), url, proxy


def _count_in_thread(catalog: Catalog) -> int | BaseException:
    out: list[int | BaseException] = []

    def count() -> None:
        try:
            out.append(catalog.unfinished_count())
        except BaseException as exc:  # handed to the test
            out.append(exc)

    thread = threading.Thread(target=count)
    thread.start()
    thread.join(30)
    return out[0]


def test_catalog_connections_an_outage_broke_are_replaced(
    proxied_postgres: tuple[str, str, TcpProxy],
) -> None:
    """Each thread keeps its connection.  One used during the outage fails then (503 /
    0xA7xx) and is replaced by the next statement; one idle during the outage must not
    fail the first statement after it (found by the outage campaign: the first WADO-RS
    request of every HTTP thread answered 503 once PostgreSQL was back)."""
    proxied, _direct, proxy = proxied_postgres
    catalog = open_catalog(proxied)
    try:
        assert catalog.unfinished_count() == 0
        assert _count_in_thread(catalog) == 0  # a thread with a connection of its own
        proxy.cut()
        with pytest.raises(CatalogError):
            catalog.unfinished_count()
        with pytest.raises(CatalogError):  # new connections are refused meanwhile
            catalog.unfinished_count()
        proxy.restore()
        assert catalog.unfinished_count() == 0
        # a thread whose connection sat idle through the outage: its first statement works
        assert _count_in_thread(catalog) == 0
    finally:
        catalog.close()


def test_a_transaction_whose_connection_breaks_fails_whole(
    proxied_postgres: tuple[str, str, TcpProxy],
) -> None:
    """A connection lost mid-transaction is not replaced before the transaction ends:
    else its remaining statements would commit on their own, outside it."""
    proxied, direct, proxy = proxied_postgres
    catalog = open_catalog(proxied)
    try:
        with pytest.raises(CatalogError), catalog.transaction():
            catalog.execute("INSERT INTO garbage (object_key, not_before) VALUES ('a', 0)")
            proxy.cut()
            proxy.restore()
            catalog.execute("INSERT INTO garbage (object_key, not_before) VALUES ('b', 0)")
        assert catalog.fetchall("SELECT object_key FROM garbage") == []
    finally:
        catalog.close()
    checker = open_catalog(direct)
    assert checker.fetchall("SELECT object_key FROM garbage") == []
    checker.close()


def test_the_finisher_gives_back_a_claim_an_outage_left_held(
    proxied_postgres: tuple[str, str, TcpProxy], tmp_path: Path
) -> None:
    """A claim the catalog committed but whose answer the outage lost (or one the finisher
    could not give back) is held by this process: the finisher must give it back once the
    catalog answers again, not after the claim's 10-minute lease (found by the outage
    campaign: an instance stayed unfinished after PostgreSQL came back)."""
    proxied, direct, proxy = proxied_postgres

    def settings(url: str) -> Settings:
        return Settings(data_dir=tmp_path / "data", catalog_url=url, spool="off")

    datasets = [make_instance(sop_uid=f"1.2.826.0.1.3680043.10.1425.77.{n}") for n in (1, 2)]
    with Archive(settings(direct)) as loader:
        loader.finisher.stop()
        for data in datasets:
            loader.ingest_part10(data, defer=True)
        # this process's claim, as if made by a claim whose answer was lost
        assert len(loader.catalog.claim_unfinished(1, 600, 3)) == 1
    with Archive(settings(proxied)) as archive:
        proxy.cut()
        archive.finisher.start()  # its threads cannot read the queue now
        try:
            time.sleep(2.0)
        finally:
            proxy.restore()
        assert archive.finisher.wait_idle(timeout=60), archive.catalog.fetchall(
            "SELECT sop_uid, owner, attempts FROM unfinished"
        )
        for n, data in enumerate(datasets, 1):
            assert archive.read_instance(f"1.2.826.0.1.3680043.10.1425.77.{n}")[1] == data


def test_outages_during_ingest_finishing_and_retrieval(tmp_path: Path) -> None:
    run = run_outages(tmp_path, outage_s=4.0, phases=("ingest", "finishing", "retrieval"))
    by_name = {f"{s.service}/{s.phase}": s for s in run.scenarios}
    assert len(by_name) == 6
    problems = {name: s.problems for name, s in by_name.items() if s.problems}
    assert problems == {}
    # refused while away: 0xA700 on DIMSE, 503 on STOW-RS (S3: each store waits out the
    # store's retries, so few are answered in a short outage)
    s3_ingest, pg_ingest = by_name["s3/ingest"].during, by_name["postgresql/ingest"].during
    assert s3_ingest.get("0xA700", 0) + s3_ingest.get("http-503", 0) >= 1, s3_ingest
    assert pg_ingest.get("0xA700", 0) >= 1 and pg_ingest.get("http-503", 0) >= 1, pg_ingest
    assert by_name["postgresql/retrieval"].during.get("http-503", 0) >= 3
    assert by_name["s3/retrieval"].during.get("http-503", 0) >= 1
    # C-GET and C-MOVE fail whole while away: S3, every sub-operation failed and listed
    # (0xA702; 0xB000 if S3 came back mid-way); PostgreSQL, no match can be computed
    for op in ("C-GET", "C-MOVE"):
        s3_codes = {a for a in by_name["s3/retrieval"].during if a.startswith(op)}
        assert s3_codes and s3_codes <= {f"{op} 0xA702", f"{op} 0xB000"}, s3_codes
        assert by_name["postgresql/retrieval"].during.get(f"{op} 0xA701", 0) >= 1
        for name in ("s3/retrieval", "postgresql/retrieval"):
            assert by_name[name].after.get(f"{op} 0x0000", 0) >= 1
    for name in ("s3/finishing", "postgresql/finishing"):
        assert by_name[name].unfinished_at_outage > 0
        assert by_name[name].finisher_drain_s is not None
    assert run.acknowledged > 0
    assert run.lost == [] and run.corrupt == []
    assert run.missing_objects == [] and run.orphans == []
    assert run.server_restarts == 0


def test_outage_in_the_middle_of_one_large_upload(tmp_path: Path) -> None:
    """Two STOW-RS requests of 3 parts (1.5 MiB here; 6 parts, 48 MiB each in the
    campaign), streamed over seconds side by side: the service goes away mid-body and is
    back before one body ends, after the other.  Every part is answered (stored, or failed
    in FailedSOPSequence), what was stored reads back, what failed is not catalogued and
    stores when sent again."""
    run = run_outages(tmp_path, outage_s=3.0, phases=("upload",), upload_shape=(3, 512))
    by_name = {f"{s.service}/{s.phase}": s for s in run.scenarios}
    assert set(by_name) == {"s3/upload", "postgresql/upload"}
    assert {name: s.problems for name, s in by_name.items() if s.problems} == {}
    for scenario in by_name.values():
        answers = {**scenario.during, **scenario.after}
        # back before the body ended: kho stored it all as if nothing happened
        assert answers.get("back before the body ends: STOW 200") == 1, answers
        assert scenario.acknowledged == 6  # 3 + 3, some of them sent again
    # back after: PostgreSQL refuses every part at once (503); S3 waits out each part's
    # retries, so parts stored once it is back are reported stored (202) or all are (200)
    pg = {**by_name["postgresql/upload"].during, **by_name["postgresql/upload"].after}
    assert pg.get("back after: STOW 503 (0/3 stored)") == 1, pg
    assert run.lost == [] and run.corrupt == []
    assert run.missing_objects == [] and run.orphans == []
    assert run.server_restarts == 0


def test_a_retrieve_answer_must_match_what_arrived() -> None:
    """The campaign's judge of C-GET / C-MOVE answers: a success missing a sub-operation,
    an altered instance, or failures not listed are findings."""
    expected = {"1.2.3.1": "a" * 64, "1.2.3.2": "b" * 64}
    whole = RetrieveAnswer("0x0000", 2, 0, [], [("1.2.3.1", "a" * 64), ("1.2.3.2", "b" * 64)])
    assert whole.check(expected) == []
    partial = RetrieveAnswer("0xB000", 1, 1, ["1.2.3.2"], [("1.2.3.1", "a" * 64)])
    assert partial.check(expected) == []
    assert RetrieveAnswer("0xA702", 0, 2, ["1.2.3.1", "1.2.3.2"]).check(expected) == []
    missing = RetrieveAnswer("0x0000", 1, 0, [], [("1.2.3.1", "a" * 64)])
    assert missing.check(expected) == ["success with 1 of 2 instances"]
    altered = RetrieveAnswer("0x0000", 2, 0, [], [("1.2.3.1", "a" * 64), ("1.2.3.2", "c" * 64)])
    assert altered.check(expected) == ["unknown or altered instances arrived: ['1.2.3.2']"]
    unlisted = RetrieveAnswer("0xB000", 1, 1, [], [("1.2.3.1", "a" * 64)])
    assert len(unlisted.check(expected)) == 2  # one failed, none listed
    assert RetrieveAnswer("0xC000").check(expected) == ["an unclear status"]
    assert RetrieveAnswer("no-answer").check(expected) == ["no final status: no-answer"]
