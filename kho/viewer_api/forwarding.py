"""On-demand forwarding over HTTP: "send this study (or series) to X" (kho.routing).

Admin only: it sends patient data out of the archive.  The body names a configured
destination (and optionally a de-identification project):
``{"destination": "referral", "deidentify": "trial-7"}``; the answer (202) says what was
queued.  Without forwarding configured in this process (no router) the routes answer 404.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body
from fastapi.responses import JSONResponse

from kho.access.callers import Role
from kho.errors import NotFoundError
from kho.routing.http import send_request
from kho.viewer_api.deps import AuthorizedDep, StateDep
from kho.viewer_api.security import requires

router = APIRouter(tags=["forwarding"], dependencies=[requires(Role.ADMIN)])

SendBody = Annotated[dict[str, Any], Body(description="destination, optional deidentify")]


def _send(
    state: StateDep, authorized: AuthorizedDep, study: str, series: str | None, body: SendBody
) -> JSONResponse:
    if state.router is None:
        raise NotFoundError("forwarding is not configured on this server")
    answer = send_request(
        state.router,
        tenant=authorized.tenant,
        caller=authorized.caller,
        study_uid=study,
        series_uid=series,
        body=body,
    )
    return JSONResponse(answer, status_code=202)


@router.post("/studies/{study}/send", summary="Send a study to a configured destination")
def send_study(
    study: str, state: StateDep, authorized: AuthorizedDep, body: SendBody
) -> JSONResponse:
    return _send(state, authorized, study, None, body)


@router.post(
    "/studies/{study}/series/{series}/send", summary="Send a series to a configured destination"
)
def send_series(
    study: str, series: str, state: StateDep, authorized: AuthorizedDep, body: SendBody
) -> JSONResponse:
    return _send(state, authorized, study, series, body)
