"""A network partition that drops packets (no reset, no FIN: a switch or a firewall that
fails, a cable pulled between two hosts), on one loopback port only, with iptables.

``dropped(port)`` drops every TCP packet to or from ``port`` on lo while it is entered:
put a TcpProxy (tests/helpers/tcp_proxy.py) the test owns in front of the service and
partition the proxy's port, never the service's own (the machine's PostgreSQL on 5432
serves other work).  The rules are tagged ``kho-test-<pid>`` and exactly those are
removed on exit, whatever happened; ``leftover_rules()`` lists any a killed test left.

Only INPUT: on lo every packet crosses OUTPUT then INPUT, and a packet dropped in OUTPUT
fails the sender's own transmit (an error the sending kernel sees, unlike a real
partition), while one dropped in INPUT has left its sender as on a real network.  Needs
root and iptables (installed by .ci/run).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator


def _tag() -> str:
    return f"kho-test-{os.getpid()}"


def _rules(port: int) -> list[list[str]]:
    """One rule per direction: packets to the port (client to service), from it (back)."""
    return [
        ["INPUT", "-i", "lo", "-p", "tcp", "--dport", str(port)],
        ["INPUT", "-i", "lo", "-p", "tcp", "--sport", str(port)],
    ]


def _iptables(*args: str) -> None:
    # -w: wait for the xtables lock (another test's rules may be changing meanwhile)
    subprocess.run(["iptables", "-w", "5", *args], check=True, capture_output=True, text=True)


def available() -> str:
    """Why partitions cannot be made here ("" where they can)."""
    if shutil.which("iptables") is None:
        return "iptables is not installed (.ci/run installs it)"
    if os.geteuid() != 0:
        return "iptables needs root"
    return ""


@contextlib.contextmanager
def dropped(port: int) -> Iterator[None]:
    """Drop every TCP packet to and from ``port`` on lo until exit."""
    added: list[list[str]] = []
    try:
        for rule in _rules(port):
            # -I: first in the chain, before any ACCEPT the machine may have
            _iptables("-I", *rule, "-m", "comment", "--comment", _tag(), "-j", "DROP")
            added.append(rule)
        yield
    finally:
        failed = []
        for rule in reversed(added):  # each tried, whatever the others did
            try:
                # -D with the same specification deletes that one rule
                _iptables("-D", *rule, "-m", "comment", "--comment", _tag(), "-j", "DROP")
            except subprocess.CalledProcessError as exc:
                failed.append(f"{' '.join(rule)}: {exc.stderr.strip()}")
        if failed:
            raise RuntimeError(f"partition rules left in place: {failed}")


def leftover_rules() -> list[str]:
    """This process's rules still in the INPUT chain (none once ``dropped`` has exited)."""
    listing = subprocess.run(
        ["iptables", "-w", "5", "-S", "INPUT"], check=True, capture_output=True, text=True
    ).stdout
    return [line for line in listing.splitlines() if _tag() in line.split()]
