"""Rendered images (/rendered, /thumbnail, tiles): render parameters from
headers and requests, the numba render kernels (kho.codecs.render), JPEG/PNG encoding, and
the stored thumbnail and tile levels read back."""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset

from kho.codecs import render as codec_render
from kho.codecs.render import Lut, RenderParams
from kho.errors import CodecError, QueryError

if TYPE_CHECKING:
    from kho.archive.catalog import InstanceRecord
    from kho.archive.read.source import StoredArchive


THUMBNAIL_OBJECT = "thumbnail"


THUMBNAIL_SIZE = 128


TILE_SIZE = 256


JPEG = "image/jpeg"


PNG = "image/png"


VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


def _first_number(value: Any) -> float | None:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _window(center: float | None, width: float | None, function: str) -> dict[str, Any]:
    """Header window values the renderer accepts (a width too small is dropped)."""
    function = function if function in VOI_FUNCTIONS else "LINEAR"
    minimum = 1.0 if function == "LINEAR" else 0.0
    if center is None or width is None or width < minimum or width <= 0:
        return {"voi_function": function}
    return {"window_center": center, "window_width": width, "voi_function": function}


#: attributes whose values (LUT tables) the JSON document may hold only as bulk data
_NEEDS_HEADER = ("00281201", "00281202", "00281203", "00283000", "00283010")


def needs_header(meta: dict[str, Any]) -> bool:
    """Palettes and LUT tables are read from the header, not the JSON document."""
    return any(tag in meta for tag in _NEEDS_HEADER)


def params_from_json(meta: dict[str, Any]) -> RenderParams:
    """Render parameters from an instance's DICOM JSON (no LUT tables: see needs_header)."""

    def value(tag: str) -> Any:
        values = (meta.get(tag) or {}).get("Value")
        return values[0] if values else None

    bits = value("00280101")
    return RenderParams(
        photometric_interpretation=str(value("00280004") or "MONOCHROME2"),
        bits_stored=int(bits) if isinstance(bits, (int, float)) and 1 <= bits <= 32 else None,
        pixel_representation=1 if value("00280103") == 1 else 0,
        rescale_slope=_first_number(value("00281053")) or 1.0,
        rescale_intercept=_first_number(value("00281052")) or 0.0,
        **_window(
            _first_number(value("00281050")),
            _first_number(value("00281051")),
            str(value("00281056") or "LINEAR").strip().upper(),
        ),
    )


def _lut(descriptor: Any, data: Any, little: bool = True) -> Lut | None:
    try:
        desc = tuple(int(v) for v in descriptor)
        if isinstance(data, bytes):
            table = np.frombuffer(data, dtype="<u2" if little else ">u2")
        else:
            table = np.asarray(data if isinstance(data, (list, tuple)) else [data])
        return Lut((desc[0], desc[1], desc[2]), table)
    except Exception:  # a broken table is rendered without it, not refused
        return None


def params_from_dataset(ds: Dataset) -> RenderParams:
    """Render parameters from a parsed header, LUT tables and palettes included."""

    def get(keyword: str) -> Any:
        try:
            return ds.get(keyword)
        except Exception:
            return None

    photometric = str(get("PhotometricInterpretation") or "MONOCHROME2").strip().upper()
    bits = get("BitsStored")
    extra: dict[str, Any] = {}
    modality = get("ModalityLUTSequence")
    if modality:
        extra["modality_lut"] = _lut(modality[0].get("LUTDescriptor"), modality[0].get("LUTData"))
    voi = get("VOILUTSequence")
    if voi:
        extra["voi_lut"] = _lut(voi[0].get("LUTDescriptor"), voi[0].get("LUTData"))
    if photometric == "PALETTE COLOR":
        luts = [
            _lut(
                get(f"{c}PaletteColorLookupTableDescriptor"), get(f"{c}PaletteColorLookupTableData")
            )
            for c in ("Red", "Green", "Blue")
        ]
        if all(luts):
            extra["palette"] = tuple(luts)
        else:  # no usable palette (segmented palettes): show the indices as grey
            photometric = "MONOCHROME2"
    return RenderParams(
        photometric_interpretation=photometric,
        bits_stored=int(bits) if isinstance(bits, int) and 1 <= bits <= 32 else None,
        pixel_representation=1 if get("PixelRepresentation") == 1 else 0,
        rescale_slope=_first_number(get("RescaleSlope")) or 1.0,
        rescale_intercept=_first_number(get("RescaleIntercept")) or 0.0,
        **{k: v for k, v in extra.items() if v is not None},
        **_window(
            _first_number(get("WindowCenter")),
            _first_number(get("WindowWidth")),
            str(get("VOILUTFunction") or "LINEAR").strip().upper(),
        ),
    )


