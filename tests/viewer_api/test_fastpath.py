"""The fast path answers exactly as FastAPI's router does, for the routes it takes."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.types import ASGIApp, Receive, Scope, Send

from kho.viewer_api.app import PREFIX, create_app
from kho.viewer_api.fastpath import FastPath, fast_routes
from tests.viewer_api.conftest import Served

STORED = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
DECODED = 'multipart/related; type="application/octet-stream"'


class Recorder:
    """Keeps the scope of the last request after the app has routed it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.scope: dict[str, Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)
        self.scope = dict(scope)


@pytest.fixture(scope="module")
def clients(served: Served) -> Iterator[tuple[TestClient, TestClient, Recorder]]:
    reference = Recorder(create_app(served.archive, fast_path=False))
    with (
        TestClient(create_app(served.archive)) as fast,
        TestClient(reference) as slow,
    ):
        yield fast, slow, reference


def _sample_path(template: str) -> tuple[str, dict[str, str]]:
    values: dict[str, str] = {}

    def fill(m: re.Match[str]) -> str:
        name = m.group(1)
        values[name] = "12" if name in ("frame", "level", "x", "y") else f"1.2.{len(values)}"
        return values[name]

    return re.sub(r"\{(\w+)\}", fill, template), values


@pytest.mark.parametrize("route", fast_routes(PREFIX), ids=lambda r: r.template)
def test_router_picks_the_same_route(
    clients: tuple[TestClient, TestClient, Recorder], route: Any
) -> None:
    _fast, slow, reference = clients
    path, values = _sample_path(route.template)
    fastpath = FastPath(lambda *_: None, None, PREFIX)  # type: ignore[arg-type]
    found = fastpath.match({"type": "http", "method": "GET", "path": path, "root_path": ""})
    assert found is not None and found[0].template == route.template
    assert found[1] == tuple(values.values())
    slow.get(path)
    assert PREFIX + reference.scope["route"].path == route.template
    assert reference.scope["path_params"] == values


@pytest.mark.parametrize(
    "path",
    [
        "/studies/1/series/2/instances/3/frames/1/",
        "/studies/1/series/2/instances/3/frames/1/rendered/x",
        "/studies/1/series/2/instances/3/frames/x/thumbnail",
        "/studies/1/series/2/instances/3/frames/1/tiles/-1/0/0",
        "/studies/1/series/2/instances/3/metadata",
        "/studies/1/series/2/instances/3",
        "/studies/1/metadata",
        "/studies/1/series/2/thumbnail",
    ],
)
def test_other_paths_go_to_fastapi(path: str) -> None:
    fastpath = FastPath(lambda *_: None, None, PREFIX)  # type: ignore[arg-type]
    scope = {"type": "http", "method": "GET", "path": PREFIX + path, "root_path": ""}
    assert fastpath.match(scope) is None
    assert fastpath.match({**scope, "method": "POST", "path": PREFIX + path}) is None


def _normalized(response: Any) -> tuple[int, str, bytes, str | None]:
    content_type = response.headers.get("content-type", "")
    body = response.content
    m = re.search(r"boundary=([^;\s]+)", content_type)
    if m:  # random per response
        content_type = content_type.replace(m.group(1), "B")
        body = body.replace(m.group(1).encode(), b"B")
    return response.status_code, content_type, body, response.headers.get("content-encoding")


