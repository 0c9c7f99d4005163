"""The catalog's interface and what both engines share: the ingest journal, instances and
the identity rules, the finisher's queue, garbage, statistics.  The engine specifics (how to
connect, lock, begin and commit) live in one module per dialect: kho.archive.catalog.sqlite
and kho.archive.catalog.postgresql.

Visibility rule: an instance exists for readers once its row is committed, and its objects
were durable before that commit.  The ``pending`` journal names object prefixes being
written, so a restart can delete what a crash left unreferenced.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from typing import Any

from kho.archive.catalog.records import (
    GARBAGE_DELAY_S,
    HEADER_OBJECT,
    INSTANCE_COLUMNS,
    PIXELS_OBJECT,
    InstanceAttributes,
    InstanceRecord,
)
from kho.archive.catalog.schema import (
    HIERARCHY_COLUMNS,
    HIS_DEMOGRAPHICS,
    SCHEMA,
    SCHEMA_VERSION,
    hierarchy_unchanged,
    hierarchy_values,
)
from kho.archive.catalog.sequences import SEQUENCES
from kho.errors import CatalogError, IdentityConflictError, NotFoundError
from kho.storage.spool import SPOOL_PREFIX, is_spool_key, segment_of, stem_of

LOG = logging.getLogger(__name__)

__all__ = ["GARBAGE_DELAY_S", "HEADER_OBJECT", "PIXELS_OBJECT", "Catalog"]


def _process_start(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _owner_of(pid: int) -> str:
    return f"{socket.gethostname()}:{pid}:{_process_start(pid)}"


def _end_pending_statement(object_prefix: str) -> tuple[str, Sequence[Any]]:
    """Take a prefix's journal row away (its objects are referenced, or gone)."""
    return ("DELETE FROM pending WHERE object_prefix = ?", (object_prefix,))


#: an instance queued again starts afresh
REQUEUE_SET = (
    "object_prefix = excluded.object_prefix, queued_at = excluded.queued_at, "
    "owner = '', claimed_at = 0, attempts = 0"
)


def _queue_statement(record: InstanceRecord, unfinished: bool) -> tuple[str, Sequence[Any]]:
    """Queue an instance for the background finisher, or take it off the queue."""
    if not unfinished:
        return ("DELETE FROM unfinished WHERE sop_uid = ?", (record.sop_uid,))
    return (
        "INSERT INTO unfinished (sop_uid, object_prefix, queued_at) VALUES (?, ?, ?) "
        f"ON CONFLICT (sop_uid) DO UPDATE SET {REQUEUE_SET}",
        (record.sop_uid, record.object_prefix, time.time()),
    )


def _is_retryable(exc: BaseException) -> bool:
    """A PostgreSQL deadlock (40P01) or serialisation failure (40001) under ``exc``."""
    cause = exc.__cause__
    return getattr(cause, "sqlstate", None) in ("40P01", "40001")


def owner_is_gone(owner: str) -> bool:
    """Whether the process that wrote ``owner`` has ended (only knowable on this host);
    an empty owner is an ingest that failed and gave its objects up."""
    if not owner:
        return True
    host, _, rest = owner.partition(":")
    pid_text, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    return _owner_of(int(pid_text)) != owner or not started


PROCESS_OWNER = _owner_of(os.getpid())


def in_list(uids: list[str]) -> str:
    """The placeholders of an IN (...) list; NULL for none (IN () is no SQL)."""
    return ", ".join("?" for _ in uids) or "NULL"


def recount_updates(
    patient_keys: list[str], study_uids: list[str], series_uids: list[str], *, folded: bool
) -> list[tuple[str, list[str]]]:
    """UPDATEs setting the counters of these patient, study and series rows to what the
    instances say; ``folded``: also those of the rows a CTE named ``d`` lists (PostgreSQL,
    the counter deltas it folds in)."""
    marks = {"p": in_list(patient_keys), "s": in_list(study_uids), "r": in_list(series_uids)}
    also = {
        "r": " OR t.series_uid IN (SELECT series_uid FROM d)" if folded else "",
        "s": " OR t.study_uid IN (SELECT study_uid FROM d)" if folded else "",
        "p": " OR t.patient_key IN (SELECT patient_key FROM d)" if folded else "",
    }
    return [
        (
            "UPDATE series AS t SET num_instances = (SELECT count(*) FROM instances i "
            "WHERE i.series_uid = t.series_uid) "
            f"WHERE t.series_uid IN ({marks['r']}){also['r']}",
            series_uids,
        ),
        (
            "UPDATE studies AS t SET num_instances = (SELECT count(*) FROM instances i "
            "WHERE i.study_uid = t.study_uid), num_series = (SELECT count(*) FROM series x "
            f"WHERE x.study_uid = t.study_uid) WHERE t.study_uid IN ({marks['s']}){also['s']}",
            study_uids,
        ),
        (
            "UPDATE patients AS t SET num_studies = (SELECT count(*) FROM studies x "
            "WHERE x.patient_key = t.patient_key), num_instances = (SELECT count(*) "
            "FROM instances i JOIN studies x ON x.study_uid = i.study_uid "
            "WHERE x.patient_key = t.patient_key) "
            f"WHERE t.patient_key IN ({marks['p']}){also['p']}",
            patient_keys,
        ),
    ]


@dataclass(frozen=True, slots=True)
class RowInsert:
    """One row to insert with an instance's commit (``Catalog.commit_instance``): the
    catalog knows nothing of what it means (an audit record, a forwarding task)."""

    table: str
    columns: tuple[str, ...]
    values: tuple[Any, ...]

    def statement(self) -> tuple[str, Sequence[Any]]:
        marks = ", ".join("?" for _ in self.columns)
        return f"INSERT INTO {self.table} ({', '.join(self.columns)}) VALUES ({marks})", self.values


