"""The audit journal: durable, hash-chained records in the catalog's SQL database.

Two steps, so that a record can commit with the change it records and still join one
unbroken chain:

1. **Outbox.** An event becomes a row of ``audit_outbox`` (its JSON).  The row is written by
   :func:`statements_for`'s statements inside the change's own transaction (an ingest
   commit: the acknowledged instance and its record commit together, or neither does), or
   by the AuditLog's flush (read and security events, at least every second).  A rolled
   back transaction leaves no row, and nothing of the chain was taken yet, so it leaves no
   hole either.
2. **Chaining.** :func:`chain_pending` moves outbox rows, oldest first, into
   ``audit_journal``: each record gets the next sequence number of its chain, the previous
   record's hash, and its own hash = SHA-256 (HMAC-SHA-256 with a key) over the previous
   hash and the record's canonical form.  Every AuditLog runs it in its background thread,
   so a row is chained within about a second by whichever process gets there first; a row
   whose writer died is chained by the next one.

One chain per catalog (per hospital: each tenant's catalog has its own), appended by one
chaining transaction at a time: the chain head row (``audit_chain``) is locked for the
transaction (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite's write transaction holds the
database).  Serialised appends instead of a chain per process or host: one total order
that ``verify`` checks in one pass, no registry of writers, and a removed tail shows up
against the head row; the serialisation costs one short transaction per process per
second, which batches every record that arrived meanwhile.

Instances Transferred / Accessed events of one study that differ only in their instances
(the 300 C-STOREs of a CT from one modality) are folded into one record when they are
chained together (up to ``MAX_MERGED_INSTANCES``): every instance is named, once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kho.archive.catalog import Catalog
from kho.audit.messages import AuditEvent, AuditSource, EventKind

LOG = logging.getLogger(__name__)

#: the chain of a catalog (one per catalog: each tenant's catalog holds its own)
DEFAULT_CHAIN = "main"
#: the previous hash of a chain's first record
GENESIS = "0" * 64
#: instances one folded record names at most (keeps a syslog message near 15 KB)
MAX_MERGED_INSTANCES = 200
#: events further apart than this are never folded into one record
MERGE_WINDOW_S = 10.0
#: outbox rows one chaining transaction takes at most
CHAIN_BATCH = 1000
#: a journal record whose outbox row could not be read as an event
UNREADABLE = "unreadable"

_AUDIT_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_outbox (
    id TEXT PRIMARY KEY,
    queued_at DOUBLE PRECISION NOT NULL,
    event TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_outbox_order ON audit_outbox (queued_at, id);
CREATE TABLE IF NOT EXISTS audit_journal (
    chain_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    event_time DOUBLE PRECISION NOT NULL,
    chained_at DOUBLE PRECISION NOT NULL,
    event_kind TEXT NOT NULL,
    action TEXT NOT NULL,
    outcome BIGINT NOT NULL,
    user_id TEXT NOT NULL,
    address TEXT NOT NULL,
    tenant TEXT NOT NULL,
    via TEXT NOT NULL,
    patient_ids TEXT NOT NULL,
    study_uids TEXT NOT NULL,
    message TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    PRIMARY KEY (chain_id, seq)
);
CREATE INDEX IF NOT EXISTS audit_journal_time ON audit_journal (event_time);
CREATE INDEX IF NOT EXISTS audit_journal_user ON audit_journal (user_id, event_time);
CREATE TABLE IF NOT EXISTS audit_subjects (
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    chain_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    PRIMARY KEY (kind, value, chain_id, seq)
);
CREATE INDEX IF NOT EXISTS audit_subjects_record ON audit_subjects (chain_id, seq);
CREATE TABLE IF NOT EXISTS audit_chain (
    chain_id TEXT PRIMARY KEY,
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_forwarded (
    destination TEXT NOT NULL,
    chain_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    owner TEXT NOT NULL DEFAULT '',
    lease_until DOUBLE PRECISION NOT NULL DEFAULT 0,
    updated_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (destination, chain_id)
)
"""

_RECORD_COLUMNS = (
    "chain_id, seq, event_time, chained_at, event_kind, action, outcome, user_id, address, "
    "tenant, via, patient_ids, study_uids, message, prev_hash, hash"
)
_OUTBOX_INSERT = "INSERT INTO audit_outbox (id, queued_at, event) VALUES (?, ?, ?)"

