"""The crash campaign in small (benchmarks/soak/crash.py runs it for hours): SIGKILL
``kho serve`` three times during DIMSE and STOW ingest; after each restart no
acknowledged instance is lost or altered, no row points at a missing object, nothing is
left that no row or journal refers to, the finisher drains and every acknowledged
instance has its audit record."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.soak import harness
from benchmarks.soak.crash import run_campaign
from kho.archive.archive import Archive


def test_three_kills_lose_nothing_acknowledged_and_leave_nothing_behind(tmp_path: Path) -> None:
    result = run_campaign("sqlite", 3, tmp_path, seed=7, associations=2, window=(0.4, 1.2))
    assert result.kills == 3
    assert result.acknowledged > 0 and result.kills_mid_ingest >= 1
    assert result.lost == []
    assert result.corrupt == []
    assert result.missing_objects == []
    assert result.orphans == []
    assert result.unaudited == []
    assert result.leftover_spool_segments == 0
    assert result.catalogued >= result.acknowledged


def test_the_store_audit_reports_orphans_and_not_garbage_collected_while_it_listed(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit behind the orphan counts: an object nothing refers to is an orphan; one
    the live server's garbage collector deleted (and forgot) while the listing ran is not:
    it is gone at the audit's second look (on S3 a listing takes seconds)."""
    orphan = "i/00/01/0001-orphan.received"
    archive.store.put(orphan, b"left behind")
    assert harness.audit_store(archive).orphans == [orphan]
    collected = "i/00/02/0002-collected.received"  # listed, deleted before the garbage read
    real_keys = harness.store_keys
    monkeypatch.setattr(harness, "store_keys", lambda a: real_keys(a) | {collected})
    audit = harness.audit_store(archive)
    assert audit.orphans == [orphan]
    assert audit.collected_meanwhile == [collected]
