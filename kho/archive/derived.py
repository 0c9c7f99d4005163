"""Objects derived at ingest (DESIGN.md "derived"): which derivers an archive runs, and
how much of what they make an instance can afford to keep.

Each deriver takes (Part 10 bytes, layout, parsed header, attributes, encoded pixels) and
returns {object name: bytes}; the names become keys under the instance's prefix and are
recorded in ``instances.derived``.

- ``metadata`` (kho.archive.dicomjson): the DICOM JSON served by WADO-RS metadata,
  zstd-compressed (about a quarter of the JSON text);
- ``thumbnail`` (kho.archive.rendering): a JPEG of frame 1 within 128x128 pixels, for
  images larger than that;
- ``tiles`` (kho.archive.rendering, ``tile_pyramid`` setting): the JPEG tile pyramid of
  frame 1 of images over 1024 pixels a side.

Derived objects are conveniences paid for by what the at-rest encoding saves: the finisher
keeps them only within :func:`allowance` (never more than received for an instance that
arrived uncompressed, at most 3% more for one that arrived compressed, which has no
savings to spend), in the order above, a tile pyramid trimmed to its coarsest levels.
What is not kept is made on request (the viewer's paths already do that for instances the
finisher has not reached yet); only instances of a few hundred bytes lose their stored
metadata, and rendering those on request costs next to nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import zstandard

from kho.archive import keys
from kho.archive.part10 import Part10Layout
from kho.errors import IntegrityError

if TYPE_CHECKING:
    from kho.archive.archive import Deriver
    from kho.archive.config import Settings
    from kho.storage import ObjectStore


def default_derivers(settings: Settings) -> list[Deriver]:
    from kho.archive.dicomjson import metadata_deriver
    from kho.archive.rendering import thumbnail_deriver, tile_pyramid_deriver

    derivers: list[Deriver] = [metadata_deriver, thumbnail_deriver]
    if settings.tile_pyramid:
        derivers.append(tile_pyramid_deriver)
    return derivers


# --- compressed objects -----------------------------------------------------------------

#: the first bytes of a zstd frame (RFC 8878); DICOM JSON always starts with "{"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
#: zstd's strongest practical level costs about 1 ms for a typical 5 KB header; above this
#: size (waveforms, large structured reports) a faster level keeps the finisher moving
_STRONG_LEVEL_MAX = 1 << 20


def compress(blob: bytes | memoryview) -> bytes:
    """One zstd frame holding ``blob`` (its size written in the frame header)."""
    level = 19 if len(blob) <= _STRONG_LEVEL_MAX else 9
    return zstandard.ZstdCompressor(level=level, write_checksum=False).compress(blob)


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


# --- what an instance can afford ---------------------------------------------------------

#: an instance that arrived compressed may grow by this fraction for its derived objects
COMPRESSED_GROWTH = 0.03
DEFLATED_SYNTAXES = frozenset({"1.2.840.10008.1.2.1.99"})
#: derived objects in the order they are kept (a viewer's first requests: the series
#: metadata, then thumbnails, then tiles); other names come after, as made
PRIORITY = ("metadata", "thumbnail", "tiles")


def arrived_compressed(layout: Part10Layout) -> bool:
    """Encapsulated pixel data or a deflated dataset: nothing for kho to save on."""
    if layout.transfer_syntax_uid in DEFLATED_SYNTAXES:
        return True
    return layout.pixels is not None and layout.pixels.encapsulated


def allowance(received_size: int, compressed: bool) -> int:
    """The most an instance may occupy once finished, all its objects together."""
    if compressed:
        return received_size + int(received_size * COMPRESSED_GROWTH)
    return received_size


def fit_derived(made: dict[str, bytes], budget: int) -> dict[str, bytes]:
    """The derived objects to keep within ``budget`` bytes, in PRIORITY order; an object
    that does not fit is left out, or trimmed where it can be (the tile pyramid keeps the
    coarsest levels that fit)."""
    from kho.archive.rendering import TILES_OBJECT, trim_pyramid

    trimmers: dict[str, Callable[[bytes, int], bytes | None]] = {TILES_OBJECT: trim_pyramid}
    order = [n for n in PRIORITY if n in made] + [n for n in made if n not in PRIORITY]
    kept: dict[str, bytes] = {}
    left = budget
    for name in order:
        blob: bytes | None = made[name]
        if blob is not None and len(blob) > left:
            trim = trimmers.get(name)
            blob = trim(blob, left) if trim is not None and left > 0 else None
        if blob is not None and len(blob) <= left:
            kept[name] = blob
            left -= len(blob)
    return kept
