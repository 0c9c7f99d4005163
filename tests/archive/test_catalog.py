"""The catalog shared by several processes: opening it beside one that is writing."""

from __future__ import annotations

import threading

from kho.archive.catalog import Catalog
from tests.helpers.postgres import postgres_database


def test_opening_a_postgresql_catalog_beside_a_writer_runs_no_ddl() -> None:
    """A process starting (kho serve, kho stats) while another holds a write transaction
    on the instances table must not wait for it: the schema is in place, so no CREATE
    INDEX (which locks its table even when the index exists) is run."""
    with postgres_database() as url:
        writer = Catalog(url)
        try:
            with writer.transaction():
                writer.execute(
                    "INSERT INTO unfinished (sop_uid, object_prefix, queued_at) VALUES (?, ?, ?)",
                    ("1.2.3", "i/00/00/x", 0.0),
                )
                writer.execute("UPDATE instances SET source = source WHERE sop_uid = ?", ("x",))
                opened: list[Catalog] = []
                thread = threading.Thread(target=lambda: opened.append(Catalog(url)))
                thread.start()
                thread.join(15)  # it would wait for the writer's commit: never, here
                assert opened, "opening the catalog waited for another process's writes"
                assert opened[0].unfinished_count() == 0  # the writer has not committed
                opened[0].close()
        finally:
            writer.close()