def _requests(served: Served) -> list[tuple[str, dict[str, str]]]:
    ct = served.instance_path("693_UNCR.dcm")
    multi = served.instance_path("emri_small_jpeg_ls_lossless.dcm")
    rgb = served.instance_path("SC_rgb_2frame.dcm")
    big = served.instance_path("RG3_J2KR.dcm")
    j2k = served.instance_path("MR2_J2KR.dcm")
    s = served.samples["693_UNCR.dcm"]
    series = f"/studies/{s.study}/series/{s.series}"
    missing = f"{series}/instances/1.2.3.4"
    return [
        (f"{ct}/frames/1", {"Accept": STORED}),
        (f"{ct}/frames/1", {"Accept": DECODED}),
        (f"{ct}/frames/1", {}),
        (f"{ct}/frames/1", {"Accept": "image/jls"}),
        (f"{ct}/frames/1", {"Accept": "image/jp2"}),
        (f"{ct}/frames/2", {"Accept": STORED}),
        (f"{ct}/frames/x", {"Accept": STORED}),
        (f"{multi}/frames/1,3,10", {"Accept": STORED}),
        (f"{multi}/frames/2,4", {"Accept": DECODED}),
        (f"{rgb}/frames/2", {"Accept": DECODED}),
        (f"{j2k}/frames/1", {"Accept": STORED}),
        (f"{j2k}/frames/1", {"Accept": DECODED}),
        (f"{missing}/frames/1", {"Accept": STORED}),
        (f"{ct}/thumbnail", {}),
        (f"{ct}/thumbnail", {"Accept": "image/png"}),
        (f"{ct}/thumbnail?viewport=64,64", {}),
        (f"{ct}/thumbnail?accept=image/png", {}),
        (f"{ct}/thumbnail", {"Accept": "text/html"}),
        (f"{multi}/frames/2/thumbnail", {}),
        (f"{missing}/thumbnail", {}),
        (f"{big}/frames/1/tiles/0/1/1", {}),
        (f"{big}/frames/1/tiles/1/0/0?quality=50", {}),
        (f"{big}/frames/1/tiles/0/0/0?quality=0", {}),
        (f"{big}/frames/1/tiles/0/0/0?quality=x", {}),
        (f"{big}/frames/1/tiles/0/0/0?window=100,200", {}),
        (f"{big}/frames/1/tiles/9/0/0", {}),
        (f"{big}/frames/1/tiles/0/999/0", {}),
        (f"{big}/frames/2/tiles/0/0/0", {}),
        (f"{ct}/rendered", {}),
        (f"{ct}/rendered?viewport=64,64", {}),
        (f"{ct}/rendered?viewport=64,64&accept=image/png", {}),
        (f"{ct}/rendered?quality=0", {}),
        (f"{ct}/rendered", {"Accept": "text/html"}),
        (f"{big}/rendered?viewport=200,200", {}),
        (f"{multi}/frames/2/rendered?window=100,200&quality=50", {}),
        (f"{multi}/frames/99/rendered", {}),
        (f"{missing}/rendered", {}),
        (f"{series}/metadata", {}),
        (f"{series}/metadata", {"Accept-Encoding": "gzip"}),
        (f"{series}/metadata", {"Accept": "image/png"}),
        (f"/studies/{s.study}/series/1.2.3.4/metadata", {}),
    ]


def test_same_responses_as_fastapi(
    served: Served, clients: tuple[TestClient, TestClient, Recorder]
) -> None:
    fast, slow, _reference = clients
    for path, headers in _requests(served):
        url = PREFIX + path
        got = _normalized(fast.get(url, headers=headers))
        want = _normalized(slow.get(url, headers=headers))
        assert got[0] == want[0], (path, headers, got[0], want[0], got[2][:200])
        assert got == want, (path, headers)


def test_fast_requests_are_timed_by_route_template(
    served: Served, clients: tuple[TestClient, TestClient, Recorder]
) -> None:
    fast, _slow, _reference = clients
    path = served.instance_path("693_UNCR.dcm")
    assert fast.get(PREFIX + path + "/frames/1", headers={"Accept": STORED}).status_code == 200
    assert fast.get(PREFIX + path + "/frames/9", headers={"Accept": STORED}).status_code == 404
    body = fast.get("/metrics").text
    template = "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}"
    route = f'route="{PREFIX}{template}"'
    lines = [line for line in body.splitlines() if route in line and "_count" in line]
    assert any('status="200"' in line for line in lines), lines
    assert any('status="404"' in line for line in lines), lines
