"""GET /metrics (Prometheus text format) and the request-latency middleware."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kho.archive import metrics

router = APIRouter(tags=["admin"])

#: the scope key where a handler that knows its route template leaves it (see fastpath)
ROUTE_KEY = "kho.route"


@router.get("/metrics", summary="Prometheus metrics: counts, bytes per modality, latencies")
def get_metrics(request: Request) -> Response:
    archive = request.app.state.viewer.archive
    return Response(metrics.exposition(archive.stats), media_type=CONTENT_TYPE_LATEST)


class RouteTemplates:
    """Maps a request path to its route template ("/dicom-web/studies/{study}/series")."""

    def __init__(self, routers: Sequence[tuple[str, APIRouter]]) -> None:
        self._patterns = []
        for prefix, api_router in routers:
            for route in api_router.routes:
                path = prefix + str(getattr(route, "path", ""))
                regex, _fmt, _convertors = compile_path(path)
                self._patterns.append((regex, path))

    def __call__(self, path: str) -> str:
        for regex, template in self._patterns:
            if regex.match(path):
                return template
        return "unmatched"


class RequestTimer:
    """Plain ASGI middleware: every HTTP request's time, from its start until the last
    byte of the response was handed to the server, by method, route template and status.

    (Starlette's ``BaseHTTPMiddleware`` costs a task group and a memory stream per
    request, a good part of what serving a small frame costs.)
    """

    def __init__(self, app: ASGIApp, templates: RouteTemplates) -> None:
        self.app = app
        self.templates = templates
        self._children: dict[tuple[str, str, str], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            template = scope.get(ROUTE_KEY) or self.templates(scope["path"])
            labels = (scope["method"], template, str(status))
            child = self._children.get(labels)
            if child is None:
                child = self._children.setdefault(labels, metrics.REQUEST_SECONDS.labels(*labels))
            child.observe(time.perf_counter() - started)


def install(app: FastAPI, routers: Sequence[tuple[str, APIRouter]]) -> None:
    """Time every request by its route template (not its URL: UIDs would explode labels)."""
    templates = RouteTemplates([*routers, ("", router)])
    app.add_middleware(RequestTimer, templates=templates)
    app.include_router(router)
