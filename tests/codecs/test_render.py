"""Rendering kernels against plain-NumPy references, and real files against pydicom's own
LUT, windowing and colour functions.

Tolerance: the pipeline rounds once, at the end, to 8 bits (half up); pydicom's functions
return values in the data's own range (float windowing output in 0..2**BitsStored-1, raw
LUT entries, 16-bit palette entries, its own YBR rounding), which the references here scale
to 8 bits: those comparisons allow 1 grey level.  The NumPy references of the kernels use
the same convention and must agree to within float32 rounding (also 1 level at worst).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
    apply_windowing,
    convert_color_space,
)

from kho.codecs import _render_kernels as kern
from kho.codecs.render import (
    Lut,
    RenderParams,
    fit_size,
    render_frame,
    render_tile,
    thumbnail,
    tile_pyramid_levels,
)
from kho.errors import CodecError

SAMPLES = Path("/work/shared/dicom-samples")
RNG = np.random.default_rng(1123)


# --- NumPy references ------------------------------------------------------------------


def ref_weights(in_size: int, start: float, scale: float, out_size: int) -> np.ndarray:
    """(out, in) matrix of box-filter coverage, rows normalised."""
    lo = np.clip(start + np.arange(out_size) * scale, 0, in_size)[:, None]
    hi = np.clip(start + (np.arange(out_size) + 1) * scale, 0, in_size)[:, None]
    j = np.arange(in_size)[None, :]
    cover = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0, None)
    return cover / cover.sum(axis=1, keepdims=True)


def ref_resample(src: np.ndarray, y0: float, sy: float, x0: float, sx: float, shape) -> np.ndarray:
    wy = ref_weights(src.shape[0], y0, sy, shape[0])
    wx = ref_weights(src.shape[1], x0, sx, shape[1])
    planes = [wy @ src[:, :, c].astype(np.float64) @ wx.T for c in range(src.shape[2])]
    return np.stack(planes, axis=-1)


def ref_window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2 to 0..255, float."""
    if function == "LINEAR":
        y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255 if width > 1 else x * 0
        y = np.where(x <= center - 0.5 - (width - 1) / 2, 0.0, y)
        return np.where(x > center - 0.5 + (width - 1) / 2, 255.0, y)
    if function == "LINEAR_EXACT":
        y = ((x - center) / width + 0.5) * 255
        y = np.where(x <= center - width / 2, 0.0, y)
        return np.where(x > center + width / 2, 255.0, y)
    with np.errstate(over="ignore"):
        return 255 / (1 + np.exp(-4 * (x - center) / width))


def to_u8(y: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(y + 0.5), 0, 255).astype(np.uint8)


def close(a: np.ndarray, b: np.ndarray, tol: int = 1) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = np.abs(a.astype(np.int32) - b.astype(np.int32))
    assert diff.max(initial=0) <= tol, f"max difference {diff.max()} at {np.argmax(diff)}"


# --- kernels vs references ---------------------------------------------------------------


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_resample_matches_reference(data) -> None:
    rows, cols = data.draw(st.integers(1, 40)), data.draw(st.integers(1, 40))
    channels = data.draw(st.sampled_from([1, 3]))
    dtype = data.draw(st.sampled_from([np.uint8, np.int16, np.uint16, np.float32]))
    src = (
        np.random.default_rng(data.draw(st.integers(0, 999)))
        .integers(-300 if dtype in (np.int16, np.float32) else 0, 256, (rows, cols, channels))
        .astype(dtype)
    )
    out_rows, out_cols = data.draw(st.integers(1, 50)), data.draw(st.integers(1, 50))
    y0 = data.draw(st.floats(0, rows - 0.5))
    x0 = data.draw(st.floats(0, cols - 0.5))
    sy = (rows - y0) / out_rows * data.draw(st.floats(0.2, 1.0))
    sx = (cols - x0) / out_cols * data.draw(st.floats(0.2, 1.0))
    y_ptr, y_idx, y_w = kern.axis_weights(rows, y0, sy, out_rows)
    x_ptr, x_idx, x_w = kern.axis_weights(cols, x0, sx, out_cols)
    out = np.empty((out_rows, out_cols, channels), np.float32)
    kern.resample(src, y_ptr, y_idx, y_w, x_ptr, x_idx, x_w, out)
    expected = ref_resample(src, y0, sy, x0, sx, (out_rows, out_cols))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-2)


