"""The DIMSE server: an Application Entity on pynetdicom bound to the archive's handlers.

Connection accounting, under floods too:

- ``max_associations`` counts associations: connections that have sent an A-ASSOCIATE-RQ and
  have not ended.  One more is answered A-ASSOCIATE-RJ (rejected-transient, service
  provider, local limit exceeded: PS3.8 9.3.4), and a slot is free again the moment an
  association is released or aborted, or its peer closes the connection.
- A TCP connection that has not (yet) sent its A-ASSOCIATE-RQ holds no association slot.
  It is closed the moment its peer closes it (a health check, a port scan), and after
  ``artim_timeout`` seconds of silence (the ARTIM timer, PS3.8 9.1.5; default 10 s).  At
  most 2 x ``max_associations`` such connections wait at once: a newer one closes the
  oldest, so a flood of silent connections holds a bounded number of threads and never
  blocks a peer that sends its A-ASSOCIATE-RQ at once.
- An established association that sends nothing is closed after the network timeout.

DICOM TLS (PS3.15 BCP 195 profile, kho.access.tls) is served on its own port beside the
plain one (``dicom_tls_port``, 2762; the plain port only while ``dicom_plain``), by the same
AE, handlers, door and connection accounting.  pynetdicom would run each TLS handshake in
the accept loop, where one client that connects and never completes it stalls every other
connection; kho accepts at once and handshakes in the connection's own thread, within the
ARTIM timeout, and handshaking connections are bounded like those awaiting their
A-ASSOCIATE-RQ (beyond the limit the oldest is closed).  A failed handshake (a protocol
below TLS 1.2, a client certificate that does not verify or is missing when required, plain
DICOM or HTTP on the TLS port) is reported as a refusal (kho.access.dicom_peers) and closed;
a connection closed or silent before its ClientHello is only logged at debug level.  After
the handshake the association runs exactly as on the plain port, kho's fast C-STORE path
included: it reads and answers from the association's DUL thread, the only thread that
touches the TLS socket.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, cast

import pydicom.config
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from kho.access import tls
from kho.access.dicom_peers import TLS_HANDSHAKE_FAILED, DicomRefusal, report_refusal
from kho.access.service import Access
from kho.archive.archive import Archive
from kho.dicom_scp import commitment, fast_dimse, handlers, qr, worklist
from kho.dicom_scp.door import Door
from kho.errors import ConfigError
from kho.routing.commitment import STORAGE_COMMITMENT_PUSH

if TYPE_CHECKING:
    from pynetdicom.association import Association
    from pynetdicom.events import Event

log = logging.getLogger(__name__)

# a new connection's wait for its A-ASSOCIATE-RQ is the setting artim_timeout (10 s): a real
# SCU sends it in the first packet after connecting (dcmtk's storescp waits 30 s)
ACSE_TIMEOUT_S = 30.0  # waiting for an A-RELEASE-RP and the like
# kho's own associations (C-MOVE destinations): the TCP connection and, over TLS, the
# handshake (pynetdicom waits forever by default)
CONNECT_TIMEOUT_S = 20.0
NETWORK_TIMEOUT_S = 120.0  # an established association's silence
#: connections waiting for their A-ASSOCIATE-RQ, per association slot
WAITING_PER_ASSOCIATION = 2
_EVICTION_LOG_INTERVAL_S = 10.0  # a flood logs one line per interval, not one per connection


class _ArchiveAE(AE):
    """pynetdicom's AE, counting as associations only connections that asked for one and
    have not ended: its limit check (``len(active acceptors) > maximum_associations``) would
    otherwise count connections still waiting for their A-ASSOCIATE-RQ (a burst of health
    checks or a port scan refused every real association) and threads still closing an
    association already released, aborted or rejected."""

    @property
    def active_associations(self) -> list[Association]:
        return [assoc for assoc in super().active_associations if _holds_slot(assoc)]

    def associate(self, addr: Any, port: int, *args: Any, **kwargs: Any) -> Association:
        """AE.associate; for a C-MOVE destination (pynetdicom opens it with the options
        kho.dicom_scp.qr.handle_move yields) a failure goes to that move's handler, which
        answers sub-operation failures instead of pynetdicom's 0xA801."""
        destination: qr.MoveDestination | None = kwargs.pop(qr.MOVE_DESTINATION_OPTION, None)
        if destination is not None and destination.refused:  # nothing to open
            return cast("Association", destination.unreachable(None))
        association = super().associate(addr, port, *args, **kwargs)
        if destination is None or association.is_established:
            return association
        return cast("Association", destination.unreachable(association))


