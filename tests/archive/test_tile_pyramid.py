"""The stored tile pyramid of large images: written by the finisher, served as stored, and
the same bytes as a tile rendered on request."""

from __future__ import annotations

import numpy as np
from fastapi.testclient import TestClient

from kho.archive.archive import Archive
from kho.archive.read import rendering
from kho.archive.read.pixels import frame_array
from kho.viewer_api.app import create_app
from kho.viewer_api.rendered import params_of
from tests.archive.test_ingest import make_instance
from tests.helpers.part10 import part10_bytes


def _radiograph() -> bytes:
    """A 1300x1100 12-bit image: over the pyramid threshold, three levels of tiles."""
    from io import BytesIO

    import pydicom

    ds = pydicom.dcmread(BytesIO(make_instance()))
    yy, xx = np.mgrid[0:1300, 0:1100]
    img = (2000 + 1500 * np.sin(xx / 90.0) * np.cos(yy / 70.0)).astype(np.uint16)
    ds.Rows, ds.Columns = img.shape
    ds.Modality = "DX"
    ds.WindowCenter, ds.WindowWidth = 2000, 3000
    ds.PixelData = img.tobytes()
    return part10_bytes(ds)


def test_large_image_gets_a_stored_pyramid_served_as_rendered(archive: Archive) -> None:
    data = _radiograph()
    result = archive.ingest_part10(data, defer=True)
    assert archive.finisher.wait_idle(timeout=120)
    record = archive.catalog.require_instance(result.sop_uid)
    assert rendering.TILES_OBJECT in record.derived_keys
    assert rendering.tile_levels(1300, 1100) == 4  # 1300, 650, 325, 163 rows

    values = frame_array(archive, record, 1)
    params = params_of(archive, record)
    client = TestClient(create_app(archive))
    base = (
        f"/dicom-web/studies/{result.study_uid}/series/{result.series_uid}"
        f"/instances/{result.sop_uid}/frames/1/tiles"
    )
    for level, x, y in [(0, 0, 0), (0, 4, 5), (1, 2, 1), (3, 0, 0)]:
        stored = rendering.stored_tile(archive, record, level, x, y)
        assert stored is not None
        on_request = rendering.encode_image(
            rendering.render_tile(values, params, level, x, y), rendering.JPEG, 90
        )
        assert stored == on_request, (level, x, y)
        response = client.get(f"{base}/{level}/{x}/{y}", headers={"Accept": "image/jpeg"})
        assert response.status_code == 200 and response.content == stored
    # outside the pyramid: 404, from the stored index as from the renderer
    assert client.get(f"{base}/0/5/0", headers={"Accept": "image/jpeg"}).status_code == 404
    assert client.get(f"{base}/4/0/0", headers={"Accept": "image/jpeg"}).status_code == 404
    # another window is rendered on request
    windowed = client.get(f"{base}/0/0/0?window=100,200,linear", headers={"Accept": "image/jpeg"})
    assert windowed.status_code == 200 and windowed.content != stored


def test_small_images_have_no_pyramid(archive: Archive) -> None:
    result = archive.ingest_part10(make_instance(), defer=False)
    record = archive.catalog.require_instance(result.sop_uid)
    assert rendering.TILES_OBJECT not in record.derived_keys
