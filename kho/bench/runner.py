"""`kho bench`: what the storage holds and will need, measured on real ingest.

Ingest a corpus (the admin's own DICOM folder, or a generated CT series) into an embedded
temporary archive (or over DICOM into a running one), then report throughput, compression
per modality, bytes per study and a capacity projection.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kho.archive.archive import Archive
from kho.archive.config import Settings
from kho.errors import KhoError

TB = 1e12


@dataclass
class ModalityFigures:
    modality: str
    instances: int = 0
    received_bytes: int = 0
    stored_bytes: int = 0

    @property
    def ratio(self) -> float | None:
        return self.received_bytes / self.stored_bytes if self.stored_bytes else None


@dataclass
class BenchReport:
    mode: str
    files: int
    instances: int
    rejected: int
    seconds: float
    received_bytes: int
    stored_bytes: int
    studies: int
    threads: int
    by_modality: list[dict[str, Any]] = field(default_factory=list)
    projection: dict[str, Any] = field(default_factory=dict)
    #: until every instance was encoded and derived too (the background finisher's work)
    seconds_at_rest: float = 0.0

    @property
    def instances_per_s(self) -> float:
        return self.instances / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.received_bytes / self.seconds / 1e6 if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["instances_per_s"] = self.instances_per_s
        out["mb_per_s"] = self.mb_per_s
        out["ratio"] = self.received_bytes / self.stored_bytes if self.stored_bytes else None
        return out


def project_capacity(
    received_per_study: float, stored_per_study: float, studies_per_day: float, years: float
) -> dict[str, Any]:
    """Terabytes needed for ``years`` at ``studies_per_day``, raw and with kho's storage."""
    studies = studies_per_day * 365.25 * years
    return {
        "studies_per_day": studies_per_day,
        "years": years,
        "studies": round(studies),
        "received_bytes_per_study": received_per_study,
        "stored_bytes_per_study": stored_per_study,
        "tb_uncompressed": received_per_study * studies / TB,
        "tb_with_kho": stored_per_study * studies / TB,
        "tb_saved": (received_per_study - stored_per_study) * studies / TB,
    }


def collect_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise KhoError(f"no such file or folder: {path}")
    return files


