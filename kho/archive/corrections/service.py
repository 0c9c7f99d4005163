"""Rejection and purge: what a rejection note does to the instances it names.

Reject (one catalog transaction): each named instance this tenant holds leaves
``instances`` (kho.archive.catalog.Catalog.withdraw_instances: its series, study and
patient go too when left empty, the counters of the rest are counted again) and enters
``rejected_instances`` with its row as it was.  From that commit on no C-FIND, QIDO-RS,
WADO, C-GET, C-MOVE or forwarding sees it: they all start from ``instances``.  Its
objects stay where they are.

Purge (when ``purge_after`` has passed; at once for data retention): one transaction
sets ``purged_at`` and lists every object of the instance as garbage (kho.archive.catalog
``garbage``); then the objects are deleted and their garbage rows forgotten.  A crash
anywhere leaves a consistent catalog: before the purge's commit the rejected row still
names the objects and the purge is retried; after it, the garbage list does and the
garbage collector deletes them.  No catalog row ever names an object already deleted,
and every object stays named by a row until it is gone.

Within one tenant only: each tenant has its own catalog, and a note is read against the
catalog of the tenant that received it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from typing import Protocol

from kho.archive import keys
from kho.archive.catalog import GARBAGE_DELAY_S, Catalog, InstanceRecord, RowInsert
from kho.archive.catalog.base import in_list
from kho.archive.config import Settings
from kho.archive.corrections.notes import Reference, RejectionNote, RejectionReason
from kho.archive.read.pixels import FRAME_CACHE
from kho.errors import CatalogError, DatasetMismatchError, KhoError, StorageError
from kho.storage import ObjectStore
from kho.storage.spool import is_spool_key

log = logging.getLogger(__name__)

#: rejected instances purged per transaction
PURGE_BATCH = 200


class CorrectingArchive(Protocol):
    """What rejection and purge use of an archive (kho.archive.archive.Archive is one)."""

    settings: Settings
    catalog: Catalog
    store: ObjectStore


@dataclass(slots=True)
class WithdrawnStudy:
    """The instances one rejection took out of one study (for the audit trail)."""

    study_uid: str
    patient_id: str
    patient_name: str
    #: (SOP Class UID, SOP Instance UID)
    instances: list[tuple[str, str]] = field(default_factory=list)
    #: nothing of the study is left (it had no other instance, nor the note)
    study_gone: bool = False


@dataclass(slots=True)
class Rejection:
    """What one rejection note did (observers: the audit trail)."""

    tenant: str
    reason: RejectionReason
    note_uid: str
    #: who asked: an AE title, a token's user or key name; and what kind of caller
    requested_by: str
    requester_kind: str
    address: str
    #: the door or command it came through (C-STORE, STOW-RS, HTTP, CLI...)
    via: str
    studies: list[WithdrawnStudy]
    #: named instances already rejected earlier (a note sent again)
    already: int
    #: named instances this tenant does not hold (unknown, or another tenant's)
    ignored: int
    purge_after: float
    purged: int = 0

    @property
    def rejected(self) -> int:
        return sum(len(s.instances) for s in self.studies)


#: rows committed in a rejection's own transaction, made from what it withdrew (the audit
#: trail's records: durable exactly when the rejection is)
RejectionRows = Callable[[Rejection], Sequence[RowInsert]]


def _retryable(exc: BaseException) -> bool:
    """A PostgreSQL deadlock or serialisation failure: the transaction is run again."""
    return getattr(exc.__cause__, "sqlstate", None) in ("40P01", "40001")


def _held(catalog: Catalog, references: Sequence[Reference]) -> tuple[list[str], int]:
    """The SOP Instance UIDs of ``references`` this catalog holds under the same study and
    series, and how many of the rest it rejected before."""
    wanted = {r.sop_uid: r for r in references}
    uids = sorted(wanted)
    held: list[str] = []
    before: set[str] = set()
    for at in range(0, len(uids), 500):
        chunk = uids[at : at + 500]
        marks = in_list(chunk)
        for sop_uid, study_uid, series_uid in catalog.fetchall(
            f"SELECT sop_uid, study_uid, series_uid FROM instances WHERE sop_uid IN ({marks})",
            chunk,
        ):
            ref = wanted[sop_uid]
            if (ref.study_uid, ref.series_uid) == (study_uid, series_uid):
                held.append(sop_uid)
        before.update(
            str(row[0])
            for row in catalog.fetchall(
                f"SELECT DISTINCT sop_uid FROM rejected_instances WHERE sop_uid IN ({marks})",
                chunk,
            )
        )
    # (an instance rejected, then sent again, is held: it is rejected anew)
    return held, len(before - set(held))


def check_note(catalog: Catalog, note: RejectionNote) -> None:
    """Refuse (DatasetMismatchError) a note that names nothing this tenant holds or
    rejected before: nothing would change, and another tenant's instances are not there."""
    held, before = _held(catalog, _others(note))
    if not held and not before:
        raise DatasetMismatchError(
            "the rejection note names no instance this archive holds "
            f"({len(note.references)} named)"
        )


