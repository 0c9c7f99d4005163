"""Access control at the DICOM door: who may associate, and may this association use this
service.

At the A-ASSOCIATE-RQ (pynetdicom's EVT_REQUESTED, before it negotiates anything) the
calling AE title, the called AE title and the peer's address go to the AE registry
(kho.access.dicom_peers).  A peer it does not accept gets an A-ASSOCIATE-RJ, rejected
permanent, source service-user (PS3.8 Table 9-21), reason 3 "calling AE title not
recognized" (unregistered, or calling from outside its network) or reason 7 "called AE
title not recognized"; nothing else of the association is negotiated.  An accepted
association carries a PeerSession: its Caller, the services it may use, and the archive of
its tenant, which every handler (and kho's fast C-STORE path) acts on, so a peer reads and
writes its own hospital's catalog only.

Over DICOM TLS the session also keeps what the handshake established (kho.access.tls.TlsPeer:
protocol, cipher, the client certificate's Common Names): a peer registered with
``tls_subject`` is accepted only with that certificate (else reason 3, as for an unknown
calling AE), and audit can tell a TLS association from a plain one.  The door also holds
the client TLS context of kho's own associations to peers registered with ``tls = true``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pynetdicom import evt

from kho.access.dicom_peers import (
    MOVE_DESTINATION_UNKNOWN,
    SERVICE_NOT_GRANTED,
    DicomRefusal,
    PeerRejectedError,
    PeerRejection,
    report_refusal,
)
from kho.access.tls import TlsPeer, client_context, peer_of
from kho.archive.ingest.pipeline import RowsFor, combine_rows

if TYPE_CHECKING:
    import ssl

    from pynetdicom.association import Association
    from pynetdicom.events import Event

    from kho.access.callers import Caller
    from kho.access.service import Access
    from kho.archive.archive import Archive
    from kho.archive.catalog import InstanceRecord
    from kho.audit.auditor import Auditor
    from kho.routing.router import Router

log = logging.getLogger(__name__)

#: the association attribute holding its PeerSession
SESSION_ATTRIBUTE = "kho_session"

# A-ASSOCIATE-RJ (PS3.8 9.3.4, Table 9-21): result, source, reason
_REJECTED_PERMANENT = 0x01
_REJECTED_TRANSIENT = 0x02
_SERVICE_USER = 0x01
_NO_REASON_GIVEN = 0x01
_CALLING_AE_NOT_RECOGNIZED = 0x03
_CALLED_AE_NOT_RECOGNIZED = 0x07

_REJECT = {
    PeerRejection.UNKNOWN_CALLING_AE: (
        _REJECTED_PERMANENT,
        _SERVICE_USER,
        _CALLING_AE_NOT_RECOGNIZED,
    ),
    PeerRejection.WRONG_NETWORK: (_REJECTED_PERMANENT, _SERVICE_USER, _CALLING_AE_NOT_RECOGNIZED),
    PeerRejection.WRONG_CALLED_AE: (_REJECTED_PERMANENT, _SERVICE_USER, _CALLED_AE_NOT_RECOGNIZED),
    PeerRejection.WRONG_CERTIFICATE: (
        _REJECTED_PERMANENT,
        _SERVICE_USER,
        _CALLING_AE_NOT_RECOGNIZED,
    ),
    PeerRejection.UNAVAILABLE: (_REJECTED_TRANSIENT, _SERVICE_USER, _NO_REASON_GIVEN),
}


@dataclass(frozen=True, slots=True)
class PeerSession:
    """What an accepted association may do, and where."""

    caller: Caller
    #: the DIMSE services it may use (echo, store, find, get, move)
    services: frozenset[str]
    #: the archive of the caller's tenant: its catalog and object keys
    archive: Archive
    #: what the TLS handshake established; None: the association came over plain TCP
    tls: TlsPeer | None = None


def _requestor(association: Association) -> tuple[str, str, str]:
    """(calling AE, called AE, address) of an association's request."""
    primitive = association.requestor.primitive
    calling = str(getattr(primitive, "calling_ae_title", "") or "").strip()
    called = str(getattr(primitive, "called_ae_title", "") or "").strip()
    try:
        address = str(association.requestor.address or "")
    except ValueError:  # pynetdicom: no address information set
        address = ""
    return calling, called, address