def bench_embedded(
    files: list[Path],
    *,
    threads: int,
    studies_per_day: float,
    years: float,
    data_dir: Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> BenchReport:
    """Ingest ``files`` into a temporary archive (default settings: durable, JPEG-LS)."""
    with tempfile.TemporaryDirectory(prefix="kho-bench-") as tmp:
        settings = Settings(data_dir=data_dir or Path(tmp))
        with Archive(settings) as archive:
            lock = threading.Lock()
            rejected = 0
            received_total = 0
            queue = list(files)

            def worker() -> None:
                nonlocal rejected, received_total
                while True:
                    with lock:
                        if not queue:
                            return
                        path = queue.pop()
                    data = path.read_bytes()
                    try:
                        archive.ingest_part10(data, source="bench", lenient_identity=True)
                        with lock:
                            received_total += len(data)
                    except KhoError:
                        with lock:
                            rejected += 1
                    if progress is not None:
                        progress(1)

            started = time.perf_counter()
            pool = [threading.Thread(target=worker) for _ in range(max(1, threads))]
            for t in pool:
                t.start()
            for t in pool:
                t.join()
            seconds = time.perf_counter() - started
            # the acknowledged instances still being encoded: help the finisher, then wait
            archive.finisher.drain()
            archive.finisher.wait_idle(timeout=3600)
            report = _report(
                archive, "embedded", files, rejected, seconds, threads, studies_per_day, years
            )
            report.seconds_at_rest = time.perf_counter() - started
            return report


def _report(
    archive: Archive,
    mode: str,
    files: list[Path],
    rejected: int,
    seconds: float,
    threads: int,
    studies_per_day: float,
    years: float,
) -> BenchReport:
    stats = archive.stats()
    figures: dict[str, ModalityFigures] = defaultdict(lambda: ModalityFigures(""))
    for row in stats["by_modality"]:
        fig = figures[row["modality"]]
        fig.modality = row["modality"]
        fig.instances = row["instances"]
        fig.received_bytes = row["received_bytes"]
        fig.stored_bytes = row["stored_bytes"]
    studies = max(1, stats["studies"])
    report = BenchReport(
        mode=mode,
        files=len(files),
        instances=stats["instances"],
        rejected=rejected,
        seconds=seconds,
        received_bytes=stats["received_bytes"],
        stored_bytes=stats["stored_bytes"],
        studies=stats["studies"],
        threads=threads,
        by_modality=[{**asdict(f), "ratio": f.ratio} for f in figures.values()],
    )
    report.projection = project_capacity(
        stats["received_bytes"] / studies, stats["stored_bytes"] / studies, studies_per_day, years
    )
    return report


def format_report(report: BenchReport) -> str:
    lines = [
        f"ingested {report.instances} instances ({report.rejected} rejected) from "
        f"{report.files} files in {report.seconds:.2f} s with {report.threads} threads "
        f"({report.mode})",
        f"throughput: {report.instances_per_s:.1f} instances/s, {report.mb_per_s:.1f} MB/s "
        "acknowledged",
    ]
    if report.seconds_at_rest:
        lines.append(
            f"all encoded at rest after {report.seconds_at_rest:.2f} s: "
            f"{report.instances / report.seconds_at_rest:.1f} instances/s"
        )
    lines += [
        "",
        f"{'modality':10} {'instances':>9} {'received MB':>12} {'stored MB':>10} {'ratio':>6}",
    ]
    for row in sorted(report.by_modality, key=lambda r: r["modality"]):
        ratio = f"{row['ratio']:.2f}" if row["ratio"] else "-"
        lines.append(
            f"{row['modality']:10} {row['instances']:>9} {row['received_bytes'] / 1e6:>12.1f} "
            f"{row['stored_bytes'] / 1e6:>10.1f} {ratio:>6}"
        )
    p = report.projection
    lines += [
        "",
        f"per study: {p['received_bytes_per_study'] / 1e6:.1f} MB received, "
        f"{p['stored_bytes_per_study'] / 1e6:.1f} MB stored",
        f"projection: {p['studies_per_day']:g} studies/day for {p['years']:g} years = "
        f"{p['studies']:,} studies -> {p['tb_uncompressed']:.1f} TB uncompressed, "
        f"{p['tb_with_kho']:.1f} TB with kho ({p['tb_saved']:.1f} TB saved)",
    ]
    return "\n".join(lines)


def write_chart(report: BenchReport, path: Path) -> Path:
    """A PNG: stored vs received bytes per modality, and the capacity projection."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(report.by_modality, key=lambda r: r["modality"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["modality"] for r in rows]
    xs = range(len(rows))
    left.bar(
        [x - 0.2 for x in xs], [r["received_bytes"] / 1e6 for r in rows], 0.4, label="received"
    )
    left.bar([x + 0.2 for x in xs], [r["stored_bytes"] / 1e6 for r in rows], 0.4, label="stored")
    left.set_xticks(list(xs), names)
    left.set_ylabel("MB")
    left.set_title("bytes per modality")
    left.legend()
    p = report.projection
    right.bar(["uncompressed", "with kho"], [p["tb_uncompressed"], p["tb_with_kho"]])
    right.set_ylabel("TB")
    right.set_title(f"{p['studies_per_day']:g} studies/day, {p['years']:g} years")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def corpus_digest(files: list[Path]) -> str:
    """A short fingerprint of the corpus, so reports can be compared run to run."""
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.stat().st_size).encode())
        h.update(p.name.encode())
    return h.hexdigest()[:16]


def bench_remote(
    files: list[Path],
    *,
    host: str,
    port: int,
    called_ae: str,
    associations: int,
    progress: Callable[[int], None] | None = None,
) -> tuple[int, int, float, int]:
    """Send ``files`` over DICOM to a running archive (their dataset bytes, unchanged).

    Returns (instances acknowledged, refused, seconds, bytes sent)."""
    from pynetdicom import AE, _config

    from kho.archive.dataset.attributes import read_header
    from kho.archive.dataset.part10 import parse_part10

    plans: list[tuple[Path, str, str, int]] = []
    for path in files:
        try:
            data = path.read_bytes()
            layout = parse_part10(data)
            ds = read_header(data, layout.pixels.element_offset if layout.pixels else None)
            plans.append((path, str(ds.SOPClassUID), layout.transfer_syntax_uid, len(data)))
        except (KhoError, AttributeError, OSError):
            continue
    contexts = sorted({(c, t) for _p, c, t, _n in plans})[:120]
    lock = threading.Lock()
    counts = {"ok": 0, "refused": 0, "bytes": 0}

    def sender(chunk: list[tuple[Path, str, str, int]]) -> None:
        ae = AE(ae_title="KHO_BENCH")
        for sop_class, ts in contexts:
            ae.add_requested_context(sop_class, ts)
        assoc = ae.associate(host, port, ae_title=called_ae, max_pdu=0)
        if not assoc.is_established:
            raise KhoError(f"association with {called_ae}@{host}:{port} refused")
        try:
            for path, _c, _t, size in chunk:
                status = assoc.send_c_store(path)
                ok = "Status" in status and status.Status in (0x0000, 0xB000, 0xB007, 0xB006)
                with lock:
                    counts["ok" if ok else "refused"] += 1
                    counts["bytes"] += size if ok else 0
                if progress is not None:
                    progress(1)
        finally:
            assoc.release()

    started = time.perf_counter()
    pool = [
        threading.Thread(target=sender, args=(plans[i::associations],))
        for i in range(max(1, associations))
    ]
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the files' bytes, not a re-encoding
    try:
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    return counts["ok"], counts["refused"], time.perf_counter() - started, counts["bytes"]