def _others(note: RejectionNote) -> list[Reference]:
    """The references of a note but the note itself (a note cannot reject itself)."""
    return [r for r in note.references if r.sop_uid != note.sop_uid]


def reject(
    archive: CorrectingArchive,
    note: RejectionNote,
    *,
    tenant: str,
    requested_by: str = "",
    requester_kind: str = "",
    address: str = "",
    via: str = "",
    now: float | None = None,
    with_rows: Sequence[RejectionRows] = (),
) -> Rejection:
    """Take the instances ``note`` names out of ``archive``'s catalog (see the module's
    text); those named but not held under the note's study and series are left alone.
    Idempotent: a note sent again changes nothing.  Deleted after the configured delay,
    or at once for data retention (the caller purges then).  ``with_rows``: rows to
    commit with the rejection when it withdrew anything (its audit records)."""
    now = time.time() if now is None else now
    delay = 0.0 if note.reason.immediate else archive.settings.rejected_purge_delay_s
    references = _others(note)
    for attempt in range(5):
        try:
            return _reject_once(
                archive,
                note,
                references,
                tenant,
                requested_by,
                requester_kind,
                address,
                via,
                now,
                delay,
                with_rows,
            )
        except CatalogError as exc:
            if attempt == 4 or not _retryable(exc):
                raise
            time.sleep(0.01 * (attempt + 1))
    raise AssertionError("unreachable")  # pragma: no cover


def _reject_once(
    archive: CorrectingArchive,
    note: RejectionNote,
    references: list[Reference],
    tenant: str,
    requested_by: str,
    requester_kind: str,
    address: str,
    via: str,
    now: float,
    delay: float,
    with_rows: Sequence[RejectionRows],
) -> Rejection:
    catalog = archive.catalog
    purge_after = now + delay
    with catalog.transaction():
        held, before = _held(catalog, references)
        studies: dict[str, WithdrawnStudy] = {}
        study_uids = sorted({r.study_uid for r in references})
        for at in range(0, len(study_uids), 500):
            chunk = study_uids[at : at + 500]
            for study_uid, patient_id, patient_name in catalog.fetchall(
                "SELECT s.study_uid, p.patient_id, p.patient_name FROM studies s "
                "JOIN patients p ON p.patient_key = s.patient_key "
                f"WHERE s.study_uid IN ({in_list(chunk)})",
                chunk,
            ):
                studies[study_uid] = WithdrawnStudy(study_uid, patient_id, patient_name)
        records = catalog.withdraw_instances(held)
        for record in records:
            catalog.execute(
                "INSERT INTO rejected_instances (sop_uid, object_prefix, study_uid, series_uid, "
                "record, reason_code, note_uid, rejected_by, rejected_at, purge_after) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (sop_uid, object_prefix) DO NOTHING",
                (
                    record.sop_uid,
                    record.object_prefix,
                    record.study_uid,
                    record.series_uid,
                    json.dumps(asdict(record), separators=(",", ":")),
                    note.reason.code,
                    note.sop_uid,
                    requested_by[:200],
                    now,
                    purge_after,
                ),
            )
            # a spooled instance: its segment must outlive the purge (the spool reclaims
            # segments nothing in the catalog names, and the garbage list is read there)
            spooled = [key for key in _referenced(record) if is_spool_key(key)]
            for key in spooled:
                catalog.execute(
                    "INSERT INTO garbage (object_key, not_before) VALUES (?, ?) "
                    "ON CONFLICT (object_key) DO NOTHING",
                    (key, purge_after + GARBAGE_DELAY_S),
                )
            study = studies.setdefault(record.study_uid, WithdrawnStudy(record.study_uid, "", ""))
            study.instances.append((record.sop_class_uid, record.sop_uid))
        withdrawn = [s for s in studies.values() if s.instances]
        for study in withdrawn:
            left = catalog.fetchone("SELECT 1 FROM studies WHERE study_uid = ?", (study.study_uid,))
            study.study_gone = left is None
        rejection = Rejection(
            tenant=tenant,
            reason=note.reason,
            note_uid=note.sop_uid,
            requested_by=requested_by,
            requester_kind=requester_kind,
            address=address,
            via=via,
            studies=withdrawn,
            already=before,
            ignored=len(references) - len(records) - before,
            purge_after=purge_after,
        )
        if withdrawn:
            for rows_of in with_rows:
                catalog.execute_batch([row.statement() for row in rows_of(rejection)])
    _forget_cached(records)
    held_count = len(records)
    if held_count:
        log.info(
            "rejection note %s (%s %s): %d instance(s) withdrawn, purge %s",
            note.sop_uid,
            note.reason.code,
            note.reason.meaning,
            held_count,
            "now" if delay == 0 else f"in {delay:.0f} s",
        )
    return rejection


