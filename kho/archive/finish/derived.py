"""The derived objects made at finishing (metadata, thumbnail, tiles) and the
budget that keeps them from outweighing what compression saves."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset

from kho.archive.dataset.attributes import InstanceAttributes
from kho.archive.dataset.part10 import DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, PIXEL_DATA, Part10Layout
from kho.archive.finish.images import thumbnail_deriver, tile_pyramid_deriver, trim_pyramid
from kho.archive.finish.pixels import EncodedPixels
from kho.archive.read import objects
from kho.archive.read.metadata import (
    METADATA_OBJECT,
    dataset_json,
    encode,
    full_header,
    pixel_vr,
)
from kho.archive.read.rendering import TILES_OBJECT

if TYPE_CHECKING:
    from kho.archive.config import Settings

#: a deriver makes named objects (metadata JSON, thumbnail, tiles) from a received instance
Deriver = Callable[
    [bytes, Part10Layout, Dataset, InstanceAttributes, EncodedPixels | None], dict[str, bytes]
]


def metadata_deriver(
    data: bytes,
    layout: Part10Layout,
    ds: Dataset,
    attrs: InstanceAttributes,
    encoded: EncodedPixels | None,
) -> dict[str, bytes]:
    """Deriver (kho.archive.finish.derived.Deriver): the instance's DICOM JSON document,
    compressed (see :func:`kho.archive.read.metadata.stored_document`)."""
    header = full_header(data, layout)
    pixel_tag = layout.pixels.tag if layout.pixels else PIXEL_DATA
    document = encode(dataset_json(header, pixel_vr(layout, attrs.bits_allocated), pixel_tag))
    return {METADATA_OBJECT: objects.compress(document)}


def default_derivers(settings: Settings) -> list[Deriver]:
    derivers: list[Deriver] = [metadata_deriver, thumbnail_deriver]
    if settings.tile_pyramid:
        derivers.append(tile_pyramid_deriver)
    return derivers


#: an instance that arrived compressed may grow by this fraction for its derived objects
COMPRESSED_GROWTH = 0.03


DEFLATED_SYNTAXES = frozenset({DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN})


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
