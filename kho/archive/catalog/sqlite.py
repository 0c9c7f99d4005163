"""The SQLite catalog (the embedded default): WAL, one writer at a time across threads and
processes (a file lock), synchronous=FULL for commits that acknowledge an instance.

Group commit: instance commits that arrive while another is being written (several
associations sending at once) wait, and the next of them writes all of them in one
transaction, each in a savepoint of its own (one instance's failure undoes only its rows),
so one flush of the WAL makes them all durable.  Each caller returns only after that
COMMIT: an acknowledged instance is still catalogued and flushed before its answer.

A full disk: a write that fails with SQLITE_FULL ("database or disk is full", answered
0xA700 / HTTP 507) leaves the WAL as long as it was, and SQLite checkpoints it only once
it holds 1000 pages: on a filesystem with less room than that the WAL itself fills the disk,
and once space is freed the next commits would fill it again before any checkpoint.  So
after a full disk the next write first checkpoints the WAL into the database and truncates
it (a committed transaction is durable in either file; the checkpoint moves it), giving the
WAL's room back; it is tried again before each write until it succeeds.  From then on, while
the filesystem has less room than LOW_SPACE_BYTES, each write is followed by a checkpoint
(PASSIVE: it waits for no one), so the next write starts the WAL over instead of making it
longer: the catalog takes the room its data needs, not that of a 4 MiB WAL.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kho.archive.catalog.base import Catalog, _is_retryable
from kho.archive.config import TENANT_NAME
from kho.errors import CatalogError

if TYPE_CHECKING:
    from kho.archive.catalog.base import RowInsert
    from kho.archive.catalog.records import InstanceAttributes, InstanceRecord

log = logging.getLogger(__name__)

#: most instance commits written in one transaction
GROUP_LIMIT = 64
#: how long a statement waits for another connection's lock (ms)
BUSY_TIMEOUT_MS = 60_000
#: how long the checkpoint after a full disk waits for readers (ms): it holds the write
#: lock meanwhile; a reader that stays longer defers it to the next write
FULL_CHECKPOINT_BUSY_MS = 1000
#: below this much free room on the catalog's filesystem (after a full disk) every write
#: is checkpointed: the WAL may grow to 1000 pages (4 MiB) before SQLite checkpoints it
LOW_SPACE_BYTES = 16 << 20
#: the WAL file is cut back to this size whenever SQLite restarts it (one large
#: transaction, a purge or a rebuild, does not keep its room after it is checkpointed)
JOURNAL_SIZE_LIMIT = 64 << 20
#: SQLite's memory in this process, all connections together (PRAGMA soft_heap_limit:
#: past it, page caches recycle their pages instead of growing).  Each connection may
#: cache 64 MiB (cache_size), and every thread has its own: without the limit, long-lived
#: threads' caches grow with the catalog (eight connections that each read a 60 MB table
#: held 525 MB; with a 32 MiB limit, 34 MB; under the memory soak 128 MiB was reached
#: after 25 minutes).  The file's pages stay in the kernel's page cache beyond it
MEMORY_LIMIT_BYTES = 32 << 20


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an error it was raised from, is SQLite's SQLITE_FULL."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@dataclass(slots=True)
class _QueuedCommit:
    """One caller's instance commit, waiting for a group transaction."""

    run: Callable[[], tuple[str, InstanceRecord | None]]
    outcome: tuple[str, InstanceRecord | None] | None = None
    error: BaseException | None = None
    done: bool = field(default=False)


