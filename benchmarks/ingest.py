"""Ingest throughput: dcmtk storescu -> kho, against dcmtk storescp --bit-preserving (the
ceiling for this machine), in the same run.

A 300-slice 512x512 16-bit CT series (kho.bench.phantom: body, lungs, bone, noise) is sent
over 1 and 4 associations (4 storescu processes sending a quarter each).  Each run starts a
fresh server with an empty data directory (a fresh bucket and database for S3).  Reports
instances/s and MB/s (received bytes) until the last acknowledgement, medians over
--repeats (the targets take turns: one run of each, then the next round, so the machine's
drifting speed weighs on all alike), and kho / storescp ratios; for kho also the time until
every instance is encoded at rest (the background finisher's queue empty), "at rest
inst/s".

kho variants (--variants):
  durable      default settings: fsync, acknowledged once appended to the fsync'd ingest
               spool and committed, JPEG-LS encoding and thumbnails after the
               acknowledgement (finish_in_background)
  no-spool     KHO_SPOOL=off: acknowledged once written as an object file of its own
  inline       KHO_FINISH_IN_BACKGROUND=false: encoded and derived before acknowledging
  no-fsync     KHO_FSYNC=false: no flush, like storescp
  no-group-commit  KHO_CATALOG_GROUP_COMMIT=false: one SQLite transaction per instance
  workersN     N `kho serve` processes sharing the port (workers2, workers4, ...)
  s3-pg        SeaweedFS (S3) objects + PostgreSQL catalog, one process; the default for
               S3 (spool auto = off): each instance PUT to the bucket before the ack
  s3-pg-spool  the same with KHO_SPOOL=on (one host: acknowledged from the local spool,
               the finisher PUTs to the bucket)
  ...-workersN any of these with N processes

Sustained mode (--series N, N > 1): N series (distinct UIDs) sent back to back into one
running server, as modalities keep sending through a hospital's day: from the second series
on, the finisher has the backlog of the earlier ones to work through while the next one
arrives.  Reported over all N series, and over series 2..N alone ("sustained inst/s").

Corpus (--corpus): ``ct`` (default), one 12-bit CT series of --slices slices; ``mixed``, the
CT series plus --radiographs 3000x2500 12-bit DX radiographs (~15 MB each) and
--multiframes 40-frame 512x512 XA runs (~10 MB each), spread among the slices.

The machine is reported: CPU model, cores, and the load average before, during (each run)
and after, since the runs share the machine with whatever else it is doing.

    python -m benchmarks.ingest [--slices 300] [--repeats 3] [--associations 1 4]
        [--series 3] [--corpus mixed --radiographs 6 --multiframes 4]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import cpu_seconds, machine, summary, write_results
from tests.helpers import dcmtk
from tests.helpers.server import kho_serve

#: a target yields its port and the processes whose CPU time the run is charged with
Target = Callable[[Path], AbstractContextManager[tuple[int, list[int]]]]


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(parents.get(current, []))
    return out


def cpu_of(pids: list[int]) -> float:
    """CPU seconds used so far by these processes and their descendants."""
    return sum(cpu_seconds(p) for root in pids for p in _descendants(root))


@contextmanager
def kho_target(
    work: Path, extra_env: dict[str, str] | None = None, workers: int = 1
) -> Iterator[tuple[int, list[int]]]:
    args = ("--workers", str(workers)) if workers > 1 else ()
    with kho_serve(work / "kho-data", env=extra_env, args=args) as (proc, port):
        # steady state, as a PACS runs: every process listening with its kernels loaded
        log = work / f"serve-{port}.log"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if log.exists() and log.read_text(errors="replace").count("codecs ready") >= workers:
                break
            time.sleep(0.1)
        yield port, [proc.pid]


def postgres_cpu() -> float:
    """CPU seconds of the machine's PostgreSQL server so far: its live processes and the
    backends it has reaped (one per catalog connection, closed as associations end)."""
    pid_files = sorted(Path("/var/run/postgresql").glob("*.pid"))  # Debian: <version>-main
    try:
        postmaster = int(pid_files[0].read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return cpu_seconds(postmaster, reaped_children=True) + sum(
        cpu_seconds(p) for p in _descendants(postmaster) if p != postmaster
    )


def wait_at_rest(catalog: str, timeout: float = 1800) -> None:
    """Until the archive has encoded at rest every instance it acknowledged."""
    from kho.archive.catalog import open_catalog

    cat = open_catalog(catalog)
    try:
        deadline = time.monotonic() + timeout
        while cat.unfinished_count() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        cat.close()


@contextmanager
def storescp_target(work: Path) -> Iterator[tuple[int, list[int]]]:
    with dcmtk.run_storescp(work / "storescp-out") as scp:
        yield scp.port, [scp.process.pid]


def send(port: int, files: list[Path], associations: int, aec: str) -> float:
    """Seconds for `associations` storescu processes to send `files` between them."""
    chunks = [files[i::associations] for i in range(associations)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [dcmtk.tool("storescu"), "-xe", "-aec", aec, "127.0.0.1", str(port), *map(str, chunk)],
            env=dcmtk.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for chunk in chunks
    ]
    errors = []
    for proc in procs:
        _out, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            errors.append(err.decode(errors="replace")[-500:])
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"storescu failed: {errors[0]}")
    return elapsed


def _with_new_uids(source: Path, target: Path, uids: dict[str, str]) -> None:
    """``source`` copied to ``target`` with its study, series and instance UIDs replaced
    (consistently through ``uids``, so a copied series stays one series)."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(source)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        old = str(getattr(ds, keyword))
        setattr(ds, keyword, uids.setdefault(old, generate_uid()))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(target, enforce_file_format=True)


