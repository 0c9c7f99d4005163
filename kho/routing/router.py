"""The router: rules observe stored instances and queue rows with them; workers send the
queue to its destinations; a housekeeping thread releases stable groups and expired
commitments.  One Router per process, for every tenant of the archive.

What the doors call: :meth:`Router.stored_rows` (the rows a stored instance commits with,
as Auditor.stored_rows gives the audit record's) and :meth:`Router.send` (an on-demand
"send this study/series to X").  ``kho serve`` starts and stops it; ``kho routes`` reads
:meth:`Router.status` and calls :meth:`Router.retry`.  Audit observes deliveries through
:attr:`Router.on_sent` (routing and audit are independent rooms: the command line wires
them).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydicom.uid import generate_uid

from kho.access.callers import Caller
from kho.access.tls import client_context
from kho.archive.catalog import InstanceAttributes, InstanceRecord, RowInsert
from kho.archive.catalog.base import in_list
from kho.archive.dataset.part10 import build_file_meta, read_file_meta
from kho.archive.read import transcode
from kho.errors import (
    AccessDeniedError,
    CodecError,
    InvalidDicomError,
    KhoError,
    NotFoundError,
    StorageError,
)
from kho.routing import metrics
from kho.routing import queue as q
from kho.routing.commitment import CommitmentReport
from kho.routing.config import ForwardDestination, RoutingConfig
from kho.routing.deid.profile import Deidentifier, WithheldError
from kho.routing.dimse import MAX_CONTEXTS, Proposal
from kho.routing.errors import DestinationError, InstanceRefusedError
from kho.routing.rules import rule_selects
from kho.routing.senders import Outgoing, Result, Sender, sender_for
from kho.storage.spool import is_spool_key

if TYPE_CHECKING:
    from kho.archive.archive import Archive
    from kho.archive.ingest.pipeline import RowsFor

log = logging.getLogger(__name__)

#: how long a worker holds a claimed batch before another process may take it over
DEFAULT_LEASE_S = 120.0
#: settled rows are written back at least this often while a batch goes out
_FLUSH_EVERY_S = 0.5
_FLUSH_EVERY_ROWS = 64
#: a worker that found nothing waits this long (shorter for a while after an ingest
#: queued rows: their commit follows the callback by milliseconds)
_IDLE_S = 0.25
_HINTED_IDLE_S = 0.02
_HINT_S = 2.0
#: instances read (and de-identified) ahead of the one being sent
_READ_AHEAD = 3
#: housekeeping (stable groups, expired commitments) runs this often
_HOUSEKEEPING_S = 0.5


@dataclass(frozen=True, slots=True)
class Delivery:
    """Instances one batch delivered (what audit records as Instances Transferred)."""

    tenant: str
    destination: str
    address: str
    #: (Study Instance UID, SOP Class UID, SOP Instance UID) as stored in kho
    instances: tuple[tuple[str, str, str], ...]
    #: the de-identification project, "" when sent as received
    project: str
    #: who asked (on-demand sends), "" for rules
    requested_by: tuple[str, ...] = ()


@dataclass
class _Batch:
    """One claimed batch on its way: rows settled as the destination answers."""

    archive: Archive
    name: str
    destination: ForwardDestination
    token: str
    rows: list[q.QueueRow]
    commit_uid: str = ""
    settled: set[str] = field(default_factory=set)
    done: list[Outgoing] = field(default_factory=list)
    done_unflushed: list[Outgoing] = field(default_factory=list)
    flushed_at: float = field(default_factory=time.monotonic)


class Router:
    """Forwarding for every tenant of ``archive`` (the root archive).  ``config``: read
    from the settings when not given."""

    def __init__(
        self,
        archive: Archive,
        config: RoutingConfig | None = None,
        *,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> None:
        self.archive = archive
        self.settings = archive.settings
        self.config = config if config is not None else RoutingConfig.from_settings(self.settings)
        self.lease_s = lease_s
        self.projects = {
            name: Deidentifier(project, name=name) for name, project in self.config.projects.items()
        }
        #: observers of deliveries (audit); a failing one is logged, never breaks a send
        self.on_sent: list[Callable[[Delivery], None]] = []
        self._senders: dict[str, Sender] = {}
        self._client_tls: Any = None
        self._lock = threading.Lock()
        self._running: dict[str, int] = {}
        self._ready: dict[tuple[str, str], int] = {}
        self._ready_at = 0.0
        self._hinted_at = 0.0
        self._stop = threading.Event()
        #: set when rows were queued: idle workers look at once
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._prepared: set[str] = set()
        #: reads instances ahead of the sends (I/O and de-identification off the socket)
        self._reader_pool: ThreadPoolExecutor | None = None

    # --- the ingest observer -------------------------------------------------------------

    def stored_rows(
        self, caller: Caller | None, tenant: str, via: str, calling_ae: str = ""
    ) -> RowsFor | None:
        """For ``Archive.ingest_*(with_rows=...)``: the queue rows of the rules that select
        the instance, committed in the instance's own transaction (durable exactly when
        it is).  None when no rule could apply to ``tenant`` (nothing to evaluate).
        ``caller`` and ``via`` are the door's (the same call as Auditor.stored_rows);
        ``calling_ae``: the sending AE title (DICOM), matched by the rules' calling_ae."""
        rules = [
            rule
            for rule in self.config.rules
            if rule.enabled
            and (not rule.tenants or tenant in rule.tenants)
            and self._allowed(self.config.destinations[rule.destination], tenant)
        ]
        if not rules:
            return None
        self._prepare(tenant)

        def rows(attrs: InstanceAttributes) -> Sequence[RowInsert]:
            out = []
            now = time.time()
            for rule in rules:
                if not rule_selects(rule, attrs, calling_ae=calling_ae, tenant=tenant):
                    continue
                group = ""
                if rule.trigger == "series":
                    group = f"{rule.name}|{attrs.series_uid}"
                elif rule.trigger == "study":
                    group = f"{rule.name}|{attrs.study_uid}"
                out.append(
                    q.new_row(
                        rule=rule.name,
                        destination=rule.destination,
                        project=rule.deidentify,
                        allow_burned_in=rule.allow_burned_in,
                        sop_uid=attrs.sop_uid,
                        series_uid=attrs.series_uid,
                        study_uid=attrs.study_uid,
                        group_key=group,
                        stable_s=rule.stable_s,
                        now=now,
                    )
                )
            if out:
                self._hinted_at = time.monotonic()
            return out

        return rows

    # --- on demand -------------------------------------------------------------------------

    def send(
        self,
        tenant: str,
        destination: str,
        *,
        study_uid: str,
        series_uid: str | None = None,
        sop_uids: Sequence[str] | None = None,
        deidentify: str = "",
        allow_burned_in: bool = False,
        requested_by: str = "",
    ) -> int:
        """Queue a study (or one series of it, or some of its instances) for
        ``destination``; how many instances.  NotFoundError: no such destination,
        project or study; AccessDeniedError: the destination is not ``tenant``'s."""
        target = self.config.destinations.get(destination)
        if target is None:
            raise NotFoundError(f"no forwarding destination {destination!r}")
        if not self._allowed(target, tenant):
            raise AccessDeniedError(f"destination {destination!r} is not open to this tenant")
        if deidentify and deidentify not in self.projects:
            raise NotFoundError(f"no de-identification project {deidentify!r}")
        archive = self.archive.for_tenant(tenant)
        where, params = "study_uid = ?", [study_uid]
        if series_uid:
            where += " AND series_uid = ?"
            params.append(series_uid)
        if sop_uids:
            where += f" AND sop_uid IN ({in_list(list(sop_uids))})"
            params += list(sop_uids)
        records = archive.catalog.instances_where(where, params)
        if not records:
            raise NotFoundError("no instances match")
        self._prepare(tenant)
        now = time.time()
        rows = [
            q.new_row(
                rule="",
                destination=destination,
                project=deidentify,
                allow_burned_in=allow_burned_in,
                sop_uid=record.sop_uid,
                series_uid=record.series_uid,
                study_uid=record.study_uid,
                requested_by=requested_by,
                now=now,
            )
            for record in records
        ]
        q.insert_rows(archive.catalog, rows)
        self.notify()
        log.info(
            "forwarding: %d instances queued for %s on request (%s)",
            len(rows),
            destination,
            requested_by or "unnamed",
        )
        return len(rows)

    # --- running -------------------------------------------------------------------------

    def start(self) -> Router:
        """Start the workers (``config.threads``) and housekeeping; claims a killed
        process of this host left are released at once."""
        if self._threads or not self.config.destinations:
            return self
        self._stop.clear()
        for archive in self._archives():
            self._prepare(archive.tenant)
            q.release_gone_owners(archive.catalog)
        for number in range(max(1, self.config.threads)):
            thread = threading.Thread(target=self._work, name=f"kho-forward-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)
        keeper = threading.Thread(target=self._keep_house, name="kho-forward-keeper", daemon=True)
        keeper.start()
        self._threads.append(keeper)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop after the batches in flight (their unsent rows stay queued)."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = []
        with self._lock:
            pool, self._reader_pool = self._reader_pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Router:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def notify(self) -> None:
        """Rows were queued (and committed): look for them now rather than at the next
        idle poll.  A door may call it after an ingest that queued rows returns."""
        self._hinted_at = time.monotonic()
        with self._lock:
            self._ready_at = 0.0
        self._wake.set()

    def run_once(self) -> int:
        """One pass in the calling thread: housekeeping, then every batch ready now;
        how many instances were delivered (tests, ``kho routes run``)."""
        self._housekeeping()
        delivered = 0
        while True:
            with self._lock:
                self._ready_at = 0.0
            job = self._take_job()
            if job is None:
                return delivered
            try:
                delivered += self._deliver(*job, interruptible=False)
            finally:
                self._release_slot(job[1])

    def _work(self) -> None:
        while not self._stop.is_set():
            job = None
            try:
                job = self._take_job()
                if job is not None:
                    self._deliver(*job)
            except Exception:
                log.exception("forwarding: a batch failed unexpectedly")
                self._stop.wait(1.0)
            finally:
                if job is not None:
                    self._release_slot(job[1])
            if job is None:
                hinted = time.monotonic() - self._hinted_at < _HINT_S
                if self._wake.wait(_HINTED_IDLE_S if hinted else _IDLE_S):
                    self._wake.clear()

    def _keep_house(self) -> None:
        while not self._stop.wait(_HOUSEKEEPING_S):
            try:
                self._housekeeping()
            except Exception:
                log.exception("forwarding: housekeeping failed")

    def _housekeeping(self) -> None:
        for archive in self._archives():
            self._prepare(archive.tenant)
            catalog = archive.catalog
            if q.release_stable(catalog):
                self.notify()
            if q.expire_commitments(catalog):
                self.notify()
            q.release_gone_owners(catalog)
            known = set(self.config.destinations)
            for name in q.ready_destinations(catalog, now=float("inf")):
                if name not in known:  # taken out of the settings: nowhere to send
                    stray = [row.id for row in q.rows_in(catalog, q.QUEUED, name, limit=10000)]
                    q.give_up(catalog, stray, q.DEAD, f"destination {name!r} is not configured")

    # --- choosing work -------------------------------------------------------------------

    def _take_job(self) -> tuple[Archive, str] | None:
        """A (tenant archive, destination) with rows due and a free slot, its slot taken."""
        with self._lock:
            now = time.monotonic()
            hinted = now - self._hinted_at < _HINT_S
            if now - self._ready_at > (_HINTED_IDLE_S if hinted else _IDLE_S):
                self._refresh_ready()
                self._ready_at = now
            for key in list(self._ready):
                tenant, name = key
                destination = self.config.destinations.get(name)
                if destination is None or self._ready[key] <= 0:
                    continue
                if self._running.get(name, 0) >= destination.concurrency:
                    continue
                archive = self.archive.for_tenant(tenant)
                if q.live_claims(archive.catalog, name) >= destination.concurrency:
                    continue  # other processes fill its slots
                self._running[name] = self._running.get(name, 0) + 1
                self._ready[key] -= destination.batch
                # the next worker starts its search after this one: destinations share
                self._ready[key] = self._ready.pop(key)
                return archive, name
            return None

    def _refresh_ready(self) -> None:
        ready: dict[tuple[str, str], int] = {}
        for archive in self._archives():
            self._prepare(archive.tenant)
            waiting = q.next_try(archive.catalog)
            for name, count in q.ready_destinations(archive.catalog).items():
                if name in self.config.destinations and name not in waiting:
                    ready[(archive.tenant, name)] = count
        # keep the rotation order of those still ready
        self._ready = {key: ready[key] for key in self._ready if key in ready}
        self._ready.update({key: n for key, n in ready.items() if key not in self._ready})

    def _release_slot(self, name: str) -> None:
        with self._lock:
            self._running[name] = max(0, self._running.get(name, 0) - 1)
            self._ready_at = 0.0

    # --- delivering one batch -------------------------------------------------------------

    def _deliver(self, archive: Archive, name: str, *, interruptible: bool = True) -> int:
        """Claim one batch of ``name``'s due rows in ``archive``'s catalog and send it;
        how many instances were delivered.  ``interruptible``: stop() cuts the batch
        short (its unsent rows go back to the queue untried)."""
        destination = self.config.destinations[name]
        catalog = archive.catalog
        token, rows = q.claim(catalog, name, destination.batch, self.lease_s)
        if not rows:
            return 0
        batch = _Batch(archive, name, destination, token, rows)
        if destination.commitment:
            batch.commit_uid = generate_uid()
        records = self._records(archive, rows)
        gone = [row for row in rows if row.sop_uid not in records]
        self._give_up(batch, gone, q.DEAD, "the instance is no longer in the archive")
        present = [row for row in rows if row.sop_uid in records]
        session = None
        ahead: deque[tuple[q.QueueRow, Future[Outgoing]]] = deque()
        try:
            sender = self._sender(name, destination)
            if present:
                session = sender.open(_proposals([records[row.sop_uid] for row in present]))
            upcoming = iter(present)

            def read_ahead() -> None:
                # the next instances are read (and de-identified) while this one is sent
                while len(ahead) < _READ_AHEAD:
                    row = next(upcoming, None)
                    if row is None:
                        return
                    record = records[row.sop_uid]
                    if row.project or not _cheap_read(record):
                        prepared = self._readers().submit(
                            self._outgoing, archive, row, record, session
                        )
                    else:  # a spooled instance as received: a pread, not worth a thread
                        prepared = Future()
                        try:
                            prepared.set_result(self._outgoing(archive, row, record, session))
                        except Exception as exc:
                            prepared.set_exception(exc)
                    ahead.append((row, prepared))

            read_ahead()
            while ahead:
                if interruptible and self._stop.is_set():
                    break
                row, prepared = ahead.popleft()
                read_ahead()
                try:
                    item = prepared.result()
                except WithheldError as exc:
                    self._give_up(batch, [row], q.WITHHELD, str(exc))
                    continue
                except InstanceRefusedError as exc:
                    self._refused(batch, row, str(exc), exc.permanent)
                    continue
                started = time.perf_counter()
                assert session is not None
                results = session.send(item)
                self._settle(batch, results, time.perf_counter() - started)
            if session is not None:  # (stopped early: what was sent is settled)
                results = session.finish()
                session = None
                self._settle(batch, results, 0.0)
        except DestinationError as exc:
            if session is not None:
                session.abort()
            self._destination_failed(batch, str(exc))
        except Exception as exc:  # a bug or a surprise: the batch is retried, not lost
            log.exception("forwarding to %s: batch failed", name)
            if session is not None:
                session.abort()
            self._destination_failed(batch, f"unexpected error: {type(exc).__name__}")
        finally:
            for _row, prepared in ahead:
                prepared.cancel()
            self._flush(batch, force=True)
            unsettled = [row.id for row in batch.rows if row.id not in batch.settled]
            if unsettled:  # stopped before them: back to the queue, untried
                q.retry_later(
                    catalog,
                    unsettled,
                    "",
                    delay_s=0.0,
                    dead_after_s=destination.dead_after_s,
                    refund=True,
                )
        if batch.done and destination.commitment:
            self._commit(batch)
        if batch.done:
            q.note_success(catalog, name)
            self._observe(batch)
        return len(batch.done)

    @staticmethod
    def _records(archive: Archive, rows: Sequence[q.QueueRow]) -> dict[str, InstanceRecord]:
        uids = sorted({row.sop_uid for row in rows})
        found: dict[str, InstanceRecord] = {}
        for at in range(0, len(uids), 500):
            chunk = uids[at : at + 500]
            for record in archive.catalog.instances_where(f"sop_uid IN ({in_list(chunk)})", chunk):
                found[record.sop_uid] = record
        return found

    def _outgoing(
        self, archive: Archive, row: q.QueueRow, record: InstanceRecord, session: Any
    ) -> Outgoing:
        """The bytes to send for one row: as received (bit for bit), converted losslessly
        when the destination takes no syntax it came in, or de-identified."""
        accepted = session.accepted_syntaxes(record.sop_class_uid)
        try:
            if row.project:
                project = self.projects.get(row.project)
                if project is None:
                    raise InstanceRefusedError(
                        f"de-identification project {row.project!r} is not configured",
                        permanent=True,
                    )
                result = project.apply(
                    archive.read_part10(record),
                    allow_burned_in=row.allow_burned_in,
                    sop_class_uid=record.sop_class_uid,
                    sop_instance_uid=record.sop_uid,
                )
                meta, offset = read_file_meta(result.data)
                syntax = meta.get(0x00020010, b"").rstrip(b"\x00 ").decode("ascii")
                if accepted is not None and syntax not in accepted:
                    raise InstanceRefusedError(
                        f"the destination takes {record.sop_class_uid} in none of the "
                        f"syntaxes the de-identified instance is in ({syntax})",
                        permanent=True,
                    )
                return Outgoing(
                    row, record.sop_class_uid, result.sop_uid, syntax, result.data, offset
                )
            if accepted is None or record.transfer_syntax_uid in accepted:
                data = archive.read_part10(record)
                _meta, offset = read_file_meta(data)
                if offset == 0:  # a file imported without File Meta Information
                    meta_bytes = build_file_meta(
                        record.sop_class_uid, record.sop_uid, record.transfer_syntax_uid
                    )
                    data, offset = meta_bytes + data, len(meta_bytes)
                return Outgoing(
                    row,
                    record.sop_class_uid,
                    record.sop_uid,
                    record.transfer_syntax_uid,
                    data,
                    offset,
                )
            syntax, body = transcode.encode_for(archive, record, accepted)
            return Outgoing(row, record.sop_class_uid, record.sop_uid, syntax, body, 0)
        except (InvalidDicomError, CodecError) as exc:
            raise InstanceRefusedError(str(exc), permanent=True) from exc
        except StorageError as exc:  # the store is out: this instance, later
            raise InstanceRefusedError(f"cannot read the instance: {exc}", permanent=False) from exc

    def _settle(self, batch: _Batch, results: list[Result], seconds: float) -> None:
        for result in results:
            item = result.item
            if result.ok:
                batch.done.append(item)
                batch.done_unflushed.append(item)
                batch.settled.add(item.row.id)
                metrics.SENT.labels(batch.name, "delivered").inc()
                metrics.SENT_BYTES.labels(batch.name).inc(len(item.data) - item.offset)
                metrics.DELAY_SECONDS.labels(batch.name).observe(
                    max(0.0, time.time() - item.row.queued_at)
                )
                if seconds:
                    metrics.SEND_SECONDS.labels(batch.name).observe(seconds)
            else:
                self._refused(batch, item.row, result.error, result.permanent)
        self._flush(batch)

    def _flush(self, batch: _Batch, *, force: bool = False) -> None:
        """Write delivered rows back (deleted, or waiting for their commitment); at least
        every _FLUSH_EVERY_S, and the lease renewed with it."""
        due = time.monotonic() - batch.flushed_at >= _FLUSH_EVERY_S
        if not batch.done_unflushed or not (
            force or due or len(batch.done_unflushed) >= _FLUSH_EVERY_ROWS
        ):
            return
        ids = [item.row.id for item in batch.done_unflushed]
        catalog = batch.archive.catalog
        if batch.destination.commitment:
            q.committing(catalog, ids, batch.commit_uid, batch.destination.commitment_timeout_s)
        else:
            q.delivered(catalog, ids)
        batch.done_unflushed = []
        batch.flushed_at = time.monotonic()
        if not force:
            q.extend_lease(catalog, batch.token, self.lease_s)

    def _refused(self, batch: _Batch, row: q.QueueRow, error: str, permanent: bool) -> None:
        catalog = batch.archive.catalog
        batch.settled.add(row.id)
        if permanent:
            log.warning("forwarding to %s: %s given up: %s", batch.name, row.sop_uid, error)
            q.give_up(catalog, [row.id], q.DEAD, error)
            metrics.SENT.labels(batch.name, "dead").inc()
            return
        destination = batch.destination
        delay = min(
            destination.retry_max_s, destination.retry_base_s * 2 ** max(0, row.attempts - 1)
        )
        dead = q.retry_later(
            catalog, [row.id], error, delay_s=delay, dead_after_s=destination.dead_after_s
        )
        metrics.SENT.labels(batch.name, "dead" if dead else "retry").inc()

    def _give_up(self, batch: _Batch, rows: Sequence[q.QueueRow], state: str, error: str) -> None:
        if not rows:
            return
        q.give_up(batch.archive.catalog, [row.id for row in rows], state, error)
        batch.settled.update(row.id for row in rows)
        metrics.SENT.labels(batch.name, state).inc(len(rows))
        log.warning("forwarding to %s: %d instance(s) %s: %s", batch.name, len(rows), state, error)

    def _destination_failed(self, batch: _Batch, error: str) -> None:
        destination = batch.destination
        catalog = batch.archive.catalog
        self._flush(batch, force=True)
        pending = [row for row in batch.rows if row.id not in batch.settled]
        delay = q.note_failure(
            catalog, batch.name, error, (destination.retry_base_s, destination.retry_max_s)
        )
        dead = q.retry_later(
            catalog,
            [row.id for row in pending],
            error,
            delay_s=delay,
            dead_after_s=destination.dead_after_s,
        )
        batch.settled.update(row.id for row in pending)
        metrics.DESTINATION_FAILURES.labels(batch.name).inc()
        metrics.SENT.labels(batch.name, "retry").inc(len(pending) - dead)
        metrics.SENT.labels(batch.name, "dead").inc(dead)
        log.warning(
            "forwarding to %s failed (%s); %d instance(s) retried in %.0f s%s",
            batch.name,
            error,
            len(pending) - dead,
            delay,
            f", {dead} dead-lettered" if dead else "",
        )

    # --- storage commitment ---------------------------------------------------------------

    def _commit(self, batch: _Batch) -> None:
        sender = self._sender(batch.name, batch.destination)
        references = [(item.sop_class, item.sop_uid) for item in batch.done]
        try:
            report = sender.commit(
                batch.commit_uid, references, batch.destination.commitment_wait_s
            )
        except (DestinationError, KhoError, OSError, RuntimeError) as exc:
            # the rows wait (committing) until their timeout, then go again
            log.warning("forwarding to %s: storage commitment not requested: %s", batch.name, exc)
            return
        if report is not None:
            self._apply_report(batch.archive, report)

    def commitment_report(
        self, report: CommitmentReport, *, tenant: str, calling_ae: str | None = None
    ) -> int:
        """A Storage Commitment N-EVENT-REPORT that came on a destination's own association
        (by way of the DICOM door): committed rows are done, failed ones go again; how many
        rows it settled (0: no transaction of ours).  Only ``tenant``'s queue is looked at
        (the tenant of the association it came on), and with ``calling_ae`` only rows for a
        destination of that AE title: a peer cannot settle another hospital's deliveries,
        nor those it did not receive."""
        archive = self.archive.for_tenant(tenant)
        self._prepare(archive.tenant)
        return self._apply_report(archive, report, calling_ae)

    def _apply_report(
        self, archive: Archive, report: CommitmentReport, calling_ae: str | None = None
    ) -> int:
        rows = q.commitment_rows(archive.catalog, report.transaction_uid)
        if calling_ae is not None:
            rows = [row for row in rows if self._destination_ae(row.destination) == calling_ae]
        if not rows:
            return 0
        committed = {uid for _cls, uid in report.committed}
        failed = {uid: reason for _cls, uid, reason in report.failed}
        done, again = [], []
        for row in rows:
            sent = self._sent_uid(row)
            if sent in committed:
                done.append(row.id)
            elif sent in failed:
                again.append(row)
        q.delivered(archive.catalog, done)
        for row in again:
            destination = self.config.destinations.get(row.destination)
            q.retry_later(
                archive.catalog,
                [row.id],
                f"storage commitment failed (reason {failed[self._sent_uid(row)]:#06x})",
                delay_s=destination.retry_base_s if destination else 60.0,
                dead_after_s=destination.dead_after_s if destination else 86400.0,
            )
        return len(done) + len(again)

    def _destination_ae(self, name: str) -> str | None:
        """The called AE title of the DICOM destination ``name`` (None: not a DICOM one)."""
        destination = self.config.destinations.get(name)
        if destination is None:
            return None
        called = getattr(self._sender(name, destination), "called_ae", None)
        return str(called).strip() if called else None

    def _sent_uid(self, row: q.QueueRow) -> str:
        project = self.projects.get(row.project) if row.project else None
        return project.uid(row.sop_uid) if project is not None else row.sop_uid

    # --- status and administration ----------------------------------------------------------

    def status(self, tenants: Iterable[str] | None = None) -> dict[str, Any]:
        """The queue: ``tenants`` {tenant: {destination: counts by state, lag_s,
        retrying, failures (consecutive), last_error, last_success, next_try}} and
        ``destinations`` {name: address, rules}."""
        names = list(tenants) if tenants is not None else self.settings.tenant_names
        per_tenant = {}
        for tenant in names:
            archive = self.archive.for_tenant(tenant)
            self._prepare(tenant)
            per_tenant[tenant] = q.status(archive.catalog)
        destinations = {}
        for name, destination in self.config.destinations.items():
            try:
                address = self._sender(name, destination).address
            except DestinationError as exc:
                address = f"{destination.url} ({exc})"
            destinations[name] = {
                "address": address,
                "concurrency": destination.concurrency,
                "commitment": destination.commitment,
                "rules": [r.name for r in self.config.rules if r.destination == name],
            }
        return {"tenants": per_tenant, "destinations": destinations}

    def retry(self, tenant: str, destination: str | None = None, *, withheld: bool = False) -> int:
        """Queue dead (or withheld) rows of ``tenant`` again; how many."""
        archive = self.archive.for_tenant(tenant)
        self._prepare(tenant)
        count = q.retry_dead(archive.catalog, destination, q.WITHHELD if withheld else q.DEAD)
        if count:
            self.notify()
        return count

    def rows(
        self, tenant: str, state: str, destination: str | None = None, limit: int = 100
    ) -> list[q.QueueRow]:
        archive = self.archive.for_tenant(tenant)
        self._prepare(tenant)
        return q.rows_in(archive.catalog, state, destination, limit)

    # --- helpers -------------------------------------------------------------------------

    def _readers(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._reader_pool is None:
                self._reader_pool = ThreadPoolExecutor(
                    max_workers=max(2, self.config.threads), thread_name_prefix="kho-forward-read"
                )
            return self._reader_pool

    def _archives(self) -> list[Archive]:
        return [self.archive.for_tenant(name) for name in self.settings.tenant_names]

    def _prepare(self, tenant: str) -> None:
        if tenant not in self._prepared:
            q.ensure_schema(self.archive.for_tenant(tenant).catalog)
            self._prepared.add(tenant)

    @staticmethod
    def _allowed(destination: ForwardDestination, tenant: str) -> bool:
        return not destination.tenants or tenant in destination.tenants

    def _sender(self, name: str, destination: ForwardDestination) -> Sender:
        sender = self._senders.get(name)
        if sender is None:
            sender = sender_for(
                destination,
                calling_ae=self.settings.ae_title,
                peers=dict(getattr(self.settings, "dicom_peers", {}) or {}),
                client_tls=self._tls,
            )
            self._senders[name] = sender
        return sender

    def _tls(self) -> Any:
        if self._client_tls is None:
            self._client_tls = client_context(self.settings)
        return self._client_tls

    def _observe(self, batch: _Batch) -> None:
        if not self.on_sent:
            return
        by_project: dict[str, list[Outgoing]] = {}
        for item in batch.done:
            by_project.setdefault(item.row.project, []).append(item)
        sender = self._senders.get(batch.name)
        for project, items in by_project.items():
            delivery = Delivery(
                tenant=batch.archive.tenant,
                destination=batch.name,
                address=sender.address if sender is not None else batch.destination.url,
                instances=tuple((i.row.study_uid, i.sop_class, i.row.sop_uid) for i in items),
                project=project,
                requested_by=tuple(
                    sorted({i.row.requested_by for i in items if i.row.requested_by})
                ),
            )
            for observer in list(self.on_sent):
                try:
                    observer(delivery)
                except Exception:
                    log.exception("forwarding: a delivery observer failed")


def _cheap_read(record: InstanceRecord) -> bool:
    """Whether reading the instance is one local read of its received bytes (its spool
    segment): then it is read in the sending thread, not ahead in another."""
    return record.stored_as_received and is_spool_key(record.pixels_key)


def _proposals(records: Sequence[InstanceRecord]) -> list[Proposal]:
    """Presentation contexts for a batch: per SOP class each syntax its instances arrived
    in, alone (the destination accepts or refuses exactly that: the bytes as received),
    then the lossless syntaxes kho could convert them to, for a destination that takes
    none of those; at most MAX_CONTEXTS, in that order of importance."""
    received: list[Proposal] = []
    converted: list[Proposal] = []
    by_class: dict[str, list[InstanceRecord]] = {}
    for record in records:
        by_class.setdefault(record.sop_class_uid, []).append(record)
    for sop_class, members in by_class.items():
        syntaxes = list(dict.fromkeys(r.transfer_syntax_uid for r in members))
        received += [Proposal(sop_class, (ts,)) for ts in syntaxes]
        common: list[str] | None = None
        for record in members:
            producible = [ts for ts in transcode.producible_syntaxes(record) if ts not in syntaxes]
            common = producible if common is None else [ts for ts in common if ts in producible]
        if common:
            converted.append(Proposal(sop_class, tuple(common)))
    return (received + converted)[:MAX_CONTEXTS]


__all__ = ["DEFAULT_LEASE_S", "Delivery", "Router"]
