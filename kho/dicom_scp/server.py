"""The DIMSE server: an Application Entity on pynetdicom bound to the archive's handlers."""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

import pydicom.config
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from kho.archive.archive import Archive
from kho.dicom_scp import handlers, qr

log = logging.getLogger(__name__)


class _ReusePortServer(ThreadedAssociationServer):
    """Sets SO_REUSEPORT so several `kho serve` processes share one DICOM port."""

    reuse_port = False

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
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = settings.max_pdu_size
    ae.maximum_associations = settings.max_associations
    ae.require_called_aet = settings.require_called_ae
    ae.network_timeout = 120
    ae.acse_timeout = 30
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


def event_handlers(archive: Archive) -> list[Any]:
    return [
        (evt.EVT_CONN_OPEN, qr.handle_connection_open),
        (evt.EVT_CONN_OPEN, handlers.handle_association_open, [archive]),
        (evt.EVT_C_ECHO, handlers.handle_echo),
        (evt.EVT_C_STORE, handlers.handle_store, [archive]),
        (evt.EVT_C_FIND, qr.handle_find, [archive]),
        (evt.EVT_C_GET, qr.handle_get, [archive]),
        (evt.EVT_C_MOVE, qr.handle_move, [archive]),
    ]


class DicomServer:
    """The running DIMSE server; ``stop()`` closes it and its associations."""

    def __init__(self, archive: Archive, *, reuse_port: bool = False) -> None:
        self.archive = archive
        self.ae = build_ae(archive)
        self.reuse_port = reuse_port
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
            evt_handlers=event_handlers(self.archive),
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
        self.ae.shutdown()
        self._server = None
