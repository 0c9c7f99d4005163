"""The one exception hierarchy of kho.

This module imports nothing, so every subpackage (codecs and storage included, which
otherwise import nothing of kho) can raise these.  Where a builtin fits, the class also
inherits it, so callers that only know the builtin still catch it.
"""

from __future__ import annotations


class KhoError(Exception):
    """Base class of every error kho raises on purpose."""


# --- codecs -------------------------------------------------------------------------------


class CodecError(KhoError, ValueError):
    """A codec could not encode or decode (corrupt, truncated or unsupported stream)."""


class CodecUnavailableError(CodecError):
    """No codec is registered (or installed) for the requested transfer syntax."""


# --- storage ------------------------------------------------------------------------------


class StorageError(KhoError, OSError):
    """The object store failed (I/O error, unreachable service)."""


class StorageUnavailableError(StorageError):
    """The object store cannot be reached right now; the caller may retry later."""


class ObjectNotFoundError(StorageError, KeyError):
    """No object under that key."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the plain message
        return str(self.args[0]) if self.args else "object not found"


class InvalidKeyError(StorageError, ValueError):
    """A key that the store refuses (absolute, '..', empty parts, odd characters)."""


# --- archive ------------------------------------------------------------------------------


class ConfigError(KhoError, ValueError):
    """Settings that cannot work."""


class InvalidDicomError(KhoError, ValueError):
    """Input that is not a well-formed DICOM dataset (garbage, truncated, absurd lengths).

    Maps to DIMSE status 0xC000 family ("cannot understand") and HTTP 400.
    """


class DatasetMismatchError(InvalidDicomError):
    """A parseable dataset that lacks or has unusable identifying attributes.

    Missing or malformed Study/Series/SOP Instance UID, SOP Class mismatch with the
    command.  Maps to DIMSE 0xA900 and HTTP 400.
    """


class IdentityConflictError(DatasetMismatchError):
    """An instance that contradicts what the catalog holds: its study belongs to another
    patient, or its series to another study.  Refused, never merged: maps to DIMSE 0xC410
    (with an Error Comment naming the conflict) and HTTP 409."""


class DuplicateInstanceError(KhoError):
    """A different instance already stored under the same SOP Instance UID, and the
    duplicate policy says reject.  Maps to DIMSE 0x0111 and HTTP 409."""


class CatalogError(KhoError):
    """The catalog database failed."""


class CatalogUnavailableError(CatalogError):
    """The catalog database cannot be reached right now (connection refused, lost or
    timed out): whether a statement in flight took effect is unknown, and the next
    statement would wait out another timeout.  The caller may retry later."""


class NotFoundError(KhoError, LookupError):
    """No such patient, study, series, instance or frame in the archive."""


class QueryError(KhoError, ValueError):
    """A query that cannot be run (bad level, malformed keys, bad parameter)."""


class IntegrityError(KhoError):
    """Stored bytes do not match their recorded SHA-256."""


# --- access -------------------------------------------------------------------------------


class AuthenticationError(KhoError, PermissionError):
    """The caller presented no credential, or one that does not hold (bad signature,
    expired, wrong issuer or audience, revoked key).  Maps to HTTP 401 and, for a DICOM
    peer, A-ASSOCIATE-RJ (calling AE title not recognized)."""


class IdentityProviderUnavailableError(AuthenticationError):
    """The issuer's signing keys cannot be fetched and none are cached: the token may be
    fine, so HTTP answers 503 with Retry-After (a client must retry, not log in again).
    Still a refusal wherever it is caught as AuthenticationError."""


class AccessDeniedError(KhoError, PermissionError):
    """A known caller asked for something no grant of theirs allows (role too low, another
    hospital's data, a DIMSE service not granted).  Maps to HTTP 403 and the DIMSE service's
    refusal status."""
