"""Stored objects read back: zstd-compressed header and metadata objects,
whole or a range of the header."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import zstandard

from kho.archive import keys
from kho.errors import IntegrityError

if TYPE_CHECKING:
    from kho.storage import ObjectStore


#: the first bytes of a zstd frame (RFC 8878); DICOM JSON always starts with "{"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


#: zstd's strongest practical level costs about 1 ms for a typical 5 KB header; above this
#: size (waveforms, large structured reports) a faster level keeps the finisher moving
_STRONG_LEVEL_MAX = 1 << 20


def compress(blob: bytes | memoryview) -> bytes:
    """One zstd frame holding ``blob`` (its size written in the frame header)."""
    level = 19 if len(blob) <= _STRONG_LEVEL_MAX else 9
    compressors: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "compressors", None)
    if compressors is None:  # one per thread and level: a level-19 context is large to make
        compressors = _local.compressors = {}
    if level not in compressors:
        compressors[level] = zstandard.ZstdCompressor(level=level, write_checksum=False)
    return compressors[level].compress(blob)


def decompress(blob: bytes) -> bytes:
    """The bytes a compress() frame holds; IntegrityError if the frame is damaged (a
    flipped bit on disk), which `kho verify` reports like a SHA-256 mismatch."""
    decompressor = getattr(_local, "decompressor", None)
    if decompressor is None:  # made once per thread: a new one costs 3x the work of a read
        decompressor = _local.decompressor = zstandard.ZstdDecompressor()
    try:
        return decompressor.decompress(blob)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"damaged compressed object: {exc}") from exc


_local = threading.local()


def read_header_object(store: ObjectStore, key: str) -> bytes:
    """A header object's bytes as received: compressed ones (``keys.is_compressed``) are
    inflated; uncompressed ones (older archives, inline ingest, instances not finished
    yet) are returned as they are."""
    blob = store.get(key)
    return decompress(blob) if keys.is_compressed(key) else blob


def read_header_range(store: ObjectStore, key: str, offset: int, length: int) -> bytes:
    """Bytes [offset, offset + length) of a header as received, however its object is
    stored: a ranged read where it is uncompressed, else the (small) object inflated."""
    if keys.is_compressed(key):
        return decompress(store.get(key))[offset : offset + length]
    return store.get_range(key, offset, length)