class Catalog:
    """Catalog access shared by ingest, query, retrieval and the admin commands: the one
    interface of both engines (kho.archive.catalog.open_catalog picks one).

    Thread-safe: each thread gets its own connection.
    """

    #: "sqlite" or "postgresql" (the query engine's few dialect choices read it)
    dialect: str = ""
    #: what a SELECT adds to lock the rows it reads until the transaction ends
    ROW_LOCK = ""
    #: the engine's own errors, reported as CatalogError
    ENGINE_ERRORS: tuple[type[BaseException], ...] = ()

    def __init__(self, url: str, *, synchronous_full: bool = True, tenant: str = "") -> None:
        self.url = url
        #: the tenant (hospital) whose catalog this is; "" for the default tenant's, the
        #: catalog of an archive from before tenants (kho.archive.catalog.open_catalog)
        self.tenant = tenant
        self._local = threading.local()
        self._all_connections: list[tuple[threading.Thread, Any]] = []
        self._conn_lock = threading.Lock()
        self.synchronous_full = synchronous_full
        self._deferred_disowns: set[str] = set()
        self._deferred_lock = threading.Lock()

    # --- the engine: each dialect's module says how -------------------------------------

    def _connect(self) -> Any:
        raise NotImplementedError

    def tenants_present(self) -> list[str]:
        """The tenants whose own catalog exists beside this (the default tenant's) one,
        declared or not (see open_catalog's ``tenant``)."""
        return []

    def sql(self, text: str) -> str:
        """Translate ``?`` placeholders for the engine."""
        return text

    def execute(self, text: str, params: Sequence[Any] = ()) -> Any:
        try:
            return self.connection.execute(self.sql(text), params)
        except self.ENGINE_ERRORS as exc:
            raise self._failure(exc, "catalog error") from exc

    def _failure(self, exc: BaseException, what: str) -> CatalogError:
        """The error to raise for an engine's exception (a dialect that can tell an
        unreachable server says CatalogUnavailableError)."""
        return CatalogError(f"{what}: {exc}")

    def execute_batch(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[Any]:
        """Run statements in order; their cursors."""
        return [self.execute(text, params) for text, params in statements]

    @contextmanager
    def writer(self) -> Iterator[None]:
        """Held around every write (SQLite: one writer at a time)."""
        yield

    def _transaction(self) -> Iterator[None]:
        raise NotImplementedError
        yield  # pragma: no cover

    def commit_batch(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        """The last statements of a transaction (PostgreSQL: and its commit, in one
        round trip)."""
        self.execute_batch(statements)

    def _create_schema(self) -> None:
        with self.transaction():
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self.execute(statement)
            self._record_version()

    @contextmanager
    def relaxed_write(self) -> Iterator[None]:
        """A write outside any transaction whose commit skips the flush to disk: it
        survives a crash of the process; after a power loss it may be lost, which callers
        must tolerate."""
        raise NotImplementedError
        yield  # pragma: no cover

    def _in_transaction(self) -> bool:
        """Whether this thread is inside a write transaction the writer lock covers."""
        return False

    def _count_statements(
        self, study_uid: str, series_uid: str, pkey: str, delta: int
    ) -> list[tuple[str, Sequence[Any]]]:
        """The statements adding ``delta`` to the instance counters of a patient, study
        and series (SQLite: the counters themselves, in the order their rows are locked
        elsewhere)."""
        return [
            (
                "UPDATE patients SET num_instances = num_instances + ? WHERE patient_key = ?",
                (delta, pkey),
            ),
            (
                "UPDATE studies SET num_instances = num_instances + ? WHERE study_uid = ?",
                (delta, study_uid),
            ),
            (
                "UPDATE series SET num_instances = num_instances + ? WHERE series_uid = ?",
                (delta, series_uid),
            ),
        ]

    def _commit_new_in_known_series(
        self,
        attrs: InstanceAttributes,
        hierarchy: tuple[dict[str, Any], ...],
        values: dict[str, Any],
        unfinished: bool,
        journalled: bool,
        with_rows: Sequence[RowInsert] = (),
    ) -> bool:
        """A one-statement store of a new instance of an unchanged series, where the
        engine has one (PostgreSQL); whether it stored it (if not, nothing was written)."""
        return False

    def fold_counters(self) -> int:
        """Add counter deltas not yet in the rows (PostgreSQL); how many were folded."""
        return 0

    def _lock_rows(self, table: str, key: str, uids: set[str]) -> None:
        """Lock these rows of ``table`` until the transaction ends (SQLite: the write
        transaction holds the whole database)."""

    def _lock_hierarchy(self, a: InstanceAttributes) -> None:
        """Lock an instance's patient, study and series rows (SQLite: the write
        transaction holds the whole database)."""

    def _recount(
        self, patient_keys: list[str], study_uids: list[str], series_uids: list[str]
    ) -> None:
        """Set the counters of these rows to what the instances say."""
        self.execute_batch(recount_updates(patient_keys, study_uids, series_uids, folded=False))

    def recount_patients(self, patient_keys: Sequence[str]) -> None:
        """Count these patients' studies and instances again (in the caller's transaction:
        after studies moved between patients, kho.archive.patients)."""
        self._recount(sorted(set(patient_keys)), [], [])

    def close(self) -> None:
        with self._conn_lock:
            for _thread, conn in self._all_connections:
                # closing another thread's connection may complain; it is closed anyway
                with suppress(Exception):
                    conn.close()
            self._all_connections.clear()
        self._local = threading.local()

    # --- connections --------------------------------------------------------------------------

    def _lost(self, conn: Any) -> bool:
        """Whether this thread's ``conn`` can no longer be used (a server restart or a
        network outage broke it): the thread's next statement opens a new one."""
        return False

    @property
    def connection(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._lost(conn):
            self._forget(conn)
            self._local.conn = conn = None
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            self._register(conn)
        return conn

    def _forget(self, conn: Any) -> None:
        """Close this thread's lost connection and stop keeping it."""
        with self._conn_lock:
            self._all_connections = [(t, c) for t, c in self._all_connections if c is not conn]
        with suppress(Exception):
            conn.close()

    def _register(self, conn: Any) -> None:
        """Keep a new connection of this thread; close those of threads that have ended
        (each DIMSE association runs in a thread of its own: without this an archive
        would keep one connection per association it ever served)."""
        with self._conn_lock:
            alive = []
            for thread, old in self._all_connections:
                if thread.is_alive():
                    alive.append((thread, old))
                else:
                    with suppress(Exception):
                        old.close()
            alive.append((threading.current_thread(), conn))
            self._all_connections = alive

    @property
    def open_connections(self) -> int:
        return len(self._all_connections)

    def fetchall(self, text: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self.execute(text, params).fetchall())

    def fetchone(self, text: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        row = self.execute(text, params).fetchone()
        return tuple(row) if row is not None else None

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """A write transaction; SQLite takes the write lock at once (no upgrade deadlocks)."""
        with self.writer():
            yield from self._transaction()

    def _record_version(self) -> None:
        row = self.fetchone("SELECT version FROM kho_schema")
        if row is None:
            self.execute("INSERT INTO kho_schema (version) VALUES (?)", (SCHEMA_VERSION,))
        elif int(row[0]) < SCHEMA_VERSION:  # the new tables were just created: upgraded
            self.execute("UPDATE kho_schema SET version = ?", (SCHEMA_VERSION,))
        elif int(row[0]) > SCHEMA_VERSION:
            raise CatalogError(
                f"catalog schema version {row[0]} is newer than this kho ({SCHEMA_VERSION})"
            )

    # --- the ingest journal -------------------------------------------------------------------

    def begin_pending(self, object_prefix: str) -> None:
        """Record that objects are about to be written under ``object_prefix``.

        A relaxed write (see relaxed_write): after a power loss the worst outcome is
        objects that recovery cannot name, invisible and harmless.  The instance commit
        that follows is fully synchronous and makes the journal row durable too.
        """
        with self.relaxed_write():
            self.execute(
                "INSERT INTO pending (object_prefix, created_at, owner) VALUES (?, ?, ?) "
                "ON CONFLICT (object_prefix) DO NOTHING",
                (object_prefix, time.time(), PROCESS_OWNER),
            )

    def end_pending(self, object_prefix: str) -> None:
        with self.writer() if not self._in_transaction() else nullcontext():
            self.execute(*_end_pending_statement(object_prefix))

    def disown_pending(self, object_prefix: str) -> None:
        """Hand a journalled prefix to the next recovery pass (its ingest has failed)."""
        self.execute("UPDATE pending SET owner = '' WHERE object_prefix = ?", (object_prefix,))

    def disown_pending_later(self, object_prefix: str) -> None:
        """disown_pending once the catalog answers again (see disown_deferred): for an
        ingest that failed because it could not be reached, so that the failure is
        reported without waiting out another timeout per clean-up statement.  Lost with
        the process, which is then gone, and recovery takes its prefixes anyway."""
        with self._deferred_lock:
            self._deferred_disowns.add(object_prefix)

    def disown_deferred(self) -> int:
        """Run the disowns deferred while the catalog was unreachable; those that fail
        again stay deferred.  Returns how many ran."""
        with self._deferred_lock:
            waiting, self._deferred_disowns = self._deferred_disowns, set()
        done: set[str] = set()
        try:
            for prefix in waiting:
                self.disown_pending(prefix)
                done.add(prefix)
        finally:
            if done != waiting:
                with self._deferred_lock:
                    self._deferred_disowns |= waiting - done
        return len(done)

    def pending_prefixes(self, older_than_s: float = 0.0) -> list[str]:
        cutoff = time.time() - older_than_s
        rows = self.fetchall("SELECT object_prefix FROM pending WHERE created_at <= ?", (cutoff,))
        return [r[0] for r in rows]

    def abandoned_prefixes(self, grace_s: float) -> list[str]:
        """Journalled prefixes whose ingest can no longer finish: written by a process of
        this host that is gone, or older than ``grace_s`` (any host)."""
        cutoff = time.time() - grace_s
        out = []
        for prefix, created, owner in self.fetchall(
            "SELECT object_prefix, created_at, owner FROM pending"
        ):
            if created <= cutoff or owner_is_gone(owner):
                out.append(prefix)
        return out

    def prefix_in_use(self, object_prefix: str) -> bool:
        """Whether an instance row, or a rejected instance not yet purged, refers to
        objects under this prefix (kho.archive.corrections deletes those itself)."""
        row = self.fetchone("SELECT 1 FROM instances WHERE object_prefix = ?", (object_prefix,))
        if row is not None:
            return True
        row = self.fetchone(
            "SELECT 1 FROM rejected_instances WHERE object_prefix = ? AND purged_at = 0",
            (object_prefix,),
        )
        return row is not None

    # --- instances ----------------------------------------------------------------------------

    def get_instance(self, sop_uid: str) -> InstanceRecord | None:
        row = self.fetchone(
            f"SELECT {', '.join(INSTANCE_COLUMNS)} FROM instances WHERE sop_uid = ?", (sop_uid,)
        )
        return InstanceRecord(*row) if row else None

    def require_instance(self, sop_uid: str) -> InstanceRecord:
        record = self.get_instance(sop_uid)
        if record is None:
            raise NotFoundError(f"no instance {sop_uid}")
        return record

    def instances_where(self, where: str, params: Sequence[Any]) -> list[InstanceRecord]:
        rows = self.fetchall(
            f"SELECT {', '.join(INSTANCE_COLUMNS)} FROM instances WHERE {where} "
            "ORDER BY series_uid, instance_number, sop_uid",
            params,
        )
        return [InstanceRecord(*r) for r in rows]

    def iter_instances(self, batch: int = 1000) -> Iterator[InstanceRecord]:
        """Every instance, in SOP Instance UID order, a batch at a time."""
        last = ""
        while True:
            rows = self.fetchall(
                f"SELECT {', '.join(INSTANCE_COLUMNS)} FROM instances WHERE sop_uid > ? "
                f"ORDER BY sop_uid LIMIT {int(batch)}",
                (last,),
            )
            if not rows:
                return
            for row in rows:
                yield InstanceRecord(*row)
            last = rows[-1][0]

    def commit_instance(
        self,
        attrs: InstanceAttributes,
        record: InstanceRecord,
        *,
        policy: str,
        unfinished: bool = False,
        journalled: bool = True,
        with_rows: Sequence[RowInsert] = (),
    ) -> tuple[str, InstanceRecord | None]:
        """See _commit_instance; a PostgreSQL deadlock or serialisation failure (another
        ingest of the same patient, study or series) is retried: the transaction rolled
        back whole and the objects are already written.  ``journalled``: the objects'
        prefix has a journal row (begin_pending) that a new instance's commit ends.
        ``with_rows``: rows inserted in the same transaction when the instance is stored
        or replaced (an audit record: durable exactly when the instance is)."""
        for attempt in range(5):
            try:
                return self._commit_instance(
                    attrs,
                    record,
                    policy=policy,
                    unfinished=unfinished,
                    journalled=journalled,
                    with_rows=with_rows,
                )
            except CatalogError as exc:
                if attempt == 4 or not _is_retryable(exc):
                    raise
                time.sleep(0.005 * (attempt + 1))
        raise AssertionError("unreachable")

    def _commit_instance(
        self,
        attrs: InstanceAttributes,
        record: InstanceRecord,
        *,
        policy: str,
        unfinished: bool,
        journalled: bool,
        with_rows: Sequence[RowInsert] = (),
    ) -> tuple[str, InstanceRecord | None]:
        """Make an instance visible, deciding duplicates inside the write transaction.

        Returns (outcome, previous record): outcome is "stored" (new SOP Instance UID),
        "duplicate" (same bytes already stored), "replaced" (policy replace; the old objects
        are journalled for deletion), "kept" (policy keep) or "rejected" (policy reject).
        For "kept" and "rejected" the caller deletes the objects it wrote.  ``unfinished``:
        the instance is stored as received and queued for the background finisher.
        """
        # its fields are plain values: no deep copy (asdict's) needed
        values = {name: getattr(record, name) for name in INSTANCE_COLUMNS}
        cols = ", ".join(INSTANCE_COLUMNS)
        marks = ", ".join("?" for _ in INSTANCE_COLUMNS)
        hierarchy = hierarchy_values(attrs)
        if not attrs.sequences and self._commit_new_in_known_series(
            attrs, hierarchy, values, unfinished, journalled, with_rows
        ):
            return "stored", None
        with self.transaction():
            # insert-first makes concurrent stores of one new instance count it once; the
            # patient, study and series rows are read in the same round trip, unlocked
            insert = (
                f"INSERT INTO instances ({cols}) VALUES ({marks}) ON CONFLICT (sop_uid) DO NOTHING",
                [values[c] for c in INSTANCE_COLUMNS],
            )
            cursors = self.execute_batch([insert, *self._hierarchy_reads(attrs, hierarchy)])
            if cursors[0].rowcount == 1:
                read = self._read_hierarchy(attrs, cursors[1:], hierarchy)
                rows: list[tuple[Any, ...] | None] | None = read
                if attrs.sequences or not hierarchy_unchanged(read, hierarchy):
                    # rows to write: lock them first, in one order, and read them again
                    self._lock_hierarchy(attrs)
                    rows = None
                # else (every instance of a series after its first) the row locks come
                # with the counter updates at the end: concurrent ingests of one series
                # hold them only for the last round trip and the commit
                self._upsert_hierarchy(attrs, hierarchy, rows)
                tail: list[tuple[str, Sequence[Any]]] = []
                if journalled:
                    tail.append(_end_pending_statement(record.object_prefix))
                if unfinished:  # a new SOP Instance UID has no queue row to clear
                    tail.append(_queue_statement(record, unfinished))
                tail += [row.statement() for row in with_rows]
                # last: these rows are shared by every instance of the series
                tail += self._count_statements(
                    attrs.study_uid, attrs.series_uid, attrs.patient_key, +1
                )
                self.commit_batch(tail)
                return "stored", None
            self._lock_hierarchy(attrs)
            row = self.fetchone(
                f"SELECT {cols} FROM instances WHERE sop_uid = ?{self.ROW_LOCK}", (record.sop_uid,)
            )
            assert row is not None  # the conflicting row exists and is locked
            previous = InstanceRecord(*row)
            if previous.sha256 == record.sha256:
                if previous.object_prefix != record.object_prefix:
                    self.end_pending(record.object_prefix)
                    self.begin_pending(record.object_prefix)  # ours are surplus: clean up
                else:
                    self.end_pending(record.object_prefix)
                return "duplicate", previous
            if policy != "replace":
                return ("kept" if policy == "keep" else "rejected"), previous
            self._replace_instance(attrs, previous, values)
            self.execute(
                "INSERT INTO replacements (sop_uid, old_sha256, new_sha256, replaced_at) "
                "VALUES (?, ?, ?, ?)",
                (record.sop_uid, previous.sha256, record.sha256, time.time()),
            )
            self.end_pending(record.object_prefix)
            if previous.object_prefix != record.object_prefix:
                self.begin_pending(previous.object_prefix)  # old objects: delete after commit
            if is_spool_key(previous.pixels_key):
                # its segment stays for a reader's grace; listed in this transaction, so
                # no moment passes where nothing refers to it
                self._add_garbage([previous.pixels_key], GARBAGE_DELAY_S)
            self._queue_unfinished(record, unfinished)
            if with_rows:
                self.execute_batch([row.statement() for row in with_rows])
            return "replaced", previous

    def _replace_instance(
        self, attrs: InstanceAttributes, previous: InstanceRecord, values: dict[str, Any]
    ) -> None:
        """Put a replacing version in its instance row (inside the commit's transaction).

        The version may name another patient, study or series than the one it replaces (a
        corrected resend).  A study or series that holds no other instance moves with it
        (the study to the new patient, the series to the new study); one that holds others
        refuses it (IdentityConflictError: a study never spans two patients).  Rows left
        without instances disappear; the counts of every row touched are counted again."""
        sop_uid = attrs.sop_uid
        # the rows it leaves and enters, locked before they are looked at (PostgreSQL)
        self._lock_rows("studies", "study_uid", {previous.study_uid, attrs.study_uid})
        self._lock_rows("series", "series_uid", {previous.series_uid, attrs.series_uid})
        old_patient = self._parent_of("studies", previous.study_uid)
        study_patient = self._parent_of("studies", attrs.study_uid)
        series_study = self._parent_of("series", attrs.series_uid)
        moves: list[tuple[str, Sequence[Any]]] = []
        if study_patient is not None and study_patient != attrs.patient_key:
            if self._holds_others("study_uid", attrs.study_uid, sop_uid):
                self._check_parents(attrs, study_patient, None)
            moves.append(
                (
                    "UPDATE studies SET patient_key = ? WHERE study_uid = ?",
                    (attrs.patient_key, attrs.study_uid),
                )
            )
        if series_study is not None and series_study != attrs.study_uid:
            if self._holds_others("series_uid", attrs.series_uid, sop_uid):
                self._check_parents(attrs, None, series_study)
            moves.append(
                (
                    "UPDATE series SET study_uid = ? WHERE series_uid = ?",
                    (attrs.study_uid, attrs.series_uid),
                )
            )
        updates = ", ".join(f"{c} = ?" for c in INSTANCE_COLUMNS[1:])
        self.execute_batch(
            [
                (
                    f"UPDATE instances SET {updates} WHERE sop_uid = ?",
                    [values[c] for c in INSTANCE_COLUMNS[1:]] + [sop_uid],
                ),
                *moves,
            ]
        )
        self._upsert_hierarchy(attrs)
        stays = (previous.study_uid, previous.series_uid, old_patient) == (
            attrs.study_uid,
            attrs.series_uid,
            attrs.patient_key,
        )
        if stays and not moves:
            return  # same patient, study and series: no count changes, no row empties
        self._tidy_hierarchy(
            {k for k in (old_patient, study_patient, attrs.patient_key) if k},
            {k for k in (previous.study_uid, series_study, attrs.study_uid) if k},
            {previous.series_uid, attrs.series_uid},
        )

    def withdraw_instances(self, sop_uids: Sequence[str]) -> list[InstanceRecord]:
        """Take these instances out of the catalog, inside the caller's transaction (a
        rejection, kho.archive.corrections): their rows, returned as they were, and their
        finisher queue rows go; a series, study or patient left without instances goes
        with them, the rest are counted again.  Their objects stay: the caller records
        where they are.  UIDs not stored here are skipped."""
        uids = sorted(set(sop_uids))
        found: list[InstanceRecord] = []
        for at in range(0, len(uids), 500):
            chunk = uids[at : at + 500]
            found += self.instances_where(f"sop_uid IN ({in_list(chunk)})", chunk)
        if not found:
            return []
        studies = sorted({r.study_uid for r in found})
        series = {r.series_uid for r in found}
        patients = {
            str(row[0])
            for row in self.fetchall(
                f"SELECT patient_key FROM studies WHERE study_uid IN ({in_list(studies)})",
                studies,
            )
        }
        # ingest's order (patient, study, series): no deadlock with a concurrent store
        self._lock_rows("patients", "patient_key", patients)
        self._lock_rows("studies", "study_uid", set(studies))
        self._lock_rows("series", "series_uid", series)
        cols = ", ".join(INSTANCE_COLUMNS)
        records: list[InstanceRecord] = []
        for at in range(0, len(uids), 500):
            chunk = uids[at : at + 500]
            marks = in_list(chunk)
            # read again, locked: a finisher's switch committed meanwhile is what goes
            rows = self.fetchall(
                f"SELECT {cols} FROM instances WHERE sop_uid IN ({marks}){self.ROW_LOCK}", chunk
            )
            records += [InstanceRecord(*row) for row in rows]
            self.execute_batch(
                [
                    (f"DELETE FROM instances WHERE sop_uid IN ({marks})", chunk),
                    (f"DELETE FROM unfinished WHERE sop_uid IN ({marks})", chunk),
                ]
            )
        self._tidy_hierarchy(
            patients, {r.study_uid for r in records}, {r.series_uid for r in records}
        )
        return records

    def _holds_others(self, column: str, uid: str, sop_uid: str) -> bool:
        """Whether a study (column study_uid) or series holds an instance but ``sop_uid``."""
        row = self.fetchone(
            f"SELECT 1 FROM instances WHERE {column} = ? AND sop_uid <> ? LIMIT 1",
            (uid, sop_uid),
        )
        return row is not None

    def _tidy_hierarchy(
        self, patient_keys: set[str], study_uids: set[str], series_uids: set[str]
    ) -> None:
        """After instances moved: rows without instances go (a series with none, then a
        study without series, then a patient without studies, with their sequence items),
        and the counters of the rest are counted again from the instances."""
        for table, key, child, child_key, uids in (
            ("series", "series_uid", "instances", "series_uid", series_uids),
            ("studies", "study_uid", "series", "study_uid", study_uids),
            ("patients", "patient_key", "studies", "patient_key", patient_keys),
        ):
            for uid in sorted(uids):
                cursor = self.execute(
                    f"DELETE FROM {table} WHERE {key} = ? AND NOT EXISTS "
                    f"(SELECT 1 FROM {child} c WHERE c.{child_key} = ?)",
                    (uid, uid),
                )
                if cursor.rowcount == 1:
                    self.execute("DELETE FROM sequence_items WHERE owner = ?", (uid,))
        self._recount(sorted(patient_keys), sorted(study_uids), sorted(series_uids))
        for study_uid in sorted(study_uids):
            self._refresh_modalities(study_uid)

    def _queue_unfinished(self, record: InstanceRecord, unfinished: bool) -> None:
        self.execute(*_queue_statement(record, unfinished))

    # --- the background finisher's queue and the garbage list ---------------------------------

    def claim_unfinished(
        self, limit: int, lease_s: float, max_attempts: int = 3
    ) -> list[tuple[str, str, int]]:
        """Claim up to ``limit`` queued instances for this process, oldest first: rows no
        one holds, or whose lease ran out.  Returns (sop_uid, object_prefix, attempts).
        A row claimed ``max_attempts`` times and not finished (its process may have died
        on it) is taken off the queue: the instance stays as received."""
        now = time.time()
        cutoff = now - lease_s
        with self.relaxed_write():
            # a spooled instance stays queued: the finisher moves it out of the spool as
            # received (its segment would otherwise be deleted under it)
            given_up = self.execute(
                "DELETE FROM unfinished WHERE attempts >= ? AND (owner = '' OR claimed_at < ?) "
                "AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.sop_uid = unfinished.sop_uid "
                "AND i.derived LIKE ?)",
                (int(max_attempts), cutoff, f'%"{SPOOL_PREFIX}%'),
            ).rowcount
        if given_up and given_up > 0:
            LOG.error(
                "finisher: %d instances stay stored as received after %d attempts",
                given_up,
                max_attempts,
            )
        candidates = self.fetchall(
            "SELECT sop_uid, object_prefix, attempts FROM unfinished "
            "WHERE owner = '' OR claimed_at < ? ORDER BY queued_at LIMIT ?",
            (cutoff, int(limit) * 4),
        )
        claimed: list[tuple[str, str, int]] = []
        for sop_uid, prefix, attempts in candidates:
            if len(claimed) >= limit:
                break
            with self.relaxed_write():  # a lost claim is only re-claimed after its lease
                cursor = self.execute(
                    "UPDATE unfinished SET owner = ?, claimed_at = ?, attempts = attempts + 1 "
                    "WHERE sop_uid = ? AND object_prefix = ? AND (owner = '' OR claimed_at < ?)",
                    (PROCESS_OWNER, now, sop_uid, prefix, cutoff),
                )
            if cursor.rowcount == 1:
                claimed.append((sop_uid, prefix, int(attempts) + 1))
        return claimed

    def release_unfinished(
        self, sop_uid: str, object_prefix: str, *, count_attempt: bool = True
    ) -> None:
        """Give a claim back: any process may take it again.  ``count_attempt=False``: the
        failure was not the instance's (an outage: its store, or the host holding its
        spool), so the claim's attempt is taken back and it goes to the end of the queue
        (what can be finished meanwhile is, instead of the same rows again and again)."""
        if count_attempt:
            statement = "UPDATE unfinished SET owner = '', claimed_at = 0"
            params: tuple[Any, ...] = ()
        else:
            statement = (
                "UPDATE unfinished SET owner = '', claimed_at = 0, queued_at = ?, "
                "attempts = CASE WHEN attempts > 1 THEN attempts - 1 ELSE 0 END"
            )
            params = (time.time(),)
        with self.relaxed_write():
            self.execute(
                f"{statement} WHERE sop_uid = ? AND object_prefix = ?",
                (*params, sop_uid, object_prefix),
            )

    def release_own_claims(self, claimed_until: float, keep: Sequence[str] = ()) -> int:
        """Give back this process's claims made until ``claimed_until`` but those of
        ``keep`` (in hand): what an outage left held (a claim whose answer was lost, a
        release that failed).  Their attempt is taken back, as in release_unfinished."""
        statement = (
            "UPDATE unfinished SET owner = '', claimed_at = 0, queued_at = ?, "
            "attempts = CASE WHEN attempts > 1 THEN attempts - 1 ELSE 0 END "
            "WHERE owner = ? AND claimed_at <= ?"
        )
        params: list[Any] = [time.time(), PROCESS_OWNER, claimed_until]
        if keep:
            statement += f" AND sop_uid NOT IN ({in_list(list(keep))})"
            params += list(keep)
        with self.relaxed_write():
            cursor = self.execute(statement, params)
        return max(0, cursor.rowcount)

    def release_claims_of_gone_processes(self) -> int:
        rows = self.fetchall("SELECT DISTINCT owner FROM unfinished WHERE owner <> ''")
        released = 0
        for (owner,) in rows:
            if owner_is_gone(owner):
                with self.relaxed_write():
                    cursor = self.execute(
                        "UPDATE unfinished SET owner = '', claimed_at = 0 WHERE owner = ?",
                        (owner,),
                    )
                released += max(0, cursor.rowcount)
        return released

    def drop_unfinished(self, sop_uid: str, object_prefix: str) -> None:
        """Take an instance off the queue: it stays as received."""
        with self.writer() if not self._in_transaction() else nullcontext():
            self.execute(
                "DELETE FROM unfinished WHERE sop_uid = ? AND object_prefix = ?",
                (sop_uid, object_prefix),
            )

    def unfinished_count(self) -> int:
        row = self.fetchone("SELECT count(*) FROM unfinished")
        return int(row[0]) if row else 0

    def finish_instance(
        self,
        sop_uid: str,
        object_prefix: str,
        *,
        pixel_format: str,
        pixel_size: int,
        frame_index: str,
        derived: str,
        stored_size: int,
        header_size: int,
        garbage: Sequence[str],
        garbage_delay_s: float,
        was: InstanceRecord,
    ) -> bool:
        """Switch an instance to its finished objects, if its row is still exactly ``was``,
        the version that was finished (same prefix, format and objects: not replaced nor
        finished by another process meanwhile); ``garbage`` (what the switch leaves
        unreferenced) is listed for deletion after ``garbage_delay_s``.  False: nothing
        changed."""
        with self.transaction():
            cursor = self.execute(
                "UPDATE instances SET pixel_format = ?, pixel_size = ?, frame_index = ?, "
                "derived = ?, stored_size = ?, header_size = ? "
                "WHERE sop_uid = ? AND object_prefix = ? AND pixel_format = ? AND derived = ?",
                (
                    pixel_format,
                    pixel_size,
                    frame_index,
                    derived,
                    stored_size,
                    header_size,
                    sop_uid,
                    object_prefix,
                    was.pixel_format,
                    was.derived,
                ),
            )
            self.execute(
                "DELETE FROM unfinished WHERE sop_uid = ? AND object_prefix = ?",
                (sop_uid, object_prefix),
            )
            if cursor.rowcount != 1:
                return False
            self._add_garbage(garbage, garbage_delay_s)
            return True

    def spool_segments_in_use(self) -> set[str]:
        """Spool segments (kho.storage.spool) an instance row or pending garbage refers to.
        Only queued instances can be spooled: the finisher moves each out before it takes
        it off the queue."""
        used: set[str] = set()
        rows = self.fetchall(
            "SELECT i.derived FROM unfinished u JOIN instances i ON i.sop_uid = u.sop_uid"
        )
        for (derived,) in rows:
            for key in json.loads(derived or "{}").values():
                if isinstance(key, str) and is_spool_key(key):
                    used.add(segment_of(key))
        for (key,) in self.fetchall(
            "SELECT object_key FROM garbage WHERE object_key LIKE ?", (f"{SPOOL_PREFIX}%",)
        ):
            used.add(segment_of(key))
        return used

    def register_spool(
        self, stems: Sequence[str], peer_url: str, *, in_use: set[str] | None = None
    ) -> None:
        """Record where the spools whose segments start with ``stems`` are served (this
        process's, and those earlier processes left in the same folder).  ``in_use``:
        the segments still referred to by every catalog sharing the spool (the tenants';
        default: this catalog's)."""
        with self.transaction():
            for stem in stems:
                self.execute(
                    "INSERT INTO spool_hosts (stem, peer_url, registered_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (stem) DO UPDATE SET peer_url = excluded.peer_url, "
                    "registered_at = excluded.registered_at",
                    (stem, peer_url, time.time()),
                )
        # this host's older spools that nothing refers to any more (a day: readers that
        # loaded a row long ago find the instance moved, in the bucket)
        if in_use is None:
            in_use = self.spool_segments_in_use()
        used_stems = {stem_of(segment) for segment in in_use}
        rows = self.fetchall(
            "SELECT stem FROM spool_hosts WHERE peer_url = ? AND registered_at < ?",
            (peer_url, time.time() - 86400.0),
        )
        unused = [stem for (stem,) in rows if stem not in used_stems and stem not in stems]
        if unused:
            with self.transaction():
                for stem in unused:
                    self.execute("DELETE FROM spool_hosts WHERE stem = ?", (stem,))

    def spool_url(self, stem: str) -> str | None:
        """Where the spool ``stem`` is served (register_spool), None if nowhere."""
        row = self.fetchone("SELECT peer_url FROM spool_hosts WHERE stem = ?", (stem,))
        return str(row[0]) if row else None

    def add_garbage(self, object_keys: Sequence[str], delay_s: float = 0.0) -> None:
        with self.transaction():
            self._add_garbage(object_keys, delay_s)

    def _add_garbage(self, object_keys: Sequence[str], delay_s: float) -> None:
        not_before = time.time() + delay_s
        for key in object_keys:
            self.execute(
                "INSERT INTO garbage (object_key, not_before) VALUES (?, ?) "
                "ON CONFLICT (object_key) DO NOTHING",
                (key, not_before),
            )

    def due_garbage(self, limit: int = 1000) -> list[str]:
        rows = self.fetchall(
            "SELECT object_key FROM garbage WHERE not_before <= ? ORDER BY not_before LIMIT ?",
            (time.time(), int(limit)),
        )
        return [r[0] for r in rows]

    def forget_garbage(self, object_keys: Sequence[str]) -> None:
        with self.transaction():
            for key in object_keys:
                self.execute("DELETE FROM garbage WHERE object_key = ?", (key,))

    # --- patients, studies, series ------------------------------------------------------------

    def _hierarchy_reads(
        self, a: InstanceAttributes, hierarchy: tuple[dict[str, Any], ...]
    ) -> list[tuple[str, Sequence[Any]]]:
        """The statements reading an instance's patient, study and series rows (the columns
        of ``hierarchy``, see schema.hierarchy_values)."""
        patient, study, series = hierarchy
        return [
            (f"SELECT {', '.join(patient)} FROM patients WHERE patient_key = ?", (a.patient_key,)),
            (
                f"SELECT patient_key, {', '.join(study)} FROM studies WHERE study_uid = ?",
                (a.study_uid,),
            ),
            (
                f"SELECT study_uid, {', '.join(series)} FROM series WHERE series_uid = ?",
                (a.series_uid,),
            ),
            (HIS_DEMOGRAPHICS, (a.patient_key,)),
        ]

    def _read_hierarchy(
        self,
        a: InstanceAttributes,
        cursors: Sequence[Any],
        hierarchy: tuple[dict[str, Any], ...],
    ) -> list[tuple[Any, ...] | None]:
        """The rows of _hierarchy_reads' cursors, the parent keys checked (IdentityConflictError
        when the study belongs to another patient or the series to another study) and then
        dropped: each row as its ``hierarchy`` values.

        A patient the hospital information system manages keeps the HIS's demographics:
        ``hierarchy``'s patient values become those (in place), so an instance typed
        otherwise at the console neither rewrites the patient row nor counts as a change."""
        patient, study, series, his = (cursor.fetchone() for cursor in cursors)
        if his is not None:
            hierarchy[0].update(zip(HIERARCHY_COLUMNS[0][2], his, strict=True))
        self._check_parents(
            a,
            study[0] if study is not None else None,
            series[0] if series is not None else None,
        )
        return [
            tuple(patient) if patient is not None else None,
            tuple(study[1:]) if study is not None else None,
            tuple(series[1:]) if series is not None else None,
        ]

    def _check_parents(
        self, a: InstanceAttributes, study_patient: str | None, series_study: str | None
    ) -> None:
        """A study belongs to one patient, a series to one study: refuse an instance that
        says otherwise (never merged: the wrong images would be filed under a patient)."""
        if series_study is not None and series_study != a.study_uid:
            # what matters first: Error Comment (LO) holds 64 characters
            raise IdentityConflictError(
                f"series belongs to study {series_study}, not {a.study_uid} "
                f"(Series Instance UID {a.series_uid})"
            )
        if study_patient is not None and study_patient != a.patient_key:
            row = self.fetchone(
                "SELECT patient_id, issuer_of_patient_id FROM patients WHERE patient_key = ?",
                (study_patient,),
            )
            held = f"Patient ID {row[0]!r}" if row else "another patient"
            if row and row[1]:
                held += f" (issuer {row[1]!r})"
            raise IdentityConflictError(
                f"study holds {held}, not {a.patient_id!r} (Study Instance UID {a.study_uid})"
            )

    def _upsert_hierarchy(
        self,
        a: InstanceAttributes,
        hierarchy: tuple[dict[str, Any], ...] | None = None,
        rows: list[tuple[Any, ...] | None] | None = None,
    ) -> None:
        """Patient, study and series rows for an instance: inserted when new, updated only
        where the instance's values differ.  The rows of a series being received are the
        same for every instance: reading them first (``rows``, else read here in one
        batch), instead of an upsert that always writes, takes no row lock, so concurrent
        ingests of one series (PostgreSQL) only meet at the counter updates at the end of
        their transactions."""
        pkey = a.patient_key
        patient, study, series = hierarchy or hierarchy_values(a)
        if rows is None:
            reads = self._hierarchy_reads(a, (patient, study, series))
            rows = self._read_hierarchy(a, self.execute_batch(reads), (patient, study, series))
        self._upsert_row(
            "patients",
            ("patient_key", pkey),
            patient,
            {"patient_id": a.patient_id, "issuer_of_patient_id": a.issuer_of_patient_id},
            current=rows[0],
        )
        new_study = self._upsert_row(
            "studies",
            ("study_uid", a.study_uid),
            study,
            {"patient_key": pkey},
            stamp="updated_at",
            current=rows[1],
        )
        if rows[1] is None and not new_study:  # PostgreSQL: inserted meanwhile by another
            self._check_parents(a, self._parent_of("studies", a.study_uid), None)
        if new_study:
            self.execute(
                "UPDATE patients SET num_studies = num_studies + 1 WHERE patient_key = ?", (pkey,)
            )
        new_series = self._upsert_row(
            "series",
            ("series_uid", a.series_uid),
            series,
            {"study_uid": a.study_uid},
            current=rows[2],
        )
        if rows[2] is None and not new_series:
            self._check_parents(a, None, self._parent_of("series", a.series_uid))
        if new_series:
            self.execute(
                "UPDATE studies SET num_series = num_series + 1 WHERE study_uid = ?",
                (a.study_uid,),
            )
        if new_series or rows[2] is None or rows[2][0] != a.modality:
            self._refresh_modalities(a.study_uid)
        owners = {"PATIENT": pkey, "STUDY": a.study_uid, "SERIES": a.series_uid}
        for keyword, items in a.sequences.items():
            self._sync_sequence(owners[SEQUENCES[keyword].level], keyword, items)

    def _parent_of(self, table: str, uid: str) -> str | None:
        """The parent key of a study (its patient) or of a series (its study)."""
        parent, key = (
            ("patient_key", "study_uid")
            if table == "studies"
            else (
                "study_uid",
                "series_uid",
            )
        )
        row = self.fetchone(f"SELECT {parent} FROM {table} WHERE {key} = ?", (uid,))
        return str(row[0]) if row else None

    def _sync_sequence(self, owner: str, keyword: str, items: list[tuple[str, ...]]) -> None:
        """The catalogued items of one sequence, replaced when an instance carries others
        (an instance without the sequence leaves them as they are)."""
        padded = [tuple(list(item) + [""] * (4 - len(item))) for item in items]
        if self.sequence_rows(owner, keyword) == padded:
            return
        # upsert by item number, then trim: concurrent writers of one owner never collide
        for number, values in enumerate(padded):
            self.execute(
                "INSERT INTO sequence_items (owner, sequence, item, v1, v2, v3, v4) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (owner, sequence, item) DO UPDATE "
                "SET v1 = excluded.v1, v2 = excluded.v2, v3 = excluded.v3, v4 = excluded.v4",
                (owner, keyword, number, *values),
            )
        self.execute(
            "DELETE FROM sequence_items WHERE owner = ? AND sequence = ? AND item >= ?",
            (owner, keyword, len(padded)),
        )

    def sequence_rows(self, owner: str, keyword: str) -> list[tuple[str, ...]]:
        rows = self.fetchall(
            "SELECT v1, v2, v3, v4 FROM sequence_items WHERE owner = ? AND sequence = ? "
            "ORDER BY item",
            (owner, keyword),
        )
        return [tuple(r) for r in rows]

    def _upsert_row(
        self,
        table: str,
        key: tuple[str, str],
        values: dict[str, Any],
        insert_only: dict[str, Any],
        *,
        stamp: str = "",
        current: tuple[Any, ...] | None,
    ) -> bool:
        """Insert a row, or update the columns of ``values`` where they differ from
        ``current`` (the row's ``values`` as read in this transaction, None if absent);
        ``stamp`` names a column set to the time of either.  Whether it was inserted.
        INSERT ... DO NOTHING: a concurrent transaction may insert the row first, and then
        this one updates it."""
        key_column, key_value = key
        columns = list(values)
        now = {stamp: time.time()} if stamp else {}
        inserted = False
        if current is None:
            names = [key_column, *insert_only, *columns, *now]
            cursor = self.execute(
                f"INSERT INTO {table} ({', '.join(names)}) "
                f"VALUES ({', '.join('?' for _ in names)}) "
                f"ON CONFLICT ({key_column}) DO NOTHING",
                (key_value, *insert_only.values(), *values.values(), *now.values()),
            )
            inserted = int(cursor.rowcount) == 1
        if not inserted and (current is None or tuple(current) != tuple(values.values())):
            sets = ", ".join(f"{c} = ?" for c in [*columns, *now])
            self.execute(
                f"UPDATE {table} SET {sets} WHERE {key_column} = ?",
                (*values.values(), *now.values(), key_value),
            )
        return inserted

    def _refresh_modalities(self, study_uid: str) -> None:
        rows = self.fetchall(
            "SELECT DISTINCT modality FROM series WHERE study_uid = ? AND modality <> ''",
            (study_uid,),
        )
        joined = "\\".join(sorted(r[0] for r in rows))
        self.execute(
            "UPDATE studies SET modalities_in_study = ? WHERE study_uid = ?", (joined, study_uid)
        )

    # --- statistics ---------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        out = {}
        for table in ("patients", "studies", "series", "instances"):
            row = self.fetchone(f"SELECT count(*) FROM {table}")
            out[table] = int(row[0]) if row else 0
        return out

    def bytes_by_modality(self) -> list[tuple[str, int, int, int]]:
        """(modality, instances, received bytes, stored bytes) per modality."""
        rows = self.fetchall(
            "SELECT s.modality, count(*), sum(i.received_size), sum(i.stored_size) "
            "FROM instances i JOIN series s ON s.series_uid = i.series_uid "
            "GROUP BY s.modality ORDER BY s.modality"
        )
        return [(r[0], int(r[1]), int(r[2] or 0), int(r[3] or 0)) for r in rows]