def with_window(params: RenderParams, window: tuple[float, float, str] | None) -> RenderParams:
    if window is None:
        return params
    center, width, function = window
    return replace(params, window_center=center, window_width=width, voi_function=function)


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


def encode_image(img: np.ndarray, media_type: str = JPEG, quality: int = 90) -> bytes:
    import imagecodecs

    img = np.ascontiguousarray(img)
    if media_type == PNG:
        return bytes(imagecodecs.png_encode(img))
    return bytes(imagecodecs.jpeg8_encode(img, level=int(quality)))


def render(
    values: np.ndarray,
    params: RenderParams,
    *,
    viewport: Viewport | None = None,
    max_size: int | None = None,
) -> np.ndarray:
    """Decoded frame -> display image (kho.codecs.render), cropped and resized per
    viewport (aspect kept within vw x vh) or to fit ``max_size``."""
    if viewport is None and max_size is not None:
        return codec_render.thumbnail(values, params, max_size)
    rows, cols = values.shape[:2]
    region = None
    if viewport is not None and viewport.region is not None:
        sx, sy, sw, sh = viewport.region
        if sx >= cols or sy >= rows:
            raise QueryError("viewport region lies outside the image")
        sw, sh = min(sw, cols - sx), min(sh, rows - sy)
        region, rows, cols = (sx, sy, sw, sh), sh, sw
    out_size = fit(rows, cols, viewport.height, viewport.width) if viewport else None
    return codec_render.render_frame(values, params, region=region, out_size=out_size)


def stored_level_image(
    archive: StoredArchive, record: InstanceRecord, viewport: Viewport
) -> np.ndarray | None:
    """Frame 1 at the instance's own window for a small viewport, made from the rendered
    levels the finisher stored (the thumbnail, a level of the tile pyramid) instead of the
    decoded frame: the coarsest stored level at least as fine as the output over the
    viewport's region is cut and area-averaged to the output size.  None where no stored
    level serves (none stored, or only full resolution would: the frame is then decoded
    and rendered exactly).  The caller checks that the request asks for frame 1 as a JPEG
    with no window of its own.  A 256-pixel view of a 3000x2500 radiograph costs four
    256x256 JPEG tiles decoded instead of 7.5 million samples."""
    rows, cols = int(record.rows_ or 0), int(record.columns_ or 0)
    if rows < 1 or cols < 1:
        return None
    sx, sy, sw, sh = 0, 0, cols, rows
    if viewport.region is not None:
        sx, sy, sw, sh = viewport.region
        if sx >= cols or sy >= rows:
            return None  # render() says what is wrong with it
        sw, sh = min(sw, cols - sx), min(sh, rows - sy)
    out_rows, out_cols = fit(sh, sw, viewport.height, viewport.width)

    def fine_enough(level_rows: int, level_cols: int) -> bool:
        return level_rows * sh >= out_rows * rows and level_cols * sw >= out_cols * cols

    region = (sx, sy, sw, sh)
    derived = record.derived_keys
    if THUMBNAIL_OBJECT in derived:
        small = codec_render.fit_size(rows, cols, THUMBNAIL_SIZE, THUMBNAIL_SIZE)
        if small != (rows, cols) and fine_enough(*small):
            data = stored_thumbnail(archive, record)
            image = _decode_jpeg(data) if data is not None else None
            if image is not None and fine_enough(image.shape[0], image.shape[1]):
                level_size = (image.shape[0], image.shape[1])
                return _cut_level(image, (0, 0), level_size, record, region, (out_rows, out_cols))
    if TILES_OBJECT not in derived:
        return None
    levels = codec_render.tile_pyramid_levels(rows, cols, TILE_SIZE)
    for level in range(len(levels) - 1, 0, -1):  # coarsest first; level 0 is the frame
        if fine_enough(*levels[level]):
            found = _pyramid_region(archive, record, level, levels[level], region)
            if found is None:  # not stored: the finer levels are not either
                return None
            image, origin = found
            return _cut_level(image, origin, levels[level], record, region, (out_rows, out_cols))
    return None


