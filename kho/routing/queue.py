"""The outbound queue: one row per instance and destination, in the tenant's own catalog
(tables made on first use, SQLite and PostgreSQL).

A row is written in the transaction that stores the instance (``RowInsert``, see
kho.routing.router.Router.stored_rows), so an acknowledged instance a rule selects is
queued exactly when it is durable, whatever happens next.  Its life:

``waiting``   a series/study trigger: held until its group (rule and series or study)
              has had no new row for the rule's quiet period (``not_before``, the row's
              arrival plus that period: the group is released when every row of it is
              due), then ``queued``.  Kept in the catalog, so a restart loses nothing.
``queued``    to send once ``not_before`` has passed: claimed by a worker of any
              process with a lease (``owner``, ``batch``, ``lease_until``, as the
              finisher's queue is); a lease that runs out (its process died) makes the
              row claimable again.  Delivered rows are deleted.
``committing`` sent to a destination that commits storage: waiting for its
              N-EVENT-REPORT (``commit_uid``); sent again when none came before
              ``lease_until``.
``dead``      given up (a permanent refusal, or not delivered within the destination's
              ``dead_after_s``): kept until ``kho routes retry`` queues it again.
``withheld``  not sent on purpose (a de-identified route and burned-in annotation).

At least once: a row is deleted only after the destination acknowledged (and committed)
it; a worker killed between the two sends it again, which a PACS takes as the same
instance.  ``forward_destinations`` keeps each destination's health: consecutive
failures, the next try (exponential backoff), the last error and success.
"""

from __future__ import annotations

import re
import secrets
import time
import weakref
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from kho.archive.catalog import PROCESS_OWNER, Catalog, RowInsert, owner_is_gone

