"""Coverage-guided fuzzing with atheris (pip install atheris) of the targets in
benchmarks/soak/fuzz_targets.py: the Part 10 walker and attribute reader, the STOW-RS
multipart parser, the HL7 MLLP deframer and message parser, the fast C-STORE P-DATA
splitter and command reader, bearer token verification, QIDO-RS parameter parsing run
against a small SQLite catalog, and the JPEG-LS and RLE decoders (their numba kernels are
compiled code that atheris cannot instrument: coverage counts their Python wrappers).

    python -m benchmarks.soak.fuzz --target part10 --runs 1000000
    python -m benchmarks.soak.fuzz --target all --seconds 600

Each target runs in its own process (libFuzzer owns it); a finding is any exception
other than a KhoError, or an input that takes longer than 1 s.  Results: executions,
executions/s, findings (the crashing inputs are kept under --artifacts).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from benchmarks.common import machine
from benchmarks.soak import report
from benchmarks.soak.fuzz_targets import TARGETS, seeds


def run_one(target: str, runs: int, seconds: int, artifacts: Path) -> None:
    """In this process: libFuzzer on ``target`` (does not return)."""
    import atheris

    corpus = Path(tempfile.mkdtemp(prefix=f"kho-fuzz-{target}-"))
    for n, data in enumerate(seeds(target)):
        (corpus / f"seed-{n}").write_bytes(data)
    function = TARGETS[target]
    for data in seeds(target):  # imports what the target runs, so that it is instrumented
        function(data)
    atheris.instrument_all()
    if target == "codecs":
        # its allocation check traces numpy's allocations: tracing from here on, since
        # starting and stopping tracemalloc for every input leaks about 1 KB each time
        # (not earlier: tracing slows instrumenting down)
        tracemalloc.start()
    argv = [
        sys.argv[0],
        str(corpus),
        f"-runs={runs}",
        f"-max_total_time={seconds}",
        "-timeout=1",
        "-rss_limit_mb=2048",
        "-max_len=262144",
        f"-artifact_prefix={artifacts}/{target}-",
        "-print_final_stats=1",
    ]
    atheris.Setup(argv, function)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=[*TARGETS, "all"], default="all")
    parser.add_argument("--runs", type=int, default=1_000_000, help="executions per target")
    parser.add_argument("--seconds", type=int, default=600, help="at most, per target")
    parser.add_argument("--artifacts", type=Path, default=Path("fuzz-artifacts"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-results", action="store_true")
    args = parser.parse_args(argv)
    args.artifacts.mkdir(parents=True, exist_ok=True)
    if args.child:
        run_one(args.target, args.runs, args.seconds, args.artifacts.resolve())
        return 0
    outcomes = {}
    for target in list(TARGETS) if args.target == "all" else [args.target]:
        started = time.monotonic()
        child = subprocess.run(
            [sys.executable, "-m", "benchmarks.soak.fuzz", "--child", "--target", target,
             "--runs", str(args.runs), "--seconds", str(args.seconds),
             "--artifacts", str(args.artifacts)],
            # atheris reports timeouts on stdout, libFuzzer everything else on stderr
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        elapsed = time.monotonic() - started
        output = child.stdout
        stats = _final_stats(output)
        executions = stats.get("stat::number_of_executed_units", 0)
        findings = sorted(p.name for p in args.artifacts.glob(f"{target}-*"))
        outcomes[target] = {
            "executions": executions,
            "seconds": round(elapsed, 1),
            "executions_per_s": round(executions / elapsed) if elapsed else 0,
            "peak_rss_mb": stats.get("stat::peak_rss_mb"),
            "coverage_edges": _last_coverage(output),
            "exit_code": child.returncode,
            "findings": findings,
            "tail": output[-1500:] if child.returncode else "",
        }
        print(target, json.dumps(outcomes[target])[:800], flush=True)
    if not args.no_results:
        previous = report.load().get("fuzz", {}).get("targets", {})
        report.record("fuzz", {"machine": machine(), "targets": {**previous, **outcomes}})
    # a child killed by a signal (atheris' timeout path can end so) failed without artifacts
    return 0 if all(not o["findings"] and o["exit_code"] == 0 for o in outcomes.values()) else 1


def _final_stats(output: str) -> dict[str, int]:
    out = {}
    for line in output.splitlines():
        if line.startswith("stat::"):
            name, _, value = line.rpartition(":")
            out[name.strip()] = int(value.strip() or 0)
    return out


def _last_coverage(output: str) -> int | None:
    found = None
    for line in output.splitlines():
        if " cov: " in line:
            found = int(line.split(" cov: ")[1].split()[0])
    return found


if __name__ == "__main__":
    raise SystemExit(main())
