"""The HTTP server: uvicorn in a background thread, bound before start() returns.

With ``http_tls`` the port speaks HTTPS only: kho's TLS context (kho.access.tls: TLS 1.2 and
1.3, the BCP 195 cipher suites, as the DICOM TLS port) on the bound socket, asyncio doing
each handshake without holding up the others, and every response carrying
Strict-Transport-Security (kho.viewer_api.hsts).  Plain HTTP to that port fails its
handshake and is closed: nothing is answered, nothing redirected, in clear text.
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from kho.access import tls
from kho.access.service import Access
from kho.archive.archive import Archive
from kho.viewer_api.app import create_app
from kho.viewer_api.hsts import StrictTransportSecurity


def _http_protocol() -> str:
    """httptools (C parser, ~1 ms less per request) when installed, else h11."""
    try:
        import httptools  # noqa: F401
    except ImportError:
        return "h11"
    return "httptools"


class HttpServer:
    """DICOMweb on ``host:port`` (port 0 picks a free one; see ``.port``).

    ``reuse_port``: several processes may bind the same port (SO_REUSEPORT), as the DICOM
    server does for ``kho serve --workers N``.  ``access``: who may call what (made from
    the archive's settings when not given; see kho.viewer_api.security).
    """

    def __init__(
        self,
        archive: Archive,
        *,
        host: str = "127.0.0.1",
        port: int = 8080,
        reuse_port: bool = False,
        access: Access | None = None,
    ) -> None:
        self.archive = archive
        self.host = host
        self._requested_port = port
        self.reuse_port = reuse_port
        self.app = create_app(archive, access=access)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def tls(self) -> bool:
        """Whether the port speaks HTTPS (the setting ``http_tls``)."""
        return bool(self.archive.settings.http_tls)

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def port(self) -> int:
        if self._socket is None:
            return self._requested_port
        return int(self._socket.getsockname()[1])

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # accepted connections inherit TCP_NODELAY (Linux): without it a small body written
        # after its headers waits for the client's delayed ACK (40 ms per response)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((self.host, self._requested_port))
        sock.listen(1024)
        sock.set_inheritable(True)
        return sock

    def start(self) -> HttpServer:
        tokens = self.app.state.viewer.access.tokens
        if tokens is not None:  # the issuer's keys now, not when the first viewer waits
            tokens.refresh()
        settings = self.archive.settings
        # a certificate that does not load fails here, before the port is bound
        context = tls.server_context(settings, client_certificates=False) if self.tls else None
        self._socket = self._bind()
        config = uvicorn.Config(
            StrictTransportSecurity(self.app) if context is not None else self.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            loop="asyncio",
            http=_http_protocol(),
            timeout_keep_alive=30,
            # forwarded headers are kho.viewer_api.proxy's to judge (trusted_proxies only):
            # uvicorn's own middleware would trust any client on 127.0.0.1
            proxy_headers=False,
            # uvicorn's own context has no protocol floor: it is replaced below
            ssl_certfile=settings.tls_cert_file if context is not None else None,
            ssl_keyfile=settings.tls_key_file if context is not None else None,
        )
        if context is not None:
            config.load()  # uvicorn's run() keeps a loaded config as it is
            config.ssl = context
        self._server = uvicorn.Server(config)
        sock = self._socket
        server = self._server
        self._thread = threading.Thread(
            target=lambda: server.run(sockets=[sock]), name="kho-http", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not self._thread.is_alive():
                raise RuntimeError("HTTP server failed to start")
            if time.monotonic() > deadline:
                raise RuntimeError("HTTP server did not start within 30 s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def __enter__(self) -> HttpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
