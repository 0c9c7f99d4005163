"""An issuer whose keys cannot be fetched (none cached): HTTP answers 503 with Retry-After,
not 401 -- the token may be fine, and a viewer told 401 would send its user to log in again
for nothing.  Real parts: a test OIDC issuer on loopback (stopped, then failing), kho's HTTP
server on 127.0.0.1:0, httpx."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from kho.archive.archive import Archive
from kho.viewer_api.app import PREFIX
from kho.viewer_api.server import HttpServer
from tests.helpers.oidc import OidcIssuer
from tests.viewer_api.test_access import bearer, secured_settings


def test_unreachable_issuer_keys_are_503_with_retry_after(tmp_path: Path) -> None:
    with OidcIssuer() as issuer:
        settings = secured_settings(tmp_path / "data", issuer)
        token = issuer.mint({"roles": ["viewer"]})
        issuer.failing = True  # its JWKS answers 503 from now on
        with Archive(settings) as archive, HttpServer(archive, host="127.0.0.1", port=0) as server:
            response = httpx.get(
                f"http://127.0.0.1:{server.port}{PREFIX}/studies", headers=bearer(token)
            )
            assert response.status_code == 503
            assert response.headers["Retry-After"] == "5"
            assert response.json()["message"] == "issuer keys unavailable"
            issuer.failing = False
            # back: the same token is accepted once the keys are fetched again (a refetch
            # at most every 10 s, so a flood of bad tokens cannot hammer the issuer)
            deadline = time.monotonic() + 15
            while True:
                again = httpx.get(
                    f"http://127.0.0.1:{server.port}{PREFIX}/studies", headers=bearer(token)
                )
                if again.status_code != 503 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert again.status_code == 200
