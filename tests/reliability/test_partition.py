"""A network partition between kho and PostgreSQL that drops packets (no reset, no FIN),
unlike test_outages.py's, which resets connections: without libpq's keepalives and
tcp_user_timeout (kho.archive.catalog.postgresql.NETWORK_BOUNDS) a statement sent into
it waits out TCP's retransmissions (about 15 minutes), one waiting for its answer
forever.  PostgreSQL is reached through a TCP proxy the test owns and only the proxy's
port is partitioned (iptables, tests/helpers/partition.py); small bounds, given in the
catalog URL as an admin would, keep the test short."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from psycopg.conninfo import conninfo_to_dict
from pydicom import dcmread
from pynetdicom import AE

from kho.archive.archive import Archive
from kho.archive.catalog import open_catalog
from kho.archive.catalog.base import Catalog
from kho.archive.catalog.postgresql import NETWORK_BOUNDS, bounded_conninfo
from kho.archive.config import Settings
from kho.errors import CatalogError, CatalogUnavailableError
from tests.archive.test_ingest import make_instance
from tests.helpers import partition
from tests.helpers.postgres import postgres_database
from tests.helpers.server import kho_serve
from tests.helpers.tcp_proxy import TcpProxy

#: the test's bounds, in the catalog URL's query string: a dead connection fails within
#: about BOUND_S (unacknowledged data after tcp_user_timeout; a silent one after
#: keepalives_idle + its probes, cut at tcp_user_timeout; a new one after connect_timeout)
BOUND_S = 3
BOUNDS = (
    f"tcp_user_timeout={BOUND_S * 1000}&keepalives_idle=1&keepalives_interval=1"
    f"&keepalives_count=2&connect_timeout={BOUND_S}"
)
#: a statement not answered within this has hung: a correctness bound, generous for a
#: busy machine, not a performance target
HUNG_S = 3 * BOUND_S
#: a C-STORE the partition fails touches the catalog once (its clean-up is deferred
#: until the catalog answers again, kho.archive.ingest.pipeline._abandon): hung if not
#: answered within this (a correctness bound with room for a busy machine)
STORE_HUNG_S = 3 * BOUND_S
CT = "1.2.840.10008.5.1.4.1.1.2"

needs_partitions = pytest.mark.skipif(bool(partition.available()), reason=partition.available())


@pytest.fixture
def partitionable_url() -> Iterator[tuple[str, TcpProxy]]:
    """(the URL, with BOUNDS, of a fresh PostgreSQL database reached through a proxy whose
    port the test may partition; the proxy)"""
    with postgres_database() as url:
        parts = urlsplit(url)
        with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
            netloc = f"{parts.username}@127.0.0.1:{proxy.port}"
            yield urlunsplit(parts._replace(netloc=netloc, query=BOUNDS)), proxy


@pytest.fixture
def partitionable_catalog(
    partitionable_url: tuple[str, TcpProxy],
) -> Iterator[tuple[Catalog, TcpProxy]]:
    url, proxy = partitionable_url
    catalog = open_catalog(url)
    try:
        yield catalog, proxy
    finally:
        catalog.close()


class _Thread:
    """One thread of its own (so one catalog connection of its own), timed."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1)

    def submit(self, call: Callable[[], Any]) -> Future[tuple[Any, float]]:
        def timed() -> tuple[Any, float]:
            start = time.monotonic()
            try:
                return call(), time.monotonic() - start
            except Exception as exc:  # handed to the test
                return exc, time.monotonic() - start

        return self._pool.submit(timed)

    def run(self, call: Callable[[], Any]) -> Any:
        return self.submit(call).result(HUNG_S)[0]

    def close(self) -> None:
        # a thread still hung is not waited for (the test has failed already)
        self._pool.shutdown(wait=False)


def test_the_catalog_url_overrides_the_network_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """An admin's own bounds (in the URL; connect_timeout also in PGCONNECT_TIMEOUT, as
    libpq reads it) stand; the others are kho's."""
    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    url = "postgresql://kho@db:5432/kho?tcp_user_timeout=60000&keepalives=0"
    given = conninfo_to_dict(bounded_conninfo(url, options="-c search_path=tenant_a"))
    assert given["tcp_user_timeout"] == "60000" and given["keepalives"] == "0"
    assert given["connect_timeout"] == NETWORK_BOUNDS["connect_timeout"]
    assert given["options"] == "-c search_path=tenant_a" and given["host"] == "db"
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "30")
    assert "connect_timeout" not in conninfo_to_dict(bounded_conninfo(url))


