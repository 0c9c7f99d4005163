"""The audit trail: PS3.15 A.5 audit records of every access to patient data and every
security event, durable with the change they record, hash-chained in the catalog, and
forwarded to an audit record repository over syslog-TLS.

Audit observes; it never fails the request it records (STYLE.md).  The doors build events
with the factories of :mod:`kho.audit.messages` and hand them to an :class:`AuditLog`
(one per catalog); a change's transaction runs :meth:`AuditLog.statements_for` so its
record commits with it.

Imports the archive's catalog and access's Caller; never a door.
"""

from kho.audit.coalesce import AccessCoalescer
from kho.audit.journal import (
    DEFAULT_CHAIN,
    AuditRecord,
    Problem,
    chain_all,
    chain_pending,
    ensure_schema,
    read_after,
    search,
    statements_for,
    verify,
)
from kho.audit.messages import (
    Action,
    AlertReason,
    AuditEvent,
    AuditSource,
    EventKind,
    Outcome,
    Patient,
    SopClassCount,
    Study,
)
from kho.audit.service import AuditLog
from kho.audit.syslog import SyslogForwarder, client_context

__all__ = [
    "DEFAULT_CHAIN",
    "AccessCoalescer",
    "Action",
    "AlertReason",
    "AuditEvent",
    "AuditLog",
    "AuditRecord",
    "AuditSource",
    "EventKind",
    "Outcome",
    "Patient",
    "Problem",
    "SopClassCount",
    "Study",
    "SyslogForwarder",
    "chain_all",
    "chain_pending",
    "client_context",
    "ensure_schema",
    "read_after",
    "search",
    "statements_for",
    "verify",
]
