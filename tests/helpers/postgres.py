"""A fresh PostgreSQL database per use, on the machine's local server (CI starts it in
.ci/run).  Unreachable PostgreSQL is a failure, not a skip: CI must run these tests."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from typing import Any

import psycopg

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    name = f"kho_test_{secrets.token_hex(6)}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
        try:
            yield f"postgresql://postgres@127.0.0.1:5432/{name}"
        finally:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


#: the catalog engines the catalog-level tests run on
ENGINES = ["sqlite", "postgresql"]


@contextlib.contextmanager
def archive_on(engine: str, settings: Any) -> Iterator[Any]:
    """An Archive on ``settings`` whose catalog is SQLite (in its data directory) or a
    fresh PostgreSQL database."""
    from kho.archive.archive import Archive
    from kho.archive.catalog import open_catalog

    with contextlib.ExitStack() as stack:
        catalog = None
        if engine == "postgresql":
            catalog = open_catalog(stack.enter_context(postgres_database()))
        yield stack.enter_context(Archive(settings, catalog=catalog))