def test_resample_integer_factor_is_block_mean() -> None:
    src = RNG.integers(-1000, 3000, (64, 96)).astype(np.int16)
    params = RenderParams(window_center=1000, window_width=4000, voi_function="LINEAR_EXACT")
    out = render_frame(src, params, out_size=(16, 24))
    means = src.reshape(16, 4, 24, 4).mean(axis=(1, 3))
    close(out, to_u8(ref_window(means, 1000, 4000, "LINEAR_EXACT")))


def test_non_integer_factor_box_filter() -> None:
    """512 -> 100 (5.12x): every output is the coverage-weighted mean; a constant image
    stays constant, and the mean is preserved."""
    src = RNG.integers(0, 4096, (512, 512)).astype(np.uint16)
    params = RenderParams(window_center=2048, window_width=4096, voi_function="LINEAR_EXACT")
    out = render_frame(src, params, out_size=(100, 100))
    expected = ref_resample(src[:, :, None], 0, 5.12, 0, 5.12, (100, 100))[:, :, 0]
    close(out, to_u8(ref_window(expected, 2048, 4096, "LINEAR_EXACT")))
    flat = render_frame(np.full((512, 300), 1000, np.uint16), params, out_size=(77, 33))
    assert np.unique(flat).tolist() == [
        to_u8(ref_window(np.array(1000.0), 2048, 4096, "LINEAR_EXACT"))
    ]


@settings(max_examples=80, deadline=None)
@given(
    st.sampled_from(["LINEAR", "LINEAR_EXACT", "SIGMOID"]),
    st.floats(-2000, 4000),
    st.floats(1, 5000),
    st.floats(0.1, 4),
    st.floats(-2000, 2000),
    st.booleans(),
    st.integers(0, 10_000),
)
def test_grey_kernel_matches_reference(function, center, width, slope, intercept, invert, seed):
    values = np.random.default_rng(seed).integers(-2048, 4096, (17, 23, 1)).astype(np.float32)
    mode = {"LINEAR": kern.LINEAR, "LINEAR_EXACT": kern.LINEAR_EXACT, "SIGMOID": kern.SIGMOID}
    out = np.empty((17, 23), np.uint8)
    kern.grey_to_u8(
        values, slope, intercept, mode[function], center, width,
        np.zeros(1, np.float32), 0, 1.0, invert, out,
    )  # fmt: skip
    x = values[:, :, 0].astype(np.float64) * slope + intercept
    expected = to_u8(ref_window(x, center, width, function))
    if invert:
        expected = 255 - expected
    close(out, expected)


def test_linear_window_edges() -> None:
    """C.11.2.1.2.1 worked at its boundaries: c=0.5, w=1 is a threshold at 0/1."""
    frame = np.array([[-1, 0, 1, 2]], np.int16)
    out = render_frame(frame, RenderParams(window_center=0.5, window_width=1))
    assert out.tolist() == [[0, 0, 255, 255]]
    out = render_frame(
        np.arange(256, dtype=np.uint8)[None], RenderParams(window_center=128, window_width=256)
    )
    close(out[0], np.arange(256))


def test_voi_lut_table_kernel_matches_reference() -> None:
    table = RNG.integers(0, 4096, 300).astype(np.uint16)
    lut = Lut((300, 100, 12), table)
    frame = RNG.integers(0, 500, (20, 30)).astype(np.uint16)
    out = render_frame(frame, RenderParams(voi_lut=lut))
    expected = table[np.clip(frame.astype(int) - 100, 0, 299)] * (255 / 4095)
    close(out, to_u8(expected), tol=0)


