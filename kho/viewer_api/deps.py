"""Shared state and dependencies of the routers (FastAPI ``Annotated`` dependencies).

The dependencies are ``async``: FastAPI runs a sync dependency in the thread pool, and a
thread hop per dependency costs more than the catalog lookup itself (~50 us).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from kho.archive.archive import Archive
from kho.archive.catalog import InstanceRecord
from kho.archive.read.rendering import RenderCache
from kho.errors import NotFoundError

#: STOW-RS request bodies larger than this are refused with 413 (settings.stow_max_bytes)
DEFAULT_MAX_UPLOAD_BYTES = 2 * 1024 * 1024 * 1024


@dataclass
class ViewerState:
    """What every request of one application shares."""

    archive: Archive
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    render_cache: RenderCache = field(default_factory=RenderCache)
    # series metadata documents: (series UID, base URL) -> (validity key, body, gzipped body)
    metadata_cache: dict[tuple[str, str], tuple[str, bytes, bytes | None]] = field(
        default_factory=dict
    )


async def get_state(request: Request) -> ViewerState:
    state: ViewerState = request.app.state.viewer
    return state


async def get_archive(request: Request) -> Archive:
    state: ViewerState = request.app.state.viewer
    return state.archive


StateDep = Annotated[ViewerState, Depends(get_state)]
ArchiveDep = Annotated[Archive, Depends(get_archive)]


async def base_url(request: Request) -> str:
    """The service root viewers reached us at (for RetrieveURL and BulkDataURI)."""
    root = str(request.base_url).rstrip("/")
    return f"{root}/dicom-web"


BaseUrlDep = Annotated[str, Depends(base_url)]


def instance_record(archive: Archive, study: str, series: str, sop: str) -> InstanceRecord:
    """The instance under that study and series, else NotFoundError (404)."""
    record = archive.catalog.get_instance(sop)
    if record is None or record.study_uid != study or record.series_uid != series:
        raise NotFoundError(f"no instance {sop} in series {series} of study {study}")
    return record


async def get_instance(
    study: str, series: str, instance: str, archive: ArchiveDep
) -> InstanceRecord:
    return instance_record(archive, study, series, instance)


InstanceDep = Annotated[InstanceRecord, Depends(get_instance)]


def instance_url(base: str, record: InstanceRecord) -> str:
    return (
        f"{base}/studies/{record.study_uid}/series/{record.series_uid}/instances/{record.sop_uid}"
    )
