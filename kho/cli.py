"""The `kho` command: serve | import | bench | verify | stats."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from kho.archive.archive import Archive
from kho.archive.config import Settings, load_settings
from kho.errors import KhoError

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


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _setup_logging(settings.log_level)
    workers = max(1, args.workers)
    if workers > 1 and not args.worker:
        return _serve_workers(args, settings, workers)
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
    sweeper.start()
    from kho.viewer_api.server import HttpServer

    server = DicomServer(archive, reuse_port=args.worker).start()
    http = HttpServer(
        archive, host=settings.host, port=settings.http_port, reuse_port=args.worker
    ).start()
    # lines the tests and scripts wait for
    print(f"kho: DICOM {settings.ae_title} on {settings.host}:{server.port}", flush=True)
    print(f"kho: HTTP (DICOMweb) on http://{settings.host}:{http.port}/dicom-web", flush=True)
    try:
        stop.wait()
    finally:
        http.stop()
        server.stop()
        archive.close()
    return 0


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

    with Archive(settings) as archive:
        cleaned = archive.recover(grace_s=args.recover_after)
        if cleaned:
            log.info("recovery: removed objects of %d interrupted ingests", cleaned)
    if not settings.dicom_port:
        raise KhoError("--workers needs a fixed --port (the processes share it)")
    argv = [sys.executable, "-m", "kho.cli"]
    if args.config:
        argv += ["--config", args.config]
    argv += ["serve", "--worker", "--data-dir", str(settings.data_dir)]
    argv += ["--ae-title", settings.ae_title, "--host", settings.host]
    argv += ["--port", str(settings.dicom_port), "--http-port", str(settings.http_port)]
    children = [subprocess.Popen(argv) for _ in range(workers)]
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
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"{summary['files']} files: {summary['stored']} stored, "
            f"{summary['replaced']} replaced, {summary['duplicates']} duplicates, "
            f"{summary['rejected']} rejected"
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
    with Archive(settings) as archive:
        stats = archive.stats()
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
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
    serve.add_argument("--host", help="bind address (KHO_HOST)")
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
    stats.set_defaults(func=cmd_stats)
    return parser


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