def test_modality_lut_kernel_matches_reference() -> None:
    table = RNG.integers(0, 65536, 4096).astype(np.uint16)
    src = RNG.integers(-3000, 3000, (25, 31)).astype(np.int16)
    out = np.empty(src.shape, np.float32)
    kern.apply_table(src, table.astype(np.float32), -2048, out)
    np.testing.assert_array_equal(out, table[np.clip(src.astype(int) + 2048, 0, 4095)])


def test_palette_kernel_matches_reference() -> None:
    luts = [RNG.integers(0, 65536, 200).astype(np.uint16) for _ in range(3)]
    params = RenderParams(
        photometric_interpretation="PALETTE COLOR",
        palette=tuple(Lut((200, 20, 16), t) for t in luts),  # type: ignore[arg-type]
    )
    frame = RNG.integers(0, 256, (13, 17)).astype(np.uint8)
    out = render_frame(frame, params)
    index = np.clip(frame.astype(int) - 20, 0, 199)
    expected = np.stack([t[index] for t in luts], axis=-1) * (255 / 65535)
    close(out, to_u8(expected), tol=0)


def test_palette_entries_zero_means_65536() -> None:
    lut = Lut((0, 0, 16), np.arange(65536, dtype=np.uint16))
    assert lut.entries == 65536
    params = RenderParams(photometric_interpretation="PALETTE COLOR", palette=(lut, lut, lut))
    out = render_frame(np.array([[0, 65535, 257 * 100]], np.uint16), params)
    assert out[0, :, 0].tolist() == [0, 255, 100]


def test_ybr_full_kernel_matches_equations() -> None:
    ybr = RNG.integers(0, 256, (11, 19, 3)).astype(np.uint8)
    out = render_frame(ybr, RenderParams(photometric_interpretation="YBR_FULL"))
    y, cb, cr = (ybr[..., i].astype(np.float64) for i in range(3))
    expected = np.stack(
        [
            y + 1.402 * (cr - 128),
            y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
            y + 1.772 * (cb - 128),
        ],
        axis=-1,
    )
    close(out, to_u8(expected), tol=0)
    same = render_frame(ybr, RenderParams(photometric_interpretation="YBR_FULL_422"))
    np.testing.assert_array_equal(same, out)


def test_rgb_wide_samples_scaled_to_8_bits() -> None:
    rgb = RNG.integers(0, 4096, (9, 7, 3)).astype(np.uint16)
    out = render_frame(rgb, RenderParams(photometric_interpretation="RGB", bits_stored=12))
    close(out, to_u8(rgb * (255 / 4095)), tol=0)
    rgb8 = RNG.integers(0, 256, (9, 7, 3)).astype(np.uint8)
    np.testing.assert_array_equal(
        render_frame(rgb8, RenderParams(photometric_interpretation="RGB")), rgb8
    )


def test_monochrome1_and_invert() -> None:
    frame = RNG.integers(0, 1024, (20, 20)).astype(np.uint16)
    base = RenderParams(window_center=512, window_width=1024)
    normal = render_frame(frame, base)
    mono1 = RenderParams(
        photometric_interpretation="MONOCHROME1", window_center=512, window_width=1024
    )
    np.testing.assert_array_equal(render_frame(frame, mono1), 255 - normal)
    flipped = RenderParams(window_center=512, window_width=1024, invert=True)
    np.testing.assert_array_equal(render_frame(frame, flipped), 255 - normal)


def test_auto_window_is_full_frame_min_max() -> None:
    frame = RNG.integers(-1000, 3000, (40, 50)).astype(np.int16)
    frame[0, 0], frame[-1, -1] = -1000, 2999
    params = RenderParams(rescale_slope=2.0, rescale_intercept=-100.0, pixel_representation=1)
    out = render_frame(frame, params)
    x = frame * 2.0 - 100.0
    close(out, to_u8(ref_window(x, (x.min() + x.max()) / 2, x.max() - x.min(), "LINEAR_EXACT")))
    assert out[0, 0] == 0 and out[-1, -1] == 255
    # the window comes from the whole frame: a region (a tile) keeps the frame's mapping
    part = render_frame(frame, params, region=(10, 5, 20, 15))
    np.testing.assert_array_equal(part, out[5:20, 10:30])
    flat = render_frame(np.full((4, 4), 7, np.uint8), RenderParams())
    assert flat.shape == (4, 4)


