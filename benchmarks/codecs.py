"""Codec benchmark: kho JPEG-LS against CharLS, OpenJPH (HTJ2K), OpenJPEG (J2K), zstd, RLE.

    python -m benchmarks.codecs [--slices 50] [--repeats 3] [--no-radiograph]

On a synthetic CT series (512x512, 12 bits stored) and a 3000x2500 12-bit radiograph:
single-thread encode/decode speed (MB/s of raw pixels, medians over repeats; the codecs
take turns within each repeat, so that load from other work on the machine hits all alike)
and compression ratio per codec, kho JPEG-LS on all cores (threads over frames: the kernels
release the GIL; with the cores the process really got, and the scaling over one thread
measured alongside), ratios against CharLS, and numba compile time (fresh cache) versus a
cached cold start, each measured in a subprocess.  Writes benchmarks/results/codecs.json
and prints a table.  Every codec's output is checked to decode to the input.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from benchmarks.common import machine, write_results
from benchmarks.synthetic import ct_series, ct_stored, radiograph
from kho.codecs import jpegls

Encoder = Callable[[np.ndarray, int], bytes]
Decoder = Callable[[bytes, np.ndarray], np.ndarray]


def _codecs() -> dict[str, tuple[Encoder, Decoder]]:
    """name -> (encode(image, bits), decode(data, like)) for what is installed here."""
    out: dict[str, tuple[Encoder, Decoder]] = {
        "kho-jpegls": (
            lambda img, bits: jpegls.encode(img, bits_stored=bits),
            lambda data, like: jpegls.decode(data),
        )
    }
    try:
        import imagecodecs
    except ImportError:
        imagecodecs = None
    if imagecodecs is not None:
        out["charls"] = (
            lambda img, bits: imagecodecs.jpegls_encode(img),
            lambda data, like: imagecodecs.jpegls_decode(data),
        )
        if getattr(imagecodecs, "HTJ2K", None) is not None and imagecodecs.HTJ2K.available:
            out["openjph-htj2k"] = (
                lambda img, bits: imagecodecs.htj2k_encode(img, level=0, reversible=True),
                lambda data, like: imagecodecs.htj2k_decode(data),
            )
        if imagecodecs.JPEG2K.available:
            out["openjpeg-j2k"] = (
                lambda img, bits: imagecodecs.jpeg2k_encode(
                    img, level=0, reversible=True, bitspersample=bits, numthreads=1
                ),
                lambda data, like: imagecodecs.jpeg2k_decode(data, numthreads=1),
            )
    try:
        import zstandard

        compressor = zstandard.ZstdCompressor(level=3)
        decompressor = zstandard.ZstdDecompressor()
        out["zstd-3"] = (
            lambda img, bits: compressor.compress(img.tobytes()),
            lambda data, like: np.frombuffer(decompressor.decompress(data), like.dtype).reshape(
                like.shape
            ),
        )
    except ImportError:
        pass
    try:
        from kho.codecs import rle

        out["kho-rle"] = (
            lambda img, bits: rle.encode(img, bits_stored=bits),
            lambda data, like: rle.decode(
                data,
                rows=like.shape[0],
                columns=like.shape[1],
                samples_per_pixel=1,
                bits_allocated=like.dtype.itemsize * 8,
            ),
        )
    except ImportError:
        pass
    return out


def _bench_codecs(
    frames: list[np.ndarray], bits: int, codecs: dict[str, tuple[Encoder, Decoder]], repeats: int
) -> dict[str, dict[str, Any]]:
    """Every codec in turn within each repeat (so a load change on a shared machine hits
    all of them alike), medians over the repeats."""
    raw = sum(f.nbytes for f in frames)
    encoded: dict[str, list[bytes]] = {}
    for name, (encode, decode) in codecs.items():
        encoded[name] = [encode(f, bits) for f in frames]  # warm up (and JIT), untimed
        for data, frame in zip(encoded[name], frames, strict=True):
            if not np.array_equal(decode(data, frame).reshape(frame.shape), frame):
                raise AssertionError(f"{name} did not round-trip")
    times: dict[str, dict[str, list[float]]] = {n: {"enc": [], "dec": []} for n in codecs}
    for _ in range(repeats):
        for name, (encode, decode) in codecs.items():
            start = time.perf_counter()
            for f in frames:
                encode(f, bits)
            times[name]["enc"].append(time.perf_counter() - start)
            start = time.perf_counter()
            for data, f in zip(encoded[name], frames, strict=True):
                decode(data, f)
            times[name]["dec"].append(time.perf_counter() - start)
    out = {}
    for name in codecs:
        size = sum(len(d) for d in encoded[name])
        out[name] = {
            "encode_mb_s": raw / 1e6 / statistics.median(times[name]["enc"]),
            "decode_mb_s": raw / 1e6 / statistics.median(times[name]["dec"]),
            "ratio": raw / size,
            "bytes": size,
            "raw_bytes": raw,
        }
    return out


def _bench_threads(
    frames: list[np.ndarray], bits: int, repeats: int, workers: int
) -> dict[str, Any]:
    """kho on ``workers`` threads over the frames, alternating with one thread in the same
    repeats; cpu_per_wall says how many cores the process really got (on a machine shared
    with other work it can be well below ``workers``)."""
    raw = sum(f.nbytes for f in frames)
    encoded = [jpegls.encode(f, bits_stored=bits) for f in frames]

    def encode(f: np.ndarray) -> bytes:
        return jpegls.encode(f, bits_stored=bits)

    runs: dict[tuple[int, str], list[tuple[float, float]]] = {}
    pools = {1: ThreadPoolExecutor(1), workers: ThreadPoolExecutor(workers)}
    try:
        for _ in range(repeats):
            for n, pool in pools.items():
                for kind, fn, data in (("enc", encode, frames), ("dec", jpegls.decode, encoded)):
                    wall, cpu = time.perf_counter(), time.process_time()
                    list(pool.map(fn, data))
                    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                    runs.setdefault((n, kind), []).append((wall, cpu))
    finally:
        for pool in pools.values():
            pool.shutdown()

    def median_run(n: int, kind: str) -> tuple[float, float]:
        ordered = sorted(runs[(n, kind)])
        return ordered[len(ordered) // 2]

    result: dict[str, Any] = {"workers": workers}
    for kind, key in (("enc", "encode"), ("dec", "decode")):
        wall, cpu = median_run(workers, kind)
        one_wall, one_cpu = median_run(1, kind)
        result[f"{key}_mb_s"] = raw / 1e6 / wall
        result[f"{key}_cpu_per_wall"] = cpu / wall
        result[f"{key}_scaling_vs_1_thread"] = one_wall / wall
        # CPU seconds for the same work, one thread over many: 1.0 means threads cost
        # nothing extra (no lock, no contention), whatever share of the cores we got
        result[f"{key}_cpu_efficiency_vs_1_thread"] = one_cpu / cpu
    return result


_STARTUP = """
import time, numpy as np
t0 = time.perf_counter()
from kho.codecs import jpegls
img = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)
for bits in (8, 12):
    data = jpegls.encode((img % (1 << bits)).astype(np.uint8 if bits <= 8 else np.uint16),
                         bits_stored=bits)
    jpegls.decode(data)
