"""This host's ingest spool, served to the archive's other hosts (kho.storage.peer).

``GET /kho/peer/spool/<segment>/<offset>-<length>?offset=&length=``: bytes of an instance
this host acknowledged and holds in its spool, for another host asked for it before this
host's finisher moved it into the shared bucket.  Only with ``peer_token`` set, and only
with it as a bearer token (401 otherwise; 404 when peer reads are off, as if absent).
Served from this host's spool folder alone, never passed on to another host.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Query, Response
from starlette.concurrency import run_in_threadpool

from kho.errors import NotFoundError
from kho.storage.peer import ABSENT_HEADER, PEER_SPOOL_PATH, token_matches
from kho.storage.spool import parse_spool_key
from kho.viewer_api.deps import StateDep
from kho.viewer_api.errors import BadRequestError, UnauthorizedError
from kho.viewer_api.security import own_credential

# host to host with the archive's peer token, not a caller's credential: the access
# middleware lets PEER_SPOOL_PATH through, and this marker tells check_routes so
router = APIRouter(tags=["peers"], include_in_schema=False, dependencies=[Depends(own_credential)])


@router.get(PEER_SPOOL_PATH + "{segment}/{span}")
async def spooled_bytes(
    state: StateDep,
    segment: Annotated[str, Path(max_length=200)],
    span: Annotated[str, Path(max_length=64)],
    offset: Annotated[int, Query(ge=0)] = 0,
    length: Annotated[int | None, Query(ge=0)] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> Response:
    archive = state.root_archive  # the host's spool, shared by every tenant
    settings = archive.settings
    if not settings.peer_reads:
        raise NotFoundError("peer reads are not enabled on this host")
    if not token_matches(settings.peer_token.get_secret_value(), authorization):
        raise UnauthorizedError("peer reads need the archive's peer token")
    key = f"spool/{segment}/{span}"
    size = parse_spool_key(key)[2]  # InvalidKeyError: 400
    if offset > size:
        raise BadRequestError(f"offset {offset} is past the end of {key} ({size} bytes)")
    spool = archive.spool_reader
    if not await run_in_threadpool(spool.exists, key):
        # the asker then knows the key is gone (moved, deleted), not this host out of order
        return Response(
            f"{key} is not in this host's spool",
            status_code=404,
            media_type="text/plain",
            headers={ABSENT_HEADER: "absent"},
        )
    data = await run_in_threadpool(spool.read, key, offset, length)
    return Response(data, media_type="application/octet-stream")
