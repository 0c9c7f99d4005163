"""Object keys: derived from hashes, never from UID text or patient data.

A hostile UID cannot reach the filesystem or the bucket, and the two-level fan-out spreads
objects evenly (S3 partitions by prefix, filesystems dislike huge folders).
"""

from __future__ import annotations

import hashlib
import secrets


def instance_prefix(
    study_uid: str, series_uid: str, sop_uid: str, sha256_hex: str, *, tenant: str
) -> str:
    """Prefix of one ingest of an instance: the UIDs' hash (fan-out), the content's hash,
    and a random part.  Each ingest writes under its own prefix, so objects being deleted
    (a replaced version, the surplus copy of a concurrent duplicate, garbage) can never be
    the objects of a later ingest of the same bytes.

    ``tenant``: "" for the default tenant, whose keys are those of an archive from before
    tenants (``i/...``); another tenant's name (config.TENANT_NAME: safe in a key) puts
    its objects under ``t/<tenant>/`` (listed, billed, or removed as one) and into its
    UIDs' hash, so the same UIDs of two hospitals never share a fan-out folder name."""
    uids = f"{study_uid}\x00{series_uid}\x00{sop_uid}"
    if tenant:
        uids = f"{tenant}\x00{uids}"
    uid_hash = hashlib.sha256(uids.encode()).hexdigest()
    unique = secrets.token_hex(4)
    space = f"t/{tenant}/i" if tenant else "i"
    return f"{space}/{uid_hash[:2]}/{uid_hash[2:4]}/{uid_hash[:40]}-{sha256_hex[:16]}-{unique}"


# An instance's objects sit side by side in one fan-out folder ("<prefix>.<name>"): no
# folder is created per instance, so a durable write costs no extra directory fsyncs.
def object_key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}"


def objects_under(prefix: str) -> str:
    """The listing prefix that finds every object of one stored instance version."""
    return f"{prefix}."


def header_key(prefix: str) -> str:
    return object_key(prefix, "header")


#: an object whose key ends so holds one zstd frame of the bytes it stands for (decided by
#: the key, not by sniffing: a header as received may begin with any 128 bytes)
COMPRESSED_SUFFIX = "-zstd"


def compressed_header_key(prefix: str) -> str:
    """Where the finisher puts the header compressed (beside ``header_key``, which older
    archives and inline ingest hold uncompressed)."""
    return object_key(prefix, "header" + COMPRESSED_SUFFIX)


def is_compressed(key: str) -> bool:
    return key.endswith(COMPRESSED_SUFFIX)


def pixels_key(prefix: str) -> str:
    return object_key(prefix, "pixels")


def received_key(prefix: str) -> str:
    """An instance kept whole, as received, until the background finisher splits it."""
    return object_key(prefix, "received")


def at_rest_pixels_key(prefix: str, pixel_format: str) -> str:
    """Where a background finisher puts an instance's re-encoded pixels (beside the value as
    received, which stays readable until the catalog points here)."""
    return object_key(prefix, f"pixels-{pixel_format}")


def derived_key(prefix: str, name: str) -> str:
    return object_key(prefix, name)
