"""The `kho` command: serve | import | bench | verify | stats | keys | share | audit | viewer."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kho.access.callers import Caller, CallerKind
from kho.archive import memory
from kho.archive.archive import Archive
from kho.archive.config import Settings, load_settings
from kho.errors import KhoError

if TYPE_CHECKING:
    from kho.access.api_keys import ApiKeys
    from kho.access.links import ShareLinks

log = logging.getLogger("kho")


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(
        args.config,
        data_dir=getattr(args, "data_dir", None),
        ae_title=getattr(args, "ae_title", None),
        dicom_port=getattr(args, "port", None),
        http_port=getattr(args, "http_port", None),
        host=getattr(args, "host", None),
    )


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


# --- serve ------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` listens on this machine only: a loopback address or
    "localhost".  Every other name or address (0.0.0.0, ::, an interface's address, a host
    name) may be reachable from the network."""
    name = host.strip().strip("[]").lower().rstrip(".")
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def check_bind_security(settings: Settings, host: str) -> str | None:
    """Why ``kho serve`` must not start on ``host`` with these settings, or None when it
    may: any address beyond loopback needs authentication, or the explicit opt-out."""
    if is_loopback(host) or settings.auth_on or settings.insecure_open_network:
        return None
    shown = host or "every address"
    return (
        f"refusing to serve on {shown} with authentication off: anyone who reaches this "
        "address could read and change every patient's images.\n"
        "Configure authentication (settings file or KHO_* environment variables):\n"
        "  - oidc_issuer and oidc_audience: OpenID Connect bearer tokens, from Keycloak or "
        "another issuer (KHO_OIDC_ISSUER, KHO_OIDC_AUDIENCE; turns auth on)\n"
        '  - auth = "on" and API keys for machine clients (KHO_AUTH=on; kho keys create '
        "--name NAME --grant viewer@TENANT)\n"
        '  - [dicom_peers."AE TITLE"] entries: the DICOM peers allowed to associate '
        "(turns auth on)\n"
        "or bind a loopback address (--host 127.0.0.1), or accept the risk with "
        "insecure_open_network = true (KHO_INSECURE_OPEN_NETWORK=true)."
    )


