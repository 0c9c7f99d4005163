"""Rendering frames to 8-bit display images: thumbnails, rendered frames, tiles.

Pipeline (PS3.3 C.11 / PS3.18 "rendered"), each step a numba kernel in
``_render_kernels``:

1. **crop** to ``region`` and **resample** to the output size with an area-average box
   filter with fractional coverage (every source pixel weighs the area it shares with the
   output pixel, so non-integer factors such as 512 -> 100 are exact box averages, not an
   integer factor plus a final resample; magnification degrades to a box/nearest blend).
   For grey images resampling happens on stored values, before the modality rescale, which
   is exact because the rescale is linear (and makes a thumbnail cost the thumbnail's
   pixels, not the frame's); a Modality LUT table (non-linear) and PALETTE COLOR lookups
   are applied before resampling, on the cropped region.
2. **modality LUT**: rescale slope/intercept, or a Modality LUT table (which then replaces
   the rescale);
3. **VOI**: an explicit window (``window_center``/``window_width`` with LINEAR,
   LINEAR_EXACT or SIGMOID) wins; else a VOI LUT table (its output scaled from its declared
   bits to 0..255); else an **auto window**: LINEAR_EXACT over the full frame's minimum to
   maximum modality value (computed over the whole frame, not the region, so every tile of
   a frame gets the same window);
4. **MONOCHROME1** inversion (``invert=True`` flips the result once more, a viewer's
   "negative" toggle);
5. colour: PALETTE COLOR through its three LUTs, YBR_FULL / YBR_FULL_422 (already upsampled
   to full size by the caller) to RGB, RGB as is; samples wider than 8 bits are scaled from
   ``bits_stored`` to 8 bits; no VOI on colour;
6. 8 bits, rounding half up, clipped to 0..255.

Frames are passed in their natural dtype: int16 (or int8/int32) for signed data
(Pixel Representation 1) as pydicom's ``pixel_array`` gives them; an unsigned array with
``pixel_representation=1`` is sign-extended from ``bits_stored`` here.  Bad input raises
``CodecError`` (a ``ValueError``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kho.codecs import _render_kernels as k
from kho.errors import CodecError

_FUNCTIONS = {"LINEAR": k.LINEAR, "LINEAR_EXACT": k.LINEAR_EXACT, "SIGMOID": k.SIGMOID}
_EMPTY_TABLE = np.zeros(1, dtype=np.float32)
TILE_SIZE = 256


@dataclass(frozen=True, eq=False)
class Lut:
    """One LUT: its descriptor (number of entries, 0 meaning 65536; first mapped value;
    bits per entry) and its entries as a 1-D array (extra entries are ignored)."""

    descriptor: tuple[int, int, int]
    data: np.ndarray

    def __post_init__(self) -> None:
        if len(self.descriptor) != 3:
            raise CodecError(f"a LUT descriptor has 3 values, not {self.descriptor!r}")
        data = np.asarray(self.data).ravel()
        if data.dtype.kind not in "uif" or data.size < self.entries:
            raise CodecError(
                f"LUT data has {data.size} entries; its descriptor says {self.entries}"
            )
        if not 1 <= int(self.descriptor[2]) <= 16:
            raise CodecError(f"LUT bits per entry {self.descriptor[2]} outside 1..16")
        object.__setattr__(self, "descriptor", tuple(int(v) for v in self.descriptor))
        object.__setattr__(self, "data", data[: self.entries])

    @property
    def entries(self) -> int:
        return int(self.descriptor[0]) or 65536

    @property
    def bits(self) -> int:
        return int(self.descriptor[2])

    def first_mapped(self, signed: bool) -> int:
        """The first mapped value; stored as US, it means a negative value for signed
        pixel data when >= 32768 (PS3.3 C.11.1.1)."""
        first = int(self.descriptor[1])
        return first - 65536 if signed and first >= 32768 else first

    def table(self) -> np.ndarray:
        return np.ascontiguousarray(self.data, dtype=np.float32)

    def to_u8_scale(self) -> float:
        """Factor taking entries to 0..255: from the declared bits, widened if the entries
        exceed them (8-bit descriptors over 16-bit data occur in the wild)."""
        top = (1 << self.bits) - 1
        peak = int(self.data.max()) if self.data.size else 0
        if peak > top:
            top = (1 << max(peak.bit_length(), 1)) - 1
        return 255.0 / top


@dataclass(frozen=True)
class RenderParams:
    """How a frame's stored values become display values; plain numbers and arrays, so
    the archive fills it from a dataset and tests from literals."""

    photometric_interpretation: str = "MONOCHROME2"
    bits_stored: int | None = None  # None: the frame dtype's width
    pixel_representation: int = 0  # 1: signed
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    modality_lut: Lut | None = None  # replaces the rescale when given
    window_center: float | None = None
    window_width: float | None = None
    voi_function: str = "LINEAR"  # LINEAR | LINEAR_EXACT | SIGMOID
    voi_lut: Lut | None = None  # used when no window is given
    palette: tuple[Lut, Lut, Lut] | None = None  # red, green, blue (PALETTE COLOR)
    invert: bool = False  # flip the grey output (on top of MONOCHROME1's own inversion)

    def __post_init__(self) -> None:
        function = self.voi_function.strip().upper() or "LINEAR"
        if function not in _FUNCTIONS:
            raise CodecError(f"VOI LUT function {self.voi_function!r} not one of {_FUNCTIONS}")
        object.__setattr__(self, "voi_function", function)
        photometric = self.photometric_interpretation.strip().upper()
        object.__setattr__(self, "photometric_interpretation", photometric)
        if (self.window_center is None) != (self.window_width is None):
            raise CodecError("give both window_center and window_width, or neither")
        if self.window_width is not None:
            minimum = 1.0 if function == "LINEAR" else 0.0
            if not self.window_width >= minimum or self.window_width <= 0:
                raise CodecError(f"window width {self.window_width} too small for {function}")
        if not math.isfinite(self.rescale_slope) or not math.isfinite(self.rescale_intercept):
            raise CodecError("rescale slope/intercept must be finite")
        if self.bits_stored is not None and not 1 <= self.bits_stored <= 32:
            raise CodecError(f"bits_stored {self.bits_stored} outside 1..32")
        if photometric == "PALETTE COLOR" and self.palette is None:
            raise CodecError("PALETTE COLOR needs the red, green and blue palette LUTs")

    @property
    def signed(self) -> bool:
        return self.pixel_representation == 1

    @property
    def is_colour(self) -> bool:
        return self.photometric_interpretation not in ("MONOCHROME1", "MONOCHROME2")


# --- input -----------------------------------------------------------------------------


def _as_image(frame: np.ndarray, params: RenderParams) -> np.ndarray:
    """The frame as a 3-D (rows, cols, samples) array kernels accept."""
    if not isinstance(frame, np.ndarray):
        raise CodecError("render needs a numpy array")
    if frame.dtype.kind not in "uif" or frame.dtype.itemsize > 8:
        raise CodecError(f"cannot render {frame.dtype} pixels")
    if frame.ndim == 2:
        image = frame[:, :, np.newaxis]
    elif frame.ndim == 3 and frame.shape[2] in (1, 3):
        image = frame
    else:
        raise CodecError(f"render takes (rows, cols) or (rows, cols, 1 or 3), not {frame.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise CodecError(f"cannot render an empty frame {frame.shape}")
    samples = image.shape[2]
    colour_samples = 1 if params.photometric_interpretation == "PALETTE COLOR" else 3
    expected = colour_samples if params.is_colour else 1
    if samples != expected:
        raise CodecError(
            f"{params.photometric_interpretation} needs {expected} sample(s), not {samples}"
        )
    if params.photometric_interpretation == "PALETTE COLOR" and image.dtype.kind == "f":
        raise CodecError("PALETTE COLOR indices must be integers")
    if not image.dtype.isnative:
        image = image.astype(image.dtype.newbyteorder("="))
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        # NaN/inf (float parametric maps) would poison the window: NaN -> 0, inf -> extremes
        finite = image[np.isfinite(image)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        image = np.nan_to_num(image, nan=0.0, posinf=high, neginf=low)
    if params.signed and image.dtype.kind == "u" and not params.is_colour:
        image = _sign_extend(image, params.bits_stored or image.dtype.itemsize * 8)
    return image


def _sign_extend(image: np.ndarray, bits: int) -> np.ndarray:
    width = image.dtype.itemsize * 8
    signed = image.view(np.dtype(f"i{image.dtype.itemsize}"))
    if bits >= width:
        return signed
    shift = width - bits
    return (signed << shift) >> shift  # arithmetic shift restores the sign


def _bits(params: RenderParams, image: np.ndarray) -> int:
    return params.bits_stored or image.dtype.itemsize * 8


# --- geometry ------------------------------------------------------------------------


def _check_region(
    region: tuple[int, int, int, int] | None, rows: int, cols: int
) -> tuple[int, int, int, int]:
    """(x, y, width, height) -> clipped to the frame; CodecError if it misses the frame."""
    if region is None:
        return 0, 0, cols, rows
    x, y, width, height = (int(v) for v in region)
    if width <= 0 or height <= 0 or x < 0 or y < 0 or x >= cols or y >= rows:
        raise CodecError(f"region {region} is empty or outside the {cols}x{rows} frame")
    return x, y, min(width, cols - x), min(height, rows - y)


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    rows, cols = (int(v) for v in size)
    if not (1 <= rows <= 65536 and 1 <= cols <= 65536):
        raise CodecError(f"output size {size} outside 1..65536")
    return rows, cols


def _resample(
    image: np.ndarray,
    y0: float,
    scale_y: float,
    x0: float,
    scale_x: float,
    out_rows: int,
    out_cols: int,
) -> np.ndarray:
    """Area-average the source window to (out_rows, out_cols, samples) float32, or return
    the window itself (any dtype) when it needs no resampling."""
    rows, cols = image.shape[:2]
    if scale_y == 1.0 and scale_x == 1.0 and float(y0).is_integer() and float(x0).is_integer():
        # no resampling: a view of the region (kernels compile for the source dtype)
        top, left = int(y0), int(x0)
        if top + out_rows <= rows and left + out_cols <= cols:
            return image[top : top + out_rows, left : left + out_cols]
    y_ptr, y_idx, y_w = k.axis_weights(rows, y0, scale_y, out_rows)
    x_ptr, x_idx, x_w = k.axis_weights(cols, x0, scale_x, out_cols)
    out = np.empty((out_rows, out_cols, image.shape[2]), dtype=np.float32)
    k.resample(image, y_ptr, y_idx, y_w, x_ptr, x_idx, x_w, out)
    return out


def _crop_for(image: np.ndarray, y0: float, span_y: float, x0: float, span_x: float) -> tuple:
    """The integer bounding box of a fractional source window, and the window's start
    relative to it: LUT lookups are done on that crop only."""
    rows, cols = image.shape[:2]
    top, left = math.floor(y0), math.floor(x0)
    bottom = min(rows, math.ceil(y0 + span_y))
    right = min(cols, math.ceil(x0 + span_x))
    return image[top:bottom, left:right], y0 - top, x0 - left


# --- the pipeline --------------------------------------------------------------------


def _voi(
    image: np.ndarray, params: RenderParams
) -> tuple[int, float, float, np.ndarray, int, float]:
    """(mode, center, width, table, table first, table scale) for grey output."""
    if params.window_center is not None and params.window_width is not None:
        mode = _FUNCTIONS[params.voi_function]
        return mode, float(params.window_center), float(params.window_width), _EMPTY_TABLE, 0, 1.0
    if params.voi_lut is not None:
        lut = params.voi_lut
        # the VOI LUT's input is the modality output: signed when it can be negative
        signed = params.signed or params.rescale_intercept < 0
        return k.TABLE, 0.0, 1.0, lut.table(), lut.first_mapped(signed), lut.to_u8_scale()
    low, high = float(image.min()), float(image.max())  # numpy's SIMD min/max
    if params.modality_lut is not None:
        lut = params.modality_lut
        first = lut.first_mapped(params.signed)
        lo = min(max(int(low) - first, 0), lut.entries - 1)
        hi = min(max(int(high) - first, 0), lut.entries - 1)
        values = lut.table()[lo : hi + 1]
        low, high = float(values.min()), float(values.max())
    else:
        a = low * params.rescale_slope + params.rescale_intercept
        b = high * params.rescale_slope + params.rescale_intercept
        low, high = min(a, b), max(a, b)
    width = max(high - low, 1e-6)
    return k.LINEAR_EXACT, (low + high) / 2.0, width, _EMPTY_TABLE, 0, 1.0


def _render(
    image: np.ndarray,
    params: RenderParams,
    y0: float,
    scale_y: float,
    x0: float,
    scale_x: float,
    out_rows: int,
    out_cols: int,
) -> np.ndarray:
    """Render the source window [y0, y0 + out_rows*scale_y) x [x0, ...) of a checked image."""
    photometric = params.photometric_interpretation
    span_y, span_x = out_rows * scale_y, out_cols * scale_x
    if photometric == "PALETTE COLOR":
        assert params.palette is not None
        crop, cy, cx = _crop_for(image, y0, span_y, x0, span_x)
        red, green, blue = params.palette
        firsts = np.array([lut.first_mapped(False) for lut in params.palette], dtype=np.int64)
        rgb = np.empty((*crop.shape[:2], 3), dtype=np.float32)
        scale = min(lut.to_u8_scale() for lut in params.palette)
        k.palette_to_rgb(crop, red.table(), green.table(), blue.table(), firsts, scale, rgb)
        values = _resample(rgb, cy, scale_y, cx, scale_x, out_rows, out_cols)
        out = np.empty((out_rows, out_cols, 3), dtype=np.uint8)
        k.colour_to_u8(values, False, 0.0, 1.0, out)
        return out
    if params.is_colour:
        values = _resample(image, y0, scale_y, x0, scale_x, out_rows, out_cols)
        bits = _bits(params, image)
        ybr = photometric in ("YBR_FULL", "YBR_FULL_422")
        if not ybr and photometric != "RGB":
            raise CodecError(f"cannot render photometric interpretation {photometric!r}")
        scale = 1.0 if bits <= 8 else 255.0 / ((1 << bits) - 1)
        out = np.empty((out_rows, out_cols, 3), dtype=np.uint8)
        k.colour_to_u8(values, ybr, float(1 << (bits - 1)), scale, out)
        return out
    mode, center, width, table, table_first, table_scale = _voi(image, params)
    if params.modality_lut is not None:
        lut = params.modality_lut
        crop, cy, cx = _crop_for(image, y0, span_y, x0, span_x)
        mapped = np.empty(crop.shape, dtype=np.float32)
        k.apply_table(
            np.ascontiguousarray(crop), lut.table(), lut.first_mapped(params.signed), mapped
        )
        values = _resample(mapped, cy, scale_y, cx, scale_x, out_rows, out_cols)
        slope, intercept = 1.0, 0.0
    else:
        values = _resample(image, y0, scale_y, x0, scale_x, out_rows, out_cols)
        slope, intercept = float(params.rescale_slope), float(params.rescale_intercept)
    invert = (photometric == "MONOCHROME1") != bool(params.invert)
    out = np.empty((out_rows, out_cols), dtype=np.uint8)
    k.grey_to_u8(
        values, slope, intercept, mode, center, width, table, table_first, table_scale, invert, out
    )
    return out


def render_frame(
    frame: np.ndarray,
    params: RenderParams,
    *,
    region: tuple[int, int, int, int] | None = None,
    out_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Render one frame to uint8, (h, w) grey or (h, w, 3) RGB.

    ``frame``: (rows, cols) or (rows, cols, samples) in its natural dtype (int16 for signed
    data).  ``region``: (x, y, width, height) of the source to show, as DICOMweb's viewport
    sx, sy, sw, sh; clipped to the frame.  ``out_size``: (rows, cols) of the result (default
    the region's size); the aspect ratio is the caller's business (see ``fit_size``).
    """
    image = _as_image(frame, params)
    x, y, width, height = _check_region(region, image.shape[0], image.shape[1])
    out_rows, out_cols = _check_size(out_size) if out_size is not None else (height, width)
    return _render(image, params, y, height / out_rows, x, width / out_cols, out_rows, out_cols)


