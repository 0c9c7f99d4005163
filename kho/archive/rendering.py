"""Rendered images for viewers: thumbnails made at ingest, rendered frames and tiles on request.

Display pipeline (PS3.18 8.3.5 "rendered"): modality LUT (rescale slope/intercept), VOI
window (from the request, else the header's first window, else the frame's min/max),
MONOCHROME1 inversion, YBR_FULL -> RGB, then 8-bit.  Resizing happens on modality values
first (box filter for integer factors, then nearest sampling), so a thumbnail of a large
radiograph windows 16 K pixels, not 7.5 M.

Images are encoded with imagecodecs (libjpeg-turbo / zlib), already a dependency; Pillow
is not needed.

Tiles (``frames/{f}/tiles/{level}/{x}/{y}``): level 0 is full resolution and level L is
downsampled by 2**L, up to the level where the frame fits one tile.  They are rendered on
request from the decoded frame; the display image of each level is cached in memory
(:class:`RenderCache`), so neighbouring tiles cost a slice and a JPEG encode.  No tile
pyramid is written at ingest.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from io import BytesIO
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset

from kho.archive.attributes import InstanceAttributes
from kho.archive.part10 import Part10Layout, dataset_encoding
from kho.archive.pixels import EncodedPixels
from kho.errors import CodecError, QueryError

if TYPE_CHECKING:
    from kho.archive.archive import Archive
    from kho.archive.catalog import InstanceRecord

THUMBNAIL_OBJECT = "thumbnail"
THUMBNAIL_SIZE = 128
TILE_SIZE = 256
JPEG = "image/jpeg"
PNG = "image/png"
VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


@dataclass(frozen=True, slots=True)
class Display:
    """How an instance's stored values map to display values."""

    photometric: str = "MONOCHROME2"
    slope: float = 1.0
    intercept: float = 0.0
    center: float | None = None
    width: float | None = None
    function: str = "LINEAR"

    def with_window(self, center: float, width: float, function: str = "LINEAR") -> Display:
        return replace(self, center=center, width=width, function=function)


def _first_number(value: Any) -> float | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def display_from_json(meta: dict[str, Any]) -> Display:
    """Display parameters from an instance's DICOM JSON document."""

    def value(tag: str) -> Any:
        elem = meta.get(tag) or {}
        values = elem.get("Value")
        return values[0] if values else None

    function = str(value("00281056") or "LINEAR").upper()
    width = _first_number(value("00281051"))
    return Display(
        photometric=str(value("00280004") or "MONOCHROME2").strip().upper(),
        slope=_first_number(value("00281053")) or 1.0,
        intercept=_first_number(value("00281052")) or 0.0,
        center=_first_number(value("00281050")),
        width=width if width and width > 0 else None,
        function=function if function in VOI_FUNCTIONS else "LINEAR",
    )


def display_from_dataset(ds: Dataset) -> Display:
    def get(keyword: str) -> Any:
        try:
            return ds.get(keyword)
        except Exception:
            return None

    width = _first_number(get("WindowWidth"))
    function = str(get("VOILUTFunction") or "LINEAR").upper()
    return Display(
        photometric=str(get("PhotometricInterpretation") or "MONOCHROME2").strip().upper(),
        slope=_first_number(get("RescaleSlope")) or 1.0,
        intercept=_first_number(get("RescaleIntercept")) or 0.0,
        center=_first_number(get("WindowCenter")),
        width=width if width and width > 0 else None,
        function=function if function in VOI_FUNCTIONS else "LINEAR",
    )


def parse_window(text: str | None) -> tuple[float, float, str] | None:
    """``window=center,width[,function]`` (PS3.18 8.3.5.1.4); QueryError if malformed."""
    if not text:
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        center, width = float(parts[0]), float(parts[1])
    except (IndexError, ValueError):
        raise QueryError(f"window must be 'center,width[,function]', not {text!r}") from None
    function = parts[2].upper() if len(parts) > 2 and parts[2] else "LINEAR"
    if width <= 0 or function not in VOI_FUNCTIONS or len(parts) > 3:
        raise QueryError(f"bad window {text!r}: width > 0, function one of {VOI_FUNCTIONS}")
    return center, width, function


@dataclass(frozen=True, slots=True)
class Viewport:
    """``viewport=vw,vh[,sx,sy,sw,sh]``: output size and an optional source region."""

    width: int
    height: int
    region: tuple[int, int, int, int] | None = None  # sx, sy, sw, sh


