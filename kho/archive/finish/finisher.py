"""The background finisher: what ingest leaves for after the acknowledgement.

With ``finish_in_background`` (the default) a C-STORE or STOW-RS is acknowledged once the
instance is durable as received and its catalog row is committed (DESIGN.md: "in the
object store or an fsync'd local spool"); it is queryable and retrievable bit for bit at
once.  The costly part, encoding native pixel data with the at-rest codec (about 20 ms of
CPU for a 512x512 CT slice, verification included) and making the thumbnail and the DICOM
JSON, runs here, in low-priority threads, so a modality's burst is received at network and
disk speed and the CPU catches up in between.

Finishing one instance: read it as received, encode and derive, write the new objects
beside the received ones (same prefix, new names: the header zstd-compressed, the pixels,
the derived objects the instance can afford, see kho.archive.finish.derived), then one catalog
transaction switches the row to them if it is still the same stored version, takes it off
the queue, and lists the received object as garbage, deleted a minute later (a reader
that loaded the old row just before can still fetch it).  While instances are arriving
the threads wait (QUIET_S), so a burst is received at full speed and encoded right after
it.  A crash at any point leaves the instance intact and queued: its claim expires (or
its process is found gone) and the work is redone, writing the same keys again.  Several
processes on one catalog claim rows, so each instance is finished once.  Viewers asking
before then get thumbnails and metadata made on request.

Tenants: one Finisher serves every tenant (hospital) of the archive, its threads taking
their work from each tenant's queue in turn.  ``finish_threads`` is what the host gives
to finishing, whatever the number of hospitals (a Finisher per tenant would multiply the
threads, and the CPU they compete for, by the tenants), and no hospital's backlog waits
behind another's.  Garbage is collected in every tenant's catalog; the spool, which every
tenant shares, loses a segment only when no tenant's catalog refers to it.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from kho.archive import keys, metrics
from kho.archive.catalog import HEADER_OBJECT, PIXELS_OBJECT
from kho.archive.corrections import purge_due
from kho.archive.dataset.attributes import extract_attributes, read_header
from kho.archive.dataset.part10 import Part10Layout, parse_part10
from kho.archive.finish.derived import allowance, arrived_compressed, fit_derived
from kho.archive.finish.pixels import EncodedPixels, encode_pixels
from kho.archive.finish.source import FinishingArchive
from kho.archive.read.objects import compress
from kho.errors import CatalogError, KhoError, ObjectNotFoundError, StorageError
from kho.storage import put_objects
from kho.storage.spool import Spool, is_spool_key

if TYPE_CHECKING:
    from kho.archive.catalog import InstanceRecord

log = logging.getLogger(__name__)


class TenantedArchive(FinishingArchive, Protocol):
    """An archive whose tenants share one store, spool and Finisher (kho.archive.archive:
    Archive, any tenant's)."""

    def housekept_archives(self) -> Sequence[FinishingArchive]:
        """Every tenant's archive, this one's among them (and those of tenants no
        longer declared whose catalogs are still there)."""
        ...


#: a claim older than this is taken to be abandoned (its process hung or is on another
#: host that died); finishing one instance takes well under a second
LEASE_S = 600.0
#: a failing instance is retried this many times, then left as received
MAX_ATTEMPTS = 3
#: how often idle threads look for work queued by other processes
IDLE_POLL_S = 5.0
#: background threads yield the CPU to receiving (Linux nice value, per thread)
NICE = 10
#: the finisher waits while an instance arrived less than this long ago ...
QUIET_S = 0.5
#: how often spool segments are looked at for deletion
SPOOL_RECLAIM_S = 30.0
#: ... unless this many are queued (then one thread keeps working)
BUSY_BACKLOG = 2000


class Finisher:
    """Threads that finish the queued instances of every tenant; started on the first
    notify() or start().  ``archive``: the platform's (any tenant's) archive."""

    def __init__(self, archive: TenantedArchive, threads: int = 0) -> None:
        self.archive = archive
        self.threads = threads or os.cpu_count() or 1
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        self._last_gc = 0.0
        self._busy = 0  # instances in hand in this process
        self._turn = 0  # the tenant whose queue a thread looks at first (in turn)
        # (notify count, until when) of a tenant whose queue was found empty: it is not
        # asked again before then, unless work was queued (notified) since
        self._idle: dict[int, tuple[int, float]] = {}
        self._notices = itertools.count(1)  # next() is atomic: no notice is lost
        self._notified = 0
        # tenants (by id) where an outage may have left claims of this process that no
        # thread works on (a claim whose answer was lost, a claim that could not be given
        # back), with when: given back once the catalog answers again, instead of
        # waiting out their lease (LEASE_S)
        self._in_doubt: dict[int, tuple[FinishingArchive, float]] = {}
        self._in_hand: set[tuple[int, str]] = set()  # (tenant id, SOP Instance UID)

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._workers or self._stop.is_set():
                return
            for n in range(self.threads):
                worker = threading.Thread(target=self._run, name=f"kho-finisher-{n}", daemon=True)
                worker.start()
                self._workers.append(worker)

    def notify(self) -> None:
        """Work was queued (in any tenant): wake (or start) the threads."""
        if not self._workers:
            self.start()
        self._rouse()

    def _rouse(self) -> None:
        """Wake the threads and have them look at every tenant's queue."""
        self._notified = next(self._notices)
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the instances in hand; queued ones wait for the next start."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))

    # --- the work ----------------------------------------------------------------------

    def drain(self, timeout: float | None = None) -> int:
        """Finish everything queued in every tenant, in this thread (``kho bench``,
        tests); how many.

        Rows other processes hold are left to them; returns when none is left to claim
        (an instance postponed by an outage is tried once, and left queued)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        done = 0
        for tenant in self.archive.housekept_archives():
            done += self._drain(tenant, deadline)
        self.collect_garbage(force=True)
        return done

    def _drain(self, tenant: FinishingArchive, deadline: float | None) -> int:
        """drain() of one tenant's queue."""
        done = 0
        catalog = tenant.catalog
        # claims postponed by an outage stay held until the end: not claimed again here
        postponed: list[tuple[str, str]] = []
        try:
            while deadline is None or time.monotonic() < deadline:
                claimed = catalog.claim_unfinished(8, LEASE_S, MAX_ATTEMPTS)
                if not claimed:
                    break
                for sop_uid, prefix, attempts in claimed:
                    done += self._finish_claimed(
                        sop_uid, prefix, attempts, postponed, archive=tenant
                    )
        finally:
            for sop_uid, prefix in postponed:
                with contextlib.suppress(KhoError):
                    catalog.release_unfinished(sop_uid, prefix, count_attempt=False)
        return done

    def unfinished_count(self) -> int:
        """Instances queued in every tenant."""
        return sum(t.catalog.unfinished_count() for t in self.archive.housekept_archives())

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until every tenant's queue is empty (the threads, or another process,
        emptied it) and this process's threads have put down what they held."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.unfinished_count() == 0 and self._busy == 0:
                return True
            self._rouse()
            time.sleep(0.05)
        return False

    def _receiving(self) -> bool:
        """Whether this host (any of its processes) is taking instances in: then the
        finisher waits (its Python parts would compete for the interpreter lock with the
        receiving threads, which a lower CPU priority does not help, and the bucket's server
        does the work of its uploads at normal priority), unless the backlog (of every
        tenant) has grown past BUSY_BACKLOG, when one thread works on regardless so raw
        data cannot pile up without bound under a sustained stream."""
        if self.archive.seconds_since_ingest() > QUIET_S:
            return False
        first = self._workers[0] if self._workers else None
        if threading.current_thread() is first:
            try:
                return self.unfinished_count() < BUSY_BACKLOG
            except KhoError:
                return True
        return True

    def _run(self) -> None:
        _lower_priority()
        while not self._stop.is_set():
            try:
                self._run_once()
            except Exception:  # a thread that died would leave the queue undrained
                log.exception("finisher: unexpected failure; going on")
                self._stop.wait(IDLE_POLL_S)

    def _run_once(self) -> None:
        """One turn of a finisher thread: claim, finish, collect garbage, or wait."""
        if self._receiving():
            self._stop.wait(QUIET_S / 2)
            return
        self._wake.clear()
        self._give_back_claims()
        tenant, claimed, failed = self._claim_next()
        if failed and not claimed:
            self._stop.wait(IDLE_POLL_S)
            return
        for sop_uid, prefix, attempts in claimed:
            self._finish_claimed(sop_uid, prefix, attempts, archive=tenant)
        try:
            self.collect_garbage()  # at most every few seconds, busy or not
        except KhoError as exc:
            log.warning("finisher: garbage collection failed: %s", exc)
        if not claimed:
            self._wake.wait(IDLE_POLL_S)

    def _claim_next(self) -> tuple[FinishingArchive, list[tuple[str, str, int]], bool]:
        """Claim one instance from the tenants' queues, each thread starting at the next
        tenant (one hospital's backlog does not hold another's up); skips queues found
        empty lately (IDLE_POLL_S) unless work was queued since.  Returns (the tenant's
        archive, what was claimed, whether a queue could not be read)."""
        try:
            tenants = self.archive.housekept_archives()
        except KhoError as exc:
            log.warning("finisher: cannot open a tenant's catalog: %s", exc)
            return self.archive, [], True
        with self._lock:
            first = self._turn
            self._turn += 1
        failed = False
        for n in range(len(tenants)):
            tenant = tenants[(first + n) % len(tenants)]
            notified, now = self._notified, time.monotonic()
            idle = self._idle.get(id(tenant))
            if idle is not None and idle[0] == notified and idle[1] > now:
                continue
            try:
                claimed = tenant.catalog.claim_unfinished(1, LEASE_S, MAX_ATTEMPTS)
            except KhoError as exc:
                log.warning("finisher: cannot read the queue: %s", exc)
                self._doubt(tenant)  # the claim may have been made all the same
                failed = True
                continue
            if claimed:
                with self._lock:
                    self._in_hand.update((id(tenant), sop_uid) for sop_uid, _p, _a in claimed)
                return tenant, claimed, failed
            self._idle[id(tenant)] = (notified, now + IDLE_POLL_S)
        return self.archive, [], failed

    def _finish_claimed(
        self,
        sop_uid: str,
        prefix: str,
        attempts: int,
        postponed: list[tuple[str, str]] | None = None,
        *,
        archive: FinishingArchive | None = None,
    ) -> int:
        """Finish one instance claimed in ``archive``'s catalog (default: the root's); 1
        if done.  Postponed by an outage, its claim is given back (to the end of the
        queue), or kept and added to ``postponed``."""
        tenant = self.archive if archive is None else archive
        with self._lock:
            self._busy += 1
            self._in_hand.add((id(tenant), sop_uid))
        try:
            return self._finish_counted(tenant, sop_uid, prefix, attempts, postponed)
        finally:
            with self._lock:
                self._busy -= 1
                self._in_hand.discard((id(tenant), sop_uid))

    def _postpone(
        self,
        tenant: FinishingArchive,
        sop_uid: str,
        prefix: str,
        postponed: list[tuple[str, str]] | None,
    ) -> None:
        if postponed is not None:
            postponed.append((sop_uid, prefix))
            return
        try:
            tenant.catalog.release_unfinished(sop_uid, prefix, count_attempt=False)
        except KhoError:  # the catalog is out too
            self._doubt(tenant)
        self._stop.wait(1.0)

    def _doubt(self, tenant: FinishingArchive) -> None:
        with self._lock:
            self._in_doubt[id(tenant)] = (tenant, time.time())

    def _give_back_claims(self) -> None:
        """Where an outage left doubt, give back this process's claims made until then
        that no thread works on, once the catalog answers."""
        with self._lock:
            doubts = list(self._in_doubt.items())
        for key, (tenant, until) in doubts:
            with self._lock:
                working = [sop for tid, sop in self._in_hand if tid == key]
            try:
                given = tenant.catalog.release_own_claims(until, keep=working)
            except KhoError:
                return  # still out: next turn
            with self._lock:
                if self._in_doubt.get(key, (None, 0.0))[1] == until:
                    del self._in_doubt[key]
            if given:
                log.info("finisher: %d claims an outage held given back", given)

    def _finish_counted(
        self,
        tenant: FinishingArchive,
        sop_uid: str,
        prefix: str,
        attempts: int,
        postponed: list[tuple[str, str]] | None,
    ) -> int:
        catalog = tenant.catalog
        started = time.perf_counter()
        if attempts > MAX_ATTEMPTS:  # given up, still spooled: only copy it out, as received
            try:
                if not self.move_out_of_spool(sop_uid, prefix, archive=tenant):
                    catalog.drop_unfinished(sop_uid, prefix)
            except KhoError as exc:
                log.warning("finisher: %s stays in the spool for now: %s", sop_uid, exc)
                self._postpone(tenant, sop_uid, prefix, postponed)
            return 0
        try:
            done = self.finish_one(sop_uid, prefix, archive=tenant)
        except (StorageError, CatalogError) as exc:  # an outage: give it back, retry later
            log.warning("finisher: %s postponed: %s", sop_uid, exc)
            self._postpone(tenant, sop_uid, prefix, postponed)
            return 0
        except Exception as exc:
            # a bug or an input no codec handles: never lose the instance, stop retrying
            log.error("finisher: %s failed (attempt %d)", sop_uid, attempts, exc_info=exc)
            with contextlib.suppress(KhoError):
                if attempts >= MAX_ATTEMPTS:
                    log.error("finisher: %s stays stored as received", sop_uid)
                    if self.move_out_of_spool(sop_uid, prefix, archive=tenant):
                        return 0
                    catalog.drop_unfinished(sop_uid, prefix)
                else:
                    catalog.release_unfinished(sop_uid, prefix)
            return 0
        if done:
            metrics.FINISH_SECONDS.observe(time.perf_counter() - started)
        return int(done)

    def finish_one(
        self, sop_uid: str, prefix: str, *, archive: FinishingArchive | None = None
    ) -> bool:
        """Encode and derive one queued instance of ``archive``'s tenant (default: the
        root's) and switch its row; False if there was nothing to do (replaced or
        removed meanwhile)."""
        archive = self.archive if archive is None else archive
        catalog = archive.catalog
        record = catalog.get_instance(sop_uid)
        if record is None or record.object_prefix != prefix:
            catalog.drop_unfinished(sop_uid, prefix)
            return False
        try:
            data = _read_received(archive, record)
        except ObjectNotFoundError as exc:
            current = catalog.get_instance(sop_uid)
            if current is not None and current.object_prefix == prefix:
                # not replaced: its bytes are where this process cannot read them (another
                # host's spool) or missing; leave it queued, never drop it
                raise StorageError(f"instance {sop_uid} is not readable here: {exc}") from exc
            catalog.drop_unfinished(sop_uid, prefix)  # replaced: its objects are gone
            return False
        layout = parse_part10(data)
        split = layout.pixels.element_offset if layout.pixels else None
        ds = read_header(data, split)
        attrs = extract_attributes(
            ds,
            sop_uid_fallback=record.sop_uid,
            sop_class_fallback=record.sop_class_uid,
            surrogate_sop_anchor=record.sha256,
        )
        encoded = encode_pixels(archive, data, layout, attrs) if layout.pixels else None
        made = archive.derive(data, layout, ds, attrs, encoded)
        plan = _plan(record, data, layout, encoded, made)
        objects: dict[str, bytes | memoryview] = dict(plan.objects)
        derived: dict[str, str] = dict(record.derived_keys)
        derived.update(plan.names)
        if plan.names.get(HEADER_OBJECT) == keys.header_key(prefix):
            derived.pop(HEADER_OBJECT)  # the default place: not named (as ingest does)
        for name, blob in plan.kept.items():
            key = keys.derived_key(prefix, name)
            objects[key] = blob
            derived[name] = key
        # journalled like an ingest: if the instance is replaced and this process dies
        # before the switch, recovery deletes what it wrote with the replaced prefix
        catalog.begin_pending(prefix)
        put_objects(archive.store, objects)
        switched = catalog.finish_instance(
            sop_uid,
            prefix,
            pixel_format=plan.pixel_format,
            pixel_size=plan.pixel_size,
            frame_index=plan.frame_index,
            derived=json.dumps(derived, separators=(",", ":")),
            stored_size=plan.stored_size,
            header_size=plan.header_size,
            garbage=plan.garbage,
            garbage_delay_s=archive.settings.garbage_delay_s,
            was=record,
        )
        if not switched:
            # replaced, or finished by another process, while we worked: delete what we
            # wrote unless the row now points at it (the same keys, written by the other)
            current = catalog.get_instance(sop_uid)
            live = _referenced(current) if current is not None else set()
            surplus = [key for key in objects if key not in live]
            try:
                for key in surplus:
                    archive.store.delete(key)
            except StorageError:
                catalog.add_garbage(surplus)
        catalog.end_pending(prefix)
        return switched

    def move_out_of_spool(
        self, sop_uid: str, prefix: str, *, archive: FinishingArchive | None = None
    ) -> bool:
        """Put a spooled instance of ``archive``'s tenant (default: the root's) into the
        object store as received, unfinished, and take it off the queue (what is left of
        an instance no finishing succeeds on); False if it is not spooled.  On a failure
        it stays queued, in the spool."""
        archive = self.archive if archive is None else archive
        catalog = archive.catalog
        record = catalog.get_instance(sop_uid)
        if record is None or record.object_prefix != prefix:
            return False
        if not is_spool_key(record.pixels_key):
            return False
        derived = dict(record.derived_keys)
        objects = _out_of_spool(record, derived, _read_received(archive, record))
        catalog.begin_pending(prefix)
        put_objects(archive.store, objects)
        switched = catalog.finish_instance(
            sop_uid,
            prefix,
            pixel_format=record.pixel_format,
            pixel_size=record.pixel_size,
            frame_index=record.frame_index,
            derived=json.dumps(derived, separators=(",", ":")),
            stored_size=record.stored_size,
            header_size=record.header_size,
            garbage=[record.pixels_key],
            garbage_delay_s=archive.settings.garbage_delay_s,
            was=record,
        )
        if not switched:  # changed meanwhile: what was written is nobody's
            catalog.add_garbage(list(objects))
        catalog.end_pending(prefix)
        return True

    def collect_garbage(self, *, force: bool = False) -> int:
        """Delete objects whose grace period is over, in every tenant (at most every few
        seconds)."""
        now = time.monotonic()
        if not force and now - self._last_gc < IDLE_POLL_S:
            return 0
        self._last_gc = now
        return collect_garbage(self.archive)


