"""The audit trail of one archive: what the doors call.

One :class:`AuditLog` per tenant catalog (a hospital's records live with its data; events
of no hospital -- start and stop, a refused association -- in the platform catalog), one
syslog forwarder per catalog when a repository is configured.  Every method here is an
observer: it never raises into the request it records.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kho.access.callers import Caller, CallerKind
from kho.access.dicom_peers import REFUSAL_OBSERVERS, TLS_HANDSHAKE_FAILED, DicomRefusal
from kho.archive.catalog import RowInsert
from kho.audit import messages
from kho.audit.journal import outbox_statement
from kho.audit.messages import AlertReason, AuditEvent, AuditSource, Patient
from kho.audit.service import AuditLog
from kho.audit.syslog import SyslogForwarder, client_context

if TYPE_CHECKING:
    from kho.archive.archive import Archive
    from kho.archive.catalog import InstanceAttributes
    from kho.archive.corrections import Rejection, RejectionRows
    from kho.archive.ingest.pipeline import RowsFor

log = logging.getLogger(__name__)

#: the outbox row's table and columns (kho.audit.journal's _OUTBOX_INSERT)
_OUTBOX_COLUMNS = ("id", "queued_at", "event")


class Auditor:
    """Audit records for every tenant of ``archive`` (the root archive)."""

    def __init__(self, archive: Archive) -> None:
        settings = archive.settings
        self.archive = archive
        self.enabled = settings.audit
        self.source = AuditSource.here(ae_title=settings.ae_title)
        secret = settings.audit_chain_key.get_secret_value()
        self.key = secret.encode() if secret else None
        self.read_window_s = settings.audit_read_window_s
        self._logs: dict[str, AuditLog] = {}
        self._forwarders: list[SyslogForwarder] = []
        self._lock = threading.Lock()
        self._closed = False

    # --- the logs ------------------------------------------------------------------------

    def log_of(self, tenant: str | None = None) -> AuditLog:
        """The AuditLog of a tenant's catalog (started on first use)."""
        name = tenant or self.archive.settings.default_tenant
        found = self._logs.get(name)
        if found is not None:
            return found
        with self._lock:
            found = self._logs.get(name)
            if found is None:
                catalog = self.archive.for_tenant(name).catalog
                found = AuditLog(
                    catalog,
                    source=self.source,
                    key=self.key,
                    access_window_s=self.read_window_s,
                ).start()
                self._logs[name] = found
                self._forward(catalog)
        return found

    def _forward(self, catalog: object) -> None:
        settings = self.archive.settings
        if not settings.audit_syslog_host:
            return
        context = client_context(
            ca_file=settings.audit_syslog_ca_file or None,
            cert_file=settings.audit_syslog_cert_file or None,
            key_file=settings.audit_syslog_key_file or None,
        )
        forwarder = SyslogForwarder(
            catalog,  # type: ignore[arg-type]
            settings.audit_syslog_host,
            settings.audit_syslog_port,
            context=context,
        ).start()
        self._forwarders.append(forwarder)

    def start(self) -> Auditor:
        """Open every tenant's log now (their outboxes left by a crash get chained)."""
        if self.enabled:
            for tenant in self.archive.settings.tenant_names:
                self.log_of(tenant)
        return self

    def watch_dicom_refusals(self) -> Auditor:
        """Record every refused association, refused DIMSE request and failed DICOM TLS
        handshake of this process (kho.access.dicom_peers.REFUSAL_OBSERVERS) as a
        Security Alert, until close()."""
        if self.enabled and self._on_refusal not in REFUSAL_OBSERVERS:
            REFUSAL_OBSERVERS.append(self._on_refusal)
        return self

    def _on_refusal(self, refusal: DicomRefusal) -> None:
        if refusal.reason == TLS_HANDSHAKE_FAILED:
            reason = AlertReason.TLS_FAILURE
        elif refusal.service is None:
            reason = AlertReason.REFUSED_ASSOCIATION
        else:
            reason = AlertReason.DENIED_REQUEST
        what = f"{refusal.service}: " if refusal.service else ""
        detail = f" ({refusal.detail})" if refusal.detail else ""
        called = f" to {refusal.called_ae}" if refusal.called_ae else ""
        self.security_alert(
            reason,
            user=refusal.calling_ae,
            address=refusal.address,
            description=f"DICOM {what}{refusal.reason}{called}{detail}",
            tenant=refusal.tenant or None,
        )

    def close(self) -> None:
        """Flush and stop (before the archive's catalogs close)."""
        if self._on_refusal in REFUSAL_OBSERVERS:
            REFUSAL_OBSERVERS.remove(self._on_refusal)
        with self._lock:
            self._closed = True
            logs, self._logs = list(self._logs.values()), {}
            forwarders, self._forwarders = self._forwarders, []
        for audit_log in logs:
            audit_log.close()
        for forwarder in forwarders:
            forwarder.stop()

    def record(self, event: AuditEvent, tenant: str | None = None) -> None:
        if not self.enabled or self._closed:
            return
        try:
            self.log_of(tenant).record(event)
        except Exception:
            log.exception("audit: an event could not be recorded")

    # --- changes: committed with the change ------------------------------------------------

    def stored_rows(self, caller: Caller, tenant: str, via: str) -> RowsFor | None:
        """For ``Archive.ingest_*(with_rows=...)``: the Instances Transferred record of an
        instance, committed in the instance's own transaction."""
        if not self.enabled:
            return None
        self.log_of(tenant)  # the outbox table exists in the tenant's catalog

        def rows(attrs: InstanceAttributes) -> Sequence[RowInsert]:
            event = messages.instances_stored(
                caller,
                patient=Patient(attrs.patient_id, attrs.patient_name),
                study=messages.one_instance(attrs.study_uid, attrs.sop_class_uid, attrs.sop_uid),
                via=via,
                tenant=tenant,
            )
            _sql, params = outbox_statement(event.stamped(self.source))
            return [RowInsert("audit_outbox", _OUTBOX_COLUMNS, tuple(params))]

        return rows

    # --- reads, queries, security events: within a second ----------------------------------

    def query(
        self,
        caller: Caller,
        tenant: str,
        *,
        target: str,
        query: bytes | str,
        via: str,
        transfer_syntax: str = "",
    ) -> None:
        if self.enabled:
            self.record(
                messages.query(
                    caller,
                    target=target,
                    query=query,
                    transfer_syntax=transfer_syntax,
                    via=via,
                    tenant=tenant,
                ),
                tenant,
            )

    def accessed(self, caller: Caller, tenant: str, study_uid: str, via: str) -> None:
        """A read of a study (metadata, frames, rendered, thumbnails, bulk data): one
        record per caller and study per window; the patient is looked up only then."""
        if not self.enabled or self._closed:
            return
        try:
            audit_log = self.log_of(tenant)
            who = (caller.kind, caller.name, caller.address, tenant)
            if not audit_log.reads.admit(who, study_uid):
                return
            patient = self._patient_of(tenant, study_uid)
            audit_log.record(
                messages.instances_accessed(
                    caller, patient=patient, study=messages.Study(study_uid), via=via, tenant=tenant
                )
            )
        except Exception:
            log.exception("audit: a read could not be recorded")

    def sent(
        self,
        caller: Caller,
        tenant: str,
        sent: Sequence[tuple[str, str, str]],
        *,
        via: str,
        destination: str = "",
        destination_address: str = "",
        failed: bool = False,
        deidentified_for: str = "",
    ) -> None:
        """Instances sent (C-GET, C-MOVE, forwarding): ``sent`` = (study UID, SOP class,
        SOP instance); one record per study.  ``deidentified_for``: they left de-identified
        for that project: an Export record (A.5.3.6) naming the real patient, since the
        hospital must know whose data left, whatever it was made to look like."""
        if not self.enabled or not sent:
            return
        by_study: dict[str, messages.Study] = {}
        for study_uid, sop_class, sop_uid in sent:
            one = messages.one_instance(study_uid, sop_class, sop_uid)
            known = by_study.get(study_uid)
            by_study[study_uid] = known.merged(one) if known is not None else one
        outcome = messages.Outcome.MINOR_FAILURE if failed else messages.Outcome.SUCCESS
        for study_uid, study in by_study.items():
            patient = self._patient_of(tenant, study_uid)
            if deidentified_for:
                event = messages.export(
                    caller,
                    patient=patient,
                    study=study,
                    destination=destination,
                    destination_address=destination_address,
                    via=via,
                    outcome=outcome,
                    description=f"de-identified for project {deidentified_for}",
                    tenant=tenant,
                )
            else:
                event = messages.instances_sent(
                    caller,
                    patient=patient,
                    study=study,
                    destination=destination,
                    destination_address=destination_address,
                    via=via,
                    outcome=outcome,
                    tenant=tenant,
                )
            self.record(event, tenant)

    def rejection_rows(self, tenant: str) -> RejectionRows | None:
        """For ``Archive.rejection_records``: the records of a rejection note carried out
        in ``tenant`` (kho.archive.corrections), committed in the rejection's own
        transaction.  Per study, DICOM Instances Accessed with action D naming the
        instances withdrawn (hidden at once, deleted after the delay), or DICOM Study
        Deleted when nothing of the study is left; the description names the reason."""
        if not self.enabled:
            return None
        self.log_of(tenant)  # the outbox table exists in the tenant's catalog

        def rows(rejection: Rejection) -> Sequence[RowInsert]:
            out = []
            for event in self._rejection_events(rejection):
                _sql, params = outbox_statement(event.stamped(self.source))
                out.append(RowInsert("audit_outbox", _OUTBOX_COLUMNS, tuple(params)))
            return out

        return rows

    def _rejection_events(self, rejection: Rejection) -> list[AuditEvent]:
        events: list[AuditEvent] = []
        try:
            kind = CallerKind(rejection.requester_kind)
        except ValueError:
            kind = CallerKind.OPEN
        caller = Caller(
            kind,
            rejection.requested_by or rejection.requester_kind,
            home_tenant=rejection.tenant,
            address=rejection.address,
        )
        reason = rejection.reason
        when = "deleted now" if reason.immediate else "deleted after the retention delay"
        description = f"rejection note {rejection.note_uid}: {reason.code} {reason.meaning}; {when}"
        for withdrawn in rejection.studies:
            study = messages.Study(withdrawn.study_uid)
            for sop_class, sop_uid in withdrawn.instances:
                study = study.merged(messages.one_instance(withdrawn.study_uid, sop_class, sop_uid))
            patient = Patient(withdrawn.patient_id, withdrawn.patient_name)
            if withdrawn.study_gone:
                event = messages.study_deleted(
                    caller,
                    patient=patient,
                    study=study,
                    description=description,
                    tenant=rejection.tenant,
                )
            else:
                event = messages.instances_accessed(
                    caller,
                    patient=patient,
                    study=study,
                    action=messages.Action.DELETE,
                    via=rejection.via,
                    description=description,
                    tenant=rejection.tenant,
                )
            events.append(event)
        return events

    def security_alert(
        self,
        reason: AlertReason,
        *,
        user: Caller | str = "",
        address: str = "",
        description: str = "",
        tenant: str | None = None,
    ) -> None:
        if self.enabled:
            self.record(
                messages.security_alert(
                    reason, user=user, address=address, description=description, tenant=tenant
                ),
                tenant,
            )

    def authentication(
        self, user: Caller | str, *, success: bool, address: str = "", description: str = ""
    ) -> None:
        if self.enabled:
            self.record(
                messages.user_authentication(
                    user, success=success, address=address, description=description
                )
            )

    def application(self, *, started: bool) -> None:
        if self.enabled:
            self.record(messages.application_activity(started=started))

    def _patient_of(self, tenant: str, study_uid: str) -> Patient:
        catalog = self.archive.for_tenant(tenant).catalog
        row = catalog.fetchone(
            "SELECT p.patient_id, p.patient_name FROM studies s "
            "JOIN patients p ON p.patient_key = s.patient_key WHERE s.study_uid = ?",
            (study_uid,),
        )
        return Patient(str(row[0]), str(row[1])) if row else Patient("")
