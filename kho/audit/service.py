"""The audit service of one catalog: records events without ever failing the request that
caused them, makes them durable at least every second, and chains the journal.

Doors hand it events; it never hands anything back (STYLE.md: audit observes, a failing
handler is logged, never breaks the transfer).  Read and security events go through
:meth:`AuditLog.record` (buffered in memory, flushed by a background thread every
``flush_interval_s``: a ``kill -9`` loses at most the events of the last interval).
Changes go through :meth:`AuditLog.statements_for`, whose statements the change's own
transaction runs: its record commits with it.  The same thread chains every outbox row of
the catalog (its own, other processes', those a crashed process left) within about a
second.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from kho.access.callers import Caller
from kho.archive.catalog import Catalog
from kho.audit.coalesce import DEFAULT_WINDOW_S, AccessCoalescer
from kho.audit.journal import (
    DEFAULT_CHAIN,
    chain_all,
    ensure_schema,
    outbox_statement,
)
from kho.audit.messages import AuditEvent, AuditSource, Patient, Study, instances_accessed

LOG = logging.getLogger(__name__)

#: a failing audit write is logged at most this often (each one is counted)
_LOG_EVERY_S = 30.0


class AuditLog:
    """Audit records of one catalog (one hospital).  ``start()`` it, ``close()`` it
    before the catalog.

    ``source`` names this archive in every record (default: this host and process);
    ``key``, if given, makes the chain's hashes HMAC-SHA-256 (verify then needs it);
    ``access_window_s`` is the read-coalescing window of :meth:`record_access`.
    """

    def __init__(
        self,
        catalog: Catalog,
        *,
        source: AuditSource | None = None,
        chain_id: str = DEFAULT_CHAIN,
        key: bytes | None = None,
        flush_interval_s: float = 0.25,
        access_window_s: float = DEFAULT_WINDOW_S,
        max_buffer: int = 100_000,
        chain: bool = True,
    ) -> None:
        self.catalog = catalog
        self.source = source or AuditSource.here()
        self.chain_id = chain_id
        self.key = key
        self.flush_interval_s = flush_interval_s
        self.max_buffer = max_buffer
        self.chain = chain
        self.reads = AccessCoalescer(access_window_s)
        self._buffer: deque[AuditEvent] = deque()
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._last_logged = 0.0
        # counters (read by metrics and tests)
        self.recorded = 0
        self.written = 0
        self.failed_writes = 0
        self.dropped = 0
        ensure_schema(catalog)

    # --- recording: never raises ------------------------------------------------------------

    def record(self, event: AuditEvent) -> None:
        """Queue a read or security event; durable within ``flush_interval_s``."""
        try:
            event = event.stamped(self.source)
            with self._lock:
                if len(self._buffer) >= self.max_buffer:
                    self._buffer.popleft()
                    self.dropped += 1
                self._buffer.append(event)
                self.recorded += 1
            if self._closed:  # after close: nobody flushes for us
                self.flush()
        except Exception:
            LOG.exception("audit: an event could not be recorded")

    def record_access(
        self,
        caller: Caller,
        *,
        patient: Patient,
        study_uid: str,
        via: str = "WADO-RS",
        tenant: str | None = None,
        description: str = "",
    ) -> bool:
        """A read of ``study_uid`` (metadata, frames, rendered, thumbnail): recorded as
        Instances Accessed if it is ``caller``'s first read of the study in the window.
        Whether a record was made."""
        try:
            who = (caller.kind, caller.name, caller.address, tenant or caller.home_tenant)
            if not self.reads.admit(who, study_uid):
                return False
            self.record(
                instances_accessed(
                    caller,
                    patient=patient,
                    study=Study(study_uid),
                    via=via,
                    tenant=tenant,
                    description=description,
                )
            )
            return True
        except Exception:
            LOG.exception("audit: a read could not be recorded")
            return False

    def statements_for(self, event: AuditEvent) -> list[tuple[str, Sequence[Any]]]:
        """The statements that write ``event``'s record inside the caller's transaction
        (an ingest commit): it commits, or rolls back, with the change.  Unlike record(),
        this may raise (the event cannot be serialised): the change's code decides."""
        return [outbox_statement(event.stamped(self.source))]

    # --- the background writer --------------------------------------------------------------

    def start(self) -> AuditLog:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kho-audit", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        next_tick = time.monotonic() + self.flush_interval_s
        while not self._stop.is_set():
            self._wake.wait(max(0.0, next_tick - time.monotonic()))
            self._wake.clear()
            # a fixed rate: a slow flush does not push the next one later
            next_tick = max(next_tick + self.flush_interval_s, time.monotonic())
            self.flush()

    def flush(self) -> bool:
        """Write the buffered events (one transaction) and chain the outbox; whether
        every buffered event was written.  Never raises; failed writes are kept and
        retried by the next flush."""
        with self._flush_lock:
            written = self._write_buffer()
            if self.chain:
                self._chain()
            return written

    def _write_buffer(self) -> bool:
        with self._lock:
            batch = list(self._buffer)
            self._buffer.clear()
        if not batch:
            return True
        kept, statements = [], []
        for event in batch:
            try:
                statements.append(outbox_statement(event))
                kept.append(event)
            except Exception:  # an event that cannot be serialised would block the rest
                LOG.exception("audit: an event could not be serialised; dropped")
                self.dropped += 1
        if not statements:
            return True
        try:
            with self.catalog.transaction():
                self.catalog.execute_batch(statements)
        except Exception as exc:
            with self._lock:  # back in front, in order, for the next flush
                self._buffer.extendleft(reversed(kept))
                while len(self._buffer) > self.max_buffer:
                    self._buffer.popleft()
                    self.dropped += 1
            self.failed_writes += 1
            self._log_failure("audit: %d event(s) not written yet (retrying): %s", len(kept), exc)
            return False
        self.written += len(statements)
        return True

    def _chain(self) -> None:
        try:
            chain_all(self.catalog, chain_id=self.chain_id, key=self.key)
        except Exception as exc:
            self._log_failure("audit: chaining the journal failed (retrying): %s", exc)

    def _log_failure(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last_logged >= _LOG_EVERY_S:
            self._last_logged = now
            LOG.error(message, *args)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def stats(self) -> dict[str, int]:
        return {
            "recorded": self.recorded,
            "written": self.written,
            "buffered": self.buffered,
            "failed_writes": self.failed_writes,
            "dropped": self.dropped,
            "reads_coalesced": self.reads.suppressed,
        }

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the thread and write what is left (a few tries while the catalog
        fails)."""
        self._closed = True
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        deadline = time.monotonic() + timeout_s
        while not self.flush() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.buffered:
            LOG.error("audit: %d event(s) could not be written before closing", self.buffered)

    def __enter__(self) -> AuditLog:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["AuditLog"]
