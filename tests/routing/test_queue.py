"""The outbound queue in the catalog, on SQLite and PostgreSQL: rows commit with their
instance (and only with it), claims hold a lease, stable groups are released from the
rows' own times, failures back off and die."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from kho.archive.archive import Archive
from kho.archive.catalog import PROCESS_OWNER
from kho.archive.config import DuplicatePolicy, Settings
from kho.errors import IdentityConflictError
from kho.routing import Router, RoutingConfig
from kho.routing import queue as q
from tests.helpers.part10 import part10_bytes
from tests.helpers.postgres import ENGINES, archive_on
from tests.routing.conftest import ingest


def _config(trigger: str = "instance", stable_s: float = 30.0) -> RoutingConfig:
    return RoutingConfig(
        rules=[{"name": "all", "destination": "pacs", "trigger": trigger, "stable_s": stable_s}],
        destinations={"pacs": {"url": "dicom://PACS@127.0.0.1:9", "retry_base_s": 1}},
    )


@pytest.fixture(params=ENGINES)
def engine_archive(request: pytest.FixtureRequest, settings: Settings) -> Iterator[Archive]:
    with archive_on(request.param, settings) as archive:
        yield archive


def _states(archive: Archive) -> dict[str, int]:
    rows = archive.catalog.fetchall("SELECT state, count(*) FROM forward_queue GROUP BY state")
    return {str(state): int(n) for state, n in rows}


def test_rows_commit_with_their_instance_and_only_then(
    engine_archive: Archive, series: list[bytes]
) -> None:
    archive = engine_archive
    router = Router(archive, _config())
    ingest(archive, router, series)
    assert _states(archive) == {"queued": len(series)}
    queued = {r[0] for r in archive.catalog.fetchall("SELECT sop_uid FROM forward_queue")}
    stored = {r.sop_uid for r in archive.catalog.instances_where("1 = 1", ())}
    assert queued == stored
    # the same bytes again: nothing stored, nothing queued
    ingest(archive, router, series[:3])
    assert _states(archive) == {"queued": len(series)}
    # an instance the archive refuses (its study belongs to another patient): no row
    ds = dcmread(io.BytesIO(series[0]))
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.1425.4242"
    ds.PatientID = "SOMEONE-ELSE"
    data = part10_bytes(ds)
    with pytest.raises(IdentityConflictError):
        ingest(archive, router, [data])
    assert _states(archive) == {"queued": len(series)}


def test_a_replaced_instance_is_queued_again(settings: Settings, series: list[bytes]) -> None:
    assert settings.duplicate_policy is DuplicatePolicy.REPLACE
    with Archive(settings) as archive:
        router = Router(archive, _config())
        ingest(archive, router, series[:1])
        ds = dcmread(io.BytesIO(series[0]))
        ds.SeriesDescription = "CORRECTED"
        ingest(archive, router, [part10_bytes(ds)])
        assert _states(archive) == {"queued": 2}


def test_claims_hold_a_lease(engine_archive: Archive, series: list[bytes]) -> None:
    archive = engine_archive
    router = Router(archive, _config())
    ingest(archive, router, series)
    catalog = archive.catalog
    first_token, first = q.claim(catalog, "pacs", 4, lease_s=60)
    _second_token, second = q.claim(catalog, "pacs", 100, lease_s=60)
    assert len(first) == 4 and len(second) == len(series) - 4
    assert not {r.id for r in first} & {r.id for r in second}
    assert q.claim(catalog, "pacs", 100, lease_s=60)[1] == []
    assert q.live_claims(catalog, "pacs") == 2
    # a lease that ran out (its holder died elsewhere): claimable again
    catalog.execute(
        "UPDATE forward_queue SET lease_until = 1 WHERE batch = ?",
        (first_token,),
    )
    _token, again = q.claim(catalog, "pacs", 100, lease_s=60)
    assert {r.id for r in again} == {r.id for r in first}
    assert all(r.attempts == 2 for r in again)
    q.delivered(catalog, [r.id for r in again])
    assert _states(archive) == {"queued": len(series) - 4}


def test_claims_of_a_killed_process_are_released_at_once(
    engine_archive: Archive, series: list[bytes]
) -> None:
    archive = engine_archive
    router = Router(archive, _config())
    ingest(archive, router, series)
    code = "import os; print(os.getpid())"
    dead = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    host, _pid, _start = PROCESS_OWNER.split(":")
    gone_owner = f"{host}:{int(dead.stdout)}:1"
    archive.catalog.execute(
        "UPDATE forward_queue SET owner = ?, batch = 'b', lease_until = ?",
        (gone_owner, time.time() + 3600),
    )
    assert q.claim(archive.catalog, "pacs", 100, lease_s=60)[1] == []
    assert q.release_gone_owners(archive.catalog) == len(series)
    assert len(q.claim(archive.catalog, "pacs", 100, lease_s=60)[1]) == len(series)


def test_stable_groups_wait_for_quiet(engine_archive: Archive, series: list[bytes]) -> None:
    archive = engine_archive
    router = Router(archive, _config(trigger="series", stable_s=5.0))
    ingest(archive, router, series[:5])
    catalog = archive.catalog
    assert _states(archive) == {"waiting": 5}
    assert q.release_stable(catalog) == 0
    arrived = float(catalog.fetchone("SELECT max(queued_at) FROM forward_queue")[0])  # type: ignore[index]
    # a later instance of the same series starts the quiet period again
    time.sleep(0.3)
    ingest(archive, router, series[5:6])
    last = float(catalog.fetchone("SELECT max(queued_at) FROM forward_queue")[0])  # type: ignore[index]
    assert q.release_stable(catalog, now=arrived + 5.1) == 0
    assert q.release_stable(catalog, now=last + 4.9) == 0
    assert q.release_stable(catalog, now=last + 5.1) == 6
    assert _states(archive) == {"queued": 6}


def test_failures_back_off_then_die(engine_archive: Archive, series: list[bytes]) -> None:
    archive = engine_archive
    router = Router(archive, _config())
    ingest(archive, router, series[:2])
    catalog = archive.catalog
    _token, rows = q.claim(catalog, "pacs", 10, lease_s=60)
    assert q.retry_later(catalog, [rows[0].id], "refused", delay_s=60, dead_after_s=3600) == 0
    assert q.ready_destinations(catalog) == {}  # both: one backing off, one still claimed
    catalog.execute("UPDATE forward_queue SET queued_at = 0")  # queued long ago
    assert q.retry_later(catalog, [rows[1].id], "refused", delay_s=1, dead_after_s=3600) == 1
    assert _states(archive) == {"queued": 1, "dead": 1}
    assert q.rows_in(catalog, q.DEAD)[0].last_error == "refused"
    assert q.retry_dead(catalog) == 1
    assert _states(archive) == {"queued": 2}
    delays = [q.note_failure(catalog, "pacs", "down", (1.0, 8.0)) for _ in range(6)]
    assert delays[0] < 1.3 and 1.9 < delays[1] < 2.5 and all(d <= 8.0 * 1.2 for d in delays)
    assert "pacs" in q.next_try(catalog)
    q.note_success(catalog, "pacs")
    assert q.next_try(catalog) == {}
    health = q.status(catalog)["pacs"]
    assert health["failures"] == 0 and health["last_success"] > 0


def test_status_counts_and_lag(
    engine_archive: Archive, series: list[bytes], tmp_path: Path
) -> None:
    archive = engine_archive
    router = Router(archive, _config())
    ingest(archive, router, series[:3])
    time.sleep(0.05)
    status = router.status()["tenants"]["default"]["pacs"]
    assert status["queued"] == 3 and status["dead"] == 0
    assert status["lag_s"] > 0.0