def parse_viewport(text: str | None) -> Viewport | None:
    if not text:
        return None
    try:
        numbers = [int(float(p)) for p in text.split(",") if p.strip() != ""]
    except ValueError:
        raise QueryError(f"viewport must be numbers, not {text!r}") from None
    if len(numbers) not in (2, 6) or numbers[0] <= 0 or numbers[1] <= 0:
        raise QueryError("viewport must be 'vw,vh' or 'vw,vh,sx,sy,sw,sh' with vw, vh > 0")
    if numbers[0] > 8192 or numbers[1] > 8192:
        raise QueryError("viewport larger than 8192 pixels")
    region = None
    if len(numbers) == 6:
        sx, sy, sw, sh = numbers[2:]
        if sx < 0 or sy < 0 or sw <= 0 or sh <= 0:
            raise QueryError("viewport region must have sx, sy >= 0 and sw, sh > 0")
        region = (sx, sy, sw, sh)
    return Viewport(numbers[0], numbers[1], region)


def fit(rows: int, cols: int, max_rows: int, max_cols: int) -> tuple[int, int]:
    """The largest size within (max_rows, max_cols) with the aspect ratio of (rows, cols)."""
    scale = min(max_rows / rows, max_cols / cols)
    return max(1, round(rows * scale)), max(1, round(cols * scale))


