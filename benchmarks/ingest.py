"""Ingest throughput: dcmtk storescu -> kho, against dcmtk storescp --bit-preserving (the
ceiling for this machine), in the same run.

A 300-slice 512x512 16-bit CT series (kho.archive.phantom: body, lungs, bone, noise) is sent over 1 and 4
associations (4 storescu processes sending a quarter each).  Each run starts a fresh
server with an empty data directory.  Reports instances/s and MB/s (received bytes),
medians over --repeats, and kho / storescp ratios.

    python -m benchmarks.ingest [--slices 300] [--repeats 3] [--associations 1 4]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from benchmarks.common import machine, summary, write_results
from tests.helpers import dcmtk
from tests.helpers.server import kho_serve

Target = Callable[[Path], AbstractContextManager[int]]


@contextmanager
def kho_target(
    work: Path, extra_env: dict[str, str] | None = None, workers: int = 1
) -> Iterator[int]:
    args = ("--workers", str(workers)) if workers > 1 else ()
    with kho_serve(work / "kho-data", env=extra_env, args=args) as (_proc, port):
        if workers > 1:
            time.sleep(4)  # the workers bind after the parent: wait until all listen
        yield port


@contextmanager
def storescp_target(work: Path) -> Iterator[int]:
    with dcmtk.run_storescp(work / "storescp-out") as scp:
        yield scp.port


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


def run_target(
    name: str, target: Target, files: list[Path], associations: int, repeats: int, aec: str
) -> dict[str, Any]:
    total_bytes = sum(p.stat().st_size for p in files)
    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix=f"kho-bench-{name}-") as tmp:
            work = Path(tmp)
            with target(work) as port:
                times.append(send(port, files, associations, aec))
    stats = summary(times)
    return {
        "target": name,
        "associations": associations,
        "instances": len(files),
        "bytes": total_bytes,
        "seconds": stats,
        "instances_per_s": len(files) / stats["median"],
        "mb_per_s": total_bytes / stats["median"] / 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--keep-corpus", type=Path, help="reuse/keep the generated series here")
    parser.add_argument("--kho-env", nargs="*", default=[], help="KEY=VALUE for kho serve")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["durable", "no-fsync"],
        help="kho configurations: durable (default settings), no-fsync (KHO_FSYNC=false: "
        "no flush, like storescp), workers2 (two processes on the port)",
    )
    args = parser.parse_args(argv)

    from kho.archive.phantom import write_ct_series

    corpus_dir = args.keep_corpus or Path(tempfile.mkdtemp(prefix="kho-ct-"))
    files = sorted(corpus_dir.glob("*.dcm"))
    if len(files) != args.slices:
        shutil.rmtree(corpus_dir, ignore_errors=True)
        corpus_dir.mkdir(parents=True)
        files = sorted(write_ct_series(corpus_dir, args.slices))
    kho_env = dict(kv.split("=", 1) for kv in args.kho_env)
    results = []
    for associations in args.associations:
        ref = run_target(
            "dcmtk-storescp", storescp_target, files, associations, args.repeats, "STORESCP"
        )
        results.append(ref)
        for variant in args.variants:
            env = dict(kho_env)
            workers = 1
            if variant == "no-fsync":
                env["KHO_FSYNC"] = "false"
            elif variant == "workers2":
                workers = 2

            def target(work: Path, env: dict[str, str] = env, workers: int = workers) -> Any:
                return kho_target(work, env, workers)

            kho = run_target(f"kho-{variant}", target, files, associations, args.repeats, "KHO")
            kho["ratio_to_storescp"] = kho["instances_per_s"] / ref["instances_per_s"]
            results.append(kho)
    if not args.keep_corpus:
        shutil.rmtree(corpus_dir, ignore_errors=True)

    payload = {"benchmark": "ingest", "machine": machine(), "kho_env": kho_env, "results": results}
    path = write_results("ingest", payload)
    print(f"machine: {payload['machine']['cpu']} x{payload['machine']['cores']}")
    print(
        f"{'target':16} {'assoc':>5} {'inst/s':>9} {'MB/s':>8} {'median s':>9} {'vs storescp':>12}"
    )
    for r in results:
        ratio = f"{r['ratio_to_storescp']:.0%}" if "ratio_to_storescp" in r else "-"
        print(
            f"{r['target']:16} {r['associations']:>5} {r['instances_per_s']:>9.1f} "
            f"{r['mb_per_s']:>8.1f} {r['seconds']['median']:>9.3f} {ratio:>12}"
        )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
