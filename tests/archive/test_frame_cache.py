"""Decoded frames for viewers: the bounded cache with read-ahead (kho.archive.read.pixels), and
small rendered views made from the stored thumbnail and tile pyramid
(kho.archive.read.rendering)."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pydicom
import pytest

from kho.archive.archive import Archive
from kho.archive.catalog import InstanceRecord
from kho.archive.read import pixels, rendering
from kho.bench.phantom import ct_series_datasets, ct_slice_hu
from kho.viewer_api.rendered import params_of
from tests.archive.test_tile_pyramid import _radiograph
from tests.helpers.part10 import part10_bytes


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    pixels.FRAME_CACHE.wait_idle()
    pixels.FRAME_CACHE.clear()


def _series(archive: Archive, count: int, rows: int = 64) -> list[InstanceRecord]:
    uids = [
        archive.ingest_part10(d).sop_uid for d in ct_series_datasets(count, rows=rows, cols=rows)
    ]
    assert archive.finisher.wait_idle(timeout=120)
    return [archive.catalog.require_instance(uid) for uid in uids]


def _expected(archive: Archive, record: InstanceRecord) -> np.ndarray:
    ds = pydicom.dcmread(BytesIO(archive.read_part10(record)))
    return np.asarray(ds.pixel_array)


def test_frames_come_decoded_once_then_from_the_cache(archive: Archive) -> None:
    records = _series(archive, 2)
    assert all(r.pixel_format == "jpeg-ls" for r in records)
    cache = pixels.FRAME_CACHE
    first = pixels.frame_array(archive, records[0], 1, read_ahead=False)
    assert np.array_equal(first, _expected(archive, records[0]))
    assert not first.flags.writeable  # shared by every request: nobody may write to it
    hits = cache.hits
    again = pixels.frame_array(archive, records[0], 1, read_ahead=False)
    assert again is first and cache.hits == hits + 1
    assert cache.held_bytes == first.nbytes
    assert not cache.cached(archive, records[1], 1)  # no read-ahead was asked for


def test_a_viewer_walking_a_series_finds_the_next_slices_decoded(archive: Archive) -> None:
    records = _series(archive, 8)
    cache = pixels.FRAME_CACHE
    pixels.frame_array(archive, records[1], 1)
    # the series' order is looked up in the background, then the next four slices decode
    assert cache.wait_idle()
    assert [cache.cached(archive, r, 1) for r in records] == [False] + [True] * 5 + [False] * 2
    misses = cache.misses
    for record in records[2:6]:  # what the viewer asks next: decoded already
        assert np.array_equal(pixels.frame_array(archive, record, 1), _expected(archive, record))
    assert cache.misses == misses
    assert cache.read_ahead_decodes >= 4


def test_read_ahead_of_a_multi_frame_instance_decodes_its_next_frames(archive: Archive) -> None:
    ds = pydicom.dcmread(BytesIO(ct_series_datasets(1, rows=48, cols=40)[0]))
    frames = np.stack(
        [(ct_slice_hu(i, 8, rows=48, cols=40).astype(np.int32) + 1024) for i in range(8)]
    ).astype(np.uint16)
    ds.NumberOfFrames = 8
    ds.PixelData = frames.tobytes()
    uid = archive.ingest_part10(part10_bytes(ds)).sop_uid
    assert archive.finisher.wait_idle(timeout=120)
    record = archive.catalog.require_instance(uid)
    assert record.pixel_format == "jpeg-ls"
    cache = pixels.FRAME_CACHE
    assert np.array_equal(pixels.frame_array(archive, record, 3), frames[2])
    assert cache.wait_idle()
    cached = [cache.cached(archive, record, f) for f in range(1, 9)]
    assert cached == [False, False, True, True, True, True, True, False]
    for number in range(4, 8):
        assert np.array_equal(pixels.frame_array(archive, record, number), frames[number - 1])


def test_the_cache_keeps_within_its_bound(archive: Archive) -> None:
    records = _series(archive, 6)
    cache = pixels.DecodedFrameCache(max_bytes=4 * 64 * 64 * 2, read_ahead=0)
    for record in records:
        cache.frame(archive, record, 1)
        assert cache.held_bytes <= cache.max_bytes
    assert [cache.cached(archive, r, 1) for r in records] == [False] * 2 + [True] * 4
    # a frame larger than a quarter of the bound is decoded for its caller, not kept
    tiny = pixels.DecodedFrameCache(max_bytes=64 * 64 * 2, read_ahead=0)
    assert np.array_equal(tiny.frame(archive, records[0], 1), _expected(archive, records[0]))
    assert tiny.held_bytes == 0


def test_raw_frames_are_read_not_cached(archive: Archive) -> None:
    archive_raw = archive
    ds = pydicom.dcmread(BytesIO(ct_series_datasets(1, rows=16, cols=16)[0]))
    ds.PixelData = np.random.default_rng(1).integers(0, 4096, (16, 16)).astype(np.uint16).tobytes()
    uid = archive_raw.ingest_part10(part10_bytes(ds)).sop_uid
    assert archive_raw.finisher.wait_idle(timeout=120)
    record = archive_raw.catalog.require_instance(uid)
    if record.pixel_format != "raw":
        pytest.skip("noise compressed after all")
    pixels.frame_array(archive_raw, record, 1)
    assert pixels.FRAME_CACHE.held_bytes == 0


# --- small views from the stored levels -------------------------------------------------


def _mean_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean())


def test_small_views_of_a_radiograph_come_from_its_stored_pyramid(archive: Archive) -> None:
    result = archive.ingest_part10(_radiograph())
    assert archive.finisher.wait_idle(timeout=120)
    record = archive.catalog.require_instance(result.sop_uid)
    assert rendering.TILES_OBJECT in record.derived_keys
    values = pixels.frame_array(archive, record, 1)
    params = params_of(archive, record)
    for text in ("256,256", "300,200", "128,128,200,300,600,500", "64,64,600,700,300,300"):
        viewport = rendering.parse_viewport(text)
        assert viewport is not None
        small = rendering.stored_level_image(archive, record, viewport)
        assert small is not None, text
        exact = rendering.render(values, params, viewport=viewport)
        assert small.shape == exact.shape, text
        # the stored levels are JPEG (quality 90) and averaged once more: close, not equal
        assert _mean_difference(small, exact) < 2.0, text
    # as fine as the frame itself: rendered from the decoded frame, not from tiles
    assert rendering.stored_level_image(archive, record, rendering.Viewport(1100, 1300)) is None
    corner = rendering.Viewport(64, 64, (1000, 1200, 300, 300))  # 100x100 pixels: too few
    assert rendering.stored_level_image(archive, record, corner) is None


def test_a_ct_view_within_the_thumbnail_comes_from_the_thumbnail(archive: Archive) -> None:
    (record,) = _series(archive, 1, rows=512)
    assert rendering.THUMBNAIL_OBJECT in record.derived_keys
    values = pixels.frame_array(archive, record, 1)
    params = params_of(archive, record)
    for text in ("128,128", "100,64"):
        viewport = rendering.parse_viewport(text)
        assert viewport is not None
        small = rendering.stored_level_image(archive, record, viewport)
        assert small is not None
        exact = rendering.render(values, params, viewport=viewport)
        # the thumbnail is a quality 85 JPEG of a noisy slice: about 1% off on average
        assert small.shape == exact.shape and _mean_difference(small, exact) < 4.0
    # larger than the thumbnail, and no pyramid below 1024 pixels: the frame is rendered
    assert rendering.stored_level_image(archive, record, rendering.Viewport(256, 256)) is None


def test_the_render_cache_holds_arrays_and_encoded_images_within_its_bound() -> None:
    cache = rendering.RenderCache(max_bytes=4000)
    values = np.zeros((10, 10), dtype=np.uint16)  # 200 bytes
    assert cache.get_or_make(("v",), lambda: values) is values
    assert cache.get(("v",)) is values and cache.get_encoded(("v",)) is None
    for i in range(10):
        cache.put_encoded(("jpeg", i), bytes(900))
        assert cache.held_bytes <= 4000
    assert cache.get_encoded(("jpeg", 9)) == bytes(900)
    assert cache.get_encoded(("jpeg", 0)) is None  # the least recently used went first
    cache.put_encoded(("huge",), bytes(1001))  # over a quarter of the bound: not kept
    assert cache.get_encoded(("huge",)) is None
