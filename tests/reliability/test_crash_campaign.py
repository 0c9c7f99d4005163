"""The crash campaign in small (benchmarks/soak/crash.py runs it for hours): SIGKILL
``kho serve`` three times during DIMSE and STOW ingest; after each restart no
acknowledged instance is lost or altered, no row points at a missing object, nothing is
left that no row or journal refers to, the finisher drains and every acknowledged
instance has its audit record."""

from __future__ import annotations

from pathlib import Path

from benchmarks.soak.crash import run_campaign


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