class Door:
    """The DICOM server's access checks: one per server, shared by its associations."""

    def __init__(self, archive: Archive, access: Access) -> None:
        self.archive = archive
        self.access = access
        self.peers = access.peers
        self._client_tls: ssl.SSLContext | None = None
        self._client_tls_lock = threading.Lock()
        #: the audit trail (kho serve sets one; None: nothing recorded)
        self.auditor: Auditor | None = None
        #: forwarding (kho serve sets one; None: nothing forwarded)
        self.router: Router | None = None

    def posture(self) -> str:
        """One line for the start-up log: who may associate."""
        if not self.peers.enabled:
            return "authentication off: any calling AE title, every service, default tenant"
        titles = self.peers.peer_titles()
        return (
            f"authentication on: {len(titles)} registered AE title(s) "
            f"({', '.join(titles) or 'none: every association is rejected'})"
        )

    # --- association ---------------------------------------------------------------------

    def association_requested(self, event: Event) -> None:
        """EVT_REQUESTED: accept (attach a PeerSession) or reject the association.

        pynetdicom logs and ignores an exception from a notification handler and goes on
        negotiating, so every failure here ends in a rejection: access fails closed."""
        association = event.assoc
        calling, called, address = _requestor(association)
        try:
            tls = peer_of(getattr(association.dul.socket, "socket", None))
            caller = self.peers.authenticate(calling, called, address, tls=tls)
            session = PeerSession(
                caller,
                self.peers.services(caller),
                self.archive.for_tenant(caller.home_tenant),
                tls,
            )
        except PeerRejectedError as exc:
            self._reject(association, exc.reason, calling, called, address)
            return
        except Exception:
            log.exception("association from %r (%s) could not be set up", calling, address)
            self._reject(association, PeerRejection.UNAVAILABLE, calling, called, address)
            return
        setattr(association, SESSION_ATTRIBUTE, session)

    def _reject(
        self,
        association: Association,
        reason: PeerRejection,
        calling: str,
        called: str,
        address: str,
    ) -> None:
        report_refusal(DicomRefusal(calling, called, address, reason.value))
        # what pynetdicom does for its own rejections (acse._negotiate_as_acceptor): the
        # A-ASSOCIATE-RJ goes out, then the association ends once the peer has closed
        association.acse.send_reject(*_REJECT[reason])
        evt.trigger(association, evt.EVT_REJECTED, {})
        association.kill()

    # --- services ------------------------------------------------------------------------

    def session(self, association: Any) -> PeerSession | None:
        """The PeerSession of an accepted association (None: it did not pass the door)."""
        return getattr(association, SESSION_ATTRIBUTE, None)

    def admit(self, association: Any, service: str) -> PeerSession | None:
        """The association's session when it may use ``service``; None (the refusal
        reported) when it may not."""
        session = self.session(association)
        if session is not None and service in session.services:
            return session
        self.refuse(association, service, SERVICE_NOT_GRANTED, session)
        return None

    def move_destination(
        self, association: Any, session: PeerSession, ae_title: str
    ) -> tuple[str, int] | None:
        """(host, port) of a C-MOVE destination this session may send to, or None (the
        refusal reported): with authentication on, only registered peers of its tenant."""
        address = self.peers.move_destination(session.caller, ae_title)
        if address is None:
            self.refuse(association, "move", MOVE_DESTINATION_UNKNOWN, session, ae_title.strip())
        return address

    def destination_tls(self, ae_title: str) -> ssl.SSLContext | None:
        """The client TLS context for kho's association to ``ae_title`` (a peer registered
        with ``tls = true``); None: plain TCP.  Made once, on first use."""
        if not self.peers.uses_tls(ae_title):
            return None
        with self._client_tls_lock:
            if self._client_tls is None:
                self._client_tls = client_context(self.archive.settings)
            return self._client_tls

    # --- audit (observers: never change an answer) -----------------------------------------

    def stored_rows(self, session: PeerSession, calling_ae: str = "") -> RowsFor | None:
        """What a C-STORE commits with its instance: its audit record and the forwarding
        tasks the rules select (both durable exactly when the instance is)."""
        tenant = session.archive.tenant
        audit = (
            self.auditor.stored_rows(session.caller, tenant, "C-STORE") if self.auditor else None
        )
        forward = (
            self.router.stored_rows(session.caller, tenant, "C-STORE", calling_ae)
            if self.router is not None
            else None
        )
        return combine_rows(audit, forward)

    def audit_query(self, session: PeerSession, event: Event) -> None:
        if self.auditor is None:
            return
        try:
            identifier = getattr(event.request, "Identifier", None)
            raw = identifier.getvalue() if identifier is not None else b""
            self.auditor.query(
                session.caller,
                session.archive.tenant,
                target=str(event.request.AffectedSOPClassUID),
                query=raw,
                transfer_syntax=str(event.context.transfer_syntax),
                via="C-FIND",
            )
        except Exception:
            log.exception("audit: a C-FIND was not recorded")

    def audit_sent(
        self,
        session: PeerSession,
        event: Event,
        sent: list[InstanceRecord],
        *,
        via: str,
        destination: tuple[str, tuple[str, int]] | None = None,
    ) -> None:
        if self.auditor is None or not sent:
            return
        try:
            name, (host, port) = destination if destination else (session.caller.name, ("", 0))
            self.auditor.sent(
                session.caller,
                session.archive.tenant,
                [(r.study_uid, r.sop_class_uid, r.sop_uid) for r in sent],
                via=via,
                destination=name,
                destination_address=f"{host}:{port}" if host else session.caller.address,
                failed=bool(event.is_cancelled),
            )
        except Exception:
            log.exception("audit: a %s was not recorded", via)

    def refuse(
        self,
        association: Any,
        service: str,
        reason: str,
        session: PeerSession | None = None,
        detail: str = "",
    ) -> None:
        calling, called, address = _requestor(association)
        tenant = session.caller.home_tenant if session is not None else ""
        report_refusal(DicomRefusal(calling, called, address, reason, service, tenant, detail))
