"""Reading instances another host of the archive holds in its ingest spool.

With an S3 bucket shared by several hosts and ``spool = on``, an instance is acknowledged
once it is in the receiving host's local spool; the other hosts read it from that host
until its finisher has moved it into the bucket (seconds, or the length of the backlog).
Each host serves its own spool to its peers at ``GET /kho/peer/spool/<segment>/<span>``
(``kho.viewer_api.peer``), behind a token the hosts share (``peer_token``); where each
spool is served from (``peer_url``) is recorded in the catalog when its process starts.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

import urllib3

from kho.errors import ObjectNotFoundError, StorageError, StorageUnavailableError
from kho.storage.spool import parse_spool_key, stem_of

#: the path under a host's HTTP root that serves its spool to peers
PEER_SPOOL_PATH = "/kho/peer/spool/"
#: set on a 404 by a host that checked the token and does not hold the key: any other 404
#: (peer reads off there, another server at that address) is an outage, not an absence
ABSENT_HEADER = "X-Kho-Spool"


def token_matches(expected: str, authorization: str | None) -> bool:
    """Whether an Authorization header carries the peers' token (constant time)."""
    if not expected or not authorization:
        return False
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), expected.encode())


class PeerSpoolClient:
    """Reads spool keys of other hosts' processes over HTTP.

    ``locate(stem)`` names the base URL that serves the spool whose segments start with
    ``stem`` (None if unknown); ``own_url`` is this host's (a key this host's spool does not
    hold is not asked of itself)."""

    def __init__(
        self,
        locate: Callable[[str], str | None],
        token: str,
        own_url: str = "",
        *,
        timeout_s: float = 30.0,
        on_read: Callable[[str], None] | None = None,
    ) -> None:
        #: told each read's outcome: "ok", "absent" or "unavailable" (metrics)
        self._on_read = on_read or (lambda _outcome: None)
        self._locate = locate
        self._token = token
        self._own_url = own_url.rstrip("/")
        # stem -> URL; forgotten when that host cannot be reached (it may have moved)
        self._urls: dict[str, str] = {}
        self._http = urllib3.PoolManager(
            num_pools=16,
            maxsize=8,
            block=True,  # at most 8 connections a host, waited for (none dropped)
            retries=False,
            timeout=urllib3.Timeout(connect=min(5.0, timeout_s), read=timeout_s),
        )

    def _url_of(self, key: str) -> str:
        stem = stem_of(parse_spool_key(key)[0])
        url = self._urls.get(stem)
        if url is None:
            found = self._locate(stem)
            if not found:  # acknowledged by a host that serves its spool to nobody
                raise StorageUnavailableError(f"no host of the archive serves {key}")
            url = self._urls[stem] = found.rstrip("/")
        if url == self._own_url:
            raise ObjectNotFoundError(key)  # ours, and not in our spool (any more)
        return url

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """The bytes of a spooled object held by another host (a range of them)."""
        try:
            data = self._read(key, offset, length)
        except ObjectNotFoundError:
            self._on_read("absent")
            raise
        except StorageUnavailableError:
            self._on_read("unavailable")
            raise
        self._on_read("ok")
        return data

    def _read(self, key: str, offset: int, length: int | None) -> bytes:
        _segment, _start, size = parse_spool_key(key)
        if offset < 0 or offset > size:
            raise StorageError(f"range {offset} outside spooled object {key} ({size} bytes)")
        count = size - offset if length is None else min(length, size - offset)
        url = f"{self._url_of(key)}{PEER_SPOOL_PATH}{key.removeprefix('spool/')}"
        try:
            response = self._http.request(
                "GET",
                url,
                fields={"offset": str(offset), "length": str(count)},
                headers={"Authorization": f"Bearer {self._token}"},
                preload_content=True,
            )
        except urllib3.exceptions.HTTPError as exc:
            self._urls.pop(stem_of(parse_spool_key(key)[0]), None)  # moved, perhaps: look again
            raise StorageUnavailableError(
                f"the host holding {key} cannot be reached: {exc}"
            ) from exc
        if response.status == 404 and response.headers.get(ABSENT_HEADER) == "absent":
            raise ObjectNotFoundError(key)
        if response.status != 200:
            raise StorageUnavailableError(f"the host holding {key} answered HTTP {response.status}")
        data = bytes(response.data)
        if len(data) != count:
            raise StorageUnavailableError(
                f"the host holding {key} sent {len(data)} of {count} bytes"
            )
        return data

    def exists(self, key: str) -> bool:
        try:
            self.read(key, 0, 0)
        except ObjectNotFoundError:
            return False
        return True

    def close(self) -> None:
        self._http.clear()