def _spread(small: list[Path], large: list[Path]) -> list[Path]:
    """The large files spread evenly among the small ones (so that every association of
    a run gets some of each)."""
    out = list(small)
    for n, path in enumerate(large):
        out.insert(min(len(out), (n + 1) * len(out) // (len(large) + 1) + n), path)
    return out


def build_corpus(
    folder: Path, *, series: int, slices: int, radiographs: int, multiframes: int
) -> list[list[Path]]:
    """``series`` groups of files, each with UIDs of its own: a CT series of ``slices``
    slices, ``radiographs`` DX radiographs and ``multiframes`` XA runs.  Kept in
    ``folder`` (reused when it already holds exactly this corpus)."""
    from benchmarks.synthetic import write_multiframe, write_radiograph
    from kho.bench.phantom import write_ct_series

    recipe = f"{series} {slices} {radiographs} {multiframes}"
    groups = [sorted((folder / f"series-{n:03d}").glob("*.dcm")) for n in range(series)]
    if (folder / "recipe").is_file() and (folder / "recipe").read_text() == recipe:
        return [_order(group) for group in groups]
    shutil.rmtree(folder, ignore_errors=True)
    first = folder / "series-000"
    write_ct_series(first, slices)
    for n in range(radiographs):
        write_radiograph(first / f"DX{n + 1:04d}.dcm", seed=n)
    for n in range(multiframes):
        write_multiframe(first / f"XA{n + 1:04d}.dcm", seed=n)
    for index in range(1, series):
        uids: dict[str, str] = {}
        copy = folder / f"series-{index:03d}"
        copy.mkdir(parents=True)
        for path in sorted(first.glob("*.dcm")):
            _with_new_uids(path, copy / path.name, uids)
    (folder / "recipe").write_text(recipe)
    groups = [sorted((folder / f"series-{n:03d}").glob("*.dcm")) for n in range(series)]
    return [_order(group) for group in groups]


def _order(group: list[Path]) -> list[Path]:
    return _spread(
        [p for p in group if p.name.startswith("CT")],
        [p for p in group if not p.name.startswith("CT")],
    )


@dataclass
class Runner:
    """One target's runs; ``catalog(work)`` names the kho catalog to watch for the at-rest
    time.  Runs of all targets alternate (one of each, then again), so that the machine's
    drifting speed weighs on every target alike."""

    name: str
    target: Target
    aec: str
    catalog: Callable[[Path], str] | None = None
    extra_pids: tuple[int, ...] = ()
    samples: dict[str, list[float]] = field(default_factory=dict)

    def add(self, **values: float) -> None:
        for key, value in values.items():
            self.samples.setdefault(key, []).append(value)


def run_once(runner: Runner, groups: list[list[Path]], associations: int) -> None:
    """One fresh server: send every series, back to back, then wait until it is at rest."""
    with tempfile.TemporaryDirectory(prefix=f"kho-bench-{runner.name}-") as tmp:
        work = Path(tmp)
        with runner.target(work) as (port, pids):
            charged = pids + list(runner.extra_pids)
            cpu0, db0 = cpu_of(charged), postgres_cpu()
            start = time.perf_counter()
            per_series = [send(port, files, associations, runner.aec) for files in groups]
            runner.add(seconds=sum(per_series))
            if len(per_series) > 1:  # the later series: the finisher has a backlog
                runner.add(sustained_seconds=sum(per_series[1:]))
            runner.add(cpu_ack=cpu_of(charged) - cpu0, db_ack=postgres_cpu() - db0)
            runner.add(load=os.getloadavg()[0])
            if runner.catalog is not None:
                wait_at_rest(runner.catalog(work))
                runner.add(at_rest=time.perf_counter() - start, cpu_rest=cpu_of(charged) - cpu0)


def summarize(runner: Runner, groups: list[list[Path]], associations: int) -> dict[str, Any]:
    """Median figures over the runner's runs."""
    files = [path for group in groups for path in group]
    total_bytes = sum(p.stat().st_size for p in files)
    got = runner.samples
    stats = summary(got["seconds"])
    out: dict[str, Any] = {
        "target": runner.name,
        "associations": associations,
        "series": len(groups),
        "instances": len(files),
        "bytes": total_bytes,
        "seconds": stats,
        "seconds_by_round": got["seconds"],
        "instances_per_s": len(files) / stats["median"],
        "instances_per_s_range": [len(files) / stats["max"], len(files) / stats["min"]],
        "mb_per_s": total_bytes / stats["median"] / 1e6,
    }
    if "sustained_seconds" in got:
        later = sum(len(group) for group in groups[1:])
        sustained = summary(got["sustained_seconds"])
        out["sustained_seconds"] = sustained
        out["sustained_instances_per_s"] = later / sustained["median"]
    # CPU of the server (and of the S3 server, where there is one) per instance: what the
    # machine's load does not change much, unlike the seconds
    out["server_cpu_ms_per_instance_until_ack"] = (
        1e3 * statistics.median(got["cpu_ack"]) / len(files)
    )
    out["server_cpu_ms_per_instance_until_ack_by_round"] = [
        1e3 * cpu / len(files) for cpu in got["cpu_ack"]
    ]
    out["server_cpu_ms_per_instance_until_ack_range"] = [
        1e3 * min(got["cpu_ack"]) / len(files),
        1e3 * max(got["cpu_ack"]) / len(files),
    ]
    # PostgreSQL's server, on the same cores (idle but for S3 + PostgreSQL variants)
    out["postgres_cpu_ms_per_instance_until_ack"] = (
        1e3 * statistics.median(got["db_ack"]) / len(files)
    )
    out["load_average_1min"] = got["load"]
    if "at_rest" in got:
        rest = summary(got["at_rest"])
        out["seconds_at_rest"] = rest
        out["at_rest_instances_per_s"] = len(files) / rest["median"]
        out["server_cpu_ms_per_instance_until_at_rest"] = (
            1e3 * statistics.median(got["cpu_rest"]) / len(files)
        )
    return out


def variant_runner(variant: str, kho_env: dict[str, str], seaweed: Any) -> Runner:
    env = dict(kho_env)
    found = re.search(r"workers(\d+)$", variant)
    workers = int(found.group(1)) if found else 1
    if variant == "no-fsync":
        env["KHO_FSYNC"] = "false"
    elif variant == "no-group-commit":
        env["KHO_CATALOG_GROUP_COMMIT"] = "false"
    elif variant == "inline":
        env["KHO_FINISH_IN_BACKGROUND"] = "false"
    elif variant.startswith("no-spool"):
        env["KHO_SPOOL"] = "off"
    if variant.startswith("s3-pg-spool"):
        env["KHO_SPOOL"] = "on"
    use_s3 = variant.startswith("s3-pg")

    @contextmanager
    def target(work: Path) -> Iterator[tuple[int, list[int]]]:
        with contextlib.ExitStack() as stack:
            run_env = dict(env)
            if use_s3:
                from tests.helpers.postgres import postgres_database

                url = stack.enter_context(postgres_database())
                (work / "catalog-url").write_text(url)
                run_env["KHO_CATALOG_URL"] = url
                run_env["KHO_STORAGE_URL"] = seaweed.url(f"kho-bench/{work.name}")
            yield stack.enter_context(kho_target(work, run_env, workers))

    def catalog(work: Path) -> str:
        if use_s3:
            return (work / "catalog-url").read_text()
        return str(work / "kho-data" / "catalog.sqlite3")

    extra = (seaweed.pid,) if use_s3 else ()
    return Runner(f"kho-{variant}", target, "KHO", catalog, extra)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    parser.add_argument(
        "--series", type=int, default=1, help="series sent back to back into one server"
    )
    parser.add_argument("--corpus", choices=["ct", "mixed"], default="ct")
    parser.add_argument("--radiographs", type=int, default=6, help="per series (mixed)")
    parser.add_argument("--multiframes", type=int, default=4, help="per series (mixed)")
    parser.add_argument("--keep-corpus", type=Path, help="reuse/keep the generated series here")
    parser.add_argument("--kho-env", nargs="*", default=[], help="KEY=VALUE for kho serve")
    parser.add_argument(
        "--results-name", default="ingest", help="benchmarks/results/<name>.json (default ingest)"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[
            "durable",
            "no-spool",
            "inline",
            "workers2",
            "workers4",
            "s3-pg",
            "s3-pg-workers2",
            "s3-pg-spool",
            "s3-pg-spool-workers2",
        ],
        help="kho configurations: durable (default settings), no-fsync (KHO_FSYNC=false: "
        "no flush, like storescp), workers2 (two processes on the port), inline, s3-pg, "
        "s3-pg-workers2 (see the module docstring)",
    )
    args = parser.parse_args(argv)

    corpus_dir = args.keep_corpus or Path(tempfile.mkdtemp(prefix="kho-ct-"))
    mixed = args.corpus == "mixed"
    groups = build_corpus(
        corpus_dir,
        series=args.series,
        slices=args.slices,
        radiographs=args.radiographs if mixed else 0,
        multiframes=args.multiframes if mixed else 0,
    )
    load_before = os.getloadavg()
    kho_env = dict(kv.split("=", 1) for kv in args.kho_env)
    results = []
    with contextlib.ExitStack() as services:
        seaweed = None
        if any(v.startswith("s3-pg") for v in args.variants):
            from tests.helpers.seaweedfs import run_seaweedfs

            seaweed = services.enter_context(
                run_seaweedfs(Path(services.enter_context(tempfile.TemporaryDirectory())))
            )
        for associations in args.associations:
            runners = [Runner("dcmtk-storescp", storescp_target, "STORESCP")]
            runners += [variant_runner(v, kho_env, seaweed) for v in args.variants]
            for _ in range(args.repeats):
                for runner in runners:
                    run_once(runner, groups, associations)
            ref = summarize(runners[0], groups, associations)
            results.append(ref)
            for runner in runners[1:]:
                kho = summarize(runner, groups, associations)
                kho["ratio_to_storescp"] = kho["instances_per_s"] / ref["instances_per_s"]
                # each round against storescp's of the same round (they ran a minute
                # apart): steadier than the ratio of medians on a machine whose load drifts
                for key in ("seconds", "sustained_seconds"):
                    if key in runner.samples:
                        rounds = [
                            theirs / ours
                            for theirs, ours in zip(
                                runners[0].samples[key], runner.samples[key], strict=True
                            )
                        ]
                        name = key.replace("seconds", "ratio_to_storescp_by_round")
                        kho[name] = rounds
                        kho[name + "_median"] = statistics.median(rounds)
                if "sustained_instances_per_s" in kho:
                    kho["sustained_ratio_to_storescp"] = (
                        kho["sustained_instances_per_s"] / ref["sustained_instances_per_s"]
                    )
                results.append(kho)
    by_key = {(r["target"], r["associations"]): r for r in results}
    for r in results:  # S3 + PostgreSQL against the local path with as many processes
        local = None
        if r["target"].startswith("kho-s3-pg"):
            local = r["target"].replace("kho-s3-pg-spool", "kho", 1).replace("kho-s3-pg", "kho", 1)
            local = "kho-durable" if local == "kho" else local
        if local and (local, r["associations"]) in by_key:
            r["ratio_to_local"] = (
                r["instances_per_s"] / by_key[(local, r["associations"])]["instances_per_s"]
            )
    if not args.keep_corpus:
        shutil.rmtree(corpus_dir, ignore_errors=True)

    host = machine()
    host["load_average_before"] = load_before
    host["load_average_after"] = os.getloadavg()
    payload = {
        "benchmark": "ingest",
        "machine": host,
        "corpus": args.corpus,
        "series": args.series,
        "kho_env": kho_env,
        "results": results,
    }
    path = write_results(args.results_name, payload)
    print(
        f"machine: {host['cpu']} x{host['cores']}, load average before "
        f"{' '.join(f'{x:.2f}' for x in load_before)}, after "
        f"{' '.join(f'{x:.2f}' for x in host['load_average_after'])}"
    )
    print(
        f"{'target':20} {'assoc':>5} {'inst/s':>9} {'MB/s':>8} {'median s':>9} "
        f"{'vs storescp (by round)':>22} {'at rest inst/s':>15} {'vs local':>9} "
        f"{'cpu ms/inst':>12} {'pg cpu ms/inst':>15} {'sustained':>10} {'load':>5}"
    )
    for r in results:
        ratio = (
            f"{r['ratio_to_storescp']:.0%} ({r['ratio_to_storescp_by_round_median']:.0%})"
            if "ratio_to_storescp" in r
            else "-"
        )
        rest = f"{r['at_rest_instances_per_s']:.1f}" if "at_rest_instances_per_s" in r else "-"
        local = f"{r['ratio_to_local']:.0%}" if "ratio_to_local" in r else "-"
        sustained = (
            f"{r['sustained_ratio_to_storescp']:.0%}"
            if "sustained_ratio_to_storescp" in r
            else f"{r.get('sustained_instances_per_s', 0):.0f}/s"
            if "sustained_instances_per_s" in r
            else "-"
        )
        print(
            f"{r['target']:20} {r['associations']:>5} {r['instances_per_s']:>9.1f} "
            f"{r['mb_per_s']:>8.1f} {r['seconds']['median']:>9.3f} {ratio:>22} {rest:>15} "
            f"{local:>9} {r['server_cpu_ms_per_instance_until_ack']:>12.2f} "
            f"{r['postgres_cpu_ms_per_instance_until_ack']:>15.2f} {sustained:>10} "
            f"{max(r['load_average_1min']):>5.1f}"
        )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