def _log_security_posture(
    settings: Settings, archive: Archive, dicom_port: int, http_port: int
) -> None:
    """Say at start who may connect: an operator reads the posture in the log."""
    from kho.access.api_keys import ApiKeys

    try:
        keys: int | str = ApiKeys(archive.catalog, settings.tenant_names).active_count()
    except KhoError as exc:  # the posture is reported, never a reason not to start
        log.warning("security: cannot count API keys: %s", exc)
        keys = "?"
    peers = len(settings.dicom_peers)
    log.info(
        "security: auth %s; OIDC issuer %s; API keys %s; registered AEs %d; tenants %s",
        "on" if settings.auth_on else "OFF (every caller is a platform admin)",
        settings.oidc_issuer or "none",
        keys,
        peers,
        ", ".join(settings.tenant_names),
    )
    host = settings.host or "*"
    log.info(
        "security: DICOM %s on %s:%s%s, %s on %s:%d",
        settings.ae_title,
        host,
        dicom_port if settings.dicom_plain else "(no plain port)",
        f", DICOM TLS on {host}:{settings.dicom_tls_port}" if settings.dicom_tls else "",
        "HTTPS (HSTS)" if settings.http_tls else "HTTP",
        host,
        http_port,
    )
    if settings.auth_on and not (settings.oidc_issuer or peers or keys):
        log.warning(
            "security: auth on but no identity source (no oidc_issuer, API key or "
            "dicom_peers): every request and association will be refused"
        )
    if not settings.auth_on and not is_loopback(settings.host):
        log.warning(
            "INSECURE: insecure_open_network is set and authentication is off on %s: anyone "
            "who reaches ports %d and %d can read, store and delete every patient's images. "
            "Configure authentication (oidc_issuer, API keys, dicom_peers) and remove "
            "insecure_open_network.",
            settings.host or "every address",
            dicom_port,
            http_port,
        )


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _setup_logging(settings.log_level)
    refusal = check_bind_security(settings, settings.host)
    if refusal:  # before anything is opened or bound
        print(f"kho: {refusal}", file=sys.stderr)
        return 2
    workers = max(1, args.workers)
    if workers > 1 and not args.worker:
        return _serve_workers(args, settings, workers)
    if settings.tune_allocator:  # before the first thread (kho.archive.memory)
        applied = memory.tune_for_server()
        if applied:
            log.info("malloc: %s", ", ".join(f"{k}={v}" for k, v in applied.items()))
    from kho.dicom_scp.server import DicomServer

    archive = Archive(settings)
    if not args.worker:
        cleaned = archive.recover(grace_s=args.recover_after)
        if cleaned:
            log.info("recovery: removed objects of %d interrupted ingests", cleaned)

    def _warm_up() -> None:
        from kho.archive.read.pixels import warm_up_codecs

        log.info("codecs ready (%.1f s)", warm_up_codecs())

    threading.Thread(target=_warm_up, name="kho-warm-up", daemon=True).start()
    if settings.finish_in_background:
        archive.finisher.start()  # also picks up what earlier runs left queued
    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    sweeper = threading.Thread(
        target=_sweep, args=(archive, stop, args.recover_after), name="kho-recovery", daemon=True
    )
    if settings.tune_allocator:  # (kho.archive.memory)
        threading.Thread(target=_trim_heap, args=(stop,), name="kho-heap-trim", daemon=True).start()
    sweeper.start()
    from kho.access.service import Access
    from kho.audit.auditor import Auditor
    from kho.viewer_api.server import HttpServer

    access = Access(settings, archive)  # one key cache and registry for both doors
    auditor = Auditor(archive).start().watch_dicom_refusals()  # one trail for both doors
    auditor.application(started=True)
    archive.rejection_records.append(auditor.rejection_rows)  # corrections, every door
    from kho.routing.router import Router

    router = Router(archive)  # forwarding: idle without destinations
    forwarder = Caller(CallerKind.OPEN, f"kho-forwarder:{settings.ae_title}")
    router.on_sent.append(
        lambda d: auditor.sent(
            forwarder,
            d.tenant,
            d.instances,
            via="FORWARD",
            destination=d.destination,
            destination_address=d.address,
            deidentified_for=d.project,
        )
    )
    router.start()
    server = DicomServer(archive, reuse_port=args.worker, access=access)
    server.door.auditor = auditor
    server.door.router = router
    server.start()
    http = HttpServer(
        archive, host=settings.host, port=settings.http_port, reuse_port=args.worker, access=access
    )
    http.app.state.viewer.auditor = auditor
    http.app.state.viewer.router = router
    http.start()
    hl7 = None
    if settings.hl7_port or settings.hl7_tls:  # the HIS's patients and orders (kho.hl7)
        from kho.hl7.server import Hl7Server

        hl7 = Hl7Server(archive, access=access, auditor=auditor).start()
    if not args.worker:  # the OHIF viewer on first start (kho.viewer_api.ohif)
        from kho.viewer_api.ohif import install_in_background

        http.app.state.viewer_files.pending = install_in_background(settings)
    if not args.worker:
        _log_security_posture(settings, archive, server.port, http.port)
    # lines the tests and scripts wait for
    print(f"kho: DICOM {settings.ae_title} on {settings.host}:{server.port}", flush=True)
    if server.tls_port is not None:
        print(
            f"kho: DICOM TLS {settings.ae_title} on {settings.host}:{server.tls_port}", flush=True
        )
    print(
        f"kho: HTTP (DICOMweb) on {http.scheme}://{settings.host}:{http.port}/dicom-web", flush=True
    )
    print(
        f"kho: viewer on {http.scheme}://{settings.host}:{http.port}/ (OHIF at /viewer/)",
        flush=True,
    )
    if hl7 is not None and hl7.serve_plain:
        print(f"kho: HL7 (MLLP) on {settings.host}:{hl7.port}", flush=True)
    if hl7 is not None and hl7.tls_port is not None:
        print(f"kho: HL7 (MLLP over TLS) on {settings.host}:{hl7.tls_port}", flush=True)
    try:
        stop.wait()
    finally:
        if hl7 is not None:
            hl7.stop()
        http.stop()
        server.stop()
        router.stop()
        auditor.application(started=False)
        auditor.close()
        archive.close()
    return 0


def _trim_heap(stop: threading.Event, every_s: float = 10) -> None:
    """Give the C heap's free pages back to the system now and then: under load the
    arenas' free memory grows again within a minute (about 100 MB a minute with 50
    associations and 8 readers on 2 cores); a trim costs milliseconds."""
    while not stop.wait(every_s):
        memory.trim()


def _sweep(archive: Archive, stop: threading.Event, grace_s: float, every_s: float = 60) -> None:
    """Roll back failed or orphaned ingests now and then (an outage leaves some behind)."""
    while not stop.wait(every_s):
        try:
            cleaned = archive.recover(grace_s=grace_s)
            if cleaned:
                log.info("recovery: removed objects of %d failed ingests", cleaned)
        except KhoError as exc:  # the store may still be down: try again later
            log.warning("recovery pass failed: %s", exc)


def _serve_workers(args: argparse.Namespace, settings: Settings, workers: int) -> int:
    """N processes share the DICOM port (SO_REUSEPORT): the kernel spreads associations
    over them, so every core works.  This process recovers, starts them, and stops them."""
    import subprocess

    if not settings.dicom_port:
        raise KhoError("--workers needs a fixed --port (the processes share it)")
    with Archive(settings) as archive:
        cleaned = archive.recover(grace_s=args.recover_after)
        if cleaned:
            log.info("recovery: removed objects of %d interrupted ingests", cleaned)
        _log_security_posture(settings, archive, settings.dicom_port, settings.http_port)
    argv = [sys.executable, "-m", "kho.cli"]
    if args.config:
        argv += ["--config", args.config]
    argv += ["serve", "--worker", "--data-dir", str(settings.data_dir)]
    argv += ["--ae-title", settings.ae_title, "--host", settings.host]
    argv += ["--port", str(settings.dicom_port), "--http-port", str(settings.http_port)]
    # one HL7 listener per host: the first worker's (MLLP connections are long-lived and
    # few; the port is not shared)
    quiet_hl7 = {**os.environ, "KHO_HL7_PORT": "0", "KHO_HL7_TLS_PORT": "0"}
    children = [subprocess.Popen(argv, env=None if i == 0 else quiet_hl7) for i in range(workers)]
    from kho.viewer_api.ohif import install_in_background

    install_in_background(settings)  # the workers find it once it is in place
    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    while not stop.wait(0.5):
        if any(child.poll() is not None for child in children):
            log.error("a worker exited; stopping the others")
            break
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return 0