def _referenced(record: InstanceRecord) -> set[str]:
    """Every object key an instance row names."""
    out = {record.header_key, keys.header_key(record.object_prefix)}
    if record.pixel_format != "none":
        out.add(record.pixels_key)
    out.update(str(v) for v in record.derived_keys.values() if isinstance(v, str))
    return out


def _forget_cached(records: Sequence[InstanceRecord]) -> None:
    """This process's decoded frames of the withdrawn instances (others' caches are
    reached through catalog rows only, which are gone)."""
    if records:
        FRAME_CACHE.forget({r.pixels_key for r in records}, {r.series_uid for r in records})


def purge_due(archive: CorrectingArchive, *, now: float | None = None) -> int:
    """Delete the rejected instances whose delay has passed (every one: in batches);
    how many.  Safe in several processes at once: each row is purged by the transaction
    that marks it."""
    purged = 0
    while True:
        done, more = _purge_batch(archive, time.time() if now is None else now)
        purged += done
        if not more:
            return purged


def _purge_batch(archive: CorrectingArchive, now: float) -> tuple[int, bool]:
    catalog = archive.catalog
    rows = catalog.fetchall(
        "SELECT sop_uid, object_prefix, record FROM rejected_instances "
        "WHERE purged_at = 0 AND purge_after <= ? ORDER BY purge_after LIMIT ?",
        (now, PURGE_BATCH),
    )
    if not rows:
        return 0, False
    planned: list[tuple[str, str, list[str]]] = []
    for sop_uid, prefix, text in rows:
        record = InstanceRecord(**json.loads(text))
        found = _referenced(record)
        # and whatever else one ingest of it left under its prefix
        found.update(archive.store.list(keys.objects_under(prefix)))
        planned.append((sop_uid, prefix, sorted(found)))
    marked_at = time.time()
    mine: list[str] = []
    done = 0
    with catalog.transaction():
        for sop_uid, prefix, names in planned:
            cursor = catalog.execute(
                "UPDATE rejected_instances SET purged_at = ? "
                "WHERE sop_uid = ? AND object_prefix = ? AND purged_at = 0",
                (marked_at, sop_uid, prefix),
            )
            if cursor.rowcount != 1:
                continue  # another process purges it
            done += 1
            for key in names:
                catalog.execute(
                    "INSERT INTO garbage (object_key, not_before) VALUES (?, ?) "
                    "ON CONFLICT (object_key) DO NOTHING",
                    (key, marked_at),
                )
            mine += [key for key in names if not is_spool_key(key)]
    deleted: list[str] = []
    try:
        for key in mine:
            archive.store.delete(key)
            deleted.append(key)
    except StorageError as exc:  # the garbage list names the rest: collected later
        log.warning("purge of rejected instances: store failed (%s); retried later", exc)
    if deleted:
        with suppress(KhoError):  # left listed: the collector deletes them again
            catalog.forget_garbage(deleted)
    return done, len(rows) == PURGE_BATCH


def rejected_counts(catalog: Catalog) -> dict[str, int]:
    """Rejected instances awaiting their purge, and purged ones (kept as a record)."""
    row = catalog.fetchone(
        "SELECT COALESCE(SUM(CASE WHEN purged_at = 0 THEN 1 ELSE 0 END), 0), "
        "COALESCE(SUM(CASE WHEN purged_at <> 0 THEN 1 ELSE 0 END), 0) FROM rejected_instances"
    )
    pending, purged = (int(row[0]), int(row[1])) if row else (0, 0)
    return {"pending_purge": pending, "purged": purged}