# what XML 1.0 (and PostgreSQL's TEXT: no NUL) cannot hold, and lone surrogates
_UNSTORABLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")

_schema_ready: weakref.WeakSet[Catalog] = weakref.WeakSet()


def _clean(text: str) -> str:
    return _UNSTORABLE.sub("\ufffd", text)


# --- schema -----------------------------------------------------------------------------------


def ensure_schema(catalog: Catalog) -> None:
    """Create the audit tables if they are missing (once per catalog object).  PostgreSQL:
    no DDL at all when they exist (CREATE INDEX IF NOT EXISTS would lock its table beside
    a process that is ingesting)."""
    if catalog in _schema_ready:
        return
    statements = [s for s in _AUDIT_SCHEMA.split(";") if s.strip()]
    if catalog.dialect == "postgresql":
        names = re.findall(r"CREATE (?:TABLE|INDEX) IF NOT EXISTS (\w+)", _AUDIT_SCHEMA)
        marks = ", ".join("to_regclass(?)" for _ in names)
        row = catalog.fetchone(f"SELECT {marks}", names)
        if row is None or any(found is None for found in row):
            with catalog.transaction():
                catalog.execute("SELECT pg_advisory_xact_lock(7302)")  # kho's DDL: 7301
                for statement in statements:
                    catalog.execute(statement)
    else:
        with catalog.transaction():
            for statement in statements:
                catalog.execute(statement)
    _schema_ready.add(catalog)


# --- step 1: the outbox -------------------------------------------------------------------


def statements_for(
    event: AuditEvent, source: AuditSource | None = None
) -> list[tuple[str, Sequence[Any]]]:
    """The statements that queue ``event`` for the journal, to run inside the
    transaction of the change it records (``Catalog.execute_batch`` or
    ``commit_batch``): the record is durable exactly when the change is.  ``source``
    stamps the reporter if the event names none.  The audit tables must exist
    (:func:`ensure_schema`, done by every AuditLog)."""
    if source is not None:
        event = event.stamped(source)
    return [outbox_statement(event)]


def outbox_statement(event: AuditEvent) -> tuple[str, Sequence[Any]]:
    """The INSERT of one event's outbox row."""
    return (_OUTBOX_INSERT, (secrets.token_hex(12), time.time(), _clean(event.to_json())))


def pending_count(catalog: Catalog) -> int:
    row = catalog.fetchone("SELECT count(*) FROM audit_outbox")
    return int(row[0]) if row else 0


# --- the record ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One journal record: the searchable columns, the DICOM Audit Message, the chain."""

    chain_id: str
    seq: int
    event_time: float
    chained_at: float
    event_kind: str
    action: str
    outcome: int
    user_id: str
    address: str
    tenant: str
    via: str
    #: JSON lists, kept as stored (the hash covers these exact texts)
    patient_ids_json: str
    study_uids_json: str
    message: str
    prev_hash: str
    hash: str

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> AuditRecord:
        return cls(
            str(row[0]),
            int(row[1]),
            float(row[2]),
            float(row[3]),
            str(row[4]),
            str(row[5]),
            int(row[6]),
            *(str(value) for value in row[7:16]),
        )

    @property
    def patient_ids(self) -> list[str]:
        return list(json.loads(self.patient_ids_json))

    @property
    def study_uids(self) -> list[str]:
        return list(json.loads(self.study_uids_json))

    def values(self) -> tuple[Any, ...]:
        return (
            self.chain_id,
            self.seq,
            self.event_time,
            self.chained_at,
            self.event_kind,
            self.action,
            self.outcome,
            self.user_id,
            self.address,
            self.tenant,
            self.via,
            self.patient_ids_json,
            self.study_uids_json,
            self.message,
            self.prev_hash,
            self.hash,
        )

    def canonical(self) -> bytes:
        """The bytes the hash covers: every column but the hashes, in a fixed order."""
        return json.dumps(
            list(self.values()[:14]), ensure_ascii=False, separators=(",", ":")
        ).encode("utf-8")

    def computed_hash(self, key: bytes | None = None) -> str:
        data = self.prev_hash.encode("ascii", "replace") + b"\n" + self.canonical()
        if key:
            return hmac.new(key, data, hashlib.sha256).hexdigest()
        return hashlib.sha256(data).hexdigest()

    def as_dict(self, *, message: bool = True) -> dict[str, Any]:
        """The record for search results (JSON-ready)."""
        out: dict[str, Any] = {
            "chain": self.chain_id,
            "seq": self.seq,
            "time": datetime.fromtimestamp(self.event_time, UTC).isoformat(),
            "event": self.event_kind,
            "action": self.action,
            "outcome": self.outcome,
            "user": self.user_id,
            "address": self.address,
            "tenant": self.tenant,
            "via": self.via,
            "patients": self.patient_ids,
            "studies": self.study_uids,
            "hash": self.hash,
        }
        if message:
            out["message"] = self.message
        return out