class SqliteCatalog(Catalog):
    """The catalog in one SQLite file."""

    dialect = "sqlite"
    ENGINE_ERRORS = (sqlite3.Error,)

    def __init__(
        self, path: str | Path, *, synchronous_full: bool = True, tenant: str = ""
    ) -> None:
        """``tenant``: only recorded; its file is chosen by open_catalog."""
        self.path = Path(str(path).removeprefix("sqlite:///"))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(f"sqlite:///{self.path}", synchronous_full=synchronous_full, tenant=tenant)
        self._writer_thread_lock = threading.Lock()
        lock_path = self.path.with_name(self.path.name + ".writelock")
        self._writer_fd: int | None = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o640)
        #: write concurrent instance commits in one transaction (see the module's doc)
        self.group_commit = True
        self._queued: list[_QueuedCommit] = []
        self._queue_lock = threading.Lock()
        self._leader_lock = threading.Lock()  # held by the thread writing a group
        self._grouping = threading.local()  # set in the thread writing a group
        #: a write failed with SQLITE_FULL: checkpoint before the next (module doc)
        self.disk_was_full = False
        #: checkpoint after each write (module doc); set by a full disk, cleared once the
        #: filesystem has LOW_SPACE_BYTES free
        self.space_is_low = False
        self._create_schema()

    def _connect(self) -> Any:
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={'FULL' if self.synchronous_full else 'NORMAL'}")
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys=OFF")
        # LIKE must be case-sensitive (DICOM matching is) and then it can use indexes
        conn.execute("PRAGMA case_sensitive_like=ON")
        conn.execute("PRAGMA cache_size=-65536")
        conn.execute(f"PRAGMA soft_heap_limit={MEMORY_LIMIT_BYTES}")
        conn.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
        return conn

    def tenants_present(self) -> list[str]:
        """Tenants with a catalog file beside this one (``<stem>-<tenant><suffix>``)."""
        stem, suffix = self.path.stem, self.path.suffix
        found = self.path.parent.glob(f"{stem}-*{suffix}")
        names = (path.name[len(stem) + 1 : len(path.name) - len(suffix)] for path in found)
        return sorted(name for name in names if re.fullmatch(TENANT_NAME, name))

    def close(self) -> None:
        if self._writer_fd is not None:
            os.close(self._writer_fd)
            self._writer_fd = None
        super().close()

    @contextmanager
    def writer(self) -> Iterator[None]:
        """Serialise SQLite writers of all threads and processes without SQLite's busy
        handler, which sleeps up to 100 ms between retries: a blocking file lock wakes the
        next writer as soon as the lock is released."""
        if self._writer_fd is None:
            yield
            return
        with self._writer_thread_lock:
            fcntl.flock(self._writer_fd, fcntl.LOCK_EX)
            try:
                if self.disk_was_full:
                    self._checkpoint_after_full()
                yield
                if self.space_is_low:
                    self._checkpoint_while_space_is_low()
            except BaseException as exc:
                if is_disk_full(exc):
                    self.disk_was_full = self.space_is_low = True
                raise
            finally:
                fcntl.flock(self._writer_fd, fcntl.LOCK_UN)

    def _checkpoint_after_full(self) -> None:
        """Checkpoint the whole WAL and truncate it (under the write lock, outside any
        transaction); clears ``disk_was_full`` once it succeeds.  While the disk is still
        full it fails, and the write that follows tells its caller so."""
        conn = self.connection
        if conn.in_transaction:
            return
        try:
            conn.execute(f"PRAGMA busy_timeout={FULL_CHECKPOINT_BUSY_MS}")
            try:
                row = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        except sqlite3.Error as exc:
            log.debug("catalog: checkpoint after a full disk failed: %s", exc)
            return
        if row is not None and row[0] == 0:  # 1: a reader kept it from finishing
            self.disk_was_full = False
            log.info("catalog: WAL checkpointed and truncated after a full disk")

    def _checkpoint_while_space_is_low(self) -> None:
        """After a write, while the filesystem has less than LOW_SPACE_BYTES free: a
        PASSIVE checkpoint (one that fails leaves the WAL as it was: harmless)."""
        try:
            stat = os.statvfs(self.path.parent)
        except OSError:
            return
        if stat.f_bavail * stat.f_frsize >= LOW_SPACE_BYTES:
            self.space_is_low = False
            return
        conn = self.connection
        if not conn.in_transaction:
            with suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """A write transaction; inside a group commit, the group's (the caller's work is
        in a savepoint of the group's transaction)."""
        if getattr(self._grouping, "active", False):
            yield
            return
        with self.writer():
            yield from self._transaction()

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
        """Catalog.commit_instance, written together with the commits of other threads
        that are waiting at the same moment (group commit); returns after the COMMIT."""

        def alone() -> tuple[str, InstanceRecord | None]:  # its own transaction
            return super(SqliteCatalog, self).commit_instance(
                attrs,
                record,
                policy=policy,
                unfinished=unfinished,
                journalled=journalled,
                with_rows=with_rows,
            )

        if not self.group_commit or self.connection.in_transaction:
            return alone()

        def run() -> tuple[str, InstanceRecord | None]:
            return self._commit_instance(
                attrs,
                record,
                policy=policy,
                unfinished=unfinished,
                journalled=journalled,
                with_rows=with_rows,
            )

        mine = _QueuedCommit(run)
        with self._queue_lock:
            self._queued.append(mine)
        with self._leader_lock:  # the group before this one is being written meanwhile
            while not mine.done:
                self._write_group()
        if mine.error is not None:
            if isinstance(mine.error, CatalogError) and _is_retryable(mine.error):
                return alone()
            raise mine.error
        assert mine.outcome is not None
        return mine.outcome

    def _write_group(self) -> None:
        """One transaction for the commits queued (up to GROUP_LIMIT), each in a savepoint;
        on return every member is done, with its outcome or its error (a failed COMMIT
        fails them all).  The group is taken once the write lock is held: whoever queued
        while it was awaited is in it."""
        conn = self.connection
        group: list[_QueuedCommit] = []
        try:
            with self.writer():
                with self._queue_lock:
                    group, self._queued = self._queued[:GROUP_LIMIT], self._queued[GROUP_LIMIT:]
                self._begin(conn)
                self._grouping.active = True
                try:
                    if len(group) == 1:  # alone: its failure rolls the transaction back
                        group[0].outcome = group[0].run()
                    else:
                        self._run_in_savepoints(conn, group)
                        if any(is_disk_full(queued.error) for queued in group):
                            self.disk_was_full = self.space_is_low = True
                finally:
                    self._grouping.active = False
                try:
                    conn.execute("COMMIT")
                except Exception as exc:
                    raise CatalogError(f"catalog commit failed: {exc}") from exc
        except BaseException as exc:
            if not group:  # nothing taken (the write lock failed): the caller's error
                raise
            with suppress(Exception):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            # alone, a member gets its own error (a refusal keeps its kind and status)
            alone = len(group) == 1
            failure = exc if alone or isinstance(exc, CatalogError) else CatalogError(str(exc))
            for queued in group:
                queued.outcome, queued.error = None, queued.error or failure
            if not isinstance(exc, Exception):
                raise
        finally:
            for queued in group:
                queued.done = True

    @staticmethod
    def _run_in_savepoints(conn: Any, group: list[_QueuedCommit]) -> None:
        for queued in group:
            conn.execute("SAVEPOINT kho_grouped")
            try:
                queued.outcome = queued.run()
            except BaseException as exc:  # only this member's rows are undone
                queued.error = exc
                conn.execute("ROLLBACK TO kho_grouped")
            conn.execute("RELEASE kho_grouped")

    @staticmethod
    def _begin(conn: Any) -> None:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except Exception as exc:
            raise CatalogError(f"cannot begin a catalog transaction: {exc}") from exc

    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE: the write lock at once (no upgrade deadlocks)."""
        conn = self.connection
        try:
            conn.execute("BEGIN IMMEDIATE")
        except Exception as exc:
            raise CatalogError(f"cannot begin a catalog transaction: {exc}") from exc
        try:
            yield
        except BaseException:
            with suppress(Exception):
                conn.execute("ROLLBACK")
            raise
        try:
            conn.execute("COMMIT")
        except Exception as exc:
            raise CatalogError(f"catalog commit failed: {exc}") from exc

    @contextmanager
    def relaxed_write(self) -> Iterator[None]:
        """synchronous=NORMAL for this write (see Catalog.relaxed_write)."""
        relaxed = self.synchronous_full and not self.connection.in_transaction
        if relaxed:
            self.connection.execute("PRAGMA synchronous=NORMAL")
        try:
            with self.writer() if relaxed else nullcontext():
                yield
        finally:
            if relaxed:
                self.connection.execute("PRAGMA synchronous=FULL")

    def _in_transaction(self) -> bool:
        return bool(self.connection.in_transaction)