WAITING = "waiting"
QUEUED = "queued"
COMMITTING = "committing"
DEAD = "dead"
WITHHELD = "withheld"
STATES = (WAITING, QUEUED, COMMITTING, DEAD, WITHHELD)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS forward_queue (
    id TEXT PRIMARY KEY,
    rule TEXT NOT NULL,
    destination TEXT NOT NULL,
    project TEXT NOT NULL,
    allow_burned_in INTEGER NOT NULL,
    sop_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    group_key TEXT NOT NULL,
    state TEXT NOT NULL,
    queued_at DOUBLE PRECISION NOT NULL,
    not_before DOUBLE PRECISION NOT NULL,
    requested_by TEXT NOT NULL,
    owner TEXT NOT NULL DEFAULT '',
    batch TEXT NOT NULL DEFAULT '',
    lease_until DOUBLE PRECISION NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    commit_uid TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS forward_queue_ready ON forward_queue (state, destination, not_before);
CREATE INDEX IF NOT EXISTS forward_queue_group ON forward_queue (state, group_key);
CREATE INDEX IF NOT EXISTS forward_queue_batch ON forward_queue (batch);
CREATE INDEX IF NOT EXISTS forward_queue_commit ON forward_queue (commit_uid);
CREATE TABLE IF NOT EXISTS forward_destinations (
    name TEXT PRIMARY KEY,
    failures INTEGER NOT NULL DEFAULT 0,
    next_try DOUBLE PRECISION NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    last_failure DOUBLE PRECISION NOT NULL DEFAULT 0,
    last_success DOUBLE PRECISION NOT NULL DEFAULT 0
)
"""

#: the columns a new row is inserted with (the rest take their defaults)
ROW_COLUMNS = (
    "id",
    "rule",
    "destination",
    "project",
    "allow_burned_in",
    "sop_uid",
    "series_uid",
    "study_uid",
    "group_key",
    "state",
    "queued_at",
    "not_before",
    "requested_by",
)
_SELECT = (
    "id, rule, destination, project, allow_burned_in, sop_uid, series_uid, study_uid, "
    "state, queued_at, attempts, last_error, commit_uid, requested_by"
)
#: an error text kept in a row or shown by status (never patient data: kho's own words)
_ERROR_LENGTH = 500
#: rows one statement names at most (SQLite's variable limit is 32766; plenty of room)
_CHUNK = 500

_ready: weakref.WeakSet[Catalog] = weakref.WeakSet()


def ensure_schema(catalog: Catalog) -> None:
    """Create the queue's tables in ``catalog`` if they are missing (once per catalog
    object; PostgreSQL: no DDL at all when they exist, as kho.audit.journal does)."""
    if catalog in _ready:
        return
    statements = [s for s in _SCHEMA.split(";") if s.strip()]
    if catalog.dialect == "postgresql":
        names = re.findall(r"CREATE (?:TABLE|INDEX) IF NOT EXISTS (\w+)", _SCHEMA)
        marks = ", ".join("to_regclass(?)" for _ in names)
        row = catalog.fetchone(f"SELECT {marks}", names)
        if row is None or any(found is None for found in row):
            with catalog.transaction():
                catalog.execute("SELECT pg_advisory_xact_lock(7303)")  # kho's DDL: 7301, 7302
                for statement in statements:
                    catalog.execute(statement)
    else:
        with catalog.transaction():
            for statement in statements:
                catalog.execute(statement)
    _ready.add(catalog)


def _bookkeeping(catalog: Catalog) -> AbstractContextManager[None]:
    """A write of the queue's own state (claims, deliveries, retries) whose commit skips
    the flush to disk (Catalog.relaxed_write: SQLite synchronous=NORMAL, PostgreSQL
    synchronous_commit off).  It survives a crash of the process; after a power loss it
    may be lost, and then an instance is claimed or sent again: at least once still
    holds.  Rows that queue an instance are never written this way (they commit with the
    instance, or in a transaction of their own: insert_rows)."""
    return catalog.relaxed_write()


def _marks(values: Sequence[Any]) -> str:
    return ", ".join("?" for _ in values)


def _chunks(values: Sequence[Any]) -> list[Sequence[Any]]:
    return [values[i : i + _CHUNK] for i in range(0, len(values), _CHUNK)]


def _clip(text: str) -> str:
    return text[:_ERROR_LENGTH]


@dataclass(frozen=True, slots=True)
class QueueRow:
    """One instance to send to one destination."""

    id: str
    rule: str
    destination: str
    project: str
    allow_burned_in: bool
    sop_uid: str
    series_uid: str
    study_uid: str
    state: str
    queued_at: float
    attempts: int
    last_error: str
    commit_uid: str
    requested_by: str

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> QueueRow:
        return cls(
            str(row[0]),
            str(row[1]),
            str(row[2]),
            str(row[3]),
            bool(row[4]),
            str(row[5]),
            str(row[6]),
            str(row[7]),
            str(row[8]),
            float(row[9]),
            int(row[10]),
            str(row[11]),
            str(row[12]),
            str(row[13]),
        )


def new_row(
    *,
    rule: str,
    destination: str,
    project: str,
    allow_burned_in: bool,
    sop_uid: str,
    series_uid: str,
    study_uid: str,
    group_key: str = "",
    stable_s: float = 0.0,
    requested_by: str = "",
    now: float | None = None,
) -> RowInsert:
    """The row queuing one instance for one destination; with a ``group_key`` (a
    series/study trigger) it waits ``stable_s`` for its group to go quiet."""
    now = time.time() if now is None else now
    state = WAITING if group_key else QUEUED
    values = (
        secrets.token_hex(12),
        rule,
        destination,
        project,
        int(allow_burned_in),
        sop_uid,
        series_uid,
        study_uid,
        group_key,
        state,
        now,
        now + stable_s if group_key else now,
        requested_by[:200],
    )
    return RowInsert("forward_queue", ROW_COLUMNS, values)


def insert_rows(catalog: Catalog, rows: Sequence[RowInsert]) -> None:
    """Queue rows outside an ingest (an on-demand send), in one transaction."""
    if not rows:
        return
    with catalog.transaction():
        catalog.execute_batch([row.statement() for row in rows])


# --- the stable-group trigger -----------------------------------------------------------------


def release_stable(catalog: Catalog, now: float | None = None) -> int:
    """Queue the waiting rows of every group that has gone quiet (each of its rows due);
    how many."""
    now = time.time() if now is None else now
    if (
        catalog.fetchone(
            "SELECT 1 FROM forward_queue WHERE state = ? AND not_before <= ? LIMIT 1",
            (WAITING, now),
        )
        is None
    ):
        return 0
    with _bookkeeping(catalog):
        cursor = catalog.execute(
            "UPDATE forward_queue SET state = ?, not_before = ? WHERE state = ? AND group_key IN "
            "(SELECT group_key FROM forward_queue WHERE state = ? GROUP BY group_key "
            "HAVING max(not_before) <= ?)",
            (QUEUED, now, WAITING, WAITING, now),
        )
    return max(0, int(cursor.rowcount))


# --- claiming and settling ------------------------------------------------------------------


def ready_destinations(catalog: Catalog, now: float | None = None) -> dict[str, int]:
    """Destinations with rows to send now, and how many."""
    now = time.time() if now is None else now
    rows = catalog.fetchall(
        "SELECT destination, count(*) FROM forward_queue WHERE state = ? AND not_before <= ? "
        "AND (owner = '' OR lease_until < ?) GROUP BY destination",
        (QUEUED, now, now),
    )
    return {str(name): int(count) for name, count in rows}


def live_claims(catalog: Catalog, destination: str, now: float | None = None) -> int:
    """Batches of ``destination`` being sent now (by any process sharing the catalog)."""
    now = time.time() if now is None else now
    row = catalog.fetchone(
        "SELECT count(DISTINCT batch) FROM forward_queue WHERE destination = ? AND state = ? "
        "AND owner <> '' AND lease_until >= ?",
        (destination, QUEUED, now),
    )
    return int(row[0]) if row else 0


def claim(
    catalog: Catalog, destination: str, limit: int, lease_s: float
) -> tuple[str, list[QueueRow]]:
    """Claim up to ``limit`` due rows of ``destination`` for this process, oldest first,
    ordered for sending (study, series, instance); (batch token, rows)."""
    now = time.time()
    batch = secrets.token_hex(8)
    # PostgreSQL: rows another process is claiming are skipped, not waited for
    lock = " FOR UPDATE SKIP LOCKED" if catalog.dialect == "postgresql" else ""
    with _bookkeeping(catalog):
        candidates = catalog.fetchall(
            "SELECT id FROM forward_queue WHERE destination = ? AND state = ? AND not_before <= ? "
            f"AND (owner = '' OR lease_until < ?) ORDER BY queued_at, id LIMIT {int(limit)}{lock}",
            (destination, QUEUED, now, now),
        )
        ids = [str(r[0]) for r in candidates]
        if not ids:
            return batch, []
        catalog.execute(
            "UPDATE forward_queue SET owner = ?, batch = ?, lease_until = ?, "
            f"attempts = attempts + 1 WHERE id IN ({_marks(ids)}) AND state = ? "
            "AND (owner = '' OR lease_until < ?)",
            (PROCESS_OWNER, batch, now + lease_s, *ids, QUEUED, now),
        )
    rows = catalog.fetchall(
        f"SELECT {_SELECT} FROM forward_queue WHERE batch = ? "
        "ORDER BY study_uid, series_uid, sop_uid",
        (batch,),
    )
    return batch, [QueueRow.from_row(r) for r in rows]


def extend_lease(catalog: Catalog, batch: str, lease_s: float) -> None:
    with _bookkeeping(catalog):
        catalog.execute(
            "UPDATE forward_queue SET lease_until = ? WHERE batch = ? AND state = ?",
            (time.time() + lease_s, batch, QUEUED),
        )


def delivered(catalog: Catalog, ids: Sequence[str]) -> None:
    """Rows the destination has (and, if it commits storage, committed): done."""
    if not ids:
        return
    with _bookkeeping(catalog):
        for chunk in _chunks(ids):
            catalog.execute(f"DELETE FROM forward_queue WHERE id IN ({_marks(chunk)})", chunk)


def committing(catalog: Catalog, ids: Sequence[str], commit_uid: str, timeout_s: float) -> None:
    """Rows sent to a destination that commits storage: waiting for its report."""
    if not ids:
        return
    until = time.time() + timeout_s
    with _bookkeeping(catalog):
        for chunk in _chunks(ids):
            catalog.execute(
                "UPDATE forward_queue SET state = ?, commit_uid = ?, lease_until = ?, "
                f"owner = '', batch = '' WHERE id IN ({_marks(chunk)})",
                (COMMITTING, commit_uid, until, *chunk),
            )


def retry_later(
    catalog: Catalog,
    ids: Sequence[str],
    error: str,
    *,
    delay_s: float,
    dead_after_s: float,
    refund: bool = False,
) -> int:
    """Rows not delivered this time: queued again after ``delay_s``, or dead when queued
    more than ``dead_after_s`` ago; how many went dead.  ``refund``: the row was never
    tried (its batch stopped before it), so its attempt is taken back."""
    if not ids:
        return 0
    now = time.time()
    attempts = "attempts - 1" if refund else "attempts"
    dead = 0
    with _bookkeeping(catalog):
        for chunk in _chunks(ids):
            catalog.execute(
                "UPDATE forward_queue SET state = CASE WHEN queued_at < ? THEN ? ELSE ? END, "
                f"not_before = ?, owner = '', batch = '', lease_until = 0, attempts = {attempts}, "
                f"last_error = ?, commit_uid = '' WHERE id IN ({_marks(chunk)})",
                (now - dead_after_s, DEAD, QUEUED, now + delay_s, _clip(error), *chunk),
            )
            row = catalog.fetchone(
                f"SELECT count(*) FROM forward_queue WHERE state = ? AND id IN ({_marks(chunk)})",
                (DEAD, *chunk),
            )
            dead += int(row[0]) if row else 0
    return dead


def give_up(catalog: Catalog, ids: Sequence[str], state: str, error: str) -> None:
    """Rows that will not be sent: ``dead`` (a permanent refusal) or ``withheld``."""
    if not ids:
        return
    with _bookkeeping(catalog):
        for chunk in _chunks(ids):
            catalog.execute(
                "UPDATE forward_queue SET state = ?, owner = '', batch = '', lease_until = 0, "
                f"last_error = ? WHERE id IN ({_marks(chunk)})",
                (state, _clip(error), *chunk),
            )


def release_gone_owners(catalog: Catalog) -> int:
    """Claims of processes of this host that have ended (a kill -9): claimable at once
    instead of after their lease."""
    released = 0
    owners = catalog.fetchall(
        "SELECT DISTINCT owner FROM forward_queue WHERE owner <> '' AND state = ?", (QUEUED,)
    )
    for (owner,) in owners:
        if owner_is_gone(str(owner)):
            with _bookkeeping(catalog):
                cursor = catalog.execute(
                    "UPDATE forward_queue SET owner = '', batch = '', lease_until = 0 "
                    "WHERE owner = ? AND state = ?",
                    (owner, QUEUED),
                )
            released += max(0, int(cursor.rowcount))
    return released


def expire_commitments(catalog: Catalog, now: float | None = None) -> int:
    """Rows whose storage commitment report never came: queued to be sent again."""
    now = time.time() if now is None else now
    if (
        catalog.fetchone(
            "SELECT 1 FROM forward_queue WHERE state = ? AND lease_until < ? LIMIT 1",
            (COMMITTING, now),
        )
        is None
    ):
        return 0  # the common case: no write transaction
    with _bookkeeping(catalog):
        cursor = catalog.execute(
            "UPDATE forward_queue SET state = ?, not_before = ?, commit_uid = '', "
            "last_error = ? WHERE state = ? AND lease_until < ?",
            (QUEUED, now, "no storage commitment report in time", COMMITTING, now),
        )
    return max(0, int(cursor.rowcount))


def commitment_rows(catalog: Catalog, commit_uid: str) -> list[QueueRow]:
    rows = catalog.fetchall(
        f"SELECT {_SELECT} FROM forward_queue WHERE commit_uid = ? AND state = ?",
        (commit_uid, COMMITTING),
    )
    return [QueueRow.from_row(r) for r in rows]


def retry_dead(catalog: Catalog, destination: str | None = None, state: str = DEAD) -> int:
    """Queue dead (or withheld) rows again, as if new; how many."""
    now = time.time()
    where = "state = ?"
    params: list[Any] = [state]
    if destination:
        where += " AND destination = ?"
        params.append(destination)
    with catalog.transaction():
        cursor = catalog.execute(
            "UPDATE forward_queue SET state = ?, queued_at = ?, not_before = ?, attempts = 0, "
            f"owner = '', batch = '', lease_until = 0, last_error = '' WHERE {where}",
            (QUEUED, now, now, *params),
        )
    return max(0, int(cursor.rowcount))


def rows_in(
    catalog: Catalog, state: str, destination: str | None = None, limit: int = 100
) -> list[QueueRow]:
    where = "state = ?"
    params: list[Any] = [state]
    if destination:
        where += " AND destination = ?"
        params.append(destination)
    rows = catalog.fetchall(
        f"SELECT {_SELECT} FROM forward_queue WHERE {where} ORDER BY queued_at LIMIT {int(limit)}",
        params,
    )
    return [QueueRow.from_row(r) for r in rows]


# --- destinations' health -------------------------------------------------------------------


def note_failure(
    catalog: Catalog, destination: str, error: str, backoff: tuple[float, float]
) -> float:
    """One more consecutive failure of ``destination``: its next try after an
    exponential backoff (``backoff``: base and cap, seconds, with a little jitter); the
    delay chosen."""
    base, cap = backoff
    now = time.time()
    with _bookkeeping(catalog):
        row = catalog.fetchone(
            f"SELECT failures FROM forward_destinations WHERE name = ?{catalog.ROW_LOCK}",
            (destination,),
        )
        failures = (int(row[0]) if row else 0) + 1
        delay = min(cap, base * 2 ** min(failures - 1, 30))
        delay *= 1 + secrets.randbelow(200) / 1000  # 0-20%: processes do not retry in step
        catalog.execute(
            "INSERT INTO forward_destinations (name, failures, next_try, last_error, "
            "last_failure) VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
            "failures = excluded.failures, next_try = excluded.next_try, "
            "last_error = excluded.last_error, last_failure = excluded.last_failure",
            (destination, failures, now + delay, _clip(error), now),
        )
    return delay


def note_success(catalog: Catalog, destination: str) -> None:
    now = time.time()
    with _bookkeeping(catalog):
        catalog.execute(
            "INSERT INTO forward_destinations (name, failures, next_try, last_success) "
            "VALUES (?, 0, 0, ?) ON CONFLICT (name) DO UPDATE SET failures = 0, next_try = 0, "
            "last_success = excluded.last_success",
            (destination, now),
        )


def next_try(catalog: Catalog) -> dict[str, float]:
    """Destinations in backoff: when each may be tried again."""
    rows = catalog.fetchall(
        "SELECT name, next_try FROM forward_destinations WHERE next_try > ?", (time.time(),)
    )
    return {str(name): float(at) for name, at in rows}


# --- status ---------------------------------------------------------------------------------


def status(catalog: Catalog) -> dict[str, dict[str, Any]]:
    """Per destination: rows by state, the oldest row not yet delivered (its age: the
    lag), rows that failed at least once and are still queued, and the destination's
    health."""
    now = time.time()
    out: dict[str, dict[str, Any]] = {}

    def entry(name: str) -> dict[str, Any]:
        return out.setdefault(
            name,
            {
                **{state: 0 for state in STATES},
                "lag_s": 0.0,
                "retrying": 0,
                "failures": 0,
                "last_error": "",
                "last_failure": 0.0,
                "last_success": 0.0,
                "next_try": 0.0,
            },
        )

    for name, state, count, oldest in catalog.fetchall(
        "SELECT destination, state, count(*), min(queued_at) FROM forward_queue "
        "GROUP BY destination, state"
    ):
        item = entry(str(name))
        item[str(state)] = int(count)
        if state in (QUEUED, WAITING, COMMITTING) and oldest is not None:
            item["lag_s"] = max(item["lag_s"], now - float(oldest))
    for name, count in catalog.fetchall(
        "SELECT destination, count(*) FROM forward_queue WHERE state = ? AND last_error <> '' "
        "GROUP BY destination",
        (QUEUED,),
    ):
        entry(str(name))["retrying"] = int(count)
    for name, failures, at, error, failed, succeeded in catalog.fetchall(
        "SELECT name, failures, next_try, last_error, last_failure, last_success "
        "FROM forward_destinations"
    ):
        item = entry(str(name))
        item.update(
            failures=int(failures),
            next_try=float(at),
            last_error=str(error),
            last_failure=float(failed),
            last_success=float(succeeded),
        )
    return out


__all__ = [
    "COMMITTING",
    "DEAD",
    "QUEUED",
    "STATES",
    "WAITING",
    "WITHHELD",
    "QueueRow",
    "claim",
    "commitment_rows",
    "committing",
    "delivered",
    "ensure_schema",
    "expire_commitments",
    "extend_lease",
    "give_up",
    "insert_rows",
    "live_claims",
    "new_row",
    "next_try",
    "note_failure",
    "note_success",
    "ready_destinations",
    "release_gone_owners",
    "release_stable",
    "retry_dead",
    "retry_later",
    "rows_in",
    "status",
]
