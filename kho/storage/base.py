"""The object-store protocol every backend implements.

Keys are '/'-separated relative paths made of ``[A-Za-z0-9._-]`` parts; the archive derives
them from hashes, so a key never carries patient data or raw UID text.  A backend must make
``put`` atomic (a reader sees the whole old object, the whole new one, or nothing) and durable
(once ``put`` returns, the bytes survive a crash of this process and of the machine).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from kho.errors import InvalidKeyError

_KEY_PART = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
MAX_KEY_LENGTH = 512


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object key, else raise InvalidKeyError."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
        raise InvalidKeyError(f"invalid object key {key!r}")
    for part in key.split("/"):
        if not _KEY_PART.match(part) or part in (".", ".."):
            raise InvalidKeyError(f"invalid object key {key!r}")
    return key


def validate_prefix(prefix: str) -> str:
    """A listing prefix: empty, or a key optionally ending in '/'."""
    if prefix == "":
        return prefix
    validate_key(prefix.rstrip("/"))
    return prefix


def put_objects(store: ObjectStore, objects: dict[str, bytes | memoryview]) -> None:
    """Write objects durably, in one batch where the backend offers one."""
    put_many = getattr(store, "put_many", None)
    if put_many is not None:
        put_many(objects)
        return
    for key, blob in objects.items():
        store.put(key, blob)


@runtime_checkable
class ObjectStore(Protocol):
    """put, get, get_range, exists, delete, list, size: all a backend must provide."""

    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` under ``key`` atomically and durably, replacing any old object."""

    def get(self, key: str) -> bytes:
        """The whole object; ObjectNotFoundError if absent."""

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (fewer at the end of the object)."""

    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""

    def size(self, key: str) -> int:
        """The object's size in bytes; ObjectNotFoundError if absent."""

    def delete(self, key: str) -> None:
        """Remove the object; deleting an absent key is not an error."""

    def list(self, prefix: str = "") -> Iterator[str]:
        """Every key starting with ``prefix``, in lexicographic order."""

    def close(self) -> None:
        """Release connections and handles."""


#: errno values of a full filesystem (no space, quota exceeded)
_FULL_ERRNOS = (28, 122)  # ENOSPC, EDQUOT (Linux)


def is_full(exc: BaseException) -> bool:
    """Whether a failure (or one it was raised from) is a full disk: an OSError with
    ENOSPC/EDQUOT, or SQLite's "database or disk is full".  A full disk is answered
    differently from an outage (HTTP 507, not 503): waiting does not help, freeing does."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FULL_ERRNOS:
            return True
        text = str(current)
        if "No space left on device" in text or "database or disk is full" in text:
            return True
        current = current.__cause__ or current.__context__
    return False