def _record_for(
    chain_id: str, seq: int, prev_hash: str, event: AuditEvent | None, raw: str, key: bytes | None
) -> AuditRecord:
    now = time.time()
    text = _clean

    def uids(values: set[str]) -> str:
        return _clean(json.dumps(sorted(values), ensure_ascii=False))

    if event is None:  # kept as evidence, never dropped: the chain must not skip it
        unsigned = AuditRecord(
            chain_id, seq, now, now, UNREADABLE, "E", 0, "", "", "", "", "[]", "[]",
            text(raw), prev_hash, "",
        )  # fmt: skip
    else:
        unsigned = AuditRecord(
            chain_id,
            seq,
            float(event.time),
            now,
            event.kind.value,
            event.action.value,
            int(event.outcome),
            text(event.user),
            text(event.address),
            text(event.tenant),
            text(event.via),
            uids({p.id for p in event.patients}),
            uids({s.uid for s in event.studies}),
            text(event.to_xml()),
            prev_hash,
            "",
        )
    return dataclasses.replace(unsigned, hash=unsigned.computed_hash(key))


# --- step 2: chaining -------------------------------------------------------------------------


def _fold(rows: Sequence[Sequence[Any]]) -> list[tuple[AuditEvent | None, str]]:
    """Outbox rows as the records they become, in order; instance events of one study
    that differ only in their instances folded into the first of them."""
    entries: list[tuple[AuditEvent | None, str]] = []
    open_groups: dict[tuple[Any, ...], int] = {}
    for _id, _queued, text in rows:
        try:
            event = AuditEvent.from_json(str(text))
        except Exception:  # a corrupt or future row: chained as it is
            LOG.warning("audit: an outbox row is not a readable event; kept unparsed")
            entries.append((None, str(text)))
            continue
        key = event.merge_key()
        at = open_groups.get(key) if key is not None else None
        first = entries[at][0] if at is not None else None
        if (
            key is not None
            and at is not None
            and first is not None
            and abs(event.time - first.time) <= MERGE_WINDOW_S
        ):
            merged = first.merged(event)
            entries[at] = (merged, "")
            if _instances(merged) >= MAX_MERGED_INSTANCES:
                del open_groups[key]
            continue
        if key is not None:
            open_groups[key] = len(entries)
        entries.append((event, ""))
    return entries


def _instances(event: AuditEvent) -> int:
    return sum(c.count for s in event.studies for c in s.sop_classes)


def chain_pending(
    catalog: Catalog,
    *,
    chain_id: str = DEFAULT_CHAIN,
    key: bytes | None = None,
    limit: int = CHAIN_BATCH,
) -> int:
    """Chain up to ``limit`` outbox rows in one transaction; how many were taken."""
    if catalog.fetchone("SELECT 1 FROM audit_outbox LIMIT 1") is None:
        return 0  # nothing to do: no write transaction
    with catalog.transaction():
        catalog.execute(
            "INSERT INTO audit_chain (chain_id, seq, hash, updated_at) VALUES (?, 0, ?, ?) "
            "ON CONFLICT (chain_id) DO NOTHING",
            (chain_id, GENESIS, time.time()),
        )
        # the head, locked until commit: one chaining transaction at a time per chain
        head = catalog.fetchone(
            f"SELECT seq, hash FROM audit_chain WHERE chain_id = ?{catalog.ROW_LOCK}",
            (chain_id,),
        )
        assert head is not None
        rows = catalog.fetchall(
            "SELECT id, queued_at, event FROM audit_outbox ORDER BY queued_at, id LIMIT ?",
            (limit,),
        )
        if not rows:
            return 0
        seq, prev_hash = int(head[0]), str(head[1])
        statements: list[tuple[str, Sequence[Any]]] = []
        for event, raw in _fold(rows):
            seq += 1
            record = _record_for(chain_id, seq, prev_hash, event, raw, key)
            statements.append(
                (
                    f"INSERT INTO audit_journal ({_RECORD_COLUMNS}) "
                    f"VALUES ({', '.join('?' for _ in range(16))})",
                    record.values(),
                )
            )
            statements.extend(_subject_statements(record))
            prev_hash = record.hash
        ids = [str(r[0]) for r in rows]
        statements.append(
            (f"DELETE FROM audit_outbox WHERE id IN ({', '.join('?' for _ in ids)})", ids)
        )
        statements.append(
            (
                "UPDATE audit_chain SET seq = ?, hash = ?, updated_at = ? WHERE chain_id = ?",
                (seq, prev_hash, time.time(), chain_id),
            )
        )
        catalog.execute_batch(statements)
    return len(rows)