# --- import -----------------------------------------------------------------------------


def _walk(paths: Sequence[str]) -> Iterator[Path]:
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for root, _dirs, files in os.walk(path):
                for name in sorted(files):
                    yield Path(root) / name
        else:
            yield path


def cmd_import(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _setup_logging("WARNING" if not args.verbose else "INFO")
    from tqdm import tqdm

    files = list(_walk(args.paths))
    outcomes: Counter[str] = Counter()
    rejected: list[tuple[str, str]] = []
    with Archive(settings) as archive:
        for path in tqdm(files, unit="file", disable=args.quiet or not sys.stderr.isatty()):
            try:
                data = path.read_bytes()
                result = archive.ingest_part10(
                    data, source=f"import:{path.name}", lenient_identity=True
                )
                outcomes[result.outcome.value] += 1
            except (KhoError, OSError) as exc:
                outcomes["rejected"] += 1
                rejected.append((str(path), str(exc)))
        # what the background threads have not encoded yet: finish it before exiting
        archive.finisher.drain()
        archive.finisher.wait_idle(timeout=3600)
    summary = {
        "files": len(files),
        "stored": outcomes["stored"],
        "replaced": outcomes["replaced"],
        "duplicates": outcomes["duplicate"] + outcomes["kept"],
        "rejected": outcomes["rejected"],
        "rejections": [{"path": p, "reason": r} for p, r in rejected],
        # data-retention rejection notes: carried out, not kept (kho.archive.corrections)
        "applied": outcomes["applied"],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        applied = f", {summary['applied']} deletion notes applied" if summary["applied"] else ""
        print(
            f"{summary['files']} files: {summary['stored']} stored, "
            f"{summary['replaced']} replaced, {summary['duplicates']} duplicates, "
            f"{summary['rejected']} rejected{applied}"
        )
        for path_text, reason in rejected:
            print(f"  rejected {path_text}: {reason}")
    return 1 if rejected and not outcomes["stored"] + outcomes["duplicate"] else 0


# --- verify / stats ---------------------------------------------------------------------


def cmd_verify(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _setup_logging("WARNING")
    checked = bad = 0
    with Archive(settings) as archive:
        for record, problem in archive.verify():
            checked += 1
            if problem:
                bad += 1
                print(f"BAD {record.sop_uid}: {problem}")
    print(f"verified {checked} instances: {checked - bad} intact, {bad} damaged")
    return 1 if bad else 0


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def cmd_stats(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _setup_logging("WARNING")
    names = settings.tenant_names
    if args.tenant is not None and args.tenant not in names:
        raise KhoError(f"no tenant {args.tenant!r}; the archive's tenants: {', '.join(names)}")
    with Archive(settings) as archive:
        if args.all_tenants:
            per_tenant = {name: archive.for_tenant(name).stats() for name in names}
        else:
            tenant = args.tenant or settings.default_tenant
            stats = archive.for_tenant(tenant).stats()
    if not args.all_tenants:
        if args.json:
            print(json.dumps(stats, indent=2))
        else:
            if args.tenant is not None:
                print(f"tenant {args.tenant}")
            _print_stats(stats)
        return 0
    if args.json:
        print(json.dumps({"tenants": per_tenant}, indent=2))
        return 0
    for name, stats in per_tenant.items():
        print(f"tenant {name}")
        _print_stats(stats)
        print()
    total = {k: sum(s[k] for s in per_tenant.values()) for k in ("patients", "studies")}
    instances = sum(s["instances"] for s in per_tenant.values())
    received = sum(s["received_bytes"] for s in per_tenant.values())
    stored = sum(s["stored_bytes"] for s in per_tenant.values())
    ratio = f"{received / stored:.2f}x" if stored else "-"
    print(
        f"all {len(per_tenant)} tenants: patients {total['patients']}  studies "
        f"{total['studies']}  instances {instances}  received {_human(received)}  stored "
        f"{_human(stored)}  ratio {ratio}"
    )
    return 0


def _print_stats(stats: dict[str, Any]) -> None:
    print(
        f"patients {stats['patients']}  studies {stats['studies']}  series {stats['series']}  "
        f"instances {stats['instances']}"
    )
    ratio = f"{stats['ratio']:.2f}x" if stats["ratio"] else "-"
    print(
        f"received {_human(stats['received_bytes'])}  stored {_human(stats['stored_bytes'])}  "
        f"ratio {ratio}"
    )
    if stats["unfinished"]:
        print(f"{stats['unfinished']} instances still stored as received, being encoded")
    rejected = stats.get("rejected") or {}
    if rejected.get("pending_purge") or rejected.get("purged"):
        print(
            f"rejected: {rejected['pending_purge']} instance(s) hidden, awaiting deletion; "
            f"{rejected['purged']} deleted"
        )
    if stats["spool"]["segments"]:
        spool = stats["spool"]
        print(f"ingest spool: {spool['segments']} segment(s), {spool['bytes'] / 1e6:.1f} MB")
    print(f"{'modality':10} {'instances':>10} {'received':>12} {'stored':>12} {'ratio':>7}")
    for row in stats["by_modality"]:
        r = f"{row['ratio']:.2f}x" if row["ratio"] else "-"
        print(
            f"{row['modality']:10} {row['instances']:>10} {_human(row['received_bytes']):>12} "
            f"{_human(row['stored_bytes']):>12} {r:>7}"
        )


# --- corrections ------------------------------------------------------------------------


def cmd_reject(args: argparse.Namespace) -> int:
    """kho reject / kho delete: a rejection note made here (kho.archive.corrections),
    audited as the person at the command line."""
    from kho.archive.corrections import DATA_RETENTION, reason_for
    from kho.audit.auditor import Auditor

    settings = _settings(args)
    _setup_logging("WARNING")
    if args.instance and not args.series:
        raise KhoError("--instance needs --series")
    reason = DATA_RETENTION if args.command == "delete" else reason_for(args.reason)
    user = _local_user()
    with Archive(settings) as archive:
        auditor = Auditor(archive)
        archive.rejection_records.append(auditor.rejection_rows)
        try:
            tenant = archive.for_tenant(args.tenant or settings.default_tenant)
            result, rejection = tenant.reject_instances(
                reason,
                args.study,
                args.series,
                args.instance,
                requested_by=user.name,
                requester_kind=user.kind.value,
                via="CLI",
            )
        finally:
            auditor.close()
    kept = "" if reason.immediate else f"; rejection note {result.sop_uid} stored"
    print(
        f"{rejection.rejected} instance(s) rejected ({reason.code} {reason.meaning}), "
        f"{rejection.purged} deleted now{kept}"
    )
    return 0


# --- keys -------------------------------------------------------------------------------


def _api_keys(archive: Archive, settings: Settings) -> ApiKeys:
    from kho.access.api_keys import ApiKeys

    # the platform catalog: the default tenant's, the one every kho serve process reads
    return ApiKeys(archive.catalog, settings.tenant_names)


def cmd_keys_create(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _setup_logging("WARNING")
    with Archive(settings) as archive:
        keys = _api_keys(archive, settings)
        key_id, text = keys.create(args.name, args.grant)
        grants = keys.validate_grants(args.grant)
        _audit_credentials(archive, f"API key {key_id} ({args.name.strip()}) created: {grants}")
    if args.json:
        payload = {"id": key_id, "name": args.name.strip(), "grants": grants, "key": text}
        print(json.dumps(payload, indent=2))
        print("The key is not shown again: store it now.", file=sys.stderr)
        return 0
    # the key alone on stdout (KEY=$(kho keys create ...)); the words around it on stderr
    print(
        f"API key {key_id} ({args.name.strip()}): {', '.join(grants)}. Send it as "
        "'Authorization: Bearer <key>' or 'X-API-Key: <key>':",
        file=sys.stderr,
    )
    print(text, flush=True)
    print(
        "This key is not shown again: store it now (kho keeps only its SHA-256). "
        f"Revoke it with: kho keys revoke {key_id}",
        file=sys.stderr,
    )
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _setup_logging("WARNING")
    with Archive(settings) as archive:
        infos = _api_keys(archive, settings).list()
    if args.json:
        print(json.dumps([info.as_dict() for info in infos], indent=2))
        return 0
    if not infos:
        print("no API keys (kho keys create --name NAME --grant ROLE@TENANT)")
        return 0
    width = max(4, *(len(info.name) for info in infos))
    print(f"{'ID':12}  {'NAME':{width}}  {'CREATED':20}  {'REVOKED':20}  GRANTS")
    for info in infos:
        shown = info.as_dict()
        print(
            f"{info.key_id:12}  {info.name:{width}}  {shown['created']!s:20}  "
            f"{shown['revoked'] or '-'!s:20}  {', '.join(info.grants)}"
        )
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _setup_logging("WARNING")
    from kho.access.api_keys import key_id_of

    key_id = key_id_of(args.key_id)
    with Archive(settings) as archive:
        revoked = key_id is not None and _api_keys(archive, settings).revoke(key_id)
        if revoked:
            _audit_credentials(archive, f"API key {key_id} revoked")
    if not revoked:
        print(f"kho: no valid API key {args.key_id!r} (kho keys list)", file=sys.stderr)
        return 1
    print(f"revoked API key {key_id}: refused from now on by every kho serve process")
    return 0


# --- share ------------------------------------------------------------------------------


def _share_links(archive: Archive, settings: Settings) -> ShareLinks:
    from kho.access.links import ShareLinks

    # the platform catalog, as API keys: every kho serve process checks links there
    return ShareLinks(archive.catalog, settings.tenant_names)


def _share_base(settings: Settings, base_url: str | None) -> str:
    """Where patients reach this archive: --base-url, else the public_url setting (the
    address a reverse proxy publishes), else the HTTP address kho serves."""
    public = base_url or str(settings.public_url or "")
    if public:
        return public.rstrip("/")
    scheme = "https" if settings.http_tls else "http"
    host = settings.host if ":" not in settings.host else f"[{settings.host}]"
    return f"{scheme}://{host}:{settings.http_port}"


def cmd_share_create(args: argparse.Namespace) -> int:
    from kho.access.callers import Grant, Role
    from kho.access.links import LinkInputError, present_studies
    from kho.archive.config import PLATFORM

    settings = _settings(args)
    _setup_logging("WARNING")
    tenant = args.tenant or settings.default_tenant
    if tenant not in settings.tenant_names:
        print(f"kho: no tenant {tenant!r} (tenants: {settings.tenant_names})", file=sys.stderr)
        return 2
    # the person at the command line holds the data directory: the platform's admin
    maker = Caller(CallerKind.OPEN, _local_user().name, frozenset({Grant(Role.ADMIN, PLATFORM)}))
    with Archive(settings) as archive:
        if not present_studies(archive.for_tenant(tenant).catalog, [args.study]):
            print(f"kho: no study {args.study} in tenant {tenant!r}", file=sys.stderr)
            return 1
        try:
            made = _share_links(archive, settings).create_share(
                tenant, [args.study], created_by=maker, expires_s=args.expires, pin=args.pin
            )
        except LinkInputError as exc:
            print(f"kho: {exc}", file=sys.stderr)
            return 2
        _audit_credentials(
            archive,
            f"share link {made.link_id} made for 1 study in {tenant}"
            + (", with PIN" if made.has_pin else ""),
        )
    url = f"{_share_base(settings, args.base_url)}/s/{made.text}"
    if args.qr:
        from kho.viewer_api.share import qr_code

        qr_path = Path(args.qr)
        qr_path.write_bytes(qr_code(url, "png" if qr_path.suffix.lower() == ".png" else "svg"))
    expires = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(made.expires))
    if args.json:
        payload = {
            "id": made.link_id,
            "url": url,
            "tenant": tenant,
            "study": args.study,
            "expires": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(made.expires)),
            "pin": made.has_pin,
            "qr": args.qr,
        }
        print(json.dumps(payload, indent=2))
        return 0
    # the URL alone on stdout (URL=$(kho share create ...)); the words around it on stderr
    print(
        f"share link {made.link_id} for study {args.study} ({tenant}), valid until {expires}"
        + (", PIN required" if made.has_pin else "")
        + ":",
        file=sys.stderr,
    )
    print(url, flush=True)
    print(
        "The link is not shown again (kho keeps only its SHA-256)."
        + (f" QR code: {args.qr}." if args.qr else "")
        + f" Withdraw it with: kho share revoke {made.link_id}",
        file=sys.stderr,
    )
    return 0


def cmd_share_list(args: argparse.Namespace) -> int:
    from kho.access.links import LinkKind

    settings = _settings(args)
    _setup_logging("WARNING")
    kinds = [LinkKind.SHARE, LinkKind.LAUNCH] if args.all else [LinkKind.SHARE]
    with Archive(settings) as archive:
        infos = _share_links(archive, settings).list(kinds, tenant=args.tenant)
    if args.json:
        print(json.dumps([info.as_dict() for info in infos], indent=2))
        return 0
    if not infos:
        print("no share links (kho share create --study UID)")
        return 0
    print(f"{'ID':12}  {'KIND':6}  {'STATE':12}  {'EXPIRES':20}  {'PIN':3}  {'USES':>4}  STUDY")
    for info in infos:
        shown = info.as_dict()
        study = info.studies[0] + (f" (+{len(info.studies) - 1})" if len(info.studies) > 1 else "")
        print(
            f"{info.link_id:12}  {info.kind.value:6}  {info.state.value:12}  "
            f"{shown['expires']!s:20}  {'yes' if info.has_pin else 'no':3}  {info.uses:>4}  "
            f"{info.tenant}/{study}"
        )
    return 0


def cmd_share_revoke(args: argparse.Namespace) -> int:
    from kho.access.links import link_id_of

    settings = _settings(args)
    _setup_logging("WARNING")
    link_id = link_id_of(args.link_id)
    with Archive(settings) as archive:
        revoked = link_id is not None and _share_links(archive, settings).revoke(link_id)
        if revoked:
            _audit_credentials(archive, f"share link {link_id} revoked")
    if not revoked:
        print(f"kho: no valid share link {args.link_id!r} (kho share list)", file=sys.stderr)
        return 1
    print(f"revoked share link {link_id}: its page and images are refused from now on")
    return 0


# --- bench ------------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace) -> int:
    _setup_logging("ERROR")
    import tempfile

    from tqdm import tqdm

    from kho.bench import phantom
    from kho.bench import runner as bench

    with tempfile.TemporaryDirectory(prefix="kho-bench-corpus-") as tmp:
        if args.paths:
            files = bench.collect_files(args.paths)
        else:
            files = phantom.write_ct_series(Path(tmp), args.generate)
        bar = tqdm(total=len(files), unit="file", disable=args.quiet or not sys.stderr.isatty())
        if args.target:
            host, _, port = args.target.rpartition(":")
            ok, refused, seconds, sent = bench.bench_remote(
                files,
                host=host,
                port=int(port),
                called_ae=args.aec,
                associations=args.threads,
                progress=bar.update,
            )
            bar.close()
            payload: dict[str, Any] = {
                "mode": "remote",
                "target": args.target,
                "instances": ok,
                "refused": refused,
                "seconds": seconds,
                "instances_per_s": ok / seconds if seconds else 0.0,
                "mb_per_s": sent / seconds / 1e6 if seconds else 0.0,
                "note": "compression and capacity: run `kho stats` on the archive",
            }
            text = (
                f"sent {ok} instances ({refused} refused) to {args.target} in {seconds:.2f} s: "
                f"{payload['instances_per_s']:.1f} instances/s, {payload['mb_per_s']:.1f} MB/s"
            )
        else:
            report = bench.bench_embedded(
                files,
                threads=args.threads,
                studies_per_day=args.studies_per_day,
                years=args.years,
                progress=bar.update,
            )
            bar.close()
            payload = report.as_dict()
            text = bench.format_report(report)
            if args.chart:
                bench.write_chart(report, Path(args.chart))
                text += f"\nchart: {args.chart}"
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=2))
        text += f"\njson: {args.json}"
    print(text)
    return 0


# --- parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kho", description="kho medical imaging archive")
    parser.add_argument("--config", help="TOML settings file (also KHO_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", type=Path, help="data directory (KHO_DATA_DIR)")

    serve = sub.add_parser("serve", help="run the DICOM and DICOMweb servers")
    common(serve)
    serve.add_argument("--ae-title", help="AE title (KHO_AE_TITLE)")
    serve.add_argument(
        "--host",
        help="bind address (KHO_HOST; default 127.0.0.1): any non-loopback address needs "
        "authentication configured, or insecure_open_network",
    )
    serve.add_argument("--port", type=int, help="DICOM port (KHO_DICOM_PORT)")
    serve.add_argument("--http-port", type=int, help="HTTP port (KHO_HTTP_PORT)")
    serve.add_argument(
        "--workers", type=int, default=1, help="processes sharing the ports (SO_REUSEPORT)"
    )
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument(
        "--recover-after",
        type=float,
        default=3600.0,
        help="at start, roll back interrupted ingests of processes that are gone, and any "
        "journalled ingest older than this many seconds",
    )
    serve.set_defaults(func=cmd_serve)

    imp = sub.add_parser("import", help="bulk-load DICOM files and folders")
    common(imp)
    imp.add_argument("paths", nargs="+")
    imp.add_argument("--json", action="store_true", help="print the summary as JSON")
    imp.add_argument("--quiet", action="store_true", help="no progress bar")
    imp.add_argument("--verbose", action="store_true")
    imp.set_defaults(func=cmd_import)

    verify = sub.add_parser("verify", help="check every stored instance against its SHA-256")
    common(verify)
    verify.set_defaults(func=cmd_verify)

    bench_p = sub.add_parser(
        "bench", help="measure ingest and compression on a corpus; project capacity"
    )
    bench_p.add_argument("paths", nargs="*", help="DICOM files/folders (default: a generated CT)")
    bench_p.add_argument("--generate", type=int, default=100, help="slices of generated CT")
    bench_p.add_argument("--threads", type=int, default=4, help="ingest threads / associations")
    bench_p.add_argument("--studies-per-day", type=float, default=800)
    bench_p.add_argument("--years", type=float, default=10)
    bench_p.add_argument("--target", help="HOST:PORT of a running archive (else embedded)")
    bench_p.add_argument("--aec", default="KHO", help="called AE title with --target")
    bench_p.add_argument("--json", help="write the report as JSON here")
    bench_p.add_argument("--chart", help="write a PNG chart here")
    bench_p.add_argument("--quiet", action="store_true")
    bench_p.set_defaults(func=cmd_bench)

    stats = sub.add_parser("stats", help="what the archive holds")
    common(stats)
    stats.add_argument("--json", action="store_true")
    which = stats.add_mutually_exclusive_group()
    which.add_argument("--tenant", help="one tenant (hospital); default: the default tenant")
    which.add_argument("--all-tenants", action="store_true", help="every tenant, one by one")
    stats.set_defaults(func=cmd_stats)

    for name, text in (
        ("reject", "hide a study, series or instance (rejection note); deleted after a delay"),
        ("delete", "delete a study, series or instance now (data retention rejection)"),
    ):
        correction = sub.add_parser(name, help=text)
        common(correction)
        correction.add_argument("--study", required=True, help="Study Instance UID")
        correction.add_argument("--series", help="Series Instance UID (only this series)")
        correction.add_argument("--instance", help="SOP Instance UID (with --series)")
        correction.add_argument("--tenant", help="the tenant (default: the default tenant)")
        if name == "reject":
            correction.add_argument(
                "--reason", required=True, help="113001|quality, 113037|safety, 113038|worklist"
            )
        correction.set_defaults(func=cmd_reject)

    keys = sub.add_parser(
        "keys", help="API keys for machine clients (shown once, stored hashed, revocable)"
    )
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="make a key and print it (once)")
    common(create)
    create.add_argument("--name", required=True, help="who holds it (logs and audit)")
    create.add_argument(
        "--grant",
        action="append",
        required=True,
        metavar="ROLE@TENANT",
        help="viewer|uploader|admin @ a tenant, or admin@* (whole platform); repeatable",
    )
    create.add_argument("--json", action="store_true", help="print id, name, grants and key")
    create.set_defaults(func=cmd_keys_create)
    listing = keys_sub.add_parser("list", help="every key: id, name, grants, created, revoked")
    common(listing)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_keys_list)
    revoke = keys_sub.add_parser("revoke", help="revoke a key at once (every process)")
    common(revoke)
    revoke.add_argument("key_id", metavar="KEY_ID", help="its id (kho keys list), or the key")
    revoke.set_defaults(func=cmd_keys_revoke)

    share = sub.add_parser(
        "share", help="share links for patients (one study; expiry, PIN, revocable)"
    )
    share_sub = share.add_subparsers(dest="share_command", required=True)
    share_create = share_sub.add_parser("create", help="make a link and print its URL (once)")
    common(share_create)
    share_create.add_argument("--study", required=True, help="Study Instance UID")
    share_create.add_argument("--tenant", help="the hospital (default: the default tenant)")
    share_create.add_argument(
        "--expires", default="7d", help="how long it works: 30m, 12h, 7d, 2w (default 7d; max 90d)"
    )
    share_create.add_argument("--pin", help="4-12 digits the patient must type (sent apart)")
    share_create.add_argument(
        "--base-url",
        help="the address patients reach kho at (https://pacs.example.org); default: "
        "public_url, else the HTTP address from the settings",
    )
    share_create.add_argument("--qr", metavar="FILE", help="write the QR code (.svg or .png)")
    share_create.add_argument("--json", action="store_true")
    share_create.set_defaults(func=cmd_share_create)
    share_list = share_sub.add_parser("list", help="every link: id, state, expiry, uses")
    common(share_list)
    share_list.add_argument("--tenant", help="one tenant's links only")
    share_list.add_argument("--all", action="store_true", help="launch tokens too")
    share_list.add_argument("--json", action="store_true")
    share_list.set_defaults(func=cmd_share_list)
    share_revoke = share_sub.add_parser("revoke", help="withdraw a link at once")
    common(share_revoke)
    share_revoke.add_argument("link_id", metavar="ID", help="its id (kho share list)")
    share_revoke.set_defaults(func=cmd_share_revoke)

    from kho.routing.cli import add_parser as add_routes_parser

    add_routes_parser(sub, common).set_defaults(func=cmd_routes)

    audit = sub.add_parser("audit", help="the audit trail: verify its chain, search it")

    def tenants(p: argparse.ArgumentParser) -> None:
        which = p.add_mutually_exclusive_group()
        which.add_argument("--tenant", help="one tenant (hospital); default: the default one")
        which.add_argument("--all-tenants", action="store_true", help="every tenant")

    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    audit_verify = audit_sub.add_parser(
        "verify", help="find edited, removed, reordered or truncated records (exit 1)"
    )
    common(audit_verify)
    tenants(audit_verify)
    audit_verify.set_defaults(func=cmd_audit_verify)
    audit_search = audit_sub.add_parser("search", help="who did what to which patient, when")
    common(audit_search)
    tenants(audit_search)
    audit_search.add_argument("--patient", help="Patient ID")
    audit_search.add_argument("--study", help="Study Instance UID")
    audit_search.add_argument("--user", help="user, API key name or AE title")
    audit_search.add_argument("--since", help="ISO date or date-time (local time if no zone)")
    audit_search.add_argument("--until", help="ISO date or date-time")
    audit_search.add_argument("--event", help="event kind, e.g. instances-accessed, query")
    audit_search.add_argument("--limit", type=int, default=100)
    audit_search.add_argument("--json", action="store_true")
    audit_search.set_defaults(func=cmd_audit_search)

    viewer = sub.add_parser("viewer", help="the OHIF viewer served at /viewer/")
    viewer_sub = viewer.add_subparsers(dest="viewer_command", required=True)
    viewer_install = viewer_sub.add_parser(
        "install",
        help="install OHIF (@ohif/app) from the npm registry, or offline from a tarball; "
        "its SHA-512 is checked before anything is unpacked",
    )
    common(viewer_install)
    viewer_install.add_argument(
        "--from", dest="from_file", metavar="FILE", help="an @ohif/app .tgz (offline)"
    )
    viewer_install.add_argument(
        "--sha512", help="the file's expected SHA-512 (sha512-<base64> or hex; default: kho's pin)"
    )
    viewer_install.add_argument(
        "--version", help="another @ohif/app version (checked against the registry's hash)"
    )
    viewer_install.add_argument("--registry", default="https://registry.npmjs.org")
    viewer_install.add_argument(
        "--dir", help="install here (default: viewer_dir or DATA_DIR/viewer)"
    )
    viewer_install.add_argument("--json", action="store_true")
    viewer_install.set_defaults(func=cmd_viewer_install)
    viewer_status = viewer_sub.add_parser(
        "status", help="the installed build: version, hash, licence"
    )
    common(viewer_status)
    viewer_status.add_argument("--dir", help="look here (default: viewer_dir or DATA_DIR/viewer)")
    viewer_status.add_argument("--json", action="store_true")
    viewer_status.set_defaults(func=cmd_viewer_status)
    return parser