@dataclass(slots=True)
class _Plan:
    """What finishing writes for one instance, and the row's new values."""

    objects: dict[str, bytes | memoryview]  # the new header and pixel objects, by key
    names: dict[str, str]  # their entries in instances.derived (HEADER_OBJECT, PIXELS_OBJECT)
    kept: dict[str, bytes]  # the derived objects it can afford, by name
    garbage: list[str]  # objects the row stops pointing at
    pixel_format: str
    pixel_size: int
    frame_index: str
    header_size: int
    stored_size: int  # every object the row points at, together


def _plan(
    record: InstanceRecord,
    data: bytes,
    layout: Part10Layout,
    encoded: EncodedPixels | None,
    made: dict[str, bytes],
) -> _Plan:
    """Split the instance into a header object (zstd-compressed when that is smaller) and
    a pixel object (the at-rest encoding, or the value as received), and keep the derived
    objects that fit its allowance (kho.archive.finish.derived).  An instance whose received
    object is already in the store and needs no re-encoding stays that one object unless
    splitting it lets it keep more of its derived objects: a large compressed instance is
    not copied for a header's worth of bytes."""
    prefix = record.object_prefix
    limit = allowance(record.received_size, arrived_compressed(layout))
    raw_header = layout.pixels.header_of(data) if layout.pixels is not None else data
    compressed = compress(raw_header)
    header: bytes | memoryview = raw_header
    header_key = keys.header_key(prefix)
    if len(compressed) < len(raw_header):
        header, header_key = compressed, keys.compressed_header_key(prefix)
    objects: dict[str, bytes | memoryview] = {}
    garbage: list[str] = []
    if header_key != record.header_key:
        objects[header_key] = header
        garbage.append(record.header_key)
    names = {HEADER_OBJECT: header_key}
    pixel_format, pixel_size, frame_index = (
        record.pixel_format,
        record.pixel_size,
        record.frame_index,
    )
    if encoded is not None and (
        record.stored_as_received or encoded.pixel_format != record.pixel_format
    ):
        key = keys.at_rest_pixels_key(prefix, encoded.pixel_format)
        objects[key] = encoded.payload
        names[PIXELS_OBJECT] = key
        if record.pixels_key not in garbage:
            garbage.append(record.pixels_key)
        pixel_format, pixel_size = encoded.pixel_format, len(encoded.payload)
        frame_index = json.dumps(encoded.frame_index, separators=(",", ":"))
    essential = len(header) + (pixel_size if layout.pixels is not None else 0)
    kept = fit_derived(made, limit - essential)

    in_spool = is_spool_key(record.header_key) or is_spool_key(record.pixels_key)
    unchanged = encoded is None or encoded.pixel_format == record.pixel_format
    if not in_spool and unchanged:
        whole = record.header_size
        if not record.stored_as_received and record.pixel_format != "none":
            whole += record.pixel_size
        kept_whole = fit_derived(made, limit - whole)
        if _total(kept_whole) >= _total(kept):
            return _Plan(
                objects={},
                names={},
                kept=kept_whole,
                garbage=[],
                pixel_format=record.pixel_format,
                pixel_size=record.pixel_size,
                frame_index=record.frame_index,
                header_size=record.header_size,
                stored_size=whole + _total(kept_whole),
            )
    return _Plan(
        objects=objects,
        names=names,
        kept=kept,
        garbage=garbage,
        pixel_format=pixel_format,
        pixel_size=pixel_size,
        frame_index=frame_index,
        header_size=len(header),
        stored_size=essential + _total(kept),
    )