def fit_size(rows: int, cols: int, max_rows: int, max_cols: int) -> tuple[int, int]:
    """The largest (rows, cols) within the bounds with the frame's aspect ratio; never
    larger than the frame itself."""
    scale = min(max_rows / rows, max_cols / cols, 1.0)
    return max(1, round(rows * scale)), max(1, round(cols * scale))


def thumbnail(frame: np.ndarray, params: RenderParams, max_size: int = 128) -> np.ndarray:
    """The frame within ``max_size`` x ``max_size`` pixels, aspect ratio kept (frames that
    are already smaller are not enlarged)."""
    if max_size < 1:
        raise CodecError(f"thumbnail size {max_size} must be positive")
    image = _as_image(frame, params)
    rows, cols = image.shape[:2]
    out_rows, out_cols = fit_size(rows, cols, max_size, max_size)
    return _render(image, params, 0.0, rows / out_rows, 0.0, cols / out_cols, out_rows, out_cols)


def resize_display(
    image: np.ndarray, window: tuple[float, float, float, float], out_size: tuple[int, int]
) -> np.ndarray:
    """Area-average the source window ``(x, y, width, height)`` (fractional) of a display
    image (uint8, (h, w) grey or (h, w, 3) RGB: a rendered level such as a stored tile
    pyramid's or thumbnail's) to ``out_size`` (rows, cols), uint8."""
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or image.size == 0:
        raise CodecError(f"a display image is uint8 (h, w) or (h, w, 3), not {image.shape}")
    grey = image.ndim == 2
    src = image[:, :, np.newaxis] if grey else image
    out_rows, out_cols = _check_size(out_size)
    x, y, width, height = (float(v) for v in window)
    if width <= 0 or height <= 0:
        raise CodecError(f"empty source window {window}")
    values = _resample(src, y, height / out_rows, x, width / out_cols, out_rows, out_cols)
    out = np.clip(np.floor(values.astype(np.float32) + 0.5), 0, 255).astype(np.uint8)
    return out[:, :, 0] if grey else out


