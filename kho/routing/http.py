"""What the HTTP door's "send this study/series to X" route does, without the door: the
viewer API (a door, which routing may not import) parses the request, authorizes the
caller and calls :func:`send_request`.

    POST /dicom-web/studies/{study}/send                 {"destination": "pacs-b"}
    POST /dicom-web/studies/{study}/series/{series}/send {"destination": "research",
                                                          "deidentify": "trial-7"}

Answers 202 with ``{"queued": <instances>, "destination": ..., "deidentify": ...}``:
queued durably in the tenant's catalog, delivered by the workers (``kho routes`` shows
progress).  Errors are kho's: QueryError (400) for a malformed body, NotFoundError (404)
for an unknown destination, project or study, AccessDeniedError (403) for a destination
that is not the tenant's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kho.access.callers import Caller
from kho.errors import QueryError
from kho.routing.router import Router

#: the body's keys
_KEYS = frozenset({"destination", "deidentify", "instances", "allow_burned_in"})


def send_request(
    router: Router,
    *,
    tenant: str,
    caller: Caller,
    study_uid: str,
    series_uid: str | None = None,
    body: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Queue a study (or series) of ``tenant`` for a destination, as ``caller`` asked;
    the answer's JSON body.  The caller must already hold the role the route requires
    (kho's suggestion: admin, since it sends patient data out of the archive)."""
    if not isinstance(body, Mapping):
        raise QueryError('the body must be a JSON object: {"destination": "<name>"}')
    unknown = sorted(set(body) - _KEYS)
    if unknown:
        raise QueryError(f"unknown keys in the body: {', '.join(unknown)}")
    destination = body.get("destination")
    if not isinstance(destination, str) or not destination:
        raise QueryError('"destination" must name a forwarding destination')
    project = body.get("deidentify", "")
    if not isinstance(project, str):
        raise QueryError('"deidentify" must name a de-identification project')
    instances = body.get("instances")
    if instances is not None and (
        not isinstance(instances, list) or not all(isinstance(u, str) for u in instances)
    ):
        raise QueryError('"instances" must be a list of SOP Instance UIDs')
    allow_burned_in = body.get("allow_burned_in", False)
    if not isinstance(allow_burned_in, bool):
        raise QueryError('"allow_burned_in" must be true or false')
    queued = router.send(
        tenant,
        destination,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uids=instances,
        deidentify=project,
        allow_burned_in=allow_burned_in,
        requested_by=f"{caller.kind.value}:{caller.name}",
    )
    return {"queued": queued, "destination": destination, "deidentify": project}


__all__ = ["send_request"]
