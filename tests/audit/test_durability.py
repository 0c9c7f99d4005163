"""Durability across ``kill -9``: a process recording a burst of events is killed; every
event recorded more than a second before is in the journal (or its outbox, chained by
the next process).  A process committing changes with their records is killed; every
committed change has its record and no record lacks its change."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from kho.archive.catalog import open_catalog
from kho.audit import journal

ROOT = Path(__file__).resolve().parents[2]

BURST = """
import sys, time
from kho.archive.catalog import open_catalog
from kho.audit import messages as m
from kho.audit.service import AuditLog

log = AuditLog(open_catalog(sys.argv[1])).start()
print("ready", flush=True)
i = 0
while True:
    log.record(m.security_alert(m.AlertReason.DENIED_REQUEST, user=f"burst-{i}", subject="/x"))
    print(i, time.time(), flush=True)
    i += 1
    time.sleep(0.002)
"""

CHANGES = """
import sys, time
from kho.access.callers import Caller, CallerKind
from kho.archive.catalog import open_catalog
from kho.audit import messages as m
from kho.audit.service import AuditLog

catalog = open_catalog(sys.argv[1])
log = AuditLog(catalog).start()
modality = Caller(CallerKind.DICOM, "CT1", address="10.0.0.1")
print("ready", flush=True)
i = 0
while True:
    sop = f"9.{i}"
    event = m.instances_stored(
        modality, patient=m.Patient("P"), study=m.one_instance(f"1.{i // 50}", "1.2.3", sop)
    )
    with catalog.transaction():
        catalog.execute_batch(
            [("INSERT INTO unfinished (sop_uid, object_prefix, queued_at) VALUES (?, ?, ?)",
              (sop, "i/" + sop, time.time()))] + log.statements_for(event)
        )
    print(i, time.time(), flush=True)
    i += 1
"""


def run_and_kill(
    script: str, catalog_url: str, run_s: float
) -> tuple[list[tuple[int, float]], float]:
    """Run ``script`` until it has worked ``run_s`` seconds, SIGKILL it; the (number,
    time) lines it printed and the time of the kill."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, catalog_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == "ready":
                ready.set()
            else:
                lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(120), "the subprocess did not start"
        time.sleep(run_s)
        killed_at = time.time()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(30)
    done = [(int(n), float(t)) for n, t in (line.split() for line in lines if " " in line)]
    return done, killed_at


def test_events_older_than_a_second_survive_kill_9(catalog_url: str) -> None:
    open_catalog(catalog_url).close()  # the schema, before the subprocess starts
    done, killed_at = run_and_kill(BURST, catalog_url, 2.5)
    must_survive = {f"burst-{n}" for n, t in done if t < killed_at - 1.0}
    assert len(must_survive) > 100
    catalog = open_catalog(catalog_url)
    try:
        journal.chain_all(catalog)  # what the killed process left in the outbox
        found = {row[0] for row in catalog.fetchall("SELECT user_id FROM audit_journal")}
        assert must_survive <= found, f"{len(must_survive - found)} events lost"
        assert found <= {f"burst-{n}" for n, _ in done} | {f"burst-{len(done)}"}
        assert journal.verify(catalog) == []
    finally:
        catalog.close()


def test_every_committed_change_has_its_record_after_kill_9(catalog_url: str) -> None:
    open_catalog(catalog_url).close()
    done, _ = run_and_kill(CHANGES, catalog_url, 2.0)
    assert len(done) > 20
    catalog = open_catalog(catalog_url)
    try:
        journal.chain_all(catalog)
        changed = {row[0] for row in catalog.fetchall("SELECT sop_uid FROM unfinished")}
        recorded = set()
        for (message,) in catalog.fetchall("SELECT message FROM audit_journal"):
            recorded |= {i.get("UID") for i in ET.fromstring(message).iter("Instance")}
        acknowledged = {f"9.{n}" for n, _ in done}
        assert acknowledged <= changed
        assert recorded == changed  # with its change, or not at all
        assert journal.verify(catalog) == []
    finally:
        catalog.close()