def _total(blobs: dict[str, bytes]) -> int:
    return sum(len(blob) for blob in blobs.values())


def _read_received(archive: FinishingArchive, record: InstanceRecord) -> bytes:
    """The instance as received.  A spooled one is checked against its SHA-256 first: its
    bytes are about to become its only copy (read from the local disk or over the network
    from the host holding them); a mismatch leaves it where it is (StorageError)."""
    data = archive.read_part10(record)
    if is_spool_key(record.pixels_key) and hashlib.sha256(data).hexdigest() != record.sha256:
        raise StorageError(f"spooled bytes of {record.sop_uid} do not match its SHA-256")
    return data


def _out_of_spool(
    record: InstanceRecord, derived: dict[str, str], data: bytes
) -> dict[str, bytes | memoryview]:
    """The object that takes a spooled instance's place in the object store (its bytes as
    received, at the key they would have had without a spool); ``derived`` points at it."""
    key = keys.received_key(record.object_prefix)
    derived[HEADER_OBJECT] = derived[PIXELS_OBJECT] = key
    return {key: data}


def _referenced(record: InstanceRecord) -> set[str]:
    """Every object key an instance row points at."""
    out = {record.header_key, keys.header_key(record.object_prefix)}
    if record.pixel_format != "none":
        out.add(record.pixels_key)
    out.update(str(v) for v in record.derived_keys.values())
    return out