def _decode_jpeg(data: bytes) -> np.ndarray:
    import imagecodecs

    image: np.ndarray = imagecodecs.jpeg8_decode(data)
    return image


def _level_window(
    record: InstanceRecord, level_size: tuple[int, int], region: tuple[int, int, int, int]
) -> tuple[float, float, float, float]:
    """The frame's ``region`` (x, y, width, height) in the pixels of a level of that size."""
    fy = level_size[0] / int(record.rows_ or 1)
    fx = level_size[1] / int(record.columns_ or 1)
    sx, sy, sw, sh = region
    return sx * fx, sy * fy, sw * fx, sh * fy


def _cut_level(
    image: np.ndarray,
    origin: tuple[int, int],
    level_size: tuple[int, int],
    record: InstanceRecord,
    region: tuple[int, int, int, int],
    out_size: tuple[int, int],
) -> np.ndarray:
    """``region`` of the frame, area-averaged to ``out_size`` from ``image``: the pixels of
    a rendered level of ``level_size`` from level pixel ``origin`` (x, y) on."""
    x, y, width, height = _level_window(record, level_size, region)
    window = (x - origin[0], y - origin[1], width, height)
    return codec_render.resize_display(image, window, out_size)


def _pyramid_region(
    archive: StoredArchive,
    record: InstanceRecord,
    level: int,
    level_size: tuple[int, int],
    region: tuple[int, int, int, int],
) -> tuple[np.ndarray, tuple[int, int]] | None:
    """The stored tiles of ``level`` under the frame's ``region``, joined, and the level
    pixel (x, y) where they start; None if the level is not stored."""
    x, y, width, height = _level_window(record, level_size, region)
    last_x = min(math.ceil(x + width), level_size[1]) - 1
    last_y = min(math.ceil(y + height), level_size[0]) - 1
    across = range(int(x) // TILE_SIZE, last_x // TILE_SIZE + 1)
    down = range(int(y) // TILE_SIZE, last_y // TILE_SIZE + 1)
    lines: list[np.ndarray] = []
    for tile_y in down:
        line = []
        for tile_x in across:
            data = stored_tile(archive, record, level, tile_x, tile_y)
            if data is None:
                return None
            line.append(_decode_jpeg(data))
        lines.append(np.concatenate(line, axis=1))
    return np.concatenate(lines, axis=0), (across.start * TILE_SIZE, down.start * TILE_SIZE)


def tile_levels(rows: int, cols: int, tile: int = TILE_SIZE) -> int:
    """How many levels the pyramid has (level 0 full size; the last fits one tile)."""
    return len(codec_render.tile_pyramid_levels(rows, cols, tile))


def render_tile(values: np.ndarray, params: RenderParams, level: int, x: int, y: int) -> np.ndarray:
    """Tile (x, y) of ``level``; IndexError outside the pyramid."""
    try:
        return codec_render.render_tile(values, params, level, x, y, TILE_SIZE)
    except CodecError as exc:
        if "outside" in str(exc):
            raise IndexError(str(exc)) from None
        raise


class RenderCache:
    """What viewers asked for recently, bounded in bytes, least recently used out first:
    decoded frames of large images (arrays, which tiles and viewport regions are cut from)
    and encoded rendered images (the bytes answered, keyed by everything that shaped them:
    a viewer scrolling back, or a second viewer, gets them without decode or encode).
    Items larger than a quarter of the bound are not kept."""

    def __init__(self, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[Any, ...], np.ndarray | bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        return self._bytes

    @property
    def entries(self) -> int:
        return len(self._items)

    def _get(self, key: tuple[Any, ...]) -> np.ndarray | bytes | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def _put(self, key: tuple[Any, ...], item: np.ndarray | bytes) -> None:
        size = item.nbytes if isinstance(item, np.ndarray) else len(item)
        if size > self.max_bytes // 4:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = item
            self._bytes += size
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _old, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.nbytes if isinstance(evicted, np.ndarray) else len(evicted)

    def get(self, key: tuple[Any, ...]) -> np.ndarray | None:
        found = self._get(key)
        return found if isinstance(found, np.ndarray) else None

    def get_or_make(self, key: tuple[Any, ...], make: Callable[[], np.ndarray]) -> np.ndarray:
        found = self.get(key)
        if found is not None:
            return found
        made = make()
        self._put(key, made)
        return made

    def get_encoded(self, key: tuple[Any, ...]) -> bytes | None:
        found = self._get(key)
        return found if isinstance(found, bytes) else None

    def put_encoded(self, key: tuple[Any, ...], data: bytes) -> None:
        self._put(key, data)


#: the last compressed frame 1 kho.archive.finish.images.first_frame decoded in this
#: thread, with its instance bytes
_decoded = threading.local()


def stored_thumbnail(archive: StoredArchive, record: InstanceRecord) -> bytes | None:
    """The JPEG thumbnail made at ingest, or None if there is none."""
    key = record.derived_keys.get(THUMBNAIL_OBJECT)
    return archive.store.get(key) if key else None


TILES_OBJECT = "tiles"


_PYRAMID_MAGIC = b"KHOTILE1"


def _pyramid_index(blob: bytes) -> dict[str, Any] | None:
    magic = len(_PYRAMID_MAGIC)
    if blob[:magic] != _PYRAMID_MAGIC or len(blob) < magic + 12:
        return None
    offset = int.from_bytes(blob[magic : magic + 8], "little")
    length = int.from_bytes(blob[magic + 8 : magic + 12], "little")
    index: dict[str, Any] = json.loads(blob[offset : offset + length])
    return index


_PYRAMID_INDEXES: OrderedDict[str, dict[str, Any]] = OrderedDict()


_PYRAMID_LOCK = threading.Lock()


def stored_tile(
    archive: StoredArchive, record: InstanceRecord, level: int, x: int, y: int
) -> bytes | None:
    """A tile from the stored pyramid (frame 1, the instance's window, JPEG), or None if
    the instance has none; IndexError for a tile outside it."""
    key = record.derived_keys.get(TILES_OBJECT)
    if not key:
        return None
    with _PYRAMID_LOCK:
        index = _PYRAMID_INDEXES.get(key)
    if index is None:
        magic = len(_PYRAMID_MAGIC)
        head = archive.store.get_range(key, 0, magic + 12)
        if head[:magic] != _PYRAMID_MAGIC or len(head) != magic + 12:
            return None
        offset = int.from_bytes(head[magic : magic + 8], "little")
        length = int.from_bytes(head[magic + 8 :], "little")
        index = json.loads(archive.store.get_range(key, offset, length))
        with _PYRAMID_LOCK:
            _PYRAMID_INDEXES[key] = index
            while len(_PYRAMID_INDEXES) > 4096:
                _PYRAMID_INDEXES.popitem(last=False)
    levels = index["levels"]
    if not 0 <= level < len(levels):
        raise IndexError(f"level {level} outside 0..{len(levels) - 1}")
    across, down = levels[level]
    if not (0 <= x < across and 0 <= y < down):
        raise IndexError(f"tile {x},{y} outside level {level} ({across}x{down} tiles)")
    first = int(index.get("first", 0))
    if level < first:  # left out to fit the instance's allowance: rendered on request
        return None
    number = sum(a * d for a, d in levels[first:level]) + y * across + x
    offset, length = index["tiles"][number]
    return archive.store.get_range(key, int(offset), int(length))
