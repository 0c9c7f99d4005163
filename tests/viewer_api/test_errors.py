"""Error statuses: unknown UIDs 404, malformed requests 400, media types 406/415, storage 503;
and the error mapping itself."""

from __future__ import annotations

import pytest
import requests

from kho import errors
from kho.viewer_api.errors import status_for
from tests.viewer_api.conftest import Served


@pytest.mark.parametrize(
    "path",
    [
        "/studies/1.2.3",
        "/studies/1.2.3/metadata",
        "/studies/1.2.3/series/4.5.6",
        "/studies/1.2.3/series/4.5.6/metadata",
        "/studies/1.2.3/series/4.5.6/instances/7.8.9",
        "/studies/1.2.3/series/4.5.6/instances/7.8.9/metadata",
        "/studies/1.2.3/series/4.5.6/instances/7.8.9/frames/1",
        "/studies/1.2.3/series/4.5.6/instances/7.8.9/rendered",
        "/studies/1.2.3/thumbnail",
        "/studies/1.2.3/series/4.5.6/thumbnail",
        "/studies/1.2.3/series/4.5.6/instances/7.8.9/frames/1/tiles/0/0/0",
        "/studies/1.2.3/series/4.5.6/instances/7.8.9/bulkdata/7FE00010",
    ],
)
def test_unknown_uids_are_404(served: Served, path: str) -> None:
    r = requests.get(served.url(path))
    assert r.status_code == 404, r.text
    assert "1.2.3" in r.text or "7.8.9" in r.text


def test_instance_under_the_wrong_series_is_404(served: Served) -> None:
    a, b = served.samples["MR2_J2KR.dcm"], served.samples["US1_UNCR.dcm"]
    r = requests.get(served.url(f"/studies/{a.study}/series/{b.series}/instances/{a.sop}/metadata"))
    assert r.status_code == 404


def test_wrong_accept_is_406(served: Served) -> None:
    s = served.samples["MR2_J2KR.dcm"]
    meta = served.url(f"/studies/{s.study}/series/{s.series}/metadata")
    assert requests.get(meta, headers={"Accept": "application/dicom+xml"}).status_code == 406
    inst = served.url(served.instance_path("MR2_J2KR.dcm"))
    assert requests.get(inst, headers={"Accept": "text/html"}).status_code == 406
    bulk = served.url(
        served.instance_path("MR-SIEMENS-DICOM-WithOverlays.dcm") + "/bulkdata/60003000"
    )
    assert requests.get(bulk, headers={"Accept": "image/png"}).status_code == 406


def test_malformed_requests_are_400(served: Served) -> None:
    path = served.instance_path("MR2_J2KR.dcm")
    assert requests.get(served.url(path + "/bulkdata/zz")).status_code == 400
    assert requests.get(served.url(path + "/frames/1/tiles/x/0/0")).status_code == 400
    assert requests.get(served.url(path + "/rendered?viewport=1,2,3")).status_code == 400


def test_stow_to_a_get_only_resource_is_405(served: Served) -> None:
    assert requests.post(served.url("/series")).status_code == 405


def test_error_mapping_is_complete() -> None:
    assert status_for(errors.NotFoundError("x")) == 404
    assert status_for(errors.ObjectNotFoundError("x")) == 404
    assert status_for(errors.QueryError("x")) == 400
    assert status_for(errors.InvalidDicomError("x")) == 400
    assert status_for(errors.DatasetMismatchError("x")) == 400
    assert status_for(errors.DuplicateInstanceError("x")) == 409
    assert status_for(errors.StorageUnavailableError("x")) == 503
    assert status_for(errors.CatalogError("x")) == 503
    assert status_for(errors.AuthenticationError("x")) == 401
    assert status_for(errors.AccessDeniedError("x")) == 403
    assert status_for(RuntimeError("x")) == 500


def test_storage_outage_is_503(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    store = served.archive.store

    def unavailable(*_args: object, **_kwargs: object) -> bytes:
        raise errors.StorageUnavailableError("object store unreachable")

    # the store itself refusing (what a dead S3 endpoint raises): not a mock of kho code
    monkeypatch.setattr(store, "get", unavailable)
    monkeypatch.setattr(store, "get_range", unavailable)
    r = requests.get(served.url(served.instance_path("MR2_J2KR.dcm")))
    assert r.status_code == 503
    assert "unreachable" in r.text


def test_openapi_document_lists_the_resources(served: Served) -> None:
    doc = requests.get(served.url("").removesuffix("/dicom-web") + "/openapi.json").json()
    paths = set(doc["paths"])
    assert "/dicom-web/studies" in paths
    assert (
        "/dicom-web/studies/{study}/series/{series}/instances/{instance}/frames/{frame}/tiles/{level}/{x}/{y}"
        in paths
    )
