"""Codec benchmark: kho JPEG-LS against CharLS, OpenJPH (HTJ2K), OpenJPEG (J2K), zstd, RLE.

    python -m benchmarks.codecs [--slices 50] [--repeats 3] [--no-radiograph]

On a synthetic CT series (512x512, 12 bits stored) and a 3000x2500 12-bit radiograph:
single-thread encode/decode speed (MB/s of raw pixels, medians over repeats) and
compression ratio per codec, kho JPEG-LS on all cores (threads over frames: the kernels
release the GIL), ratios against CharLS, and numba compile time (fresh cache) versus a
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


def _bench(
    frames: list[np.ndarray], bits: int, encode: Encoder, decode: Decoder, repeats: int
) -> dict[str, Any]:
    raw = sum(f.nbytes for f in frames)
    encoded = [encode(f, bits) for f in frames]  # warm up (and JIT) outside the timing
    for data, frame in zip(encoded, frames, strict=True):
        if not np.array_equal(decode(data, frame).reshape(frame.shape), frame):
            raise AssertionError("codec did not round-trip")
    enc_times, dec_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for f in frames:
            encode(f, bits)
        enc_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        for data, f in zip(encoded, frames, strict=True):
            decode(data, f)
        dec_times.append(time.perf_counter() - start)
    size = sum(len(d) for d in encoded)
    return {
        "encode_mb_s": raw / 1e6 / statistics.median(enc_times),
        "decode_mb_s": raw / 1e6 / statistics.median(dec_times),
        "ratio": raw / size,
        "bytes": size,
        "raw_bytes": raw,
    }


def _bench_threads(
    frames: list[np.ndarray], bits: int, repeats: int, workers: int
) -> dict[str, Any]:
    raw = sum(f.nbytes for f in frames)
    encoded = [jpegls.encode(f, bits_stored=bits) for f in frames]
    enc_times, dec_times = [], []
    with ThreadPoolExecutor(workers) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(lambda f: jpegls.encode(f, bits_stored=bits), frames))
            enc_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            list(pool.map(jpegls.decode, encoded))
            dec_times.append(time.perf_counter() - start)
    return {
        "workers": workers,
        "encode_mb_s": raw / 1e6 / statistics.median(enc_times),
        "decode_mb_s": raw / 1e6 / statistics.median(dec_times),
    }


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
    results: dict[str, Any] = {"machine": machine(), "repeats": args.repeats, "datasets": {}}
    for name, (frames, bits) in datasets.items():
        per_codec: dict[str, Any] = {}
        for codec_name, (encode, decode) in codecs.items():
            per_codec[codec_name] = _bench(frames, bits, encode, decode, args.repeats)
        # kho at P=16 as well: the precision imagecodecs' CharLS binding always writes
        per_codec["kho-jpegls-P16"] = _bench(
            frames,
            16,
            lambda img, b: jpegls.encode(img, bits_stored=b),
            lambda d, like: jpegls.decode(d),
            args.repeats,
        )
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
    jit = results["jit"]
    print(
        f"\nnumba: first run with empty cache {jit['compile_s']:.1f} s, "
        f"cached cold start {jit['cached_cold_start_s']:.2f} s"
    )


if __name__ == "__main__":
    main()
