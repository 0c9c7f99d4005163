"""The SQLite catalog (the embedded default): WAL, one writer at a time across threads and
processes (a file lock), synchronous=FULL for commits that acknowledge an instance."""

from __future__ import annotations

import fcntl
import os
import re
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any

from kho.archive.catalog.base import Catalog
from kho.archive.config import TENANT_NAME
from kho.errors import CatalogError


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
        self._create_schema()

    def _connect(self) -> Any:
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={'FULL' if self.synchronous_full else 'NORMAL'}")
        conn.execute("PRAGMA busy_timeout=60000")
        conn.execute("PRAGMA foreign_keys=OFF")
        # LIKE must be case-sensitive (DICOM matching is) and then it can use indexes
        conn.execute("PRAGMA case_sensitive_like=ON")
        conn.execute("PRAGMA cache_size=-65536")
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
                yield
            finally:
                fcntl.flock(self._writer_fd, fcntl.LOCK_UN)

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
