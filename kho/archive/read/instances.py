"""An instance read back: the Part 10 bytes exactly as received (rebuilt from the header
object and the at-rest pixels when finished), its dataset, and a re-read of everything
(kho verify)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from kho.archive.catalog import InstanceRecord
from kho.archive.dataset.part10 import read_file_meta
from kho.archive.read.objects import read_header_object
from kho.archive.read.pixels import pixel_value
from kho.archive.read.source import StoredArchive
from kho.errors import IntegrityError, ObjectNotFoundError, StorageError, StorageUnavailableError
from kho.storage.spool import is_spool_key


def read_part10(archive: StoredArchive, record: InstanceRecord) -> bytes:
    """The instance's bytes exactly as received (Part 10, with our meta for DIMSE).

    ``record`` may be older than the row: a C-MOVE or a study retrieve loads its records
    first, and the finisher may switch one meanwhile and delete its received object a
    minute later.  Then the row is read again and the instance rebuilt from it (the
    same bytes either way)."""
    try:
        return _read_part10(archive, record)
    except (ObjectNotFoundError, StorageUnavailableError) as exc:
        # unavailable: a spooled instance whose host is out of reach, moved into the
        # bucket since, perhaps (else nothing better to read)
        unreachable = isinstance(exc, StorageUnavailableError)
        if unreachable and not is_spool_key(record.pixels_key):
            raise
        current = archive.catalog.get_instance(record.sop_uid)
        if current is None or current == record or current.sha256 != record.sha256:
            raise
        if unreachable and is_spool_key(current.pixels_key):
            raise
        return _read_part10(archive, current)


def _read_part10(archive: StoredArchive, record: InstanceRecord) -> bytes:
    header = read_header_object(archive.store, record.header_key)
    if record.pixel_format == "none" or record.stored_as_received:
        return header
    payload = archive.store.get(record.pixels_key)
    value = pixel_value(archive, record, payload)
    split = record.pixel_split
    return b"".join((header[:split], value, header[split:]))


def read_instance(archive: StoredArchive, sop_uid: str) -> tuple[InstanceRecord, bytes]:
    record = archive.catalog.require_instance(sop_uid)
    return record, read_part10(archive, record)


def read_dataset(archive: StoredArchive, record: InstanceRecord) -> bytes:
    """The dataset bytes (no File Meta Information) in the transfer syntax received."""
    data = read_part10(archive, record)
    _meta, offset = read_file_meta(data)
    return data[offset:]


def verify(archive: StoredArchive) -> Iterator[tuple[InstanceRecord, str | None]]:
    """Re-read every instance; yield (record, problem or None)."""
    for record in archive.catalog.iter_instances():
        try:
            data = read_part10(archive, record)
        except ObjectNotFoundError as exc:
            yield record, f"missing object: {exc}"
            continue
        except (StorageError, IntegrityError) as exc:
            yield record, f"unreadable: {exc}"
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest != record.sha256:
            yield record, f"SHA-256 mismatch: stored {record.sha256}, read {digest}"
        else:
            yield record, None
