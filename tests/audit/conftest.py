"""Audit fixtures: a catalog on each engine (SQLite in a temporary directory, a fresh
PostgreSQL database), callers of each kind, and the archive's audit source."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from kho.access.callers import Caller, CallerKind, Grant, Role
from kho.archive.catalog import Catalog, open_catalog
from kho.audit.messages import AuditSource
from tests.helpers.postgres import ENGINES, postgres_database


@pytest.fixture(params=ENGINES)
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "postgresql":
        with postgres_database() as url:
            yield url
    else:
        yield str(tmp_path / "catalog.sqlite3")


@pytest.fixture
def catalog(catalog_url: str) -> Iterator[Catalog]:
    with contextlib.closing(open_catalog(catalog_url)) as opened:
        yield opened


@pytest.fixture
def sqlite_catalog(tmp_path: Path) -> Iterator[Catalog]:
    with contextlib.closing(open_catalog(tmp_path / "catalog.sqlite3")) as opened:
        yield opened


@pytest.fixture
def source() -> AuditSource:
    return AuditSource("kho@archive-1", "hosp-a", "KHO", "archive-1.example.org", "4242")


@pytest.fixture
def modality() -> Caller:
    return Caller(
        CallerKind.DICOM,
        "CT_SCANNER_1",
        frozenset({Grant(Role.UPLOADER, "hosp-a")}),
        home_tenant="hosp-a",
        address="10.20.30.40",
    )


@pytest.fixture
def radiologist() -> Caller:
    return Caller(
        CallerKind.TOKEN,
        "dr.house",
        frozenset({Grant(Role.VIEWER, "hosp-a")}),
        home_tenant="hosp-a",
        address="192.168.1.50",
    )


@pytest.fixture
def workstation() -> Caller:
    return Caller(
        CallerKind.DICOM,
        "READING_WS",
        frozenset({Grant(Role.VIEWER, "hosp-a")}),
        home_tenant="hosp-a",
        address="10.20.30.41",
    )
