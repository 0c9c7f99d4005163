"""numba kernels of the display pipeline: resampling, LUTs, windowing, colour, 8-bit.

Images are 3-D (rows, columns, samples); kernels are compiled per input dtype and cached.
Every table index is clamped, every output index is inside the output's shape.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

LINEAR, LINEAR_EXACT, SIGMOID, TABLE = 0, 1, 2, 3


@njit(cache=True, nogil=True)
def axis_weights(
    in_size: int, start: float, scale: float, out_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Box-filter weights along one axis, as CSR arrays (indptr, source index, weight).

    Output pixel i covers source interval [start + i*scale, start + (i+1)*scale) clipped to
    [0, in_size); each source pixel weighs the length of its overlap (fractional coverage at
    both ends).  Magnification (scale < 1) gives one or two source pixels per output."""
    per = math.ceil(scale) + 2
    indptr = np.zeros(out_size + 1, dtype=np.int64)
    index = np.zeros(out_size * per, dtype=np.int64)
    weight = np.zeros(out_size * per, dtype=np.float64)
    n = 0
    for i in range(out_size):
        lo = max(start + i * scale, 0.0)
        hi = min(start + (i + 1) * scale, float(in_size))
        j = math.floor(lo)
        while j < hi and j < in_size and n < index.shape[0]:
            w = min(j + 1.0, hi) - max(float(j), lo)
            if w > 1e-9:
                index[n] = j
                weight[n] = w
                n += 1
            j += 1
        if n == indptr[i] and in_size > 0:  # a sliver below rounding: nearest source pixel
            index[n] = min(max(int(lo), 0), in_size - 1)
            weight[n] = 1.0
            n += 1
        indptr[i + 1] = n
    return indptr, index, weight


@njit(cache=True, nogil=True)
def resample(
    src: np.ndarray,
    y_ptr: np.ndarray,
    y_idx: np.ndarray,
    y_w: np.ndarray,
    x_ptr: np.ndarray,
    x_idx: np.ndarray,
    x_w: np.ndarray,
    out: np.ndarray,
) -> None:
    """Area-average src (h, w, c) into out (oh, ow, c) float32 with separable box weights."""
    height, width, channels = src.shape
    out_h, out_w = out.shape[0], out.shape[1]
    x_lo, x_hi = width, 0
    for q in range(x_ptr[out_w]):
        x_lo = min(x_lo, x_idx[q])
        x_hi = max(x_hi, x_idx[q] + 1)
    # one weighted sum of source rows per output row, on flat (width * channels) rows so
    # the inner loop is a plain vectorisable axpy
    row = np.zeros(width * channels, dtype=np.float64)
    lo, hi = x_lo * channels, x_hi * channels
    for oy in range(out_h):
        row[lo:hi] = 0.0
        wy_sum = 0.0
        for p in range(y_ptr[oy], y_ptr[oy + 1]):
            r = y_idx[p]
            wy = y_w[p]
            wy_sum += wy
            if 0 <= r < height:
                line = src[r].ravel()
                for i in range(lo, hi):
                    row[i] += wy * line[i]
        for ox in range(out_w):
            wx_sum = 0.0
            for q in range(x_ptr[ox], x_ptr[ox + 1]):
                wx_sum += x_w[q]
            norm = wx_sum * wy_sum
            for ch in range(channels):
                acc = 0.0
                for q in range(x_ptr[ox], x_ptr[ox + 1]):
                    acc += x_w[q] * row[x_idx[q] * channels + ch]
                out[oy, ox, ch] = acc / norm if norm > 0.0 else 0.0


@njit(cache=True, nogil=True)
def apply_table(src: np.ndarray, table: np.ndarray, first: int, out: np.ndarray) -> None:
    """out[...] = table[clamp(src - first)] (PS3.3 C.11.1: below the first mapped value the
    first entry, above the last the last entry); out has src's shape, float32."""
    flat_src = src.ravel()
    flat_out = out.ravel()
    last = table.shape[0] - 1
    for i in range(min(flat_src.shape[0], flat_out.shape[0])):
        k = int(flat_src[i]) - first
        if k < 0:
            k = 0
        elif k > last:
            k = last
        flat_out[i] = table[k]