def tile_pyramid_levels(rows: int, cols: int, tile: int = TILE_SIZE) -> list[tuple[int, int]]:
    """(rows, cols) of each level: level 0 is full size, each next one half (rounded up),
    the last the first that fits one ``tile`` x ``tile`` tile."""
    if rows < 1 or cols < 1 or tile < 1:
        raise CodecError(f"bad pyramid geometry {rows}x{cols}, tile {tile}")
    levels = [(rows, cols)]
    while max(levels[-1]) > tile:
        r, c = levels[-1]
        levels.append(((r + 1) // 2, (c + 1) // 2))
    return levels


def render_tile(
    frame: np.ndarray, params: RenderParams, level: int, x: int, y: int, tile: int = TILE_SIZE
) -> np.ndarray:
    """Tile (x, y) (column, row of tiles) of pyramid ``level``; tiles on the right and
    bottom edges are cut to the level's size, not padded.  Only the source pixels under the
    tile are read and filtered, so a tile costs about its own area times 4**level."""
    image = _as_image(frame, params)
    rows, cols = image.shape[:2]
    levels = tile_pyramid_levels(rows, cols, tile)
    if not 0 <= level < len(levels):
        raise CodecError(f"level {level} outside 0..{len(levels) - 1}")
    level_rows, level_cols = levels[level]
    if x < 0 or y < 0 or x * tile >= level_cols or y * tile >= level_rows:
        raise CodecError(f"tile ({x}, {y}) outside level {level} ({level_cols}x{level_rows})")
    out_rows = min(tile, level_rows - y * tile)
    out_cols = min(tile, level_cols - x * tile)
    scale_y, scale_x = rows / level_rows, cols / level_cols
    return _render(
        image, params, y * tile * scale_y, scale_y, x * tile * scale_x, scale_x, out_rows, out_cols
    )
