"""At-rest encoding of pixel data: frames located in the received value
(native or encapsulated) and native frames encoded with the lossless at-rest codec
(JPEG-LS) where that is exactly reversible."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from kho.archive.dataset.attributes import InstanceAttributes
from kho.archive.dataset.part10 import (
    ITEM,
    SEQUENCE_DELIMITER,
    Part10Layout,
)
from kho.archive.read.pixels import (
    _at_rest_codec,
    _frames_array,
    _pool,
    _sign_extend,
    is_little_endian,
)
from kho.errors import CodecError, IntegrityError, InvalidDicomError

FrameIndex = list[list[list[int]]]


@dataclass(frozen=True, slots=True)
class EncodedPixels:
    pixel_format: str
    payload: bytes | memoryview
    frame_index: FrameIndex


class NativeEncoder(Protocol):
    """What encoding uses of the archive (kho.archive.finish.source.FinishingArchive is
    one): whether the at-rest codec is on, and a hook that may encode first."""

    at_rest_codec: bool

    def encode_native(
        self, value: bytes, layout: Part10Layout, attrs: InstanceAttributes
    ) -> EncodedPixels | None: ...


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
    table = [struct.unpack_from("<I", value, bot_offset + 4 * i)[0] for i in range(bot_length // 4)]
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
    archive: NativeEncoder,
    data: bytes,
    layout: Part10Layout,
    attrs: InstanceAttributes,
    *,
    use_codec: bool = True,
) -> EncodedPixels:
    """The pixel object for an instance's pixel value (see the module docstring);
    ``use_codec=False``: native data stays as received (a finisher encodes it later)."""
    pixels = layout.pixels
    assert pixels is not None
    if not use_codec:  # a view: the caller stores the received bytes whole, not this value
        view = memoryview(data)[pixels.value_offset : pixels.value_offset + pixels.value_length]
        if pixels.encapsulated:
            index = encapsulated_frame_index(view, attrs.number_of_frames)
            return EncodedPixels("encapsulated", view, index)
        return EncodedPixels("raw", view, native_frame_index(len(view), attrs))
    value = data[pixels.value_offset : pixels.value_offset + pixels.value_length]
    if pixels.encapsulated:
        return EncodedPixels(
            "encapsulated", value, encapsulated_frame_index(value, attrs.number_of_frames)
        )
    encoded = archive.encode_native(value, layout, attrs)
    if encoded is None and archive.at_rest_codec and not _ow_bytes_swapped(data, layout, attrs):
        encoded = encode_at_rest(value, layout.transfer_syntax_uid, attrs)
    if encoded is not None:
        return encoded
    return EncodedPixels("raw", value, native_frame_index(len(value), attrs))


def _ow_bytes_swapped(data: bytes, layout: Part10Layout, attrs: InstanceAttributes) -> bool:
    """8-bit big endian OW pixel data: kept raw, since the at-rest codec would encode the
    word-swapped bytes (not the image) and decoded frames would come back scrambled."""
    pixels = layout.pixels
    if pixels is None or pixels.encapsulated or attrs.bits_allocated != 8:
        return False
    if is_little_endian(layout.transfer_syntax_uid):
        return False
    return data[pixels.value_offset - 8 : pixels.value_offset - 6] == b"OW"


def encode_at_rest(
    value: bytes, transfer_syntax_uid: str, attrs: InstanceAttributes, *, verify: bool = True
) -> EncodedPixels | None:
    """Native pixel data as JPEG-LS frames, or None where JPEG-LS cannot hold it exactly.

    JPEG-LS holds Bits Stored bits per sample.  Unsigned data must have every bit above
    Bits Stored clear; signed data must have them equal to the sign bit (two's complement
    sign extension), which decoding restores.  Anything else (overlay bits in the high bits,
    odd layouts, 32-bit, YBR 4:2:2) stays raw: never altered.
    """
    bits_allocated = attrs.bits_allocated or 0
    bits_stored = attrs.bits_stored or bits_allocated
    spp = attrs.samples_per_pixel or 1
    frame_length = native_frame_length(attrs)
    frames = attrs.number_of_frames
    if (
        bits_allocated not in (8, 16)
        or not 2 <= bits_stored <= bits_allocated
        or spp not in (1, 3)
        or frame_length is None
        or frame_length * frames != len(value)
        or (
            attrs.photometric_interpretation.startswith("YBR")
            and "422" in attrs.photometric_interpretation
        )
    ):
        return None
    codec = _at_rest_codec("jpeg-ls")
    if codec is None:
        return None
    little = is_little_endian(transfer_syntax_uid)
    stack = _frames_array(value, attrs, little, frames)
    mask = (1 << bits_stored) - 1
    masked = (stack & mask).astype(np.uint8 if bits_allocated == 8 else np.uint16)
    if attrs.pixel_representation == 1 and bits_stored < bits_allocated:
        if not np.array_equal(
            _sign_extend(masked, bits_stored, bits_allocated), stack.astype(masked.dtype)
        ):
            return None
    elif bits_stored < bits_allocated and not np.array_equal(masked, stack):
        return None

    def encode_one(i: int) -> bytes:
        frame = np.ascontiguousarray(masked[i])
        stream: bytes = codec.encode(frame, bits_stored=bits_stored)
        if verify:
            back = codec.decode(stream)
            if not np.array_equal(back.reshape(frame.shape), frame):
                raise IntegrityError("at-rest codec round trip differs; keeping raw")
        return stream

    try:
        streams = [encode_one(0)] if frames == 1 else list(_pool().map(encode_one, range(frames)))
    except (IntegrityError, CodecError):
        return None
    total = sum(len(s) for s in streams)
    if total >= len(value):
        return None  # incompressible (noise): raw is smaller and faster to serve
    index: FrameIndex = []
    offset = 0
    for stream in streams:
        index.append([[offset, len(stream)]])
        offset += len(stream)
    return EncodedPixels("jpeg-ls", b"".join(streams), index)