@njit(cache=True, nogil=True)
def grey_to_u8(
    values: np.ndarray,
    slope: float,
    intercept: float,
    mode: int,
    center: float,
    width: float,
    table: np.ndarray,
    table_first: int,
    table_scale: float,
    invert: bool,
    out: np.ndarray,
) -> None:
    """Modality rescale, VOI (window function or table) to 0..255, optional inversion."""
    rows, cols = out.shape
    last = table.shape[0] - 1
    low_exact = center - width / 2.0
    high_exact = center + width / 2.0
    low_linear = center - 0.5 - (width - 1.0) / 2.0
    high_linear = center - 0.5 + (width - 1.0) / 2.0
    for r in range(rows):
        for c in range(cols):
            x = values[r, c, 0] * slope + intercept
            if mode == TABLE:
                k = math.floor(x + 0.5) - table_first
                if k < 0:
                    k = 0
                elif k > last:
                    k = last
                y = table[k] * table_scale
            elif mode == LINEAR_EXACT:
                if x <= low_exact:
                    y = 0.0
                elif x > high_exact:
                    y = 255.0
                else:
                    y = ((x - center) / width + 0.5) * 255.0
            elif mode == SIGMOID:
                t = -4.0 * (x - center) / width
                # exp overflows past ~709 (Python raises, numba gives inf): y is 0 there
                y = 0.0 if t > 700.0 else 255.0 / (1.0 + math.exp(t))
            else:  # LINEAR, PS3.3 C.11.2.1.2.1
                if x <= low_linear:
                    y = 0.0
                elif x > high_linear:
                    y = 255.0
                else:
                    y = ((x - (center - 0.5)) / (width - 1.0) + 0.5) * 255.0
            v = math.floor(y + 0.5)
            v = 0 if v < 0 else (255 if v > 255 else v)
            out[r, c] = 255 - v if invert else v


@njit(cache=True, nogil=True)
def palette_to_rgb(
    src: np.ndarray,
    red: np.ndarray,
    green: np.ndarray,
    blue: np.ndarray,
    firsts: np.ndarray,
    scale: float,
    out: np.ndarray,
) -> None:
    """PALETTE COLOR indices (h, w, 1) -> RGB (h, w, 3) float32 in 0..255."""
    rows, cols = src.shape[0], src.shape[1]
    for r in range(rows):
        for c in range(cols):
            v = int(src[r, c, 0])
            for ch in range(3):
                table = red if ch == 0 else (green if ch == 1 else blue)
                k = v - firsts[ch]
                if k < 0:
                    k = 0
                elif k >= table.shape[0]:
                    k = table.shape[0] - 1
                out[r, c, ch] = table[k] * scale


@njit(cache=True, nogil=True)
def colour_to_u8(values: np.ndarray, ybr: bool, half: float, scale: float, out: np.ndarray) -> None:
    """RGB (or YBR_FULL -> RGB, PS3.3 C.7.6.3.1.2) float values -> uint8, times ``scale``."""
    rows, cols = out.shape[0], out.shape[1]
    for r in range(rows):
        for c in range(cols):
            a = values[r, c, 0]
            b = values[r, c, 1]
            d = values[r, c, 2]
            if ybr:
                red = a + 1.402 * (d - half)
                green = a - 0.344136 * (b - half) - 0.714136 * (d - half)
                blue = a + 1.772 * (b - half)
            else:
                red, green, blue = a, b, d
            for ch in range(3):
                y = (red if ch == 0 else (green if ch == 1 else blue)) * scale
                v = math.floor(y + 0.5)
                out[r, c, ch] = 0 if v < 0 else (255 if v > 255 else v)
