"""The PostgreSQL catalog (hospital scale, several kho processes and hosts): statements
sent in pipelines, BEGIN with a transaction's first statements and COMMIT with its last, a
new instance of a known series stored by one statement, instance counters kept as deltas
(instance_deltas) that concurrent ingests of one series do not queue on.

A dead network (a partition that drops packets: no reset, no FIN) holds a connection
only for a bounded time (NETWORK_BOUNDS, libpq parameters).  Without them a statement
sent into it waits out TCP's retransmissions (about 15 minutes), one waiting for its
answer forever, a new connection two minutes of SYN retries, holding a DIMSE
association, an HTTP worker or a finisher thread meanwhile.  With them the statement
fails with CatalogError (0xA7xx / 503) within 15 s (a new connection within 5 s) and the
thread's next statement opens a new connection.  Each bound applies only where the
catalog URL (for connect_timeout: nor the environment's PGCONNECT_TIMEOUT) does not set
it: ``postgresql://kho@db/kho?tcp_user_timeout=30000`` overrides one."""

from __future__ import annotations

import functools
import os
import re
import select
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from kho.archive.catalog.base import REQUEUE_SET, Catalog, RowInsert, in_list, recount_updates
from kho.archive.catalog.records import INSTANCE_COLUMNS, InstanceAttributes
from kho.archive.catalog.schema import HIERARCHY_COLUMNS, SCHEMA, SCHEMA_VERSION, column_types
from kho.archive.config import TENANT_NAME
from kho.errors import CatalogError, CatalogUnavailableError

#: libpq parameters bounding how long a dead network holds a connection.  A modality's
#: DIMSE timeout is commonly 30 s: a C-STORE's failure must reach it before that, as a
#: refusal (0xA7xx) it retries later, not as an aborted association.  A failed store
#: touches the catalog three times (the commit, then two statements of its clean-up, each
#: on a new connection): at most 15 + 5 + 5 = 25 s.  Still far beyond any loss a healthy
#: network recovers from: the server's kernel answers keepalives and acknowledges data
#: even while PostgreSQL is busy, so a long statement is never cut.
NETWORK_BOUNDS = {
    # unacknowledged data (a statement sent into the partition): ms until the socket fails
    "tcp_user_timeout": "15000",
    # a connection waiting for an answer, or idle: probed after 10 s of silence, every
    # 5 s; the kernel gives up once tcp_user_timeout has passed without an answer (15 s;
    # without tcp_user_timeout after 3 unanswered probes, 25 s)
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    # a new connection (SYN, TLS and the startup exchange), in seconds: on a LAN it takes
    # milliseconds; 5 s still allows a lost SYN to be sent again twice
    "connect_timeout": "5",
}


def bounded_conninfo(url: str, **params: str) -> str:
    """The connection string of ``url`` with ``params`` and the NETWORK_BOUNDS it does
    not set itself."""
    given = conninfo_to_dict(url)
    bounds = {k: v for k, v in NETWORK_BOUNDS.items() if k not in given}
    if "PGCONNECT_TIMEOUT" in os.environ:  # the admin's, as libpq would take it
        bounds.pop("connect_timeout", None)
    return make_conninfo(url, **bounds, **params)


