"""Path parameters and UID query values: a blank, wildcard or malformed UID is 400, never
"everything" (issue 12, item 2).  The route cases are generated from the application's
route table, so a route added later is checked without anyone listing it here."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from kho.viewer_api.app import create_app
from tests.viewer_api.conftest import (
    ROUTE_SAMPLE,
    Served,
    fill,
    get_routes,
    params_of,
    valid_values,
)

UID_PARAMS = ("study", "series", "instance")

#: as they go on the wire: each stays one path segment (encoded where it must)
BAD_UIDS = {
    "space": "%20",
    "two spaces": "%20%20",
    "tab": "%09",
    "newline": "%0A",
    "65 characters": "1." * 32 + "1",
    "empty component": "1..2",
    "trailing dot": "1.2.",
    "encoded slash": "..%2Fx",
    "dot dot": "%2E%2E",
    "inner space": "a%20b",
    "wildcard": "*",
    "question mark": "1.2%3F",
    "list": "1.2%5C1.3",
    "nul": "1.2%00",
}
BAD_FRAMES = {
    "zero": "0",
    "negative": "-1",
    "letter": "a",
    "space": "%20",
    "fraction": "1.5",
    "plus": "%2B1",
    "ten digits": "1234567890",
}
BAD_FRAME_LISTS = {**BAD_FRAMES, "empty item": "1,,2", "trailing comma": "1,", "spaced": "1,%202"}


@pytest.fixture(scope="module")
def clients(served: Served) -> Iterator[list[httpx.Client | TestClient]]:
    """The live server (fast path, uvicorn) and FastAPI's router alone (no fast path)."""
    with (
        httpx.Client(base_url=f"http://127.0.0.1:{served.server.port}") as live,
        TestClient(create_app(served.archive, fast_path=False)) as routed,
    ):
        yield [live, routed]


def test_every_route_answers_its_valid_path(
    served: Served, clients: list[httpx.Client | TestClient]
) -> None:
    """The substitution below is sound: with the sample's real UIDs every route serves."""
    values = valid_values(served)
    for route in get_routes(served):
        path = fill(route, values)
        for client in clients:
            r = client.get(path)
            assert r.status_code == 200, (route, r.status_code, r.text[:200])


def test_bad_uid_in_any_route_is_400(
    served: Served, clients: list[httpx.Client | TestClient]
) -> None:
    values = valid_values(served)
    checked = 0
    for route in get_routes(served):
        for param in (p for p in params_of(route) if p in UID_PARAMS):
            for label, bad in BAD_UIDS.items():
                path = fill(route, {**values, param: bad})
                for client in clients:
                    r = client.get(path)
                    assert r.status_code == 400, (route, param, label, r.status_code)
                    assert r.headers["content-type"].startswith("text/plain")
                    checked += 1
    assert checked > 500


def test_bad_uid_message_names_the_parameter(served: Served) -> None:
    r = httpx.get(served.url("/studies/%20/metadata"))
    assert r.status_code == 400
    assert "Study Instance UID" in r.text
    s = served.samples[ROUTE_SAMPLE]
    r = httpx.get(served.url(f"/studies/{s.study}/series/{s.series}/instances/1..2/metadata"))
    assert r.status_code == 400
    assert "SOP Instance UID" in r.text and "empty UID component" in r.text


def test_bad_frame_numbers_in_any_route_are_400(
    served: Served, clients: list[httpx.Client | TestClient]
) -> None:
    values = valid_values(served)
    checked = 0
    for route in get_routes(served):
        for param in params_of(route):
            bad_values = {"frame": BAD_FRAMES, "frames": BAD_FRAME_LISTS}.get(param)
            if bad_values is None:
                continue
            for label, bad in bad_values.items():
                path = fill(route, {**values, param: bad})
                for client in clients:
                    r = client.get(path)
                    assert r.status_code == 400, (route, label, r.status_code, r.text)
                    checked += 1
    assert checked >= 50


def test_negative_tile_coordinates_are_400(served: Served) -> None:
    path = served.instance_path(ROUTE_SAMPLE) + "/frames/1/tiles"
    for tail in ("-1/0/0", "0/-1/0", "0/0/-1", "0/0/1.0"):
        assert httpx.get(served.url(f"{path}/{tail}")).status_code == 400, tail


def test_encoded_slash_in_a_query_value_is_not_a_path_problem(
    clients: list[httpx.Client | TestClient],
) -> None:
    for client in clients:
        r = client.get("/dicom-web/studies?StudyDescription=a%2Fb")
        assert r.status_code == 200, r.text


def test_stow_to_a_blank_study_is_400(served: Served) -> None:
    r = httpx.post(
        served.url("/studies/%20"),
        content=b"--XyZ--\r\n",
        headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=XyZ'},
    )
    assert r.status_code == 400
    assert "Study Instance UID" in r.text


# --- QIDO values that are UIDs ----------------------------------------------------------


@pytest.mark.parametrize(
    ("resource", "keyword"),
    [
        ("/studies", "StudyInstanceUID"),
        ("/series", "SeriesInstanceUID"),
        ("/instances", "SOPInstanceUID"),
        ("/instances", "0020000D"),  # by tag too
        ("/series", "StudyInstanceUID"),
    ],
)
@pytest.mark.parametrize(
    "value", ["", " ", "  ", "\t", "\n", "1..2", "*", "1.2.*", "1.2,", "a b", "1." * 32 + "1"]
)
def test_blank_or_malformed_uid_query_value_is_400(
    served: Served, resource: str, keyword: str, value: str
) -> None:
    r = httpx.get(served.url(resource), params={keyword: value})
    assert r.status_code == 400, (resource, keyword, value, r.status_code, r.text[:200])


def test_uid_list_matching_with_commas_and_backslashes(served: Served) -> None:
    """PS3.18 8.3.4.1 uid-list-match: ``attribute=1#value`` (comma-separated)."""
    a, b = served.samples["MR2_J2KR.dcm"], served.samples["US1_UNCR.dcm"]
    for value in (f"{a.study},{b.study}", f"{a.study}\\{b.study}"):
        r = httpx.get(served.url("/studies"), params={"StudyInstanceUID": value})
        assert r.status_code == 200, r.text
        found = {row["0020000D"]["Value"][0] for row in r.json()}
        assert found == {a.study, b.study}
    pairs = [("StudyInstanceUID", a.study), ("StudyInstanceUID", b.study)]
    repeated = httpx.get(served.url("/studies"), params=pairs)
    assert {row["0020000D"]["Value"][0] for row in repeated.json()} == {a.study, b.study}
    one = httpx.get(served.url("/series"), params={"SeriesInstanceUID": a.series})
    assert [row["0020000E"]["Value"][0] for row in one.json()] == [a.series]


def test_bad_uid_inside_a_path_scoped_search_is_400(served: Served) -> None:
    s = served.samples[ROUTE_SAMPLE]
    r = httpx.get(
        served.url(f"/studies/{s.study}/series/{s.series}/instances"),
        params={"SOPInstanceUID": " "},
    )
    assert r.status_code == 400