def resize(values: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Resize (float32 out): box average by the integer factor, then nearest sampling."""
    src_rows, src_cols = values.shape[:2]
    if (src_rows, src_cols) == (rows, cols):
        return values.astype(np.float32, copy=False)
    factor = max(1, min(src_rows // rows, src_cols // cols))
    out = values
    if factor > 1:
        h, w = src_rows // factor * factor, src_cols // factor * factor
        shape = (h // factor, factor, w // factor, factor, *values.shape[2:])
        out = values[:h, :w].reshape(shape).mean(axis=(1, 3), dtype=np.float32)
    row_index = (np.arange(rows) * (out.shape[0] / rows)).astype(np.intp)
    col_index = (np.arange(cols) * (out.shape[1] / cols)).astype(np.intp)
    return np.asarray(out[row_index][:, col_index], dtype=np.float32)


def to_display(values: np.ndarray, display: Display) -> np.ndarray:
    """Stored values (any dtype) -> uint8 display image, (rows, cols) or (rows, cols, 3)."""
    if values.ndim == 3:
        return _colour(values, display.photometric)
    data = values.astype(np.float32, copy=False)
    if display.slope != 1.0 or display.intercept != 0.0:
        data = data * np.float32(display.slope) + np.float32(display.intercept)
    if display.center is not None and display.width is not None:
        center, width = display.center, display.width
    else:
        low, high = (float(data.min()), float(data.max())) if data.size else (0.0, 1.0)
        center, width = (low + high) / 2, max(high - low, 1.0)
    if display.function == "SIGMOID":
        out = 255.0 / (1.0 + np.exp(-4.0 * (data - center) / width))
    elif display.function == "LINEAR_EXACT":
        out = (data - (center - width / 2)) * (255.0 / width)
    else:  # PS3.3 C.11.2.1.2.1
        out = ((data - (center - 0.5)) / max(width - 1, 1.0) + 0.5) * 255.0
    img = np.clip(out, 0, 255).astype(np.uint8)
    if display.photometric == "MONOCHROME1":
        img = np.subtract(255, img, dtype=np.uint8)
    return img


def _colour(values: np.ndarray, photometric: str) -> np.ndarray:
    data = values[..., :3]
    if data.dtype != np.uint8:
        peak = float(data.max()) if data.size else 1.0
        data = data.astype(np.float32) * (255.0 / max(peak, 1.0))
    if photometric.startswith("YBR_FULL"):
        y, cb, cr = (data[..., i].astype(np.float32) for i in range(3))
        rgb = np.stack(
            (
                y + 1.402 * (cr - 128),
                y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                y + 1.772 * (cb - 128),
            ),
            axis=-1,
        )
        return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    return np.clip(data, 0, 255).astype(np.uint8)


def encode_image(img: np.ndarray, media_type: str = JPEG, quality: int = 90) -> bytes:
    import imagecodecs

    img = np.ascontiguousarray(img)
    if media_type == PNG:
        return bytes(imagecodecs.png_encode(img))
    return bytes(imagecodecs.jpeg8_encode(img, level=int(quality)))


def render(
    values: np.ndarray,
    display: Display,
    *,
    viewport: Viewport | None = None,
    max_size: int | None = None,
) -> np.ndarray:
    """Decoded frame -> display image, cropped/resized per viewport or to ``max_size``."""
    rows, cols = values.shape[:2]
    if viewport is not None and viewport.region is not None:
        sx, sy, sw, sh = viewport.region
        if sx >= cols or sy >= rows:
            raise QueryError("viewport region lies outside the image")
        values = values[sy : min(rows, sy + sh), sx : min(cols, sx + sw)]
        rows, cols = values.shape[:2]
    out_rows, out_cols = rows, cols
    if viewport is not None:
        out_rows, out_cols = fit(rows, cols, viewport.height, viewport.width)
    elif max_size is not None and max(rows, cols) > max_size:
        out_rows, out_cols = fit(rows, cols, max_size, max_size)
    return to_display(resize(values, out_rows, out_cols), display)


# --- tiles ------------------------------------------------------------------------------


def tile_levels(rows: int, cols: int, tile: int = TILE_SIZE) -> int:
    """How many levels the pyramid has (level 0 full size; the last fits one tile)."""
    longest = max(rows, cols, 1)
    return max(1, math.ceil(math.log2(longest / tile)) + 1) if longest > tile else 1


def level_shape(rows: int, cols: int, level: int) -> tuple[int, int]:
    factor = 1 << level
    return max(1, rows // factor), max(1, cols // factor)


class RenderCache:
    """Display images of recently viewed frames per pyramid level, bounded in bytes."""

    def __init__(self, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, ...]) -> np.ndarray | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def get_or_make(self, key: tuple[Any, ...], make: Callable[[], np.ndarray]) -> np.ndarray:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                return found
        made = make()
        with self._lock:
            if key not in self._items:
                self._items[key] = made
                self._bytes += made.nbytes
                while self._bytes > self.max_bytes and len(self._items) > 1:
                    _old, evicted = self._items.popitem(last=False)
                    self._bytes -= evicted.nbytes
        return made


def level_image(values: np.ndarray, display: Display, level: int) -> np.ndarray:
    rows, cols = values.shape[:2]
    out_rows, out_cols = level_shape(rows, cols, level)
    return to_display(resize(values, out_rows, out_cols), display)


def cut_tile(level_img: np.ndarray, x: int, y: int, tile: int = TILE_SIZE) -> np.ndarray:
    rows, cols = level_img.shape[:2]
    if x < 0 or y < 0 or x * tile >= cols or y * tile >= rows:
        raise IndexError(f"tile ({x}, {y}) outside the level ({cols}x{rows})")
    return level_img[y * tile : (y + 1) * tile, x * tile : (x + 1) * tile]


# --- the thumbnail deriver --------------------------------------------------------------


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
    from pydicom.pixels import pixel_array

    try:
        arr = pixel_array(BytesIO(data), index=0, raw=True)
    except Exception as exc:
        raise CodecError(f"cannot decode frame 1: {exc}") from exc
    return np.asarray(arr)


def thumbnail_deriver(
    data: bytes,
    layout: Part10Layout,
    ds: Dataset,
    attrs: InstanceAttributes,
    encoded: EncodedPixels | None,
) -> dict[str, bytes]:
    """Deriver (kho.archive.archive.Deriver): a JPEG of frame 1 within 128x128 pixels.

    An image that cannot be decoded gets no thumbnail (it is rendered on request, or the
    request fails there with a clear error); ingest never fails for a thumbnail.
    """
    if layout.pixels is None:
        return {}
    from kho.archive.dicomjson import full_header

    try:
        frame = first_frame(data, layout, attrs)
        display = display_from_dataset(full_header(data, layout))
        img = render(frame, display, max_size=THUMBNAIL_SIZE)
        return {THUMBNAIL_OBJECT: encode_image(img, JPEG, 85)}
    except Exception:  # a thumbnail is a convenience, never a reason to refuse an image
        return {}


def stored_thumbnail(archive: Archive, record: InstanceRecord) -> bytes | None:
    """The JPEG thumbnail made at ingest, or None if there is none."""
    key = record.derived_keys.get(THUMBNAIL_OBJECT)
    return archive.store.get(key) if key else None