@functools.cache
def _new_in_known_series_statement(
    journalled: bool, unfinished: bool, with_rows: tuple[tuple[str, tuple[str, ...]], ...] = ()
) -> str:
    """PostgreSQL: the whole ingest of a new instance into a patient, study and series the
    catalog holds with exactly its values (every instance of a series after its first), as
    one statement, committed on its own (one round trip, one WAL flush).  The instance row
    is inserted only if the three rows match and its SOP Instance UID is new; the queue,
    counter and journal rows only if it was.  Returns (rows matched, instance inserted):
    anything else is left to the general path, which then finds the catalog unchanged.
    Parameters: the patient, study and series keys each followed by their
    schema.hierarchy_values, the instance columns, then the tail's."""
    types = column_types("instances")
    # the rows must also be each other's parents (a study of another patient, a series of
    # another study: the general path refuses the instance)
    checks = [
        "studies.patient_key = patients.patient_key",
        "series.study_uid = studies.study_uid",
    ]
    for table, key, columns in HIERARCHY_COLUMNS:
        row = ", ".join(f"{table}.{c}" for c in columns)
        given = ", ".join("%s::" + column_types(table)[c] for c in columns)
        same = f"({row}) IS NOT DISTINCT FROM ({given})"
        if table == "patients":  # the HIS's demographics stand, whatever the instance says
            same = (
                f"({same} OR EXISTS (SELECT 1 FROM his_patients h WHERE "
                "h.patient_key = patients.patient_key AND h.merged_into = ''))"
            )
        checks.append(f"{table}.{key} = %s AND {same}")
    values = ", ".join(f"%s::{types[c]}" for c in INSTANCE_COLUMNS)
    parts = [
        f"known AS (SELECT 1 FROM patients, studies, series WHERE {' AND '.join(checks)})",
        f"ins AS (INSERT INTO instances ({', '.join(INSTANCE_COLUMNS)}) SELECT {values} "
        "FROM known ON CONFLICT (sop_uid) DO NOTHING RETURNING sop_uid)",
        "counted AS (INSERT INTO instance_deltas (patient_key, study_uid, series_uid, delta) "
        "SELECT %s::TEXT, %s::TEXT, %s::TEXT, 1 FROM ins)",
    ]
    if unfinished:  # a new SOP Instance UID has no queue row
        parts.append(
            "queued AS (INSERT INTO unfinished (sop_uid, object_prefix, queued_at) "
            "SELECT sop_uid, %s::TEXT, %s::DOUBLE PRECISION FROM ins "
            f"ON CONFLICT (sop_uid) DO UPDATE SET {REQUEUE_SET})"
        )
    if journalled:
        parts.append(
            "unjournalled AS (DELETE FROM pending WHERE object_prefix = %s "
            "AND EXISTS (SELECT 1 FROM ins))"
        )
    for n, (row_table, row_columns) in enumerate(with_rows):  # only with the instance
        marks = ", ".join("%s" for _ in row_columns)
        parts.append(
            f"with_row{n} AS (INSERT INTO {row_table} ({', '.join(row_columns)}) "
            f"SELECT {marks} FROM ins)"
        )
    return (
        f"WITH {', '.join(parts)} SELECT (SELECT count(*) FROM known), (SELECT count(*) FROM ins)"
    )


