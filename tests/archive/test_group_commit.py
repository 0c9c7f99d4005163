"""SQLite group commit: instance commits that queue while the catalog is being written go
in one transaction, each in its own savepoint, and each caller returns only after that
transaction's COMMIT; a member refused (an identity conflict) gets its own error and
nothing of it is stored, while the others of its group are stored and counted."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kho.archive.archive import Archive
from kho.archive.catalog.sqlite import SqliteCatalog
from kho.archive.config import Settings
from kho.errors import IdentityConflictError
from tests.archive.test_identity import ROOT, instance


@pytest.fixture
def archive(settings: Settings) -> Iterator[Archive]:
    with Archive(settings) as arc:
        arc.finisher.stop()
        yield arc


def _wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def _count_transactions(catalog: SqliteCatalog, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The group transactions begun from now on (each entry: one BEGIN)."""
    begun: list[int] = []
    real = SqliteCatalog._begin

    def counting(conn: Any) -> None:
        begun.append(1)
        real(conn)

    monkeypatch.setattr(catalog, "_begin", counting)
    return begun


def test_commits_queued_while_the_catalog_is_written_share_one_transaction(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = archive.catalog
    assert isinstance(catalog, SqliteCatalog) and catalog.group_commit
    study, series = f"{ROOT}.70", f"{ROOT}.70.1"
    archive.ingest_part10(instance(f"{ROOT}.70.1.0", "GROUP", study, series))
    begun = _count_transactions(catalog, monkeypatch)
    results: dict[int, Any] = {}

    def store(n: int) -> None:
        try:
            results[n] = archive.ingest_part10(
                instance(f"{ROOT}.70.1.{n}", "GROUP", study, series), defer=True
            )
        except Exception as exc:  # shown by the assertion below
            results[n] = exc

    with catalog.writer():  # another writer holds the catalog: the commits queue
        threads = [threading.Thread(target=store, args=(n,)) for n in range(1, 7)]
        for thread in threads:
            thread.start()
        _wait_for(lambda: len(catalog._queued) == 6)
        assert results == {}  # nobody answered before its commit
    for thread in threads:
        thread.join(20)
    assert all(not isinstance(r, Exception) for r in results.values()), results
    assert len(begun) == 1  # six instances, one transaction
    for n in range(1, 7):
        assert catalog.get_instance(f"{ROOT}.70.1.{n}") is not None
    assert catalog.fetchone("SELECT num_instances FROM series WHERE series_uid = ?", (series,)) == (
        7,
    )
    assert catalog.unfinished_count() == 7  # queued for the finisher, each once


def test_a_refused_member_fails_alone_and_leaves_nothing(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = archive.catalog
    study = f"{ROOT}.71"
    archive.ingest_part10(instance(f"{ROOT}.71.1.0", "OWNER", study, f"{ROOT}.71.1"))
    before = catalog.counts()
    begun = _count_transactions(catalog, monkeypatch)
    results: dict[str, Any] = {}

    def store(sop: str, patient: str, series: str) -> None:
        try:
            results[sop] = archive.ingest_part10(instance(sop, patient, study, series))
        except Exception as exc:
            results[sop] = exc

    members = [
        (f"{ROOT}.71.1.1", "OWNER", f"{ROOT}.71.1"),
        (f"{ROOT}.71.2.1", "INTRUDER", f"{ROOT}.71.2"),  # the study is OWNER's
        (f"{ROOT}.71.1.2", "OWNER", f"{ROOT}.71.1"),
    ]
    with catalog.writer():
        threads = [threading.Thread(target=store, args=member) for member in members]
        for thread in threads:
            thread.start()
        _wait_for(lambda: len(catalog._queued) == 3)
    for thread in threads:
        thread.join(20)
    assert len(begun) == 1
    assert isinstance(results[f"{ROOT}.71.2.1"], IdentityConflictError)
    assert catalog.get_instance(f"{ROOT}.71.2.1") is None
    assert catalog.fetchone("SELECT 1 FROM series WHERE series_uid = ?", (f"{ROOT}.71.2",)) is None
    for sop in (f"{ROOT}.71.1.1", f"{ROOT}.71.1.2"):
        assert not isinstance(results[sop], Exception), results[sop]
        assert catalog.get_instance(sop) is not None
    assert catalog.counts()["instances"] == before["instances"] + 2


def test_a_lone_refused_commit_keeps_its_own_error(archive: Archive) -> None:
    study = f"{ROOT}.72"
    archive.ingest_part10(instance(f"{ROOT}.72.1.0", "OWNER", study, f"{ROOT}.72.1"))
    with pytest.raises(IdentityConflictError):
        archive.ingest_part10(instance(f"{ROOT}.72.2.1", "OTHER", study, f"{ROOT}.72.2"))
    assert archive.catalog.get_instance(f"{ROOT}.72.2.1") is None


def test_a_failed_group_commit_fails_every_member(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The COMMIT itself fails (a full disk, say): no member is stored, each is told."""
    catalog = archive.catalog
    assert isinstance(catalog, SqliteCatalog)
    study, series = f"{ROOT}.73", f"{ROOT}.73.1"
    archive.ingest_part10(instance(f"{ROOT}.73.1.0", "FAIL", study, series))
    before, queued_before = catalog.counts(), catalog.unfinished_count()
    real = SqliteCatalog._run_in_savepoints

    def then_break(conn: Any, group: list[Any]) -> None:
        real(conn, group)
        raise OSError("disk full")  # as if the COMMIT had failed after the statements

    monkeypatch.setattr(catalog, "_run_in_savepoints", then_break)
    results: dict[int, Any] = {}

    def store(n: int) -> None:
        try:
            results[n] = archive.ingest_part10(
                instance(f"{ROOT}.73.1.{n}", "FAIL", study, series), defer=True
            )
        except Exception as exc:
            results[n] = exc

    with catalog.writer():
        threads = [threading.Thread(target=store, args=(n,)) for n in range(1, 4)]
        for thread in threads:
            thread.start()
        _wait_for(lambda: len(catalog._queued) == 3)
    for thread in threads:
        thread.join(20)
    assert all(isinstance(r, Exception) for r in results.values()), results
    assert catalog.counts() == before
    assert catalog.unfinished_count() == queued_before
