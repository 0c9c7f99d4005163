"""Access control: identities (OIDC tokens, API keys, the AE registry), roles, tenants, and
share and launch tokens -- the one place that answers "may this caller do this to these
studies".  Front doors ask it; the archive below knows nothing of callers.

Imports the archive (settings, the platform catalog for API keys) and errors; never a door.
"""

from kho.access.callers import Caller, CallerKind, Grant, Role, open_caller, parse_grants

__all__ = ["Caller", "CallerKind", "Grant", "Role", "open_caller", "parse_grants"]
