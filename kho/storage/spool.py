"""The ingest spool: received instances appended to local segment files, fsync'd.

DESIGN.md lets an acknowledgement rest on "an fsync'd local spool".  Writing each received
instance as a file of its own costs a file creation, a rename and two flushes of the
filesystem journal (the file, its folder); on the 2-core benchmark machine that was ~1.2 ms
of CPU per 512 KB CT slice and the most of the time an association waited.  Appending to one
open file and flushing it costs ~0.25 ms (benchmarks/results: ingest), and several
associations' appends share the disk's flushes.

A spooled instance is an object like any other to readers: its key, ``spool/<segment>/
<offset>-<length>``, says where its bytes are, and :class:`SpooledStore` serves it beside
the object store.  The background finisher moves every spooled instance into the object
store (encoded at rest, or as received) and lists its spool key as garbage; deleting a
spool key frees nothing by itself.  A segment file is deleted whole once no catalog row and
no pending garbage refers to it and no process writes to it (:meth:`Spool.reclaim`).

Who writes a segment holds an exclusive ``flock`` on it.  A full segment is released only
once every instance appended to it has had its catalog commit (or failed), so a segment
seen unlocked can never gain a reference again; the lock goes with a dying process.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Protocol, cast

from kho.errors import InvalidKeyError, ObjectNotFoundError, StorageError
from kho.storage.base import ObjectStore
from kho.storage.filesystem import fsync_dir

SPOOL_PREFIX = "spool/"
SEGMENT_SUFFIX = ".seg"
MAKING_SUFFIX = ".making"  # a segment being created (see _Segment)
DEFAULT_SEGMENT_BYTES = 128 * 1024 * 1024
_KEY = re.compile(r"spool/([A-Za-z0-9][A-Za-z0-9_-]*)/([0-9]+)-([0-9]+)")


def is_spool_key(key: object) -> bool:
    return isinstance(key, str) and key.startswith(SPOOL_PREFIX)


def parse_spool_key(key: str) -> tuple[str, int, int]:
    """(segment name, offset, length) of a spool key."""
    match = _KEY.fullmatch(key)
    if match is None:
        raise InvalidKeyError(f"not a spool key: {key!r}")
    return match.group(1), int(match.group(2)), int(match.group(3))


def segment_of(key: str) -> str:
    return parse_spool_key(key)[0]


def stem_of(segment: str) -> str:
    """The spool a segment belongs to (its writer's :attr:`Spool.stem`)."""
    return segment.rpartition("-")[0]


class _Segment:
    """One segment being appended to by this process."""

    def __init__(self, folder: Path, name: str) -> None:
        self.name = name
        self.path = folder / f"{name}{SEGMENT_SUFFIX}"
        # made and locked under a name the reclaimer does not look at, then renamed: a
        # segment is never seen unlocked before its first append
        making = folder / f"{name}{MAKING_SUFFIX}"
        self.fd = os.open(making, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(making, self.path)
        except OSError:
            os.close(self.fd)
            with contextlib.suppress(OSError):
                making.unlink()
            raise
        self.size = 0
        self.in_flight = 0  # appended, not yet released by the ingest that appended it
        self.full = False
        self.last_append = time.monotonic()

    def close(self) -> None:
        os.close(self.fd)  # releases the lock


class Spool:
    """Append-only segment files in one folder, shared by the processes of one host."""

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        fsync: bool = True,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    ) -> None:
        self.folder = Path(folder)
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        try:
            if not self.folder.is_dir():
                self.folder.mkdir(parents=True, exist_ok=True)
                if fsync:  # the folder's own entry, or a crash could lose it whole
                    fsync_dir(self.folder.parent)
        except OSError as exc:
            raise StorageError(f"cannot create the spool folder {self.folder}: {exc}") from exc
        host = "h" + re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32]
        #: names this process's segments (``<stem>-<serial>``): host, process, chance
        self.stem = f"{host}-{os.getpid()}-{secrets.token_hex(6)}"
        self._serial = 0
        self._lock = threading.Lock()
        self._active: _Segment | None = None
        self._segments: dict[str, _Segment] = {}  # this process's: active and draining
        self.last_reclaim = 0.0  # time.monotonic() of the last look for deletable segments
        self._closed = False

    def __repr__(self) -> str:
        return f"Spool({str(self.folder)!r})"

    # --- writing ---------------------------------------------------------------------

    def append(self, data: bytes | bytearray | memoryview) -> str:
        """Append ``data`` durably; its key.  Call :meth:`release` with the key once the
        catalog commit that refers to it is done (or has failed)."""
        length = len(data)
        with self._lock:
            if self._closed:
                raise StorageError(f"the spool in {self.folder} is closed")
            segment = self._active
            if segment is None or (segment.size and segment.size + length > self.segment_bytes):
                segment = self._rotate()
            offset = segment.size
            segment.size += length
            segment.in_flight += 1
            segment.last_append = time.monotonic()
        key = f"{SPOOL_PREFIX}{segment.name}/{offset}-{length}"
        try:
            view = memoryview(data)
            position = offset
            while view:
                written = os.pwrite(segment.fd, view, position)
                view, position = view[written:], position + written
            if self.fsync:
                os.fdatasync(segment.fd)  # the data and the file's new size
        except OSError as exc:
            self.release(key)
            raise StorageError(f"cannot append to spool segment {segment.path}: {exc}") from exc
        return key

    def release(self, key: str) -> None:
        """The ingest that appended ``key`` has committed (or given up)."""
        name = segment_of(key)
        with self._lock:
            segment = self._segments.get(name)
            if segment is None:
                return
            segment.in_flight -= 1
            if segment.full and segment.in_flight <= 0:
                self._segments.pop(name)
                segment.close()

    def _rotate(self) -> _Segment:
        """A new active segment (the old one is released when its appends are)."""
        old = self._active
        if old is not None:
            old.full = True
            if old.in_flight <= 0:
                self._segments.pop(old.name, None)
                old.close()
        self._serial += 1
        try:
            segment = _Segment(self.folder, f"{self.stem}-{self._serial:06d}")
            if self.fsync:  # the new file's name must survive a crash too
                fsync_dir(self.folder)
        except OSError as exc:
            self._active = None
            raise StorageError(f"cannot create a spool segment in {self.folder}: {exc}") from exc
        self._active = segment
        self._segments[segment.name] = segment
        return segment

    def retire_idle(self, idle_s: float) -> bool:
        """Stop appending to the active segment if nothing was appended for ``idle_s`` and
        nothing appended is in flight (so that it can be reclaimed; the next append opens
        a new one)."""
        with self._lock:
            segment = self._active
            if segment is None or segment.in_flight > 0:
                return False
            if time.monotonic() - segment.last_append < idle_s:
                return False
            self._active = None
            segment.full = True
            self._segments.pop(segment.name, None)
            segment.close()
            return True

    def close(self) -> None:
        """Stop appending.  A segment with appends in flight is closed by their release:
        closing its descriptor under them could let a pwrite land in whatever file reuses
        the number."""
        with self._lock:
            self._closed = True
            self._active = None
            for name, segment in list(self._segments.items()):
                segment.full = True
                if segment.in_flight <= 0:
                    del self._segments[name]
                    segment.close()

    # --- reading ---------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}{SEGMENT_SUFFIX}"

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes of a spooled object (``offset``/``length`` within it)."""
        name, start, size = parse_spool_key(key)
        if offset < 0 or offset > size:
            raise StorageError(f"range {offset} outside spooled object {key} ({size} bytes)")
        count = size - offset if length is None else min(length, size - offset)
        try:
            fd = os.open(self._path(name), os.O_RDONLY)
        except FileNotFoundError as exc:
            raise ObjectNotFoundError(key) from exc
        except OSError as exc:
            raise StorageError(f"cannot read spooled object {key}: {exc}") from exc
        try:
            data = os.pread(fd, count, start + offset)
            # freed (Spool.free) reads as zeros: not there, as a deleted object
            freed = bool(count) and _has_hole(fd, start + offset, count)
        except OSError as exc:
            raise StorageError(f"cannot read spooled object {key}: {exc}") from exc
        finally:
            os.close(fd)
        if len(data) != count or freed:  # or a segment cut short (a crash before its flush)
            raise ObjectNotFoundError(key)
        return data

    def exists(self, key: str) -> bool:
        name, start, size = parse_spool_key(key)
        try:
            fd = os.open(self._path(name), os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            return os.fstat(fd).st_size >= start + size and not _has_hole(fd, start, size)
        finally:
            os.close(fd)

    def free(self, key: str) -> None:
        """Give the disk blocks of a spooled object that nothing reads any more (collected
        garbage) back to the filesystem: a hole punched in its segment, offsets and size
        unchanged.  After a full disk the finisher then regains room instance by instance,
        not only once a whole segment is reclaimed.  Best effort: a filesystem that cannot
        punch holes, and an object smaller than two blocks, free their bytes with the
        segment, as before."""
        name, start, size = parse_spool_key(key)
        try:
            fd = os.open(self._path(name), os.O_WRONLY)
        except OSError:
            return  # gone already, or another host's
        try:
            # whole blocks inside the object only: the filesystem would zero a partly
            # covered block instead, which holds a neighbour's bytes, and a freed range
            # must read as missing (a hole), never as zeros
            block = max(os.fstat(fd).st_blksize, 512)
            first = -(-start // block) * block
            end = (start + size) // block * block
            if end > first:
                _punch_hole(fd, first, end - first)
        finally:
            os.close(fd)

    def holds_segment(self, key: str) -> bool:
        """Whether the segment of ``key`` is in this folder (else another host has it,
        or it was deleted)."""
        return self._path(parse_spool_key(key)[0]).exists()

    # --- reclaiming ------------------------------------------------------------------

    def stems(self) -> set[str]:
        """The spools whose segments are in this folder (this process's and others')."""
        return {stem_of(name) for name in self.segment_names()} | {self.stem}

    def segment_names(self) -> list[str]:
        found = self.folder.glob(f"*{SEGMENT_SUFFIX}")
        return sorted(path.name[: -len(SEGMENT_SUFFIX)] for path in found)

    @contextlib.contextmanager
    def unlocked_segments(self) -> Iterator[list[str]]:
        """The segments no process writes to, held locked (so none starts to) while the
        caller looks up which of them the catalog still refers to."""
        held: list[tuple[str, int]] = []
        try:
            for name in self.segment_names():
                if name in self._segments:
                    continue
                try:
                    fd = os.open(self._path(name), os.O_RDONLY)
                except OSError:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)  # being written by a live process
                    continue
                held.append((name, fd))
            yield [name for name, _fd in held]
        finally:
            for _name, fd in held:
                os.close(fd)

    def remove_stale_makings(self) -> int:
        """Delete segments a crashed process left half made (created, never renamed: they
        hold nothing anyone was told is stored); how many."""
        removed = 0
        for path in self.folder.glob(f"*{MAKING_SUFFIX}"):
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # being made right now
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
            finally:
                os.close(fd)
        return removed

    def reclaim(self, referenced: set[str] | frozenset[str], candidates: list[str]) -> int:
        """Delete the ``candidates`` (from :meth:`unlocked_segments`, still held) that
        nothing refers to; how many."""
        removed = 0
        for name in candidates:
            if name in referenced:
                continue
            with contextlib.suppress(FileNotFoundError):
                self._path(name).unlink()
                removed += 1
        return removed

    def stats(self) -> dict[str, int]:
        segments = size = 0
        for path in self.folder.glob(f"*{SEGMENT_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):  # reclaimed meanwhile
                size += path.stat().st_size
                segments += 1
        return {"segments": segments, "bytes": size}


class SpoolPeers(Protocol):
    """Reads the spool keys other hosts hold (kho.storage.peer.PeerSpoolClient): declared
    here so that the spool depends on no reader of it."""

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def close(self) -> None: ...


_FALLOC_PUNCH_HOLE = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE (Linux)


def _punch_hole(fd: int, offset: int, length: int) -> None:
    """fallocate(2) a hole over the range, where the platform has it (else nothing)."""
    fallocate = _fallocate()
    if fallocate is not None and length > 0:
        fallocate(fd, _FALLOC_PUNCH_HOLE, offset, length)  # an error: the bytes stay


def _has_hole(fd: int, offset: int, length: int) -> bool:
    """Whether a hole (a freed range) lies within the range: the first hole at or after
    ``offset`` comes before its end (the end of the file counts as one)."""
    try:
        return os.lseek(fd, offset, os.SEEK_HOLE) < offset + length
    except OSError:  # no SEEK_HOLE here: nothing is ever freed either
        return False


@functools.cache
def _fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.fallocate
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return cast("Callable[[int, int, int, int], int]", function)


class SpooledStore:
    """An object store with the spool beside it: spool keys are read from the spool, the
    rest goes to ``inner``.  Deleting a spool key frees its disk blocks (Spool.free); the
    segment file goes once nothing refers to it (Spool.reclaim)."""

    def __init__(self, inner: ObjectStore, spool: Spool, peers: SpoolPeers | None = None) -> None:
        self.inner = inner
        self.spool = spool
        #: reads the spool keys of other hosts (kho.storage.peer); None: one host
        self.peers = peers

    def __repr__(self) -> str:
        return f"SpooledStore({self.inner!r}, {self.spool!r})"

    def __getattr__(self, name: str) -> object:  # backend extras (put_many, root...)
        return getattr(self.inner, name)

    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        if is_spool_key(key):
            raise InvalidKeyError("spool keys are written by appending to the spool")
        self.inner.put(key, data)

    def put_many(self, items: Mapping[str, bytes | bytearray | memoryview]) -> None:
        if any(is_spool_key(key) for key in items):
            raise InvalidKeyError("spool keys are written by appending to the spool")
        put_many = getattr(self.inner, "put_many", None)
        if put_many is not None:
            put_many(items)
            return
        for key, data in items.items():
            self.inner.put(key, data)

    def get(self, key: str) -> bytes:
        if not is_spool_key(key):
            return self.inner.get(key)
        if self.peers is not None and not self.spool.holds_segment(key):
            return self.peers.read(key)
        return self.spool.read(key)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if not is_spool_key(key):
            return self.inner.get_range(key, offset, length)
        if self.peers is not None and not self.spool.holds_segment(key):
            return self.peers.read(key, offset, length)
        return self.spool.read(key, offset, length)

    def exists(self, key: str) -> bool:
        if not is_spool_key(key):
            return self.inner.exists(key)
        if self.peers is not None and not self.spool.holds_segment(key):
            return self.peers.exists(key)
        return self.spool.exists(key)

    def size(self, key: str) -> int:
        if is_spool_key(key):
            if not self.exists(key):
                raise ObjectNotFoundError(key)
            return parse_spool_key(key)[2]
        return self.inner.size(key)

    def delete(self, key: str) -> None:
        if not is_spool_key(key):
            self.inner.delete(key)
        elif self.spool.holds_segment(key):
            self.spool.free(key)

    def list(self, prefix: str = "") -> Iterator[str]:
        return self.inner.list(prefix)

    def close(self) -> None:
        self.spool.close()
        if self.peers is not None:
            self.peers.close()
        self.inner.close()
