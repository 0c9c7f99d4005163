"""Rendered images, thumbnails and tiles."""

from __future__ import annotations

import imagecodecs
import numpy as np
import pytest
import requests

from kho.archive.read.rendering import tile_levels
from tests.viewer_api.conftest import Served


def decode(response: requests.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    kind = response.headers["content-type"]
    if kind == "image/png":
        return np.asarray(imagecodecs.png_decode(response.content))
    assert kind == "image/jpeg"
    return np.asarray(imagecodecs.jpeg8_decode(response.content))


def test_rendered_instance_with_dicomweb_client(served: Served) -> None:
    s = served.samples["MR2_J2KR.dcm"]
    jpeg = served.client.retrieve_instance_rendered(
        s.study, s.series, s.sop, media_types=("image/jpeg",)
    )
    img = np.asarray(imagecodecs.jpeg8_decode(jpeg))
    assert img.shape == (1024, 1024)
    png = served.client.retrieve_instance_frames_rendered(
        s.study, s.series, s.sop, [1], media_types=("image/png",)
    )
    assert np.asarray(imagecodecs.png_decode(png)).shape == (1024, 1024)


def test_window_maps_values_exactly_in_png(served: Served) -> None:
    path = served.instance_path("693_UNCR.dcm")
    ds = served.samples["693_UNCR.dcm"].dataset()
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    img = decode(
        requests.get(
            served.url(path + "/rendered"),
            params={"window": "40,400,LINEAR_EXACT", "accept": "image/png"},
        )
    )
    expected = np.clip((hu - (40 - 200)) * (255 / 400), 0, 255).astype(np.uint8)
    assert np.abs(img.astype(int) - expected.astype(int)).max() <= 1
    wide = decode(
        requests.get(
            served.url(path + "/rendered"), params={"window": "40,4000", "accept": "image/png"}
        )
    )
    assert wide.std() < img.std()  # a wider window flattens contrast


def test_viewport_and_quality(served: Served) -> None:
    path = served.instance_path("MR2_J2KR.dcm") + "/frames/1/rendered"
    small = decode(requests.get(served.url(path), params={"viewport": "128,64"}))
    assert small.shape == (64, 64)  # aspect kept within 128x64
    region = decode(requests.get(served.url(path), params={"viewport": "100,100,0,0,512,256"}))
    assert region.shape == (50, 100)
    low = requests.get(served.url(path), params={"quality": 10})
    high = requests.get(served.url(path), params={"quality": 95})
    assert len(low.content) < len(high.content)
    assert requests.get(served.url(path), params={"quality": 0}).status_code == 400
    assert requests.get(served.url(path), params={"viewport": "0,10"}).status_code == 400
    assert requests.get(served.url(path), params={"window": "40"}).status_code == 400


def test_monochrome1_is_inverted(served: Served) -> None:
    path = served.instance_path("RG3_J2KR.dcm") + "/rendered"
    img = decode(
        requests.get(served.url(path), params={"viewport": "256,256", "accept": "image/png"})
    )
    ds = served.samples["RG3_J2KR.dcm"].dataset()
    arr = ds.pixel_array[::7, ::7]
    # MONOCHROME1: high stored values are dark
    bright, dark = (
        np.unravel_index(arr.argmax(), arr.shape),
        np.unravel_index(arr.argmin(), arr.shape),
    )
    assert (
        img[bright[0] * 256 // arr.shape[0], bright[1] * 256 // arr.shape[1]]
        < img[dark[0] * 256 // arr.shape[0], dark[1] * 256 // arr.shape[1]]
    )


def test_rgb_rendering_keeps_colour(served: Served) -> None:
    img = decode(
        requests.get(
            served.url(served.instance_path("US1_UNCR.dcm") + "/rendered"),
            params={"accept": "image/png"},
        )
    )
    assert np.array_equal(img, served.samples["US1_UNCR.dcm"].dataset().pixel_array)


@pytest.mark.parametrize("level", ["study", "series", "instance", "frame"])
def test_thumbnails_at_every_level(served: Served, level: str) -> None:
    s = served.samples["RG3_J2KR.dcm"]
    path = {
        "study": f"/studies/{s.study}",
        "series": f"/studies/{s.study}/series/{s.series}",
        "instance": served.instance_path("RG3_J2KR.dcm"),
        "frame": served.instance_path("RG3_J2KR.dcm") + "/frames/1",
    }[level]
    img = decode(requests.get(served.url(path + "/thumbnail")))
    assert max(img.shape) == 128


def test_thumbnail_made_at_ingest_is_served(served: Served) -> None:
    s = served.samples["693_UNCR.dcm"]
    record = served.archive.catalog.require_instance(s.sop)
    stored = served.archive.store.get(record.derived_keys["thumbnail"])
    r = requests.get(served.url(served.instance_path("693_UNCR.dcm") + "/thumbnail"))
    assert r.content == stored
    frame2 = requests.get(
        served.url(served.instance_path("emri_small_jpeg_ls_lossless.dcm") + "/frames/2/thumbnail")
    )
    assert decode(frame2).shape == (64, 64)  # small images are not enlarged


def test_tiles_cover_the_radiograph(served: Served) -> None:
    s = served.samples["RG3_J2KR.dcm"]
    base = served.instance_path("RG3_J2KR.dcm") + "/frames/1/tiles"
    levels = tile_levels(1760, 1760)
    assert levels == 4  # 1760 -> 880 -> 440 -> 220
    top = decode(requests.get(served.url(f"{base}/{levels - 1}/0/0")))
    assert top.shape == (220, 220)
    full = decode(requests.get(served.url(f"{base}/0/0/0"), params={"accept": "image/png"}))
    assert full.shape == (256, 256)
    edge = decode(requests.get(served.url(f"{base}/0/6/6")))
    assert edge.shape == (1760 - 6 * 256, 1760 - 6 * 256)
    # tile (1, 2) of level 0 is that region of the full-resolution rendering
    rendered = decode(
        requests.get(
            served.url(served.instance_path("RG3_J2KR.dcm") + "/rendered"),
            params={"accept": "image/png"},
        )
    )
    tile = decode(requests.get(served.url(f"{base}/0/1/2"), params={"accept": "image/png"}))
    assert np.array_equal(tile, rendered[512:768, 256:512])
    assert requests.get(served.url(f"{base}/0/7/0")).status_code == 404
    assert requests.get(served.url(f"{base}/{levels}/0/0")).status_code == 404
    assert (
        requests.get(served.url(f"{base.replace('/frames/1/', '/frames/2/')}/0/0/0")).status_code
        == 404
    )
    assert s.sop


def test_rendered_refuses_other_media_types(served: Served) -> None:
    path = served.instance_path("MR2_J2KR.dcm") + "/rendered"
    assert requests.get(served.url(path), headers={"Accept": "image/gif"}).status_code == 406
    assert (
        requests.get(served.url(path), headers={"Accept": "image/*"}).headers["content-type"]
        == "image/jpeg"
    )
