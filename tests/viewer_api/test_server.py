"""HttpServer: free ports, SO_REUSEPORT sharing, clean stop."""

from __future__ import annotations

import socket

import requests

from kho.archive.archive import Archive
from kho.viewer_api.server import HttpServer


def test_two_servers_share_one_port_with_reuse_port(archive: Archive) -> None:
    first = HttpServer(archive, host="127.0.0.1", port=0, reuse_port=True).start()
    try:
        second = HttpServer(archive, host="127.0.0.1", port=first.port, reuse_port=True).start()
        try:
            assert second.port == first.port
            for _ in range(6):  # new connections land on either process
                r = requests.get(f"http://127.0.0.1:{first.port}/dicom-web/studies")
                assert r.status_code == 200 and r.json() == []
        finally:
            second.stop()
    finally:
        first.stop()


def test_stop_releases_the_port(archive: Archive) -> None:
    server = HttpServer(archive, host="127.0.0.1", port=0).start()
    port = server.port
    assert requests.get(f"http://127.0.0.1:{port}/openapi.json").status_code == 200
    server.stop()
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0
