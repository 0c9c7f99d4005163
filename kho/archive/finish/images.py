"""Derived images made at finishing: the thumbnail and the JPEG tile pyramid
of large images (rendered with kho.archive.read.rendering)."""

from __future__ import annotations

import json
import math
from io import BytesIO
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from kho.archive.dataset.attributes import InstanceAttributes
from kho.archive.dataset.part10 import Part10Layout, dataset_encoding
from kho.archive.finish.pixels import EncodedPixels
from kho.archive.read.metadata import full_header
from kho.archive.read.rendering import (
    _PYRAMID_MAGIC,
    JPEG,
    THUMBNAIL_OBJECT,
    THUMBNAIL_SIZE,
    TILE_SIZE,
    TILES_OBJECT,
    _decoded,
    _pyramid_index,
    encode_image,
    params_from_dataset,
)
from kho.codecs import render as codec_render
from kho.codecs.render import RenderParams
from kho.errors import CodecError


def first_frame(data: bytes, layout: Part10Layout, attrs: InstanceAttributes) -> np.ndarray:
    """Frame 1 of an instance being ingested: a view of native data, or pydicom's decoders
    for compressed or odd layouts."""
    pixels = layout.pixels
    if pixels is None:
        raise CodecError("no pixel data")
    rows, cols = attrs.rows or 0, attrs.columns or 0
    spp, bits = attrs.samples_per_pixel or 1, attrs.bits_allocated or 0
    encoding = dataset_encoding(layout.transfer_syntax_uid)
    if not pixels.encapsulated and encoding is not None and bits in (8, 16, 32):
        count = rows * cols * spp
        if rows and cols and count * bits // 8 <= pixels.value_length:
            kind = "i" if attrs.pixel_representation == 1 else "u"
            dtype = np.dtype(f"{'<' if encoding[1] else '>'}{kind}{bits // 8}")
            flat = np.frombuffer(data, dtype=dtype, count=count, offset=pixels.value_offset)
            if spp == 1:
                return flat.reshape(rows, cols)
            if attrs.planar_configuration == 1:
                return flat.reshape(spp, rows, cols).transpose(1, 2, 0)
            return flat.reshape(rows, cols, spp)
    # the thumbnail and the tile pyramid derivers both need it: decode once per instance
    cached = getattr(_decoded, "entry", None)
    if cached is not None and cached[0] is data:
        decoded: np.ndarray = cached[1]
        return decoded
    from pydicom.pixels import pixel_array

    try:
        arr = pixel_array(BytesIO(data), index=0, raw=True)
    except Exception as exc:
        raise CodecError(f"cannot decode frame 1: {exc}") from exc
    decoded = np.asarray(arr)
    _decoded.entry = (data, decoded)
    return decoded


def thumbnail_deriver(
    data: bytes,
    layout: Part10Layout,
    ds: Dataset,
    attrs: InstanceAttributes,
    encoded: EncodedPixels | None,
) -> dict[str, bytes]:
    """Deriver (kho.archive.finish.derived.Deriver): a JPEG of frame 1 within 128x128 pixels.

    An image that cannot be decoded gets no thumbnail (it is rendered on request, or the
    request fails there with a clear error); ingest never fails for a thumbnail.  Nor does
    an image smaller than a thumbnail: its thumbnail would be the image itself, as large
    as its pixel data and as quick to render on request.
    """
    if layout.pixels is None:
        return {}
    if max(attrs.rows or 0, attrs.columns or 0) < THUMBNAIL_SIZE:
        return {}

    try:
        frame = first_frame(data, layout, attrs)
        params = params_from_dataset(full_header(data, layout))
        img = codec_render.thumbnail(frame, params, THUMBNAIL_SIZE)
        return {THUMBNAIL_OBJECT: encode_image(img, JPEG, 85)}
    except Exception:  # a thumbnail is a convenience, never a reason to refuse an image
        return {}


#: frames with a side longer than this get a stored pyramid (DESIGN.md: "about 1024")
PYRAMID_MIN_SIDE = 1024


PYRAMID_QUALITY = 90


def encode_pyramid(values: np.ndarray, params: RenderParams) -> bytes:
    """Every tile of every level as JPEG, in one object (see :func:`pack_pyramid`)."""
    rows, cols = values.shape[:2]
    shape: list[list[int]] = []
    tiles: list[bytes] = []
    for level, (level_rows, level_cols) in enumerate(
        codec_render.tile_pyramid_levels(rows, cols, TILE_SIZE)
    ):
        across, down = math.ceil(level_cols / TILE_SIZE), math.ceil(level_rows / TILE_SIZE)
        shape.append([across, down])
        for y in range(down):
            for x in range(across):
                piece = codec_render.render_tile(values, params, level, x, y, TILE_SIZE)
                tiles.append(encode_image(piece, JPEG, PYRAMID_QUALITY))
    return pack_pyramid(shape, 0, tiles)


def pack_pyramid(shape: list[list[int]], first: int, tiles: list[bytes]) -> bytes:
    """The stored pyramid: a 20-byte head (magic, u64 offset and u32 length of the index),
    the tiles of levels ``first`` and up, then the index (JSON: tiles across and down of
    every level, the first level stored, and [offset, length] of each stored tile, level by
    level, row-major).  Levels below ``first`` are rendered on request."""
    pos = len(_PYRAMID_MAGIC) + 12
    offsets: list[list[int]] = []
    for tile in tiles:
        offsets.append([pos, len(tile)])
        pos += len(tile)
    index: dict[str, Any] = {"levels": shape, "tiles": offsets}
    if first:  # absent in pyramids written before levels could be left out: 0
        index["first"] = first
    encoded = json.dumps(index, separators=(",", ":")).encode()
    head = (_PYRAMID_MAGIC, pos.to_bytes(8, "little"), len(encoded).to_bytes(4, "little"))
    return b"".join((*head, *tiles, encoded))


def trim_pyramid(blob: bytes, max_bytes: int) -> bytes | None:
    """The pyramid without its finest levels, down to the coarsest levels that fit in
    ``max_bytes`` (the finest level holds about three quarters of the bytes and is the
    quickest to render on request); None if not even the coarsest level fits."""
    index = _pyramid_index(blob)
    if index is None:
        return None
    shape: list[list[int]] = index["levels"]
    first = int(index.get("first", 0))
    tiles = [blob[o : o + n] for o, n in index["tiles"]]
    while first < len(shape):
        packed = pack_pyramid(shape, first, tiles)
        if len(packed) <= max_bytes:
            return packed
        across, down = shape[first]
        tiles = tiles[across * down :]
        first += 1
    return None


def tile_pyramid_deriver(
    data: bytes,
    layout: Part10Layout,
    ds: Dataset,
    attrs: InstanceAttributes,
    encoded: EncodedPixels | None,
) -> dict[str, bytes]:
    """Deriver: the stored tile pyramid of frame 1 of a large single-frame image."""
    rows, cols = attrs.rows or 0, attrs.columns or 0
    if layout.pixels is None or max(rows, cols) <= PYRAMID_MIN_SIDE or attrs.number_of_frames != 1:
        return {}

    try:
        values = first_frame(data, layout, attrs)
        params = params_from_dataset(full_header(data, layout))
        return {TILES_OBJECT: encode_pyramid(values, params)}
    except Exception:  # a convenience, as the thumbnail: tiles are then rendered on request
        return {}