@needs_partitions
def test_a_partition_that_drops_packets_fails_statements_within_the_bound(
    partitionable_catalog: tuple[Catalog, TcpProxy],
) -> None:
    """Every kind of statement the partition catches fails with CatalogError (0xA7xx /
    503) instead of hanging: one waiting for its answer, one sent on an idle connection,
    one needing a new connection.  Once the partition is gone each thread's next statement
    works, on a new connection, kho never restarted; so does the first statement of a
    thread whose connection sat idle through the partition."""
    catalog, proxy = partitionable_catalog
    waiting, idle, new, quiet = threads = [_Thread() for _ in range(4)]
    try:
        before = {t: t.run(lambda: catalog.connection) for t in (waiting, idle, quiet)}
        # sent and acknowledged before the partition; its answer (after 1 s) is dropped
        answer = waiting.submit(lambda: catalog.fetchone("SELECT pg_sleep(1)"))
        time.sleep(0.5)
        with partition.dropped(proxy.port):
            start = time.monotonic()
            sent = idle.submit(catalog.unfinished_count)  # into the partition
            opened = new.submit(catalog.unfinished_count)  # the thread's first connection
            outcomes = {
                "waiting for its answer": answer.result(HUNG_S + 1),
                "sent into the partition": sent.result(HUNG_S),
                "a new connection": opened.result(HUNG_S),
            }
            for name, (outcome, elapsed) in outcomes.items():
                print(f"{name}: {type(outcome).__name__} after {elapsed:.1f} s: {outcome}")
                assert isinstance(outcome, CatalogError), (name, outcome)
            # long enough for the quiet thread's keepalives to give its connection up
            time.sleep(max(0.0, 2 * BOUND_S - (time.monotonic() - start)))
        assert partition.leftover_rules() == []
        for thread in threads:
            assert thread.run(catalog.unfinished_count) == 0
        for thread, conn in before.items():
            assert thread.run(lambda: catalog.connection) is not conn
    finally:
        for thread in threads:
            thread.close()


@needs_partitions
def test_a_c_store_during_a_partition_is_refused_and_the_next_one_stored(
    partitionable_url: tuple[str, TcpProxy], tmp_path: Path
) -> None:
    """Through a live ``kho serve``: a C-STORE whose catalog is partitioned is answered
    0xA7xx (the modality sends it again later) instead of holding the association until
    the modality's DIMSE timeout; once the partition is gone the same association stores
    again, kho never restarted."""
    url, proxy = partitionable_url
    ae = AE(ae_title="PARTITION")
    ae.add_requested_context(CT, "1.2.840.10008.1.2.1")
    # an answer later than this is no answer (send_c_store returns none): the test fails
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = STORE_HUNG_S

    def status(n: int) -> int | None:
        sop_uid = f"1.2.826.0.1.3680043.10.1425.88.{n}"
        answer = assoc.send_c_store(dcmread(BytesIO(make_instance(sop_uid=sop_uid))))
        return int(answer.Status) if "Status" in answer else None

    (tmp_path / "data").mkdir()
    with kho_serve(tmp_path / "data", env={"KHO_CATALOG_URL": url}) as (proc, port):
        assoc = ae.associate("127.0.0.1", port, ae_title="KHO")
        assert assoc.is_established
        try:
            assert status(1) == 0x0000
            with partition.dropped(proxy.port):
                start = time.monotonic()
                refused = status(2)
                print(f"C-STORE in the partition: {refused} after {time.monotonic() - start:.1f} s")
                assert refused is not None and 0xA700 <= refused <= 0xA7FF, refused
            assert status(3) == 0x0000
            assert status(2) == 0x0000  # sent again, as the modality would
        finally:
            if assoc.is_established:
                assoc.release()
        assert proc.poll() is None


@needs_partitions
def test_an_ingest_the_partition_fails_is_cleaned_up_once_the_catalog_answers(
    partitionable_url: tuple[str, TcpProxy], tmp_path: Path
) -> None:
    """The failed ingest asks the unreachable catalog nothing more (each statement would
    wait out another bound before the sender hears of the failure); whether its commit
    went through is unknown, so nothing is deleted then.  The next recovery pass after
    the partition hands its journal row to recovery and removes what it wrote: nothing
    is left, the archive never restarted."""
    url, proxy = partitionable_url
    settings = Settings(
        data_dir=tmp_path / "data", dicom_port=0, http_port=0, catalog_url=url, spool="off"
    )
    with Archive(settings) as archive, ExitStack() as partitioned:
        worker = _Thread()
        commit_instance = archive.catalog.commit_instance

        def commit_into_the_partition(*args: Any, **kwargs: Any) -> Any:
            # the objects are written and journalled: the partition catches the commit
            partitioned.enter_context(partition.dropped(proxy.port))
            return commit_instance(*args, **kwargs)

        try:
            assert worker.run(lambda: archive.ingest_part10(make_instance(sop_uid="1.2.3.1")))
            archive.catalog.commit_instance = commit_into_the_partition  # type: ignore[method-assign]
            failed = worker.submit(lambda: archive.ingest_part10(make_instance(sop_uid="1.2.3.2")))
            outcome, elapsed = failed.result(STORE_HUNG_S)
            print(f"ingest in the partition: {type(outcome).__name__} after {elapsed:.1f} s")
            assert isinstance(outcome, CatalogUnavailableError), outcome
            # answered after one bound, not one per clean-up statement
            assert elapsed < 2 * BOUND_S + 1
            partitioned.close()
            archive.catalog.commit_instance = commit_instance  # type: ignore[method-assign]
            journalled = worker.run(archive.catalog.pending_prefixes)
            assert len(journalled) == 1
            written = worker.run(lambda: list(archive.store.list(journalled[0])))
            assert written, "the failed ingest wrote its objects before the commit"
            worker.run(lambda: archive.recover(grace_s=3600))
            assert worker.run(archive.catalog.pending_prefixes) == []
            assert worker.run(lambda: list(archive.store.list(journalled[0]))) == []
            assert worker.run(lambda: archive.catalog.get_instance("1.2.3.2")) is None
            assert worker.run(lambda: archive.ingest_part10(make_instance(sop_uid="1.2.3.2")))
        finally:
            worker.close()