def chain_all(catalog: Catalog, *, chain_id: str = DEFAULT_CHAIN, key: bytes | None = None) -> int:
    """Chain every outbox row (a backlog after an outage, a restart); how many."""
    total = 0
    while True:
        taken = chain_pending(catalog, chain_id=chain_id, key=key)
        total += taken
        if taken < CHAIN_BATCH:
            return total


def _subjects(record: AuditRecord) -> set[tuple[str, str]]:
    return {("patient", p) for p in record.patient_ids} | {("study", s) for s in record.study_uids}


def _subject_statements(record: AuditRecord) -> list[tuple[str, Sequence[Any]]]:
    return [
        (
            "INSERT INTO audit_subjects (kind, value, chain_id, seq) VALUES (?, ?, ?, ?)",
            (kind, value, record.chain_id, record.seq),
        )
        for kind, value in sorted(_subjects(record))
    ]


# --- reading ----------------------------------------------------------------------------------


def read_after(
    catalog: Catalog, after_seq: int, *, chain_id: str = DEFAULT_CHAIN, limit: int = 500
) -> list[AuditRecord]:
    """The records of a chain after ``after_seq``, in order (the forwarder's reader)."""
    rows = catalog.fetchall(
        f"SELECT {_RECORD_COLUMNS} FROM audit_journal WHERE chain_id = ? AND seq > ? "
        "ORDER BY seq LIMIT ?",
        (chain_id, after_seq, limit),
    )
    return [AuditRecord.from_row(r) for r in rows]


def _epoch(value: float | datetime | None) -> float | None:
    if value is None or isinstance(value, float | int):
        return value
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def search(
    catalog: Catalog,
    *,
    patient_id: str | None = None,
    study_uid: str | None = None,
    user: str | None = None,
    since: float | datetime | None = None,
    until: float | datetime | None = None,
    event: EventKind | str | None = None,
    outcome: int | None = None,
    tenant: str | None = None,
    limit: int = 100,
) -> list[AuditRecord]:
    """Journal records matching every given criterion, newest first.  ``since`` and
    ``until`` bound the event time (epoch seconds, or a datetime: naive means UTC);
    ``event`` is an EventKind or its name (``query``, ``security-alert`` ...)."""
    where: list[str] = []
    params: list[Any] = []
    for kind, value in (("patient", patient_id), ("study", study_uid)):
        if value:
            where.append(
                "EXISTS (SELECT 1 FROM audit_subjects s WHERE s.kind = ? AND s.value = ? "
                "AND s.chain_id = j.chain_id AND s.seq = j.seq)"
            )
            params += [kind, value]
    for column, value in (
        ("user_id", user),
        ("event_kind", EventKind(event).value if event else None),
        ("tenant", tenant),
    ):
        if value:
            where.append(f"j.{column} = ?")
            params.append(value)
    if outcome is not None:
        where.append("j.outcome = ?")
        params.append(int(outcome))
    for op, bound in ((">=", _epoch(since)), ("<=", _epoch(until))):
        if bound is not None:
            where.append(f"j.event_time {op} ?")
            params.append(float(bound))
    columns = ", ".join(f"j.{c.strip()}" for c in _RECORD_COLUMNS.split(","))
    text = f"SELECT {columns} FROM audit_journal j"
    if where:
        text += " WHERE " + " AND ".join(where)
    text += " ORDER BY j.event_time DESC, j.seq DESC LIMIT ?"
    return [AuditRecord.from_row(r) for r in catalog.fetchall(text, [*params, int(limit)])]


# --- verification -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """Something ``verify`` found wrong in a chain."""

    chain_id: str
    seq: int
    #: altered | missing | out-of-order | truncated | extra | index
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"chain {self.chain_id} record {self.seq}: {self.kind}: {self.detail}"


