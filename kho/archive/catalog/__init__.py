"""The SQL catalog (patients, studies, series, instances, the ingest journal, the
finisher's queue): one interface (Catalog), one module per SQL dialect.  Imports storage's
spool keys and errors; nothing of the archive's flows."""

from __future__ import annotations

from pathlib import Path

from kho.archive.catalog.base import PROCESS_OWNER, Catalog, owner_is_gone
from kho.archive.catalog.records import (
    GARBAGE_DELAY_S,
    HEADER_OBJECT,
    INSTANCE_COLUMNS,
    PIXELS_OBJECT,
    InstanceAttributes,
    InstanceRecord,
    fold_name,
    patient_key,
)


def open_catalog(url_or_path: str | Path, *, synchronous_full: bool = True) -> Catalog:
    """The catalog at a ``postgresql://`` URL, else the SQLite file at a path (or
    ``sqlite:///path``).  psycopg is loaded only for PostgreSQL."""
    text = str(url_or_path)
    if text.startswith(("postgresql://", "postgres://")):
        from kho.archive.catalog.postgresql import PostgresCatalog

        return PostgresCatalog(text, synchronous_full=synchronous_full)
    from kho.archive.catalog.sqlite import SqliteCatalog

    return SqliteCatalog(text, synchronous_full=synchronous_full)


__all__ = [
    "GARBAGE_DELAY_S",
    "HEADER_OBJECT",
    "INSTANCE_COLUMNS",
    "PIXELS_OBJECT",
    "PROCESS_OWNER",
    "Catalog",
    "InstanceAttributes",
    "InstanceRecord",
    "fold_name",
    "open_catalog",
    "owner_is_gone",
    "patient_key",
]
