"""The embedded default object store: one file per object under a root folder."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

from kho.errors import ObjectNotFoundError, StorageError, StorageUnavailableError
from kho.storage.base import validate_key, validate_prefix

_TMP_SUFFIX = ".kho-tmp"
# errno values that mean "the store is full or gone" rather than "this key is bad"
_OUTAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.ENODEV, errno.ENXIO}


def _wrap(exc: OSError, what: str) -> StorageError:
    if exc.errno in _OUTAGE_ERRNOS:
        return StorageUnavailableError(f"{what}: {exc}")
    return StorageError(f"{what}: {exc}")


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (new files, renames) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FilesystemStore:
    """Objects as files: atomic writes (temp file, fsync, rename, fsync of the folder).

    ``fsync=False`` skips the fsyncs; only for throw-away stores in benchmarks of the
    upper layers.  Folders that were created are fsync'd once, then remembered.
    """

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = Path(root).resolve()
        self.fsync = fsync
        self._known_dirs: set[Path] = set()
        self._lock = threading.Lock()
        self._counter = 0
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _wrap(exc, f"cannot create store root {self.root}") from exc
        self.remove_temporaries()

    def __repr__(self) -> str:
        return f"FilesystemStore({str(self.root)!r})"

    # --- helpers -----------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def _ensure_dir(self, folder: Path) -> None:
        if folder in self._known_dirs:
            return
        missing = []
        probe = folder
        while probe != self.root and not probe.is_dir():
            missing.append(probe)
            probe = probe.parent
        folder.mkdir(parents=True, exist_ok=True)
        if self.fsync:
            # a new folder's entry must reach disk too, or the file in it can vanish on crash
            for created in reversed(missing):
                fsync_dir(created.parent)
        self._known_dirs.add(folder)

    def remove_temporaries(self) -> int:
        """Delete temp files left by a crash mid-put; return how many."""
        removed = 0
        for tmp in self.root.rglob(f"*{_TMP_SUFFIX}"):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed += 1
        return removed

    # --- protocol ----------------------------------------------------------------------

    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        self.put_many({key: data})

    def put_many(self, items: Mapping[str, bytes | bytearray | memoryview]) -> None:
        """Several objects, each atomic and durable; a folder shared by several is fsync'd
        once (an instance's objects share one)."""
        with self._lock:
            self._counter += 1
            serial = self._counter
        paths = {key: self._path(key) for key in items}  # InvalidKeyError before any I/O
        written: list[tuple[Path, Path]] = []
        try:
            for key, data in items.items():
                path = paths[key]
                tmp = path.with_name(f"{path.name}.{os.getpid()}.{serial}{_TMP_SUFFIX}")
                self._ensure_dir(path.parent)
                written.append((tmp, path))
                self._write_file(tmp, data)
            for tmp, path in written:
                os.replace(tmp, path)
            if self.fsync:
                for folder in {path.parent for _tmp, path in written}:
                    fsync_dir(folder)
        except OSError as exc:
            for tmp, _path in written:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            raise _wrap(exc, f"cannot write objects {', '.join(items)}") from exc

    def _write_file(self, tmp: Path, data: bytes | bytearray | memoryview) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if self.fsync:
                os.fdatasync(fd)  # data and size; the rename is made durable by the dir fsync
        finally:
            os.close(fd)

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFoundError(f"no object {key}") from None
        except OSError as exc:
            raise _wrap(exc, f"cannot read object {key}") from exc

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be >= 0")
        path = self._path(key)
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                return fh.read(length)
        except FileNotFoundError:
            raise ObjectNotFoundError(f"no object {key}") from None
        except OSError as exc:
            raise _wrap(exc, f"cannot read object {key}") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        path = self._path(key)
        try:
            info = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFoundError(f"no object {key}") from None
        if not stat.S_ISREG(info.st_mode):  # a fan-out folder is not an object
            raise ObjectNotFoundError(f"no object {key}")
        return info.st_size

    def delete(self, key: str) -> None:
        path = self._path(key)  # InvalidKeyError, not wrapped below
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return
        except OSError as exc:
            raise _wrap(exc, f"cannot delete object {key}") from exc

    def list(self, prefix: str = "") -> Iterator[str]:
        validate_prefix(prefix)
        keys = []
        for dirpath, _dirnames, filenames in os.walk(self.root):
            rel = os.path.relpath(dirpath, self.root)
            base = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            if prefix and not (base.startswith(prefix) or prefix.startswith(base)):
                continue
            for name in filenames:
                if name.endswith(_TMP_SUFFIX):
                    continue
                key = base + name
                if key.startswith(prefix):
                    keys.append(key)
        yield from sorted(keys)

    def close(self) -> None:
        pass
