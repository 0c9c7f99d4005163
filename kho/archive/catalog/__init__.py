"""The SQL catalog (patients, studies, series, instances, the ingest journal, the
finisher's queue): one interface (Catalog), one module per SQL dialect.  Imports storage's
spool keys and errors; nothing of the archive's flows."""

from __future__ import annotations

import re
from pathlib import Path

from kho.archive.catalog.base import PROCESS_OWNER, Catalog, RowInsert, owner_is_gone
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
from kho.archive.config import TENANT_NAME
from kho.errors import CatalogError


def open_catalog(
    url_or_path: str | Path, *, synchronous_full: bool = True, tenant: str = ""
) -> Catalog:
    """The catalog at a ``postgresql://`` URL, else the SQLite file at a path (or
    ``sqlite:///path``).  psycopg is loaded only for PostgreSQL.

    ``tenant`` (a name config.TENANT_NAME allows; "" for the default tenant): that
    tenant's own catalog beside the default one: in PostgreSQL the same database, schema
    ``tenant_<name>``; in SQLite the file ``<stem>-<name><suffix>`` next to the default
    one (``catalog-<name>.sqlite3``).  The default tenant keeps the public schema and the
    plain file: an archive from before tenants is the default tenant's as it is."""
    text = str(url_or_path)
    if tenant and not re.fullmatch(TENANT_NAME, tenant):
        raise CatalogError(f"tenant name {tenant!r} must match {TENANT_NAME}")
    if text.startswith(("postgresql://", "postgres://")):
        from kho.archive.catalog.postgresql import PostgresCatalog

        return PostgresCatalog(text, synchronous_full=synchronous_full, tenant=tenant)
    from kho.archive.catalog.sqlite import SqliteCatalog

    path = Path(text.removeprefix("sqlite:///"))
    if tenant:
        path = path.with_name(f"{path.stem}-{tenant}{path.suffix}")
    return SqliteCatalog(path, synchronous_full=synchronous_full, tenant=tenant)


__all__ = [
    "GARBAGE_DELAY_S",
    "HEADER_OBJECT",
    "INSTANCE_COLUMNS",
    "PIXELS_OBJECT",
    "PROCESS_OWNER",
    "Catalog",
    "InstanceAttributes",
    "InstanceRecord",
    "RowInsert",
    "fold_name",
    "open_catalog",
    "owner_is_gone",
    "patient_key",
]