def test_unsigned_input_with_signed_representation_is_sign_extended() -> None:
    signed = RNG.integers(-2048, 2048, (16, 16)).astype(np.int16)
    stored = signed.view(np.uint16) & 0x0FFF  # 12 bits stored, as a codec returns them
    params = RenderParams(
        pixel_representation=1, bits_stored=12, window_center=0, window_width=4000
    )
    np.testing.assert_array_equal(render_frame(stored, params), render_frame(signed, params))


def test_float_frames_with_nan_and_inf() -> None:
    frame = np.array([[0.0, 0.5, np.nan], [1.0, np.inf, -np.inf]], np.float32)
    out = render_frame(frame, RenderParams())
    assert out.tolist() == [[0, 128, 0], [255, 255, 0]]


def test_region_and_out_size() -> None:
    frame = RNG.integers(0, 256, (60, 80)).astype(np.uint8)
    params = RenderParams(window_center=127.5, window_width=256, voi_function="LINEAR_EXACT")
    full = render_frame(frame, params)
    np.testing.assert_array_equal(
        render_frame(frame, params, region=(10, 20, 30, 15)), full[20:35, 10:40]
    )
    clipped = render_frame(frame, params, region=(70, 50, 100, 100))
    np.testing.assert_array_equal(clipped, full[50:, 70:])
    half = render_frame(frame, params, region=(10, 20, 30, 16), out_size=(8, 15))
    close(half, to_u8(frame[20:36, 10:40].reshape(8, 2, 15, 2).mean(axis=(1, 3))))
    bigger = render_frame(frame, params, region=(0, 0, 4, 4), out_size=(8, 8))
    np.testing.assert_array_equal(bigger, np.repeat(np.repeat(full[:4, :4], 2, 0), 2, 1))


def test_thumbnail_keeps_aspect_ratio() -> None:
    frame = RNG.integers(0, 4096, (300, 512)).astype(np.uint16)
    thumb = thumbnail(frame, RenderParams())
    assert thumb.shape == (75, 128) and thumb.dtype == np.uint8
    assert thumbnail(frame, RenderParams(), max_size=64).shape == (38, 64)
    small = np.zeros((20, 10), np.uint8)
    assert thumbnail(small, RenderParams()).shape == (20, 10)
    assert fit_size(1, 10000, 128, 128) == (1, 128)
    rgb = RNG.integers(0, 256, (64, 32, 3)).astype(np.uint8)
    assert thumbnail(rgb, RenderParams(photometric_interpretation="RGB"), 16).shape == (16, 8, 3)


def test_pyramid_levels() -> None:
    assert tile_pyramid_levels(100, 200) == [(100, 200)]
    assert tile_pyramid_levels(256, 256) == [(256, 256)]
    assert tile_pyramid_levels(257, 100) == [(257, 100), (129, 50)]
    assert tile_pyramid_levels(3072, 2614) == [
        (3072, 2614), (1536, 1307), (768, 654), (384, 327), (192, 164)
    ]  # fmt: skip
    assert tile_pyramid_levels(1000, 1000, tile=100)[-1] == (63, 63)
    with pytest.raises(CodecError):
        tile_pyramid_levels(0, 10)


def _stitch(frame: np.ndarray, params: RenderParams, level: int, tile: int) -> np.ndarray:
    rows, cols = tile_pyramid_levels(frame.shape[0], frame.shape[1], tile)[level]
    lines = []
    for y in range(math.ceil(rows / tile)):
        lines.append(
            np.concatenate(
                [
                    render_tile(frame, params, level, x, y, tile)
                    for x in range(math.ceil(cols / tile))
                ],
                axis=1,
            )
        )
    return np.concatenate(lines, axis=0)