def _audit_credentials(archive: Archive, description: str) -> None:
    """A Security Alert (credentials changed) in the platform's audit trail, written now."""
    from kho.audit.auditor import Auditor
    from kho.audit.messages import AlertReason

    auditor = Auditor(archive)
    auditor.security_alert(
        AlertReason.CREDENTIALS_CHANGE, user=_local_user(), description=description
    )
    auditor.close()


def _local_user() -> Caller:
    """The person at the command line (their OS account): the data directory's owner."""
    import getpass

    try:
        name = f"local:{getpass.getuser()}"
    except (OSError, KeyError):
        name = "local"
    return Caller(CallerKind.OPEN, name)


def _audit_archives(archive: Archive, args: argparse.Namespace) -> list[Archive]:
    if args.all_tenants:
        return archive.tenant_archives()
    return [archive.for_tenant(args.tenant or archive.settings.default_tenant)]


def cmd_routes(args: argparse.Namespace) -> int:
    """kho routes [status | list | retry | send]: the forwarding queue (kho.routing.cli)."""
    settings = _settings(args)
    _setup_logging("WARNING")
    with Archive(settings) as archive:
        result: int = args.routes_command(args, archive)
        return result


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Chain what is waiting, then check every record of the chosen tenants' journals."""
    from kho.audit.journal import chain_all, verify

    settings = _settings(args)
    _setup_logging("WARNING")
    secret = settings.audit_chain_key.get_secret_value()
    key = secret.encode() if secret else None
    problems_found = 0
    with Archive(settings) as archive:
        for tenant_archive in _audit_archives(archive, args):
            chain_all(tenant_archive.catalog, key=key)
            problems = verify(tenant_archive.catalog, key=key)
            problems_found += len(problems)
            count = tenant_archive.catalog.fetchone("SELECT count(*) FROM audit_journal")
            total = int(count[0]) if count else 0
            print(f"tenant {tenant_archive.tenant}: {total} records, {len(problems)} problems")
            for problem in problems:
                print(f"  {problem}")
    return 1 if problems_found else 0


