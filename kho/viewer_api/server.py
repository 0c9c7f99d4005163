"""The HTTP server: uvicorn in a background thread, bound before start() returns."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from kho.archive.archive import Archive
from kho.viewer_api.app import create_app


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
    server does for ``kho serve --workers N``.
    """

    def __init__(
        self,
        archive: Archive,
        *,
        host: str = "127.0.0.1",
        port: int = 8080,
        reuse_port: bool = False,
    ) -> None:
        self.archive = archive
        self.host = host
        self._requested_port = port
        self.reuse_port = reuse_port
        self.app = create_app(archive)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

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
        self._socket = self._bind()
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            loop="asyncio",
            http=_http_protocol(),
            timeout_keep_alive=30,
        )
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
