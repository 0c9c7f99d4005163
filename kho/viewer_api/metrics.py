"""GET /metrics (Prometheus text format) and the request-latency middleware.

/metrics needs the admin role.  A platform admin sees every series; an admin of one
hospital (or a platform admin asking through ``/tenants/<t>/metrics``) sees only the series
labelled ``tenant="<t>"``: what the archive holds and does for that hospital, not the
process-wide figures (spool, request latencies) that mix every hospital's traffic.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kho.access.callers import Role
from kho.archive import metrics
from kho.archive.read.pixels import FRAME_CACHE
from kho.viewer_api.deps import AuthorizedDep, StateDep
from kho.viewer_api.security import requires, route_path, split_tenant

router = APIRouter(tags=["admin"], dependencies=[requires(Role.ADMIN)])

#: the scope key where a handler that knows its route template leaves it (see fastpath)
ROUTE_KEY = "kho.route"


@router.get("/metrics", summary="Prometheus metrics: counts, bytes per modality, latencies")
def get_metrics(state: StateDep, authorized: AuthorizedDep) -> Response:
    root = state.root_archive
    if authorized.platform_view:
        # the process's caches serve every hospital: shown to the platform view only
        caches: dict[str, metrics.BoundedCache] = {
            "decoded_frame": FRAME_CACHE,
            "rendered": state.render_cache,
        }
        if len(root.settings.tenant_names) == 1:  # one hospital: unlabelled, as before tenants
            body = metrics.exposition(root.stats, caches=caches)
        else:
            body = metrics.exposition(
                tenants=lambda: root.platform_stats()["tenants"], caches=caches
            )
    else:
        tenant = authorized.tenant
        body = metrics.exposition(
            tenants=lambda: root.platform_stats([tenant])["tenants"], host=False
        )
        # this process's histograms and counters mix every hospital's traffic: only the
        # series labelled with the caller's tenant
        body = tenant_exposition(body, tenant)
    router = state.router
    if router is not None:  # the forwarding queue's gauges, of the tenants in view
        from kho.routing.metrics import exposition as queue_exposition

        names = root.settings.tenant_names if authorized.platform_view else [authorized.tenant]
        body += queue_exposition(lambda: router.status(names)["tenants"])
    return Response(body, media_type=CONTENT_TYPE_LATEST)


class _Families:
    """A collector of metric families already made (filtered from an exposition)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


def tenant_exposition(text: bytes, tenant: str) -> bytes:
    """Only the samples labelled ``tenant="<tenant>"``; families left empty are dropped.
    Parsed, not matched as text: label values come from DICOM data (modality) and may
    hold quotes and commas."""
    kept = []
    for family in text_string_to_metric_families(text.decode()):
        family.samples = [s for s in family.samples if s.labels.get("tenant") == tenant]
        if family.samples:
            kept.append(family)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(kept))
    return generate_latest(registry)


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
            # the route template, never the URL (UIDs would explode labels) nor the
            # tenant prefix (the same route for every hospital)
            template = scope.get(ROUTE_KEY) or self.templates(split_tenant(route_path(scope))[1])
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