def _pages(catalog: Catalog, chain_id: str, page: int) -> Iterator[list[AuditRecord]]:
    after = -1
    while True:
        records = read_after(catalog, after, chain_id=chain_id, limit=page)
        if not records:
            return
        yield records
        after = records[-1].seq


def verify(catalog: Catalog, *, key: bytes | None = None, page: int = 2000) -> list[Problem]:
    """Check every chain of the catalog: each record's hash against its content (an
    edited record), sequence numbers without gaps (a removed one), each record's
    previous hash against the record before it (reordered, swapped or replaced ones),
    the chain head against the last record (a removed tail), and the search index against
    the records.  No problems: an empty list."""
    ensure_schema(catalog)
    problems: list[Problem] = []
    chains = {
        str(r[0])
        for r in catalog.fetchall(
            "SELECT chain_id FROM audit_chain UNION SELECT DISTINCT chain_id FROM audit_journal"
        )
    }
    for chain_id in sorted(chains):
        problems += _verify_chain(catalog, chain_id, key, page)
    return problems


def _verify_chain(catalog: Catalog, chain_id: str, key: bytes | None, page: int) -> list[Problem]:
    problems: list[Problem] = []
    expected, prev_hash = 1, GENESIS
    last: AuditRecord | None = None
    for records in _pages(catalog, chain_id, page):
        for record in records:
            if record.seq != expected:
                span = f"{expected}..{record.seq - 1}" if record.seq > expected + 1 else ""
                span = span or str(expected)
                problems.append(
                    Problem(chain_id, expected, "missing", f"record(s) {span} were removed")
                )
            if record.computed_hash(key) != record.hash:
                problems.append(
                    Problem(chain_id, record.seq, "altered", "its content does not match its hash")
                )
            if record.prev_hash != prev_hash and record.seq == expected:
                problems.append(
                    Problem(
                        chain_id,
                        record.seq,
                        "out-of-order",
                        f"it does not follow record {record.seq - 1} (a record was moved, "
                        "swapped or replaced)",
                    )
                )
            prev_hash, expected, last = record.hash, record.seq + 1, record
        problems += _verify_index(catalog, chain_id, records)
    head = catalog.fetchone("SELECT seq, hash FROM audit_chain WHERE chain_id = ?", (chain_id,))
    last_seq = last.seq if last else 0
    if head is None:
        if last is not None:
            problems.append(Problem(chain_id, last_seq, "truncated", "the chain head is gone"))
        return problems
    head_seq, head_hash = int(head[0]), str(head[1])
    if head_seq > last_seq:
        problems.append(
            Problem(
                chain_id,
                last_seq + 1,
                "truncated",
                f"records {last_seq + 1}..{head_seq} were removed from the end",
            )
        )
    elif head_seq < last_seq:
        problems.append(
            Problem(
                chain_id,
                head_seq + 1,
                "extra",
                f"records {head_seq + 1}..{last_seq} were added after the chain head",
            )
        )
    elif last is not None and head_hash != last.hash:
        problems.append(
            Problem(chain_id, last_seq, "altered", "the last record is not the one chained")
        )
    return problems


def _verify_index(catalog: Catalog, chain_id: str, records: list[AuditRecord]) -> list[Problem]:
    """The search index rows of these records are exactly what the records name."""
    indexed: dict[int, set[tuple[str, str]]] = {}
    for kind, value, seq in catalog.fetchall(
        "SELECT kind, value, seq FROM audit_subjects WHERE chain_id = ? AND seq >= ? AND seq <= ?",
        (chain_id, records[0].seq, records[-1].seq),
    ):
        indexed.setdefault(int(seq), set()).add((str(kind), str(value)))
    problems = []
    for record in records:
        if indexed.pop(record.seq, set()) != _subjects(record):
            problems.append(
                Problem(chain_id, record.seq, "index", "its search index entries were changed")
            )
    for seq in sorted(indexed):
        problems.append(Problem(chain_id, seq, "index", "index entries of no record"))
    return problems


__all__ = [
    "CHAIN_BATCH",
    "DEFAULT_CHAIN",
    "GENESIS",
    "AuditRecord",
    "Problem",
    "chain_all",
    "chain_pending",
    "ensure_schema",
    "outbox_statement",
    "pending_count",
    "read_after",
    "search",
    "statements_for",
    "verify",
]