def _when(text: str | None) -> float | None:
    if not text:
        return None
    from datetime import datetime

    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.astimezone()  # local time, as a person types it
    return moment.timestamp()


def cmd_audit_search(args: argparse.Namespace) -> int:
    from kho.audit import messages
    from kho.audit.auditor import Auditor
    from kho.audit.journal import chain_all, search

    settings = _settings(args)
    _setup_logging("WARNING")
    found: list[dict[str, Any]] = []
    with Archive(settings) as archive:
        archives = _audit_archives(archive, args)
        for tenant_archive in archives:
            chain_all(tenant_archive.catalog)
            for record in search(
                tenant_archive.catalog,
                patient_id=args.patient,
                study_uid=args.study,
                user=args.user,
                since=_when(args.since),
                until=_when(args.until),
                event=args.event,
                limit=args.limit,
            ):
                found.append({**record.as_dict(message=args.json), "tenant": tenant_archive.tenant})
        # reading the audit trail is itself audited (PS3.15 A.5.3.2 Audit Log Used)
        auditor = Auditor(archive)
        for tenant_archive in archives:
            auditor.record(
                messages.audit_log_used(_local_user(), uri="kho audit search"),
                tenant_archive.tenant,
            )
        auditor.close()
    found.sort(key=lambda r: str(r["time"]), reverse=True)
    found = found[: args.limit]
    if args.json:
        print(json.dumps(found, indent=2, default=str))
        return 0
    for r in found:
        print(
            f"{r['time']}  {r['tenant']:10}  {r['event']:24} outcome={r['outcome']}  "
            f"user={r['user']}  from={r['address']}  via={r['via']}  "
            f"patients={r['patients']}  studies={r['studies']}"
        )
    if not found:
        print("no audit records match")
    return 0