def _holds_slot(assoc: Association) -> bool:
    if fast_dimse.awaiting_request(assoc):
        return False
    return not (assoc.is_released or assoc.is_aborted or assoc.is_rejected or assoc._kill)


class _ReusePortServer(ThreadedAssociationServer):
    """Sets SO_REUSEPORT so several `kho serve` processes share one DICOM port."""

    reuse_port = False
    # listen() backlog: socketserver's 5 overflows under a burst of connections and every
    # overflowing SYN waits ~1 s for its retransmission (the kernel caps it at somaxconn)
    request_queue_size = socket.SOMAXCONN

    def server_bind(self) -> None:
        if self.reuse_port and self.socket is not None and hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def build_ae(archive: Archive) -> AE:
    """The archive's AE: Verification, Storage (every SOP class, even private ones),
    Query/Retrieve (FIND, GET, MOVE), Modality Worklist, MPPS and Storage Commitment."""
    settings = archive.settings
    # accept storage of SOP classes pynetdicom does not list (private, newer than it)
    _config.UNRESTRICTED_STORAGE_SERVICE = True
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    # kho checks what it needs itself; pydicom's per-value validation costs ~10% of ingest
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    ae = _ArchiveAE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = settings.max_pdu_size
    ae.maximum_associations = settings.max_associations
    # the door (kho.dicom_scp.door) checks it first and says why; kept as a second lock
    ae.require_called_aet = settings.require_called_ae or settings.auth_on
    ae.network_timeout = NETWORK_TIMEOUT_S
    ae.acse_timeout = ACSE_TIMEOUT_S
    ae.connection_timeout = CONNECT_TIMEOUT_S
    ae.dimse_timeout = 120
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    # Storage needs no supported contexts: with UNRESTRICTED_STORAGE_SERVICE pynetdicom
    # accepts every storage SOP class with the requestor's first transfer syntax (its
    # preference, as dcmtk's storescp does) and both roles (C-GET role selection).  Not
    # listing ~170 classes x 45 syntaxes also spares each new association copying them.
    # Query/Retrieve: C-FIND, C-GET, C-MOVE in the patient root and study root models
    for sop_class in qr.QR_SOP_CLASSES:
        ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
    # the Modality Worklist (C-FIND) and Modality Performed Procedure Step (N-CREATE,
    # N-SET) of kho.dicom_scp.worklist
    ae.add_supported_context(worklist.MODALITY_WORKLIST_FIND, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(worklist.MODALITY_PERFORMED_PROCEDURE_STEP, ALL_TRANSFER_SYNTAXES)
    # Storage Commitment (kho.dicom_scp.commitment): a modality's request (kho the SCP) and
    # a forwarding destination's late report (kho the SCU), so both roles are accepted
    ae.add_supported_context(
        STORAGE_COMMITMENT_PUSH, ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=True
    )
    # C-MOVE/C-GET send stored bytes from files unchanged (see kho.dicom_scp.qr)
    qr.enable_raw_sending()
    return ae


class ConnectionGate:
    """Connections still waiting for their A-ASSOCIATE-RQ: each gets the ARTIM timeout, and
    beyond ``waiting_limit`` of them the oldest is closed (see the module's docstring)."""

    def __init__(self, max_associations: int, artim_timeout: float) -> None:
        self.waiting_limit = max(1, WAITING_PER_ASSOCIATION * max_associations)
        self.artim_timeout = artim_timeout
        self.closed_waiting = 0  # connections closed to keep within the limit, ever
        self._waiting: deque[Association] = deque()
        #: TLS connections whose handshake is under way (id -> socket; oldest first)
        self._handshaking: dict[int, ssl.SSLSocket] = {}
        self._lock = threading.Lock()
        self._logged_at = float("-inf")
        self._closed_since_log = 0

    def connection_opened(self, event: Event) -> None:
        """EVT_CONN_OPEN, after fast_dimse.install (which marks the connection waiting)."""
        association = event.assoc
        association.dul.artim_timer.timeout = self.artim_timeout
        with self._lock:
            self._waiting = deque(a for a in self._waiting if fast_dimse.awaiting_request(a))
            while len(self._waiting) >= self.waiting_limit:
                self.closed_waiting += 1  # before the close its peer may already see
                self._closed_since_log += 1
                fast_dimse.drop_connection(self._waiting.popleft())
            self._waiting.append(association)
            self._log_evictions("an A-ASSOCIATE-RQ", association.requestor.address)

    def handshake_started(self, sock: ssl.SSLSocket, address: str) -> None:
        """A TLS connection is accepted (the accept loop calls this, so in order of
        arrival); its handshake follows in its own thread.  Beyond ``waiting_limit``
        handshakes under way the oldest is closed: its thread's handshake fails at once."""
        with self._lock:
            while len(self._handshaking) >= self.waiting_limit:
                oldest = self._handshaking.pop(next(iter(self._handshaking)))
                self.closed_waiting += 1
                self._closed_since_log += 1
                _shut(oldest)
            self._handshaking[id(sock)] = sock
            self._log_evictions("a completed TLS handshake", address)

    def handshake_ended(self, sock: ssl.SSLSocket) -> None:
        with self._lock:
            self._handshaking.pop(id(sock), None)

    def _log_evictions(self, waiting_for: str, latest: str) -> None:
        """(under the lock) One warning per interval for the connections closed."""
        now = time.monotonic()
        if self._closed_since_log and now - self._logged_at >= _EVICTION_LOG_INTERVAL_S:
            log.warning(
                "more than %d connections without %s: closed the oldest %d "
                "(latest connection from %s)",
                self.waiting_limit,
                waiting_for,
                self._closed_since_log,
                latest,
            )
            self._logged_at, self._closed_since_log = now, 0

    def close_all(self) -> None:
        """Close every connection still waiting (the server stops)."""
        with self._lock:
            waiting, self._waiting = self._waiting, deque()
            handshaking, self._handshaking = self._handshaking, {}
        for association in waiting:
            fast_dimse.drop_connection(association)
        for sock in handshaking.values():
            _shut(sock)


def _host(client_address: Any) -> str:
    return str(client_address[0]) if isinstance(client_address, tuple) else ""


def _shut(sock: socket.socket) -> None:
    """Shut a connection down from another thread: whatever its thread is waiting for
    (a handshake, a read) ends at once.  socket.socket's own shutdown: SSLSocket's would
    also drop the TLS state under that thread."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _TlsAssociationServer(_ReusePortServer):
    """The DICOM TLS port: the accept loop only accepts and sets up the TLS state (no I/O);
    each connection's handshake runs in its own thread within ``handshake_timeout``
    (pynetdicom would run it in the accept loop)."""

    gate: ConnectionGate
    handshake_timeout: float

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None and self.ssl_context is not None
        sock, client_address = self.socket.accept()
        try:
            secured = self.ssl_context.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            )
        except OSError:  # socketserver drops the connection quietly
            sock.close()
            raise
        # counted here, in the order of arrival, so the gate closes the oldest
        self.gate.handshake_started(secured, _host(client_address))
        return secured, client_address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if self._handshake(request, _host(client_address)):
            super().process_request_thread(request, client_address)

    def _handshake(self, secured: ssl.SSLSocket, address: str) -> bool:
        try:
            secured.settimeout(self.handshake_timeout)
            secured.do_handshake()
            secured.settimeout(None)  # as pynetdicom's accepted sockets: blocking
        except (OSError, ValueError) as exc:
            self._handshake_failed(exc, address)
            self.shutdown_request(secured)
            return False
        finally:
            self.gate.handshake_ended(secured)
        return True

    @staticmethod
    def _handshake_failed(exc: BaseException, address: str) -> None:
        # closed or silent before any TLS was spoken (health checks, port scans, a client
        # gone away, a connection the gate closed): nothing to refuse
        if isinstance(exc, ssl.SSLEOFError | ConnectionError | TimeoutError) or not isinstance(
            exc, ssl.SSLError
        ):
            log.debug("TLS connection from %s ended before its handshake: %s", address, exc)
            return
        report_refusal(
            DicomRefusal("", "", address, TLS_HANDSHAKE_FAILED, detail=tls.failure_reason(exc))
        )


def event_handlers(
    archive: Archive,
    gate: ConnectionGate | None = None,
    access: Access | Door | None = None,
) -> list[Any]:
    """The server's (event, handler) pairs.  ``access``: the archive's Access (or a Door
    made from one); None makes one from the archive's settings."""
    gate = gate or ConnectionGate(archive.settings.max_associations, archive.settings.artim_timeout)
    door = (
        access
        if isinstance(access, Door)
        else Door(archive, access or Access(archive.settings, archive))
    )
    return [
        (evt.EVT_CONN_OPEN, qr.handle_connection_open),
        (evt.EVT_CONN_OPEN, handlers.handle_association_open, [door]),
        (evt.EVT_CONN_OPEN, gate.connection_opened),
        # who is calling: accepted with its tenant's archive, or A-ASSOCIATE-RJ
        (evt.EVT_REQUESTED, door.association_requested),
        (evt.EVT_C_ECHO, handlers.handle_echo, [door]),
        (evt.EVT_C_STORE, handlers.handle_store, [door]),
        # one event for every C-FIND model: the worklist's, else Query/Retrieve (qr)
        (evt.EVT_C_FIND, worklist.handle_find, [door]),
        (evt.EVT_N_CREATE, worklist.handle_n_create, [door]),
        (evt.EVT_N_SET, worklist.handle_n_set, [door]),
        (evt.EVT_N_ACTION, commitment.handle_n_action, [door]),
        (evt.EVT_N_EVENT_REPORT, commitment.handle_n_event_report, [door]),
        (evt.EVT_C_GET, qr.handle_get, [door]),
        (evt.EVT_C_MOVE, qr.handle_move, [door]),
    ]


class DicomServer:
    """The running DIMSE server: the plain port (``dicom_port``, while ``dicom_plain``) and
    the TLS port (``dicom_tls_port``, when ``tls_cert_file`` and ``tls_key_file`` are set);
    ``stop()`` closes both and their associations."""

    def __init__(
        self,
        archive: Archive,
        *,
        reuse_port: bool = False,
        artim_timeout: float | None = None,
        access: Access | None = None,
    ) -> None:
        self.archive = archive
        #: who may associate and use which service, in which tenant (kho.access)
        self.access = access or Access(archive.settings, archive)
        self.door = Door(archive, self.access)
        self.ae = build_ae(archive)
        self.reuse_port = reuse_port
        if artim_timeout is None:
            artim_timeout = archive.settings.artim_timeout
        self.gate = ConnectionGate(archive.settings.max_associations, artim_timeout)
        #: the plain port's server; the TLS port's when only that is served
        self._server: ThreadedAssociationServer | None = None
        self._tls: ThreadedAssociationServer | None = None

    @property
    def port(self) -> int:
        """The plain DICOM port; the TLS port when only that is served."""
        assert self._server is not None, "the server is not started"
        return int(self._server.server_address[1])

    @property
    def tls_port(self) -> int | None:
        """The DICOM TLS port (None: not served)."""
        return None if self._tls is None else int(self._tls.server_address[1])

    def start(self) -> DicomServer:
        settings = self.archive.settings
        if not (settings.dicom_plain or settings.dicom_tls):
            raise ConfigError(
                "dicom_plain = false needs a DICOM TLS port: tls_cert_file, tls_key_file "
                "and dicom_tls_port"
            )
        handlers = event_handlers(self.archive, self.gate, self.door)
        # settings that cannot work fail here, before any port is open
        context = tls.server_context(settings) if settings.dicom_tls else None
        for title in self.door.peers.peer_titles():
            self.door.destination_tls(title)  # a peer's client context: loads the CA now
        started: list[str] = []
        if settings.dicom_plain:
            self._server = self._serve(settings.dicom_port, _ReusePortServer, handlers)
            started.append(f"{settings.host}:{self.port}")
        if context is not None:
            self._tls = self._serve(
                settings.dicom_tls_port,
                _TlsAssociationServer,
                handlers,
                context,
                gate=self.gate,
                handshake_timeout=self.gate.artim_timeout,
            )
            self._server = self._server or self._tls
            if settings.tls_require_client_cert:
                client_certificates = "required"
            elif settings.tls_ca_file:
                client_certificates = "verified when sent"
            else:
                client_certificates = "not asked for"
            started.append(
                f"{settings.host}:{self.tls_port} (TLS; client certificates {client_certificates})"
            )
        log.info(
            "DICOM server %s listening on %s (%s)",
            settings.ae_title,
            " and ".join(started),
            self.door.posture(),
        )
        return self

    def _serve(
        self,
        port: int,
        base: type[_ReusePortServer],
        handlers: list[Any],
        context: ssl.SSLContext | None = None,
        **attributes: Any,
    ) -> ThreadedAssociationServer:
        server_class: type[_ReusePortServer] = type(
            f"Kho{base.__name__.lstrip('_')}",
            (base,),
            {"reuse_port": self.reuse_port, **attributes},
        )
        server = self.ae.make_server(
            (self.archive.settings.host, port),
            evt_handlers=handlers,
            server_class=server_class,
            ssl_context=context,
        )
        # registered so that AE.shutdown() aborts associations and closes this server
        self.ae._servers.append(server)
        thread = threading.Thread(
            target=server.serve_forever,
            name="kho-dicom-tls-acceptor" if context is not None else "kho-dicom-acceptor",
            daemon=True,
        )
        thread.start()
        return server

    def stop(self) -> None:
        self.ae.shutdown()  # aborts the associations, stops accepting
        self.gate.close_all()
        self._server = self._tls = None