def test_tiles_stitch_to_the_level_image() -> None:
    frame = RNG.integers(-1024, 2000, (150, 233)).astype(np.int16)
    params = RenderParams(pixel_representation=1, rescale_intercept=-5.0)
    levels = tile_pyramid_levels(150, 233, tile=64)
    assert levels == [(150, 233), (75, 117), (38, 59)]
    np.testing.assert_array_equal(_stitch(frame, params, 0, 64), render_frame(frame, params))
    for level in (1, 2):
        close(
            _stitch(frame, params, level, 64), render_frame(frame, params, out_size=levels[level])
        )
    assert render_tile(frame, params, 2, 0, 0, 64).shape == (38, 59)
    for bad in ((3, 0, 0), (1, 2, 0), (0, 0, 3), (0, -1, 0)):
        with pytest.raises(CodecError):
            render_tile(frame, params, *bad, tile=64)


def test_bad_input_is_refused() -> None:
    grey = np.zeros((8, 8), np.uint16)
    for frame in (np.zeros((8, 8, 2)), np.zeros((0, 8)), np.zeros(8), np.zeros((8, 8), complex)):
        with pytest.raises(CodecError):
            render_frame(frame, RenderParams())
    with pytest.raises(CodecError):
        render_frame(grey, RenderParams(photometric_interpretation="RGB"))
    with pytest.raises(CodecError):
        render_frame(np.zeros((8, 8, 3), np.uint8), RenderParams())
    for region in ((8, 0, 1, 1), (0, 0, 0, 4), (-1, 0, 4, 4)):
        with pytest.raises(CodecError):
            render_frame(grey, RenderParams(), region=region)
    with pytest.raises(CodecError):
        render_frame(grey, RenderParams(), out_size=(0, 4))
    for bad in (
        {"voi_function": "CUBIC"},
        {"window_center": 1.0},
        {"window_center": 1.0, "window_width": 0.5},
        {"window_center": 1.0, "window_width": 0.0, "voi_function": "SIGMOID"},
        {"photometric_interpretation": "PALETTE COLOR"},
        {"rescale_slope": float("nan")},
    ):
        with pytest.raises(CodecError):
            RenderParams(**bad)  # type: ignore[arg-type]
    with pytest.raises(CodecError):
        Lut((300, 0, 16), np.zeros(10, np.uint16))
    with pytest.raises(CodecError):
        render_frame(np.zeros((4, 4, 3), np.uint8), RenderParams(photometric_interpretation="HSV"))


# --- real files vs pydicom -------------------------------------------------------------


def _read(name: str) -> pydicom.Dataset:
    local = SAMPLES / name
    path = str(local) if local.exists() else get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} not available")
    return pydicom.dcmread(path, force=True)


def _lut(
    item: pydicom.Dataset, data_keyword: str = "LUTData", desc_keyword: str = "LUTDescriptor"
) -> Lut:
    descriptor = [int(v) for v in item[desc_keyword].value]
    data = item[data_keyword].value
    if isinstance(data, bytes):
        data = np.frombuffer(
            data, "<u2" if descriptor[2] > 8 or len(data) >= 2 * (descriptor[0] or 65536) else "u1"
        )
    return Lut((descriptor[0], descriptor[1], descriptor[2]), np.asarray(data))