def collect_garbage(archive: TenantedArchive, limit: int = 1000) -> int:
    """Delete due garbage objects of every tenant, then spool segments nothing refers to
    any more; how many objects.  Safe in several processes at once.  A tenant whose
    catalog fails does not hold the others up (its error is raised at the end)."""
    collected = 0
    failure: KhoError | None = None
    for tenant in archive.housekept_archives():
        catalog = tenant.catalog
        try:
            catalog.fold_counters()  # PostgreSQL's pending instance counts
            purge_due(tenant)  # rejected instances past their delay: objects to garbage
            due = catalog.due_garbage(limit)
            for key in due:
                tenant.store.delete(key)
            if due:
                catalog.forget_garbage(due)
        except KhoError as exc:
            failure = failure or exc
            continue
        collected += len(due)
    reclaim_spool(archive, archive.spool_reader)
    if failure is not None:
        raise failure
    return collected


def spool_segments_in_use(archive: TenantedArchive) -> set[str]:
    """The spool segments any tenant's catalog refers to.  The spool is the host's, one
    for every tenant, and one segment holds instances of several: a segment one tenant
    no longer needs may be another's only copy of an instance."""
    used: set[str] = set()
    for tenant in archive.housekept_archives():
        used |= tenant.catalog.spool_segments_in_use()
    return used


def reclaim_spool(archive: TenantedArchive, spool: Spool, *, force: bool = False) -> int:
    """Delete the spool segments that no process writes and no tenant's catalog row
    refers to (at most every SPOOL_RECLAIM_S unless ``force``: the look-up reads every
    queued row)."""
    now = time.monotonic()
    if not force and now - spool.last_reclaim < SPOOL_RECLAIM_S:
        return 0
    spool.last_reclaim = now
    spool.retire_idle(0.0 if force else SPOOL_RECLAIM_S)  # an idle archive frees it all
    spool.remove_stale_makings()
    # unlocked first, references second: a segment is unlocked only after every
    # instance in it was committed, so what the catalogs show then is complete (a
    # catalog that cannot be read raises here, and nothing is deleted)
    with spool.unlocked_segments() as candidates:
        if not candidates:
            return 0
        removed = spool.reclaim(spool_segments_in_use(archive), candidates)
    if removed:
        log.info("spool: %d segment(s) deleted", removed)
    return removed


def _lower_priority() -> None:
    """Linux schedules threads individually: a nice background thread takes only the CPU
    that receiving leaves over, and all of it when the archive is idle."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