rgb = np.zeros((8, 8, 3), np.uint8)
jpegls.decode(jpegls.encode(rgb, bits_stored=8))
print(time.perf_counter() - t0)
"""


def _startup_seconds() -> dict[str, float]:
    """Import + first encode/decode (gray 8/16-bit and RGB) in a fresh interpreter: with an
    empty numba cache (compile) and again with the cache just written (cold start)."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        runs = []
        for _ in range(2):
            result = subprocess.run(
                [sys.executable, "-c", _STARTUP],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            runs.append(float(result.stdout.strip().splitlines()[-1]))
    return {"compile_s": runs[0], "cached_cold_start_s": runs[1]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=50, help="CT slices (512x512)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-radiograph", action="store_true")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)

    datasets: dict[str, tuple[list[np.ndarray], int]] = {
        f"ct-{args.slices}x512x512-12bit": ([ct_stored(s) for s in ct_series(args.slices)], 12)
    }
    if not args.no_radiograph:
        datasets["radiograph-3000x2500-12bit"] = ([radiograph()], 12)
    codecs = _codecs()
    results: dict[str, Any] = {
        "machine": machine(),
        "repeats": args.repeats,
        "load_average_before": os.getloadavg(),
        "datasets": {},
    }
    for name, (frames, bits) in datasets.items():
        # kho at P=16 as well: the precision imagecodecs' CharLS binding always writes
        variants = dict(codecs)
        variants["kho-jpegls-P16"] = (
            lambda img, b: jpegls.encode(img, bits_stored=16),
            lambda d, like: jpegls.decode(d),
        )
        per_codec = _bench_codecs(frames, bits, variants, args.repeats)
        per_codec[f"kho-jpegls-{args.workers}-threads"] = _bench_threads(
            frames, bits, args.repeats, args.workers
        )
        charls = per_codec.get("charls")
        if charls:
            for entry in per_codec.values():
                for key in ("encode_mb_s", "decode_mb_s", "ratio"):
                    if key in entry:
                        entry[f"{key}_vs_charls"] = entry[key] / charls[key]
        results["datasets"][name] = per_codec
    results["load_average_after"] = os.getloadavg()
    results["jit"] = _startup_seconds()
    path = write_results("codecs", results)
    _print_table(results)
    print(f"\nwritten to {path}")
    return results


def _print_table(results: dict[str, Any]) -> None:
    m = results["machine"]
    print(f"{m['cpu']} ({m['cores']} cores), median of {results['repeats']} repeats")
    for name, per_codec in results["datasets"].items():
        print(f"\n{name}")
        print(
            f"{'codec':<24}{'enc MB/s':>10}{'dec MB/s':>10}{'ratio':>8}"
            f"{'enc/CharLS':>12}{'dec/CharLS':>12}{'ratio/CharLS':>14}"
        )
        for codec, r in per_codec.items():
            ratio = f"{r['ratio']:.3f}" if "ratio" in r else "-"
            rel_ratio = f"{r['ratio_vs_charls']:.3f}" if "ratio_vs_charls" in r else "-"
            print(
                f"{codec:<24}{r['encode_mb_s']:>10.1f}{r['decode_mb_s']:>10.1f}{ratio:>8}"
                f"{r.get('encode_mb_s_vs_charls', float('nan')):>12.2f}"
                f"{r.get('decode_mb_s_vs_charls', float('nan')):>12.2f}{rel_ratio:>14}"
            )
            if "workers" in r:
                print(
                    f"{'':<24}x{r['encode_scaling_vs_1_thread']:.2f} / "
                    f"x{r['decode_scaling_vs_1_thread']:.2f} of one thread, cores used "
                    f"{r['encode_cpu_per_wall']:.2f} / {r['decode_cpu_per_wall']:.2f}, CPU "
                    f"efficiency {r['encode_cpu_efficiency_vs_1_thread']:.2f} / "
                    f"{r['decode_cpu_efficiency_vs_1_thread']:.2f}"
                )
    jit = results["jit"]
    print(
        f"\nnumba: first run with empty cache {jit['compile_s']:.1f} s, "
        f"cached cold start {jit['cached_cold_start_s']:.2f} s"
    )


if __name__ == "__main__":
    main()