# --- viewer -----------------------------------------------------------------------------


def cmd_viewer_install(args: argparse.Namespace) -> int:
    """Install OHIF (kho.viewer_api.ohif): from the registry, or from a file (offline)."""
    from kho.viewer_api import ohif

    settings = _settings(args)
    _setup_logging("WARNING")
    directory = Path(args.dir) if args.dir else ohif.viewer_dir(settings)
    source = Path(args.from_file) if args.from_file else None
    if args.sha512 and source is None:
        raise KhoError("--sha512 checks a file given with --from")
    version = args.version or ohif.PINNED_VERSION
    build = ohif.install(
        directory,
        version=version,
        tarball=source,
        sha512=args.sha512,
        registry=args.registry,
        progress=lambda message: print(f"kho: {message}", flush=True),
    )
    if args.json:
        print(json.dumps(build.describe(), indent=2))
    elif build.version != ohif.PINNED_VERSION:
        print(f"kho: note: {build.version} is not the version kho pins ({ohif.PINNED_VERSION})")
    return 0


def cmd_viewer_status(args: argparse.Namespace) -> int:
    from kho.viewer_api import ohif

    settings = _settings(args)
    directory = Path(args.dir) if args.dir else ohif.viewer_dir(settings)
    build = ohif.installed(directory)
    if build is None:
        if args.json:
            print(json.dumps({"installed": False, "directory": str(directory)}))
        else:
            print(f"no viewer installed in {directory} (kho viewer install [--from FILE])")
        return 1
    described = build.describe()
    if args.json:
        print(json.dumps({"installed": True, **described}, indent=2))
        return 0
    print(f"OHIF {build.version} ({ohif.PACKAGE}, {build.licence} licence: {build.licence_file})")
    print(f"  integrity {build.integrity}" + ("  (kho's pin)" if described["pinned"] else ""))
    print(f"  from {build.source}")
    print(f"  in {build.root} ({build.size / 1e6:.0f} MB)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KhoError as exc:
        print(f"kho: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
