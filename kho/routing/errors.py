"""Why an instance was not delivered: the destination (retried with backoff, every row of
the batch) or the instance (refused: given up at once when the refusal is permanent)."""

from __future__ import annotations

from kho.errors import KhoError


class DestinationError(KhoError):
    """The destination cannot take instances now: unreachable, refused or aborted the
    association, a TLS or HTTP failure.  Retried later with the destination's backoff."""


class InstanceRefusedError(KhoError):
    """The destination (or kho) refused one instance.  ``permanent``: it never will
    accept it (a 0xA9xx/0xCxxx status, no syntax in common, an instance kho cannot
    read or de-identify); else it is retried like a destination failure."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


__all__ = ["DestinationError", "InstanceRefusedError"]