class PostgresCatalog(Catalog):
    """The catalog in a PostgreSQL database."""

    dialect = "postgresql"
    ROW_LOCK = " FOR UPDATE"
    ENGINE_ERRORS = (psycopg.Error,)

    def __init__(self, url: str, *, synchronous_full: bool = True, tenant: str = "") -> None:
        """``tenant``: the catalog of that tenant, in the schema ``tenant_<name>`` of the
        same database (made if need be); "" for the default tenant's, in the schema the
        connection starts in (public), as before tenants."""
        if tenant and not re.fullmatch(TENANT_NAME, tenant):
            raise CatalogError(f"tenant name {tenant!r} must match {TENANT_NAME}")
        super().__init__(url, synchronous_full=synchronous_full, tenant=tenant)
        #: the schema holding this tenant's tables ("" : the connection's default)
        self.namespace = f"tenant_{tenant}" if tenant else ""
        extra = {}
        if self.namespace:
            # in the startup packet, no round trip: each DIMSE association's thread opens
            # a connection of its own.  Only the tenant's schema: a table missing there
            # must never be found in another (pg_catalog is searched implicitly).
            # TENANT_NAME keeps the name a plain identifier there (lower case, no space)
            given = conninfo_to_dict(url).get("options") or ""
            extra["options"] = f"{given} -c search_path={self.namespace}".strip()
        self._conninfo = bounded_conninfo(url, **extra)
        self._create_schema()

    def _connect(self) -> Any:
        try:
            return psycopg.connect(self._conninfo, autocommit=True)
        except psycopg.Error as exc:
            raise CatalogUnavailableError(f"cannot connect to the catalog: {exc}") from exc

    def _lost(self, conn: Any) -> bool:
        # inside a transaction a new connection would run its remaining statements
        # outside it: the broken one stays until the transaction has failed
        if getattr(self._local, "committed", None) is not None:
            return False
        if conn.closed:
            return True
        # an idle connection has nothing to read (every result was read with its
        # statement): something to read is the server's goodbye, or the reset of a
        # connection an outage broke while it sat idle.  Looking costs no round trip;
        # else the first statement after the outage would fail on it
        try:
            poller = select.poll()
            poller.register(conn.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError, psycopg.Error):
            return True

    def sql(self, text: str) -> str:
        return text.replace("?", "%s")

    def _failure(self, exc: BaseException, what: str) -> CatalogError:
        # the connection broke (refused, reset, a bound of NETWORK_BOUNDS ran out): the
        # server is unreachable, not the statement wrong
        conn = getattr(self._local, "conn", None)
        if isinstance(exc, psycopg.OperationalError) and (
            conn is None or conn.closed or conn.broken
        ):
            return CatalogUnavailableError(f"{what}: {exc}")
        return CatalogError(f"{what}: {exc}")

    def tenants_present(self) -> list[str]:
        """Tenants with a schema (``tenant_<name>``) in this catalog's database."""
        rows = self.fetchall(
            "SELECT nspname FROM pg_namespace WHERE starts_with(nspname, ?)", ("tenant_",)
        )
        names = (str(name).removeprefix("tenant_") for (name,) in rows)
        return sorted(name for name in names if re.fullmatch(TENANT_NAME, name))

    def execute(self, text: str, params: Sequence[Any] = ()) -> Any:
        if getattr(self._local, "begin_unsent", False):
            return self.execute_batch([(text, params)])[-1]
        return super().execute(text, params)

    def execute_batch(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[Any]:
        """Sent in one pipeline (one round trip instead of one each; psycopg's
        per-statement wait dominated the catalog's cost of an ingest); an error in any
        raises CatalogError once all ran."""
        if getattr(self._local, "begin_unsent", False):
            self._local.begin_unsent = False
            return self.execute_batch([("BEGIN", ()), *statements])[1:]
        if len(statements) < 2:
            return [self.execute(text, params) for text, params in statements]
        conn = self.connection
        try:
            with conn.pipeline():
                return [conn.execute(self.sql(text), params) for text, params in statements]
        except psycopg.Error as exc:
            raise self._failure(exc, "catalog error") from exc

    def _transaction(self) -> Iterator[None]:
        """BEGIN is sent with the transaction's first statements (one round trip less), and
        commit_batch may send COMMIT with its last."""
        conn = self.connection
        local = self._local
        local.begin_unsent = True
        local.committed = False
        try:
            yield
        except BaseException:
            if not getattr(local, "begin_unsent", False):
                with suppress(Exception):
                    conn.execute("ROLLBACK")
            local.begin_unsent = False
            local.committed = None
            raise
        unsent, local.begin_unsent = local.begin_unsent, False
        committed, local.committed = local.committed, None
        if unsent or committed:  # nothing ran, or commit_batch committed
            return
        try:
            conn.execute("COMMIT")
        except Exception as exc:
            raise self._failure(exc, "catalog commit failed") from exc

    def commit_batch(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        """The last statements of a transaction and its commit, in one round trip; the
        transaction's end then commits nothing more."""
        if getattr(self._local, "committed", None) is False:
            self.execute_batch([*statements, ("COMMIT", ())])
            self._local.committed = True
            return
        self.execute_batch(statements)

    def _schema_in_place(self) -> bool:
        """Whether every table and index of the schema exists: then opening the catalog
        runs no DDL.  CREATE INDEX IF NOT EXISTS locks its table even when the index is
        there, and a process starting beside one that ingests would deadlock with it."""
        names = re.findall(r"CREATE (?:TABLE|INDEX) IF NOT EXISTS (\w+)", SCHEMA)
        marks = ", ".join("to_regclass(?)" for _ in names)
        row = self.fetchone(f"SELECT {marks}", names)
        if row is None or any(found is None for found in row):
            return False
        version = self.fetchone("SELECT version FROM kho_schema")
        return version is not None and int(version[0]) == SCHEMA_VERSION

    def _create_schema(self) -> None:
        if self._schema_in_place():
            return
        # one DDL lock so several processes starting at once do not race
        with self.transaction():
            self.execute("SELECT pg_advisory_xact_lock(7301)")
            if self.namespace:  # the tables below go into it (the first in search_path)
                self.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.namespace}"')
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self.execute(statement)
            self._record_version()

    @contextmanager
    def relaxed_write(self) -> Iterator[None]:
        """SET LOCAL synchronous_commit = off (see Catalog.relaxed_write); inside a
        transaction, part of it."""
        in_transaction = getattr(self._local, "begin_unsent", False) or (
            self.connection.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
        )
        if in_transaction:
            yield  # inside a transaction: part of it, committed with it
            return
        with self.transaction():
            self.execute("SET LOCAL synchronous_commit = off")
            yield

    def _count_statements(
        self, study_uid: str, series_uid: str, pkey: str, delta: int
    ) -> list[tuple[str, Sequence[Any]]]:
        """One row of instance_deltas (see fold_counters) instead of updating three rows
        every ingest of the series shares."""
        return [
            (
                "INSERT INTO instance_deltas (patient_key, study_uid, series_uid, delta) "
                "VALUES (?, ?, ?, ?)",
                (pkey, study_uid, series_uid, delta),
            )
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
        """PostgreSQL: store a new instance of a series the catalog holds unchanged in one
        statement (_new_in_known_series_statement); whether it was stored.  If not (a new
        or changed patient, study or series, or a SOP Instance UID already stored) nothing
        was written."""
        params: list[Any] = []
        for (_table, key, _columns), row_values in zip(HIERARCHY_COLUMNS, hierarchy, strict=True):
            params += [getattr(attrs, key), *row_values.values()]
        params += [values[c] for c in INSTANCE_COLUMNS]
        params += [attrs.patient_key, attrs.study_uid, attrs.series_uid]
        if unfinished:
            params += [values["object_prefix"], time.time()]
        if journalled:
            params.append(values["object_prefix"])
        for row in with_rows:
            params += row.values
        # committed on its own: never part of a transaction the caller has open
        assert not getattr(self._local, "begin_unsent", False)
        shapes = tuple((row.table, row.columns) for row in with_rows)
        statement = _new_in_known_series_statement(journalled, unfinished, shapes)
        row = self.execute(statement, params).fetchone()
        return bool(row and row[1])

    def fold_counters(self) -> int:
        """PostgreSQL: add the pending instance_deltas to the patient, study and series
        counters, in one statement (the rows it deletes are exactly those it adds, however
        many ingests commit meanwhile); how many were folded.  Queries add what is still
        pending, so counts are exact either way."""
        with self.transaction():
            row = self.fetchone(
                "WITH d AS (DELETE FROM instance_deltas "
                "RETURNING patient_key, study_uid, series_uid, delta), "
                "p AS (UPDATE patients t SET num_instances = t.num_instances + x.n FROM "
                "(SELECT patient_key, SUM(delta) AS n FROM d GROUP BY patient_key) x "
                "WHERE t.patient_key = x.patient_key RETURNING 1), "
                "s AS (UPDATE studies t SET num_instances = t.num_instances + x.n FROM "
                "(SELECT study_uid, SUM(delta) AS n FROM d GROUP BY study_uid) x "
                "WHERE t.study_uid = x.study_uid RETURNING 1), "
                "r AS (UPDATE series t SET num_instances = t.num_instances + x.n FROM "
                "(SELECT series_uid, SUM(delta) AS n FROM d GROUP BY series_uid) x "
                "WHERE t.series_uid = x.series_uid RETURNING 1) "
                "SELECT (SELECT count(*) FROM d), (SELECT count(*) FROM p), "
                "(SELECT count(*) FROM s), (SELECT count(*) FROM r)"
            )
        return int(row[0]) if row else 0

    def _lock_rows(self, table: str, key: str, uids: set[str]) -> None:
        ordered = sorted(uids)  # one order for every transaction: no deadlock between them
        self.execute(
            f"SELECT 1 FROM {table} WHERE {key} IN ({in_list(ordered)}) FOR UPDATE", ordered
        )

    def _lock_hierarchy(self, a: InstanceAttributes) -> None:
        """PostgreSQL: lock the patient, study and series rows of an instance, in that
        order (the counter updates take them in the same order: no deadlock)."""
        self.execute_batch(
            [
                (f"SELECT 1 FROM {table} WHERE {column} = ? FOR UPDATE", (key,))
                for table, column, key in (
                    ("patients", "patient_key", a.patient_key),
                    ("studies", "study_uid", a.study_uid),
                    ("series", "series_uid", a.series_uid),
                )
            ]
        )

    def _recount(
        self, patient_keys: list[str], study_uids: list[str], series_uids: list[str]
    ) -> None:
        """In one statement that also folds in (deletes) these rows' pending
        instance_deltas, so the instances counted and the deltas dropped are of one
        snapshot."""
        fold = (
            f"DELETE FROM instance_deltas WHERE patient_key IN ({in_list(patient_keys)}) "
            f"OR study_uid IN ({in_list(study_uids)}) OR series_uid IN ({in_list(series_uids)}) "
            "RETURNING patient_key, study_uid, series_uid"
        )
        parts = [f"d AS ({fold})"]
        params: list[Any] = [*patient_keys, *study_uids, *series_uids]
        updates = recount_updates(patient_keys, study_uids, series_uids, folded=True)
        for name, (text, uids) in zip("rsp", updates, strict=True):
            parts.append(f"{name} AS ({text} RETURNING 1)")
            params += uids
        self.execute(f"WITH {', '.join(parts)} SELECT (SELECT count(*) FROM d)", params)
