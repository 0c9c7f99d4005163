"""From a message's bytes to its acknowledgement: who sent it and for which hospital, which
handler applies it, exactly once (the journal), and the audit trail.

Senders: ``hl7_senders`` maps ``application^facility`` (MSH-3^MSH-4, compared without
case; or ``application`` alone for any facility) to the tenant its messages act in.  With
authentication on, a sender not listed gets AR and nothing is applied; with it off, an
unlisted sender acts in the default tenant (loopback, zero set-up).

Answers: AR before anything is applied (not HL7 kho can read, an unknown sender or tenant,
a message type kho does not take), AE when the message was understood but could not be
applied (nothing of it was), AA when it was.  Every message is journalled in its tenant's
catalog (kho.archive.patients.journal): a resend is answered from there.  A message from
an unknown sender is journalled (its MSH only: its content belongs to no hospital) in the
platform's catalog.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from kho.archive.patients import DEFAULT_CITIZEN_ISSUER, PatientChange, RecordError
from kho.archive.patients import journal as hl7_journal
from kho.archive.worklist import OrderError
from kho.audit import messages as audit_messages
from kho.errors import KhoError, NotFoundError
from kho.hl7 import handlers
from kho.hl7.message import (
    DATA_TYPE_ERROR,
    INTERNAL_ERROR,
    REQUIRED_FIELD_MISSING,
    Header,
    Message,
    MessageError,
    acknowledgement,
    codec_of,
    read_header,
)

if TYPE_CHECKING:
    from kho.access.service import Access
    from kho.archive.archive import Archive
    from kho.audit.auditor import Auditor

log = logging.getLogger(__name__)

#: service field names (RecordError, OrderError) -> HL7 location (ERR-2)
_LOCATIONS = {
    "patient_id": "PID^1^3",
    "citizen_id": "PID^1^3",
    "other_ids": "PID^1^3",
    "name": "PID^1^5",
    "birth_date": "PID^1^7",
    "sex": "PID^1^8",
    "merged_id": "MRG^1^1",
    "order": "ORC^1^2",
    "status": "ORC^1^5",
    "accession_number": "OBR^1^18",
    "sps_id": "OBR^1^20",
    "station_ae": "ORC^1^18",
    "start": "TQ1^1^7",
}
_REFUSALS = (RecordError, OrderError, MessageError, hl7_journal.DuplicateControlIdError)


class Hl7Receiver:
    """Applies HL7 messages to an archive's tenants (the root archive given)."""

    def __init__(
        self, archive: Archive, access: Access | None = None, auditor: Auditor | None = None
    ) -> None:
        settings = archive.settings
        self.archive = archive
        self.auditor = auditor
        self.auth_on = access.enabled if access is not None else bool(settings.auth_on)
        senders: dict[str, str] = dict(settings.hl7_senders or {})
        self.senders = {name.strip().casefold(): tenant for name, tenant in senders.items()}
        self.citizen_issuer = str(settings.citizen_id_issuer or DEFAULT_CITIZEN_ISSUER)
        self.local_issuer = str(settings.hl7_patient_id_issuer or "")
        self.application = str(settings.hl7_application or "KHO")
        self.facility = str(settings.ae_title)

    # --- senders ---------------------------------------------------------------------------

    def tenant_of(self, header: Header) -> str | None:
        """The tenant a sender's messages act in; None: the sender is not accepted."""
        for name in (header.sender, header.sending_application):
            tenant = self.senders.get(name.casefold())
            if tenant is not None:
                return tenant
        return None if self.auth_on else self.archive.settings.default_tenant

    # --- messages --------------------------------------------------------------------------

    def receive(self, raw: bytes, address: str = "") -> bytes:
        """The acknowledgement of one message (unframed), in the message's character set."""
        try:
            header = read_header(raw)
        except MessageError as exc:
            log.warning("HL7 message from %s rejected: %s", address or "?", exc)
            return self._bare_reject(str(exc))
        ack = self.answer(raw, header, address)
        return ack.encode(codec_of(header) or "utf-8", "replace")

    def answer(self, raw: bytes, header: Header, address: str = "") -> str:
        tenant = self.tenant_of(header)
        received = hl7_journal.Received(
            header.sender, header.control_id, header.type_name, _msh_only(raw)
        )
        if tenant is None:
            text = "the sending application is not registered"
            ack = self._ack(header, "AR", text, INTERNAL_ERROR, "MSH^1^3")
            log.warning("HL7 %s from %s (%s): %s", header.type_name, header.sender, address, text)
            hl7_journal.record(self.archive.catalog, received, "AR", text, ack)
            return ack
        try:
            archive = self.archive.for_tenant(tenant)
        except NotFoundError:
            text = "the sender's hospital is not declared"
            log.error(
                "HL7 sender %s maps to tenant %r, which is not declared", header.sender, tenant
            )
            ack = self._ack(header, "AR", text, INTERNAL_ERROR, "MSH^1^4")
            hl7_journal.record(self.archive.catalog, received, "AR", text, ack)
            return ack
        try:
            message = Message(raw, header)
            handler = handlers.handler_for(header.message_type, header.trigger)
        except MessageError as exc:
            ack = self._ack(header, exc.code, str(exc), exc.error, exc.location)
            log.warning(
                "HL7 %s %s from %s: %s %s",
                header.type_name,
                header.control_id,
                header.sender,
                exc.code,
                exc,
            )
            hl7_journal.record(archive.catalog, received, exc.code, str(exc), ack)
            return ack
        received = hl7_journal.Received(
            header.sender, header.control_id, header.type_name, message.text
        )
        context = handlers.Context(archive.catalog, self.citizen_issuer, self.local_issuer)

        def acknowledge(code: str, text: str, error: KhoError | None) -> str:
            condition, location = _condition(error)
            return self._ack(header, code, text, condition, location)

        outcome, changes = hl7_journal.run(
            archive.catalog,
            received,
            lambda: handler(message, context),
            acknowledge,
            refusals=_REFUSALS,
        )
        if outcome.ack_code != "AA":
            log.warning(
                "HL7 %s %s from %s: %s %s",
                header.type_name,
                header.control_id,
                header.sender,
                outcome.ack_code,
                outcome.ack_text,
            )
        if changes:
            self._audit(changes, header, tenant, address)
        return outcome.ack

    def replay(self, tenant: str, since: float = 0.0) -> int:
        """Apply again the messages a tenant's journal answered AA since ``since`` (a
        catalog restored from a backup), oldest first; how many.  The journal rows stay."""
        archive = self.archive.for_tenant(tenant)
        context = handlers.Context(archive.catalog, self.citizen_issuer, self.local_issuer)
        count = 0
        for entry in list(hl7_journal.entries(archive.catalog, since=since)):
            raw = entry.message.encode("utf-8")
            header = dataclasses.replace(read_header(raw), charset="UNICODE UTF-8")
            message = Message(raw, header)
            handler = handlers.handler_for(header.message_type, header.trigger)
            with archive.catalog.transaction():
                handler(message, context)
            count += 1
        return count

    # --- answers ---------------------------------------------------------------------------

    def _ack(
        self, header: Header, code: str, text: str, error: str = "", location: str = ""
    ) -> str:
        return acknowledgement(
            header,
            code,
            text,
            error=error,
            location=location,
            application=self.application,
            facility=self.facility,
        )

    def _bare_reject(self, text: str) -> bytes:
        """An AR for bytes without a readable MSH (no control ID to acknowledge)."""
        header = Header("|", "^~\\&", "", "", "", "", "", "", "", "", "P", "2.5", "")
        return self._ack(header, "AR", text, "100", "MSH").encode("ascii", "replace")

    def _audit(
        self, changes: list[PatientChange], header: Header, tenant: str, address: str
    ) -> None:
        if self.auditor is None:
            return
        for change in changes:
            action = (
                audit_messages.Action.CREATE
                if change.action == "created"
                else audit_messages.Action.UPDATE
            )
            description = f"HL7 {header.type_name}: patient {change.action}"
            if change.previous_id:
                description += f" (from another Patient ID, {change.studies_moved} studies moved)"
            self.auditor.record(
                audit_messages.patient_record(
                    f"HL7 {header.sender}",
                    patient=audit_messages.Patient(change.patient_id, change.name),
                    action=action,
                    address=address,
                    via="hl7",
                    description=description,
                    tenant=tenant,
                ),
                tenant,
            )


def _condition(error: KhoError | None) -> tuple[str, str]:
    """(HL7 error code, location) of a refusal."""
    if isinstance(error, MessageError):
        return error.error, error.location
    if isinstance(error, RecordError | OrderError):
        location = _LOCATIONS.get(error.field, "")
        code = REQUIRED_FIELD_MISSING if str(error).startswith("no ") else DATA_TYPE_ERROR
        return code, location
    return INTERNAL_ERROR, ""


def _msh_only(raw: bytes) -> str:
    end = min((i for i in (raw.find(b"\r"), raw.find(b"\n")) if i >= 0), default=len(raw))
    return raw[:end].decode("latin-1")
