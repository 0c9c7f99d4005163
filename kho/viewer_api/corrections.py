"""Corrections over HTTP: an admin rejects or deletes a study, series or instance
(kho.archive.corrections).

- ``POST .../reject`` with ``{"reason": "113001"}`` (or ``quality``, ``safety``,
  ``worklist``, ``retention``): kho makes a rejection note (Key Object Selection Document)
  naming the instances and takes it as a received one: they disappear from every query
  and retrieval at once and are deleted after ``rejected_purge_delay_s``; the note is
  stored in the study (its own series, modality KO).
- ``DELETE`` of the same resources: a Data Retention Policy Expired note, carried out at
  once (the instances and their objects are deleted; the note is not kept).

Admin only (deny by default, security.requires); each is audited by the archive's
rejection observers (kho.audit.auditor.Auditor.rejected), naming the caller.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Body
from fastapi.responses import JSONResponse

from kho.access.callers import Role
from kho.archive.corrections import DATA_RETENTION, Rejection, RejectionReason, reason_for
from kho.archive.ingest.pipeline import IngestOutcome, IngestResult
from kho.errors import QueryError
from kho.viewer_api.deps import AuthorizedDep
from kho.viewer_api.security import Authorized, requires

router = APIRouter(tags=["corrections"], dependencies=[requires(Role.ADMIN)])

RejectBody = Annotated[dict[str, Any], Body(description='{"reason": "113001"}')]


def _answer(result: IngestResult, rejection: Rejection) -> JSONResponse:
    return JSONResponse(
        {
            "reason": {"code": rejection.reason.code, "meaning": rejection.reason.meaning},
            "rejected": rejection.rejected,
            "already_rejected": rejection.already,
            "note": result.sop_uid if result.outcome != IngestOutcome.APPLIED else None,
            "purge_after": dt.datetime.fromtimestamp(rejection.purge_after, dt.UTC).isoformat(),
            "purged": rejection.purged,
        }
    )


def _reject(
    authorized: Authorized,
    reason: RejectionReason,
    study: str,
    series: str | None = None,
    instance: str | None = None,
) -> JSONResponse:
    caller = authorized.caller
    result, rejection = authorized.archive.reject_instances(
        reason,
        study,
        series,
        instance,
        requested_by=caller.name,
        requester_kind=caller.kind.value,
        address=caller.address,
    )
    return _answer(result, rejection)


def _reason(body: dict[str, Any]) -> RejectionReason:
    value = body.get("reason")
    if not isinstance(value, str):
        raise QueryError('the body must name a reason: {"reason": "113001"}')
    return reason_for(value)


@router.post("/studies/{study}/reject", summary="Reject a study (rejection note)")
def reject_study(study: str, authorized: AuthorizedDep, body: RejectBody) -> JSONResponse:
    return _reject(authorized, _reason(body), study)


@router.post("/studies/{study}/series/{series}/reject", summary="Reject a series")
def reject_series(
    study: str, series: str, authorized: AuthorizedDep, body: RejectBody
) -> JSONResponse:
    return _reject(authorized, _reason(body), study, series)


@router.post(
    "/studies/{study}/series/{series}/instances/{instance}/reject", summary="Reject an instance"
)
def reject_instance(
    study: str, series: str, instance: str, authorized: AuthorizedDep, body: RejectBody
) -> JSONResponse:
    return _reject(authorized, _reason(body), study, series, instance)


@router.delete("/studies/{study}", summary="Delete a study now (data retention)")
def delete_study(study: str, authorized: AuthorizedDep) -> JSONResponse:
    return _reject(authorized, DATA_RETENTION, study)


@router.delete("/studies/{study}/series/{series}", summary="Delete a series now")
def delete_series(study: str, series: str, authorized: AuthorizedDep) -> JSONResponse:
    return _reject(authorized, DATA_RETENTION, study, series)


@router.delete(
    "/studies/{study}/series/{series}/instances/{instance}", summary="Delete an instance now"
)
def delete_instance(
    study: str, series: str, instance: str, authorized: AuthorizedDep
) -> JSONResponse:
    return _reject(authorized, DATA_RETENTION, study, series, instance)
