"""Image encoder benchmark for rendered frames, thumbnails and tiles: Pillow vs imagecodecs.

    python -m benchmarks.image_encoders [--repeats 31]

Encodes what /rendered, /thumbnail and the tile pyramid produce — 8-bit display images — as
JPEG (quality 90) and PNG with each library's default settings (the settings kho would call
them with), on a 512x512 grey CT slice (window 40/400) and a 2048x2048 RGB image (a chest
radiograph through a colour map).  Synthetic but anatomy-like (benchmarks.synthetic), so the
sizes and speeds land near those of real images.  The libraries take turns within each
repeat so that load from other work on the machine hits both alike; medians over repeats.
Every output is decoded again (by the other library) and checked: PNG equal to the input,
JPEG within a plausible PSNR.  Also reports import time and installed size of each library.
Writes benchmarks/results/image_encoders.json and prints a table.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import machine, write_results
from benchmarks.synthetic import ct_slice, radiograph

Encoder = Callable[[np.ndarray], bytes]


def grey_ct_512() -> np.ndarray:
    """A 512x512 CT slice in a soft-tissue window (40/400), as 8-bit grey."""
    hu = ct_slice(150).astype(np.float64)
    low, high = 40 - 200, 40 + 200
    return (np.clip((hu - low) / (high - low), 0, 1) * 255).round().astype(np.uint8)


def rgb_2048() -> np.ndarray:
    """A 2048x2048 chest radiograph through a smooth colour map (hot-iron like), 8-bit RGB."""
    values = radiograph(2048, 2048, bits=12).astype(np.float64) / 4095.0
    red = np.clip(values * 3.0, 0, 1)
    green = np.clip(values * 3.0 - 1.0, 0, 1)
    blue = np.clip(values * 3.0 - 2.0, 0, 1)
    return (np.stack([red, green, blue], axis=-1) * 255).round().astype(np.uint8)


def _pillow_jpeg(img: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(img).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _pillow_png(img: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(img).save(out, format="PNG")
    return out.getvalue()


def _imagecodecs_jpeg(img: np.ndarray) -> bytes:
    import imagecodecs

    return bytes(imagecodecs.jpeg8_encode(img, level=90))


def _imagecodecs_png(img: np.ndarray) -> bytes:
    import imagecodecs

    return bytes(imagecodecs.png_encode(img))


ENCODERS: dict[tuple[str, str], Encoder] = {
    ("pillow", "jpeg"): _pillow_jpeg,
    ("imagecodecs", "jpeg"): _imagecodecs_jpeg,
    ("pillow", "png"): _pillow_png,
    ("imagecodecs", "png"): _imagecodecs_png,
}


def _decode(library: str, data: bytes) -> np.ndarray:
    """Decode with the library that did NOT encode, so each output is checked independently."""
    if library == "imagecodecs":
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(data)))
    import imagecodecs

    return np.asarray(imagecodecs.imread(data))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _check(library: str, fmt: str, img: np.ndarray, data: bytes) -> float:
    back = _decode(library, data)
    if back.shape != img.shape:
        raise AssertionError(f"{library} {fmt}: decoded shape {back.shape} != {img.shape}")
    psnr = _psnr(img, back)
    if fmt == "png" and psnr != float("inf"):
        raise AssertionError(f"{library} png is not lossless")
    if fmt == "jpeg" and psnr < 30:
        raise AssertionError(f"{library} jpeg q=90 PSNR {psnr:.1f} dB is implausibly low")
    return psnr


def _library_facts(module: str, distribution: str) -> dict[str, Any]:
    """Version, installed size (package + bundled libraries) and import time in a fresh process."""
    dist = importlib.metadata.distribution(distribution)
    size = 0
    for file in dist.files or []:
        path = Path(str(dist.locate_file(file)))
        if path.is_file():
            size += path.stat().st_size
    imports = []
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
        imports.append(time.perf_counter() - started)
    baseline = []
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        baseline.append(time.perf_counter() - started)
    return {
        "version": dist.version,
        "installed_mb": round(size / 1e6, 1),
        "import_ms": round((statistics.median(imports) - statistics.median(baseline)) * 1e3, 1),
    }


def run(repeats: int) -> dict[str, Any]:
    images = {"grey 512x512": grey_ct_512(), "rgb 2048x2048": rgb_2048()}
    rows: list[dict[str, Any]] = []
    for image_name, img in images.items():
        timings: dict[tuple[str, str], list[float]] = {key: [] for key in ENCODERS}
        outputs: dict[tuple[str, str], bytes] = {}
        for key, encode in ENCODERS.items():  # warm-up: imports, first-call allocations
            outputs[key] = encode(img)
        for _ in range(repeats):
            for key, encode in ENCODERS.items():
                started = time.perf_counter()
                encode(img)
                timings[key].append(time.perf_counter() - started)
        for (library, fmt), values in timings.items():
            data = outputs[(library, fmt)]
            rows.append(
                {
                    "image": image_name,
                    "format": fmt,
                    "library": library,
                    "median_ms": statistics.median(values) * 1e3,
                    "min_ms": min(values) * 1e3,
                    "bytes": len(data),
                    "psnr_db": _check(library, fmt, img, data),
                    "repeats": repeats,
                }
            )
    return {
        "machine": machine(),
        "settings": {
            "jpeg": "quality 90, library defaults otherwise (4:2:0 for RGB, no optimize)",
            "png": "library defaults (zlib level 6 class, adaptive filters)",
        },
        "libraries": {
            "pillow": _library_facts("PIL.Image", "pillow"),
            "imagecodecs": _library_facts("imagecodecs", "imagecodecs"),
        },
        "rows": rows,
    }


def format_table(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, Python {m['python']}",
        "",
        f"{'image':<14} {'format':<6} {'library':<12} {'median ms':>10} {'min ms':>8} "
        f"{'bytes':>10} {'PSNR dB':>8}",
    ]
    for r in result["rows"]:
        psnr = "lossless" if r["psnr_db"] == float("inf") else f"{r['psnr_db']:.1f}"
        lines.append(
            f"{r['image']:<14} {r['format']:<6} {r['library']:<12} {r['median_ms']:>10.2f} "
            f"{r['min_ms']:>8.2f} {r['bytes']:>10,} {psnr:>8}"
        )
    lines.append("")
    for name, facts in result["libraries"].items():
        lines.append(
            f"{name} {facts['version']}: installed {facts['installed_mb']} MB, "
            f"import {facts['import_ms']} ms"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=31)
    args = parser.parse_args()
    result = run(args.repeats)
    print(format_table(result))
    print(f"\nwritten: {write_results('image_encoders', result)}")


if __name__ == "__main__":
    main()
