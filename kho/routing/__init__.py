"""Forwarding: rules as settings, a matcher observing ingest, a durable outbound queue in
each tenant's catalog, workers that send it by destination URI scheme (C-STORE, STOW-RS),
storage commitment, and de-identification on the way out (PS3.15 Annex E).

rules as settings (config) -> a matcher observing stored instances (Router.stored_rows:
queue rows committed with the instance) -> queue rows (queue) -> workers by destination
(Router) -> senders by URI scheme (senders: dimse, STOW-RS), de-identified (deid) when
the rule says so.

Imports the archive, access (TLS contexts, callers) and errors; never a door.
"""

from kho.routing.commitment import CommitmentReport, parse_report
from kho.routing.config import DeidProject, ForwardDestination, ForwardRule, RoutingConfig
from kho.routing.deid.profile import Deidentified, Deidentifier, WithheldError
from kho.routing.errors import DestinationError, InstanceRefusedError
from kho.routing.router import Delivery, Router

__all__ = [
    "CommitmentReport",
    "DeidProject",
    "Deidentified",
    "Deidentifier",
    "Delivery",
    "DestinationError",
    "ForwardDestination",
    "ForwardRule",
    "InstanceRefusedError",
    "Router",
    "RoutingConfig",
    "WithheldError",
    "parse_report",
]
