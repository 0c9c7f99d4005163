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
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, cast

import pydicom.config
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from kho.archive.archive import Archive
from kho.dicom_scp import fast_dimse, handlers, qr

if TYPE_CHECKING:
    from pynetdicom.association import Association
    from pynetdicom.events import Event

log = logging.getLogger(__name__)

# a new connection's wait for its A-ASSOCIATE-RQ is the setting artim_timeout (10 s): a real
# SCU sends it in the first packet after connecting (dcmtk's storescp waits 30 s)
ACSE_TIMEOUT_S = 30.0  # waiting for an A-RELEASE-RP and the like
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
    Query/Retrieve (FIND, GET, MOVE)."""
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
    ae.require_called_aet = settings.require_called_ae
    ae.network_timeout = NETWORK_TIMEOUT_S
    ae.acse_timeout = ACSE_TIMEOUT_S
    ae.dimse_timeout = 120
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    # Storage needs no supported contexts: with UNRESTRICTED_STORAGE_SERVICE pynetdicom
    # accepts every storage SOP class with the requestor's first transfer syntax (its
    # preference, as dcmtk's storescp does) and both roles (C-GET role selection).  Not
    # listing ~170 classes x 45 syntaxes also spares each new association copying them.
    # Query/Retrieve: C-FIND, C-GET, C-MOVE in the patient root and study root models
    for sop_class in qr.QR_SOP_CLASSES:
        ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
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
                fast_dimse.drop_connection(self._waiting.popleft())
                self.closed_waiting += 1
                self._closed_since_log += 1
            self._waiting.append(association)
            now = time.monotonic()
            if self._closed_since_log and now - self._logged_at >= _EVICTION_LOG_INTERVAL_S:
                log.warning(
                    "more than %d connections without an A-ASSOCIATE-RQ: closed the oldest "
                    "%d (latest connection from %s)",
                    self.waiting_limit,
                    self._closed_since_log,
                    association.requestor.address,
                )
                self._logged_at, self._closed_since_log = now, 0

    def close_all(self) -> None:
        """Close every connection still waiting (the server stops)."""
        with self._lock:
            waiting, self._waiting = self._waiting, deque()
        for association in waiting:
            fast_dimse.drop_connection(association)


def event_handlers(archive: Archive, gate: ConnectionGate | None = None) -> list[Any]:
    gate = gate or ConnectionGate(archive.settings.max_associations, archive.settings.artim_timeout)
    return [
        (evt.EVT_CONN_OPEN, qr.handle_connection_open),
        (evt.EVT_CONN_OPEN, handlers.handle_association_open, [archive]),
        (evt.EVT_CONN_OPEN, gate.connection_opened),
        (evt.EVT_C_ECHO, handlers.handle_echo),
        (evt.EVT_C_STORE, handlers.handle_store, [archive]),
        (evt.EVT_C_FIND, qr.handle_find, [archive]),
        (evt.EVT_C_GET, qr.handle_get, [archive]),
        (evt.EVT_C_MOVE, qr.handle_move, [archive]),
    ]


class DicomServer:
    """The running DIMSE server; ``stop()`` closes it and its associations."""

    def __init__(
        self,
        archive: Archive,
        *,
        reuse_port: bool = False,
        artim_timeout: float | None = None,
    ) -> None:
        self.archive = archive
        self.ae = build_ae(archive)
        self.reuse_port = reuse_port
        if artim_timeout is None:
            artim_timeout = archive.settings.artim_timeout
        self.gate = ConnectionGate(archive.settings.max_associations, artim_timeout)
        self._server: ThreadedAssociationServer | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def start(self) -> DicomServer:
        settings = self.archive.settings
        server_class: type[_ReusePortServer] = type(
            "KhoAssociationServer", (_ReusePortServer,), {"reuse_port": self.reuse_port}
        )
        self._server = self.ae.make_server(
            (settings.host, settings.dicom_port),
            evt_handlers=event_handlers(self.archive, self.gate),
            server_class=server_class,
        )
        # registered so that AE.shutdown() aborts associations and closes this server
        self.ae._servers.append(self._server)
        thread = threading.Thread(
            target=self._server.serve_forever, name="kho-dicom-acceptor", daemon=True
        )
        thread.start()
        log.info("DICOM server %s listening on %s:%d", settings.ae_title, settings.host, self.port)
        return self

    def stop(self) -> None:
        self.ae.shutdown()  # aborts the associations, stops accepting
        self.gate.close_all()
        self._server = None
