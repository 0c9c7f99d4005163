"""``kho routes``: the outbound queue from the command line.  Each function takes the
parsed arguments and the (root) Archive; kho.cli registers them with :func:`add_parser`
and opens the archive (``args.routes_command(args, archive)``).

    kho routes [status] [--tenant T | --all-tenants] [--json]
    kho routes list [--state dead|withheld|queued|waiting|committing] [--destination D]
    kho routes retry [--destination D] [--withheld]
    kho routes send --destination D --study UID [--series UID] [--deidentify PROJECT]
    kho routes run [--timeout S]      deliver what is due, in this process, then exit
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from kho.errors import KhoError
from kho.routing import queue as q
from kho.routing.router import Router

if TYPE_CHECKING:
    from kho.archive.archive import Archive


def _tenants(args: argparse.Namespace, archive: Archive) -> list[str]:
    names = archive.settings.tenant_names
    if getattr(args, "all_tenants", False):
        return list(names)
    tenant = getattr(args, "tenant", None) or archive.settings.default_tenant
    if tenant not in names:
        raise KhoError(f"no tenant {tenant!r}; the archive's tenants: {', '.join(names)}")
    return [tenant]


def _when(at: float) -> str:
    if not at:
        return "-"
    return datetime.fromtimestamp(at, UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def status(args: argparse.Namespace, archive: Archive) -> int:
    """Queue depth, lag and failures per tenant and destination."""
    router = Router(archive)
    report = router.status(_tenants(args, archive))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if not report["destinations"]:
        print("no forwarding destinations are configured (forward_destinations)")
    for name, destination in report["destinations"].items():
        rules = ", ".join(destination["rules"]) or "on demand only"
        print(f"{name}: {destination['address']}  (rules: {rules})")
    failing = 0
    for tenant, destinations in report["tenants"].items():
        print(f"tenant {tenant}")
        if not destinations:
            print("  queue empty")
        for name, item in sorted(destinations.items()):
            depth = item["queued"] + item["waiting"] + item["committing"]
            print(
                f"  {name:16} queued {item['queued']:>6}  waiting {item['waiting']:>6}  "
                f"committing {item['committing']:>5}  dead {item['dead']:>5}  "
                f"withheld {item['withheld']:>5}  lag {_age(item['lag_s']) if depth else '-'}"
            )
            if item["failures"]:
                failing += 1
                last = _when(item["last_failure"])
                print(
                    f"    failing: {item['failures']} consecutive, last {last}: "
                    f"{item['last_error']}; next try {_when(item['next_try'])}"
                )
            elif item["retrying"]:
                print(f"    {item['retrying']} instance(s) waiting to be retried")
            if item["last_success"]:
                print(f"    last delivery {_when(item['last_success'])}")
    return 1 if failing else 0


def list_rows(args: argparse.Namespace, archive: Archive) -> int:
    """Rows of one state (dead letters by default), oldest first."""
    router = Router(archive)
    found: list[dict[str, Any]] = []
    for tenant in _tenants(args, archive):
        for row in router.rows(tenant, args.state, args.destination, args.limit):
            found.append(
                {
                    "tenant": tenant,
                    "destination": row.destination,
                    "rule": row.rule or "(on demand)",
                    "study": row.study_uid,
                    "series": row.series_uid,
                    "instance": row.sop_uid,
                    "queued": _when(row.queued_at),
                    "attempts": row.attempts,
                    "error": row.last_error,
                }
            )
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    for r in found:
        print(
            f"{r['queued']}  {r['tenant']:10} {r['destination']:16} {r['rule']:16} "
            f"attempts {r['attempts']}  {r['instance']}  {r['error']}"
        )
    if not found:
        print(f"no {args.state} instances")
    return 0


def retry(args: argparse.Namespace, archive: Archive) -> int:
    """Queue dead (or withheld) instances again."""
    router = Router(archive)
    total = 0
    for tenant in _tenants(args, archive):
        count = router.retry(tenant, args.destination, withheld=args.withheld)
        total += count
        print(f"tenant {tenant}: {count} instance(s) queued again")
    return 0


def send(args: argparse.Namespace, archive: Archive) -> int:
    """Queue a study or series for a destination (a running kho serve delivers it; or
    ``kho routes run``)."""
    import getpass

    try:
        who = f"local:{getpass.getuser()}"
    except (OSError, KeyError):
        who = "local"
    router = Router(archive)
    (tenant,) = _tenants(args, archive)
    count = router.send(
        tenant,
        args.destination,
        study_uid=args.study,
        series_uid=args.series,
        deidentify=args.deidentify or "",
        allow_burned_in=args.allow_burned_in,
        requested_by=who,
    )
    print(f"{count} instance(s) queued for {args.destination}")
    return 0


def run(args: argparse.Namespace, archive: Archive) -> int:
    """Deliver what is due (and what becomes due) until the queue holds nothing to send
    or ``--timeout`` passes; 1 if anything is left."""
    router = Router(archive)
    deadline = time.monotonic() + args.timeout
    delivered = 0
    while True:
        delivered += router.run_once()
        left = 0
        for item in router.status(archive.settings.tenant_names)["tenants"].values():
            left += sum(d[q.QUEUED] + d[q.WAITING] + d[q.COMMITTING] for d in item.values())
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    print(f"{delivered} instance(s) delivered; {left} still queued")
    return 1 if left else 0


#: options both ``routes`` and its subcommands take
_SHARED = ("data_dir", "json", "tenant", "all_tenants")


def add_parser(sub: Any, common: Any = None) -> argparse.ArgumentParser:
    """The ``routes`` command and its subcommands on kho's subparsers ``sub``; ``common``
    adds kho's shared options (--config, --data-dir) to each.  Sets
    ``args.routes_command`` (default: status)."""
    routes = sub.add_parser("routes", help="forwarding: queue depth, lag, failures; resend")
    routes.set_defaults(routes_command=status, json=False, tenant=None, all_tenants=False)
    routes_sub = routes.add_subparsers(dest="routes_action")

    def tenants(p: argparse.ArgumentParser) -> None:
        group = p.add_mutually_exclusive_group()
        group.add_argument("--tenant", help="this hospital (default: the default tenant)")
        group.add_argument("--all-tenants", action="store_true", help="every hospital")

    def options(p: argparse.ArgumentParser, *, nested: bool = True) -> None:
        if common is not None:
            common(p)
        tenants(p)
        p.add_argument("--json", action="store_true")
        if nested:  # given before the subcommand (kho routes --data-dir D list): kept
            for action in p._actions:  # argparse has no public way to change a default
                if action.dest in _SHARED:
                    action.default = argparse.SUPPRESS

    options(routes, nested=False)
    status_p = routes_sub.add_parser("status", help="queue depth, lag, failures per destination")
    options(status_p)
    status_p.set_defaults(routes_command=status)

    listing = routes_sub.add_parser("list", help="instances in one state (dead letters)")
    options(listing)
    listing.add_argument("--state", default=q.DEAD, choices=q.STATES)
    listing.add_argument("--destination")
    listing.add_argument("--limit", type=int, default=100)
    listing.set_defaults(routes_command=list_rows)

    retry_p = routes_sub.add_parser("retry", help="queue dead (or withheld) instances again")
    options(retry_p)
    retry_p.add_argument("--destination")
    retry_p.add_argument(
        "--withheld", action="store_true", help="withheld ones (burned-in annotation) instead"
    )
    retry_p.set_defaults(routes_command=retry)

    send_p = routes_sub.add_parser("send", help="send a study or series to a destination")
    options(send_p)
    send_p.add_argument("--destination", required=True)
    send_p.add_argument("--study", required=True, help="Study Instance UID")
    send_p.add_argument("--series", help="Series Instance UID (default: the whole study)")
    send_p.add_argument("--deidentify", help="a de-identification project (deid_projects)")
    send_p.add_argument("--allow-burned-in", action="store_true")
    send_p.set_defaults(routes_command=send)

    run_p = routes_sub.add_parser("run", help="deliver what is due in this process, then exit")
    options(run_p)
    run_p.add_argument("--timeout", type=float, default=600.0)
    run_p.set_defaults(routes_command=run)
    return routes


__all__ = ["add_parser", "list_rows", "retry", "run", "send", "status"]
