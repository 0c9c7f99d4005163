"""The MLLP listener: a TCP server (one thread a connection) whose messages go to the
receiver (kho.hl7.receiver) one at a time per connection, each answered before the next
is read (HL7 original acknowledgement mode).

Connections: at most ``hl7_max_connections`` at once (more are closed at once), each
closed after ``hl7_idle_timeout_s`` without a byte; with ``hl7_networks`` set, only from
those networks.  TCP_NODELAY: an ACK is a small write the sender waits for.

MLLP over TLS (``hl7_tls_port``, with kho's certificate): the same listener on a second
port whose connections complete a TLS handshake (in their own thread, within
``_HANDSHAKE_TIMEOUT_S``) before the first byte of HL7; client certificates are asked for
and required as for DICOM TLS (``tls_ca_file``, ``tls_require_client_cert``), which is how
an interface engine proves it is the HIS.

The server also runs the worklist and patient housekeeping every
``hl7_housekeeping_interval_s`` seconds, for every tenant: steps whose study arrived
complete (kho.archive.worklist.complete_arrived), studies that arrived under a merged-away
Patient ID move to the surviving patient (kho.archive.patients.follow_merges).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import socketserver
import ssl
import threading
from typing import TYPE_CHECKING, Any

from kho.access import tls
from kho.archive import patients, worklist
from kho.hl7.mllp import Deframer, FramingError, frame
from kho.hl7.receiver import Hl7Receiver

if TYPE_CHECKING:
    from kho.access.service import Access
    from kho.archive.archive import Archive
    from kho.audit.auditor import Auditor

log = logging.getLogger(__name__)

_READ_SIZE = 65536
#: a TLS client that connects and says nothing holds a thread this long at most
_HANDSHAKE_TIMEOUT_S = 10.0


class _Connection(socketserver.BaseRequestHandler):
    server: _MllpServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        address = str(self.client_address[0]) if isinstance(self.client_address, tuple) else ""
        owner = self.server.owner
        if not owner.admits(address):
            log.warning("HL7 connection from %s refused: not from hl7_networks", address)
            return
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        context = self.server.tls_context
        if context is None:
            self._converse(sock, address)
            return
        sock.settimeout(_HANDSHAKE_TIMEOUT_S)
        try:
            secured = context.wrap_socket(sock, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.warning("HL7 TLS connection from %s refused: handshake failed: %s", address, exc)
            return
        try:
            self._converse(secured, address)
        finally:
            with contextlib.suppress(OSError):
                secured.close()

    def _converse(self, sock: socket.socket, address: str) -> None:
        owner = self.server.owner
        sock.settimeout(owner.idle_timeout_s)
        deframer = Deframer(owner.max_message_bytes)
        while not owner.stopping.is_set():
            try:
                data = sock.recv(_READ_SIZE)
            except (TimeoutError, OSError):
                return
            if not data:
                return
            try:
                messages = deframer.feed(data)
            except FramingError as exc:
                log.warning("HL7 connection from %s closed: %s", address, exc)
                return
            for raw in messages:
                try:
                    ack = owner.receiver.receive(raw, address)
                except Exception:  # never reached in normal operation: answer nothing, log
                    log.exception("HL7 message from %s could not be answered", address)
                    return
                try:
                    sock.sendall(frame(ack))
                except OSError:
                    return


class _MllpServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = socket.SOMAXCONN
    owner: Hl7Server
    #: the TLS port's server context (None: plain MLLP)
    tls_context: ssl.SSLContext | None = None

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self.owner.connection_opened()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.owner.connection_closed()


class Hl7Server:
    """The running MLLP listener of an archive (the root: senders map to its tenants)."""

    def __init__(
        self,
        archive: Archive,
        access: Access | None = None,
        auditor: Auditor | None = None,
        host: str | None = None,
        port: int | None = None,
        tls_port: int | None = None,
    ) -> None:
        """``port``/``tls_port``: the settings' ``hl7_port``/``hl7_tls_port`` unless given
        (None); the TLS port is served only with kho's certificate configured."""
        settings = archive.settings
        self.archive = archive
        self.receiver = Hl7Receiver(archive, access, auditor)
        self.host = host if host is not None else settings.host
        self.requested_port = int(port if port is not None else settings.hl7_port)
        self.requested_tls_port: int | None = (
            tls_port
            if tls_port is not None
            else (settings.hl7_tls_port if settings.hl7_tls else None)
        )
        # hl7_port = 0 in the settings with TLS on: TLS only (a port given here, even 0 for
        # an ephemeral one, is served)
        self.serve_plain = (
            port is not None or bool(settings.hl7_port) or self.requested_tls_port is None
        )
        self.max_connections = int(settings.hl7_max_connections)
        self.idle_timeout_s = float(settings.hl7_idle_timeout_s)
        self.max_message_bytes = int(settings.hl7_max_message_bytes)
        self.housekeeping_interval_s = float(settings.hl7_housekeeping_interval_s)
        networks = settings.hl7_networks or []
        self.networks = [ipaddress.ip_network(str(n), strict=False) for n in networks]
        self.stopping = threading.Event()
        self._server: _MllpServer | None = None
        self._tls_server: _MllpServer | None = None
        self._threads: list[threading.Thread] = []
        self._open = 0
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        """The plain MLLP port (when only TLS is served: the TLS port)."""
        server = self._server or self._tls_server
        assert server is not None, "the HL7 server is not started"
        return int(server.server_address[1])

    @property
    def tls_port(self) -> int | None:
        """The MLLP-over-TLS port (None: not served)."""
        return None if self._tls_server is None else int(self._tls_server.server_address[1])

    def start(self) -> Hl7Server:
        # a TLS context that cannot work fails here, before any port is open
        context = (
            tls.server_context(self.archive.settings)
            if self.requested_tls_port is not None
            else None
        )
        self.stopping.clear()
        self._threads = []
        listening = []
        if self.serve_plain:
            self._server = self._listen(self.requested_port, None, "kho-hl7-acceptor")
            listening.append(f"{self.host}:{self.port}")
        if context is not None:
            assert self.requested_tls_port is not None
            self._tls_server = self._listen(self.requested_tls_port, context, "kho-hl7-tls")
            listening.append(f"{self.host}:{self.tls_port} (TLS)")
        self._threads.append(
            threading.Thread(target=self._housekeep, name="kho-hl7-housekeeping", daemon=True)
        )
        for thread in self._threads:
            thread.start()
        log.info(
            "HL7 MLLP listener on %s (%s)",
            " and ".join(listening),
            "senders must be registered (hl7_senders)"
            if self.receiver.auth_on
            else "authentication off: unregistered senders act in the default tenant",
        )
        return self

    def _listen(self, port: int, context: ssl.SSLContext | None, name: str) -> _MllpServer:
        server = _MllpServer((self.host, port), _Connection)
        server.owner = self
        server.tls_context = context
        self._threads.append(threading.Thread(target=server.serve_forever, name=name, daemon=True))
        return server

    def stop(self) -> None:
        self.stopping.set()
        servers = [self._server, self._tls_server]
        self._server = self._tls_server = None
        for server in servers:
            if server is not None:
                server.shutdown()
                server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []

    def __enter__(self) -> Hl7Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- connections -----------------------------------------------------------------------

    def admits(self, address: str) -> bool:
        if not self.networks:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)

    def connection_opened(self) -> bool:
        with self._lock:
            if self._open >= self.max_connections:
                log.warning("HL7: more than %d connections, one refused", self.max_connections)
                return False
            self._open += 1
            return True

    def connection_closed(self) -> None:
        with self._lock:
            self._open = max(0, self._open - 1)

    # --- housekeeping ----------------------------------------------------------------------

    def housekeep(self) -> tuple[int, int]:
        """One pass over every tenant: (worklist steps completed, studies moved)."""
        completed = moved = 0
        for archive in self.archive.tenant_archives():
            try:
                completed += worklist.complete_arrived(archive.catalog)
                moved += patients.follow_merges(archive.catalog)
            except Exception:
                log.exception("HL7 housekeeping failed for tenant %s", archive.tenant)
        return completed, moved

    def _housekeep(self) -> None:
        while not self.stopping.wait(self.housekeeping_interval_s):
            completed, moved = self.housekeep()
            if completed or moved:
                log.info(
                    "worklist: %d steps completed by their studies; %d studies moved to "
                    "merged patients",
                    completed,
                    moved,
                )
