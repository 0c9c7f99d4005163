"""Pixel data at rest: how a received pixel value becomes the pixel object, and back.

Formats (``instances.pixel_format``):
- ``raw``: a native pixel value exactly as received (also the fallback when the at-rest
  codec cannot represent it exactly);
- ``encapsulated``: compressed fragments exactly as received (item tags, offset table and
  delimiter included), so they go back out untouched;
- a codec name (e.g. ``jpeg-ls``): native frames encoded one by one and concatenated.
The frame index lists, per frame, the ``[offset, length]`` of its fragments in the pixel
object, so a viewer's frame request is one ranged read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kho.archive.attributes import InstanceAttributes
from kho.archive.part10 import ITEM, SEQUENCE_DELIMITER, Part10Layout, dataset_encoding
from kho.errors import InvalidDicomError

if TYPE_CHECKING:
    from kho.archive.archive import Archive
    from kho.archive.catalog import InstanceRecord

FrameIndex = list[list[list[int]]]


@dataclass(frozen=True, slots=True)
class EncodedPixels:
    pixel_format: str
    payload: bytes
    frame_index: FrameIndex


def native_frame_length(attrs: InstanceAttributes) -> int | None:
    """Bytes of one native frame, or None when frames are not byte-aligned / unknown."""
    if not (attrs.rows and attrs.columns and attrs.bits_allocated):
        return None
    bits = attrs.rows * attrs.columns * (attrs.samples_per_pixel or 1) * attrs.bits_allocated
    return bits // 8 if bits % 8 == 0 else None


def native_frame_index(value_length: int, attrs: InstanceAttributes) -> FrameIndex:
    frame_length = native_frame_length(attrs)
    frames = attrs.number_of_frames
    if frame_length is None or frame_length * frames > value_length:
        return [[[0, value_length]]]
    return [[[i * frame_length, frame_length]] for i in range(frames)]


def encapsulated_fragments(value: bytes | memoryview) -> tuple[list[int], list[list[int]]]:
    """(Basic Offset Table entries, fragments as [offset, length]) of an encapsulated value.

    Offsets are relative to the start of the value; a fragment's offset is its data's.
    """
    pos, end = 0, len(value)
    items: list[list[int]] = []
    while pos + 8 <= end:
        group, element, length = struct.unpack_from("<HHI", value, pos)
        tag = (group << 16) | element
        if tag == SEQUENCE_DELIMITER:
            break
        if tag != ITEM or pos + 8 + length > end:
            raise InvalidDicomError("malformed encapsulated pixel data")
        items.append([pos + 8, length])
        pos += 8 + length
    if not items:
        raise InvalidDicomError("encapsulated pixel data has no Basic Offset Table item")
    bot_offset, bot_length = items[0]
    table = [
        struct.unpack_from("<I", value, bot_offset + 4 * i)[0] for i in range(bot_length // 4)
    ]
    return table, items[1:]


def encapsulated_frame_index(value: bytes | memoryview, frames: int) -> FrameIndex:
    """Group fragments into frames: one frame, one fragment per frame, the offset table, or
    (JPEG family) the end-of-image marker, in that order."""
    table, fragments = encapsulated_fragments(value)
    if not fragments:
        return []
    if frames <= 1:
        return [fragments]
    if len(fragments) == frames:
        return [[f] for f in fragments]
    first_item = fragments[0][0] - 8
    if len(table) == frames:
        starts = [first_item + t for t in table]
        grouped: FrameIndex = []
        for i, start in enumerate(starts):
            stop = starts[i + 1] if i + 1 < len(starts) else len(value) + 1
            grouped.append([f for f in fragments if start <= f[0] - 8 < stop])
        if all(grouped):
            return grouped
    grouped, current = [], []
    for frag in fragments:
        current.append(frag)
        end = frag[0] + frag[1]
        # a JPEG frame ends with EOI (FFD9), possibly followed by one padding byte
        tail = bytes(value[max(frag[0], end - 3) : end])
        if tail.endswith(b"\xff\xd9") or tail[:2] == b"\xff\xd9":
            grouped.append(current)
            current = []
    if current:
        grouped.append(current)
    return grouped


def encode_pixels(
    archive: Archive, data: bytes, layout: Part10Layout, attrs: InstanceAttributes
) -> EncodedPixels:
    """The pixel object for an instance's pixel value (see the module docstring)."""
    pixels = layout.pixels
    assert pixels is not None
    value = data[pixels.value_offset : pixels.value_offset + pixels.value_length]
    if pixels.encapsulated:
        return EncodedPixels(
            "encapsulated", value, encapsulated_frame_index(value, attrs.number_of_frames)
        )
    encoded = archive.encode_native(value, layout, attrs)
    if encoded is not None:
        return encoded
    return EncodedPixels("raw", value, native_frame_index(len(value), attrs))


def is_little_endian(transfer_syntax_uid: str) -> bool:
    encoding = dataset_encoding(transfer_syntax_uid)
    return encoding is None or encoding[1]


def pixel_value(archive: Archive, record: InstanceRecord, payload: bytes) -> bytes:
    """The pixel value exactly as received, from the stored pixel object."""
    if record.pixel_format in ("raw", "encapsulated"):
        return payload
    return archive.decode_native(record, payload)
