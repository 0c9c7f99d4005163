"""A full disk (benchmarks/soak/disk.py in small): ``kho serve`` with its data directory
on a small tmpfs the test mounts (root needed: skipped otherwise).  Stores are refused
with 0xA700 once it is full, nothing half-written is visible, and once space is freed
stores succeed again and the finisher drains, without a restart."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from benchmarks.soak.disk import run_full_disk, small_filesystem
from kho.archive.catalog.sqlite import SqliteCatalog
from kho.errors import CatalogError
from kho.storage.base import is_full

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


def _assert_refused_cleanly_and_recovered(outcome: dict[str, Any]) -> None:
    """Full: 0xA700 / 507, the server up, nothing refused catalogued, nothing lost or
    left over; freed: stores succeed and the finisher drains."""
    assert outcome["stored_before_full"] > 0
    assert outcome["dimse_statuses_when_full"] == ["0xA700"]
    assert outcome["stow_status_when_full"] == 507
    assert outcome["server_alive_when_full"]
    assert outcome["refused_but_catalogued"] == []
    assert outcome["lost"] == outcome["corrupt"] == []
    assert outcome["missing_objects"] == outcome["orphans"] == []
    assert outcome["dimse_statuses_after_freeing"] == {"0x0000": 5}
    assert outcome["stow_status_after_freeing"] == 200
    assert outcome["finisher_stalled"] == ""


def test_a_full_data_disk_refuses_cleanly_and_recovers_once_space_is_freed(
    tmp_path: Path,
) -> None:
    # 8 MiB fill the disk; freeing 16 leaves the finisher room for the whole backlog
    outcome = run_full_disk(tmp_path, size_mb=24, ballast_mb=16, pixels=128, drain_timeout=60)
    _assert_refused_cleanly_and_recovered(outcome)


def test_stow_on_a_full_disk_answers_507(tmp_path: Path) -> None:
    outcome = run_full_disk(tmp_path, size_mb=8, ballast_mb=6, pixels=128, drain_timeout=30)
    assert outcome["dimse_statuses_when_full"] == ["0xA700"]
    assert outcome["stow_status_when_full"] == 507


def test_the_finisher_drains_when_less_than_the_backlog_is_freed(tmp_path: Path) -> None:
    """It was stuck at 0 bytes free: a spool segment was freed only whole, once every
    instance in it was finished.  Collected garbage now frees each finished instance's
    bytes in its segment (a hole punched), so the finisher goes on instance by instance,
    a garbage delay behind (60 s by default; 2 s here, so the test is short)."""
    outcome = run_full_disk(
        tmp_path, size_mb=16, ballast_mb=4, pixels=256, drain_timeout=300, garbage_delay_s=2
    )
    assert outcome["dimse_statuses_when_full"] == ["0xA700"]
    assert outcome["finisher_stalled"] == ""
    assert outcome["lost"] == outcome["corrupt"] == []
    assert outcome["missing_objects"] == outcome["orphans"] == []


def test_a_full_catalog_disk_refuses_cleanly_and_recovers_once_space_is_freed(
    tmp_path: Path,
) -> None:
    """Only the SQLite catalog on the small disk (3 MiB, 1 MiB freed).  Its WAL filled it
    (SQLite checkpoints at 1000 pages, 4 MiB) and every write after freeing appended to
    the WAL until it was full again: the finisher stayed stuck at 0 bytes free.  After a
    full disk the next write now checkpoints and truncates the WAL first."""
    outcome = run_full_disk(
        tmp_path, where="catalog", size_mb=3, ballast_mb=1, pixels=16, drain_timeout=20
    )
    _assert_refused_cleanly_and_recovered(outcome)


def test_after_a_full_catalog_disk_the_wal_no_longer_takes_the_freed_room(
    tmp_path: Path,
) -> None:
    """The catalog alone, without kho serve, on a 3 MiB disk: one row rewritten until the
    WAL fills it (as kho's index pages are), then 1 MiB freed and the row rewritten 2000
    times more (8 MiB of WAL pages; the data is one page).  Before, the WAL took the freed
    room and the disk was full again after a few hundred."""
    with small_filesystem(tmp_path / "catalog", 3) as small:
        ballast = small / "ballast"
        ballast.write_bytes(b"\0" * (1 << 20))
        catalog = SqliteCatalog(small / "catalog.sqlite")
        rewrite = "UPDATE filler SET x = randomblob(3000) WHERE n = 0"
        try:
            with catalog.transaction():
                catalog.execute("CREATE TABLE filler (n INTEGER PRIMARY KEY, x BLOB)")
                catalog.execute("INSERT INTO filler VALUES (0, NULL)")
            with pytest.raises(CatalogError) as full:
                for _ in range(2000):
                    with catalog.transaction():
                        catalog.execute(rewrite)
            assert is_full(full.value)  # what STOW answers 507 and C-STORE 0xA700 for
            ballast.unlink()
            for _ in range(2000):
                with catalog.transaction():
                    catalog.execute(rewrite)
            assert catalog.fetchone("SELECT count(*) FROM filler") == (1,)
        finally:
            catalog.close()
