"""GET /metrics (Prometheus text format) and the request-latency middleware."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.routing import compile_path

from kho.archive import metrics

router = APIRouter(tags=["admin"])


@router.get("/metrics", summary="Prometheus metrics: counts, bytes per modality, latencies")
def get_metrics(request: Request) -> Response:
    archive = request.app.state.viewer.archive
    return Response(metrics.exposition(archive), media_type=CONTENT_TYPE_LATEST)


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


def install(app: FastAPI, routers: Sequence[tuple[str, APIRouter]]) -> None:
    """Time every request by its route template (not its URL: UIDs would explode labels)."""
    templates = RouteTemplates([*routers, ("", router)])

    @app.middleware("http")
    async def observe(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        template = templates(request.url.path)
        started = time.perf_counter()
        response = await call_next(request)
        metrics.REQUEST_SECONDS.labels(request.method, template, str(response.status_code)).observe(
            time.perf_counter() - started
        )
        return response

    app.include_router(router)