def _windowed_reference(values: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """pydicom's windowing output (range of BitsStored) scaled to 0..255."""
    out = apply_windowing(values.astype(np.float64), ds)
    bits = ds.BitsStored
    if ds.PixelRepresentation == 1:
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        low, high = 0, 2**bits - 1
    if "RescaleSlope" in ds:  # pydicom moves the output range through the rescale too
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        low, high = sorted((low * slope + intercept, high * slope + intercept))
    return to_u8((out - low) * 255 / (high - low))


@pytest.mark.parametrize("name", ["RG3_UNCI.dcm", "RG1_UNCI.dcm"])
def test_monochrome1_window_matches_pydicom(name: str) -> None:
    ds = _read(name)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    arr = ds.pixel_array
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    params = RenderParams(
        photometric_interpretation="MONOCHROME1",
        bits_stored=ds.BitsStored,
        rescale_slope=float(ds.get("RescaleSlope", 1)),
        rescale_intercept=float(ds.get("RescaleIntercept", 0)),
        window_center=center,
        window_width=width,
    )
    crop = (100, 200, 300, 250)
    out = render_frame(arr, params, region=crop)
    reference = _windowed_reference(apply_modality_lut(arr, ds), ds)[200:450, 100:400]
    close(out, 255 - reference)
    assert thumbnail(arr, params).shape[:2] == fit_size(ds.Rows, ds.Columns, 128, 128)


def test_ct_window_matches_pydicom() -> None:
    ds = _read("CT_small.dcm")
    arr = ds.pixel_array
    ds.WindowCenter, ds.WindowWidth = 40, 400  # the file has none: a soft-tissue window
    params = RenderParams(
        bits_stored=ds.BitsStored,
        pixel_representation=ds.PixelRepresentation,
        rescale_slope=float(ds.RescaleSlope),
        rescale_intercept=float(ds.RescaleIntercept),
        window_center=float(ds.WindowCenter),
        window_width=float(ds.WindowWidth),
    )
    close(render_frame(arr, params), _windowed_reference(apply_modality_lut(arr, ds), ds))


def test_voi_lut_file_matches_pydicom() -> None:
    ds = _read("vlut_04.dcm")
    arr = ds.pixel_array
    lut = _lut(ds.VOILUTSequence[0])
    params = RenderParams(bits_stored=ds.BitsStored, voi_lut=lut)
    reference = apply_voi_lut(arr, ds).astype(np.float64) * (255 / (2**lut.bits - 1))
    close(render_frame(arr, params), to_u8(reference))


def test_modality_lut_file_matches_pydicom() -> None:
    ds = _read("mlut_18.dcm")
    arr = ds.pixel_array
    lut = _lut(ds.ModalityLUTSequence[0])
    params = RenderParams(
        bits_stored=ds.BitsStored,
        pixel_representation=ds.PixelRepresentation,
        modality_lut=lut,
        window_center=2000.0,
        window_width=30000.0,
    )
    modality = apply_modality_lut(arr, ds).astype(np.float64)
    mapped = np.empty(arr.shape, np.float32)
    kern.apply_table(arr, lut.table(), lut.first_mapped(True), mapped)
    np.testing.assert_array_equal(mapped, modality)
    close(render_frame(arr, params), to_u8(ref_window(modality, 2000.0, 30000.0, "LINEAR")))
    auto = render_frame(arr, RenderParams(pixel_representation=1, modality_lut=lut))
    low, high = modality.min(), modality.max()
    close(auto, to_u8(ref_window(modality, (low + high) / 2, high - low, "LINEAR_EXACT")))


def test_palette_file_matches_pydicom() -> None:
    ds = _read("OT-PAL-8-face.dcm")
    if "TransferSyntaxUID" not in ds.file_meta:  # the file has no meta header
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    arr = ds.pixel_array
    palette = tuple(
        _lut(ds, f"{c}PaletteColorLookupTableData", f"{c}PaletteColorLookupTableDescriptor")
        for c in ("Red", "Green", "Blue")
    )
    params = RenderParams(photometric_interpretation="PALETTE COLOR", palette=palette)  # type: ignore[arg-type]
    reference = apply_color_lut(arr, ds).astype(np.float64)
    bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    close(render_frame(arr, params), to_u8(reference * (255 / (2**bits - 1))))


def test_ybr_file_matches_pydicom() -> None:
    ds = _read("SC_ybr_full_uncompressed.dcm")
    ds.pixel_array_options(as_rgb=False)
    arr = ds.pixel_array
    assert ds.PhotometricInterpretation == "YBR_FULL"
    frames = arr if arr.ndim == 4 else arr[np.newaxis]
    for frame in frames:
        reference = convert_color_space(frame, "YBR_FULL", "RGB")
        out = render_frame(frame, RenderParams(photometric_interpretation="YBR_FULL"))
        close(out, reference)
