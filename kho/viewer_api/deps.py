"""Shared state and dependencies of the routers (FastAPI ``Annotated`` dependencies).

The dependencies are ``async``: FastAPI runs a sync dependency in the thread pool, and a
thread hop per dependency costs more than the catalog lookup itself (~50 us).

Routes reach the archive only through :data:`ArchiveDep` (and :data:`InstanceDep` on it):
the archive of the tenant the request acts in, as the route's role dependency decided
(kho.viewer_api.security).  A route that declared no role gets 403 from it, never the
root archive.

Share links and launch tokens see their studies only: the authorization rule checks the
study a route names (security.authorize_scope); the dependency that loads an instance checks
it again (:func:`get_instance`), so a route added later with its own way to the study still
meets one lock where the instance is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from kho.archive.archive import Archive
from kho.archive.catalog import InstanceRecord
from kho.archive.read.rendering import RenderCache
from kho.audit.auditor import Auditor
from kho.errors import NotFoundError
from kho.routing.router import Router
from kho.viewer_api.security import Authorized, authorized_of, require_study

if TYPE_CHECKING:
    from kho.access.service import Access

#: STOW-RS request bodies larger than this are refused with 413 (settings.stow_max_bytes)
DEFAULT_MAX_UPLOAD_BYTES = 2 * 1024 * 1024 * 1024


@dataclass
class ViewerState:
    """What every request of one application shares."""

    #: the default tenant's archive, whose for_tenant() gives the others: routes use
    #: ArchiveDep (the request's tenant), never this
    root_archive: Archive
    access: Access
    #: the audit trail (kho serve makes one; None: nothing recorded)
    auditor: Auditor | None = None
    #: forwarding (kho serve makes one; None: nothing forwarded, no send route)
    router: Router | None = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    #: keys carry the tenant (kho.viewer_api.rendered)
    render_cache: RenderCache = field(default_factory=RenderCache)
    # series metadata documents: (tenant, series UID, base URL) -> (validity key, body,
    # gzipped body)
    metadata_cache: dict[tuple[str, str, str], tuple[str, bytes, bytes | None]] = field(
        default_factory=dict
    )


async def get_state(request: Request) -> ViewerState:
    state: ViewerState = request.app.state.viewer
    return state


async def get_authorized(request: Request) -> Authorized:
    return authorized_of(request.scope)


async def get_archive(request: Request) -> Archive:
    """The archive of the tenant the request acts in (see the module's note)."""
    return authorized_of(request.scope).archive


StateDep = Annotated[ViewerState, Depends(get_state)]
AuthorizedDep = Annotated[Authorized, Depends(get_authorized)]
ArchiveDep = Annotated[Archive, Depends(get_archive)]


async def base_url(request: Request) -> str:
    """The service root viewers reached us at (for RetrieveURL and BulkDataURI): under
    ``/tenants/<t>`` when the request came that way (it is in the root path then)."""
    root = str(request.base_url).rstrip("/")
    return f"{root}/dicom-web"


BaseUrlDep = Annotated[str, Depends(base_url)]


def instance_record(archive: Archive, study: str, series: str, sop: str) -> InstanceRecord:
    """The instance under that study and series, else NotFoundError (404)."""
    record = archive.catalog.get_instance(sop)
    if record is None or record.study_uid != study or record.series_uid != series:
        raise NotFoundError(f"no instance {sop} in series {series} of study {study}")
    return record


async def get_instance(study: str, series: str, instance: str, request: Request) -> InstanceRecord:
    """The instance a route names, for a caller that may see its study (a share or launch
    caller: one of its own; 403 otherwise, before any lookup)."""
    authorized = authorized_of(request.scope)
    require_study(authorized.caller, study)
    return instance_record(authorized.archive, study, series, instance)


InstanceDep = Annotated[InstanceRecord, Depends(get_instance)]


def instance_url(base: str, record: InstanceRecord) -> str:
    return (
        f"{base}/studies/{record.study_uid}/series/{record.series_uid}/instances/{record.sop_uid}"
    )
