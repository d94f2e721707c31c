"""Pass 1 reads headers only, for every format: time and peak RSS of one header scan, before and after.

    python -m bench.bench_header_scan [--width 9600 --height 6500]

"before" is the header scan as it was (Pillow's ``getexif()``, which for a PNG inflates every pixel to
look for an eXIf chunk after IDAT); "after" is ``curation.stages.scan_header``. Each measurement runs in
a fresh Python process: the scan's memory is the growth of peak RSS (VmHWM, reset after the imports),
and its time the best of 5 scans. Files are zero-filled (a 62 MP PNG is
then ~180 KB on disk: cheap to store and to send, costly to decode); HEIC and AVIF are smaller because
their encoders take minutes at 62 MP on this machine. Files are cached under --cache. Writes its
section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from bench.record import write_section
from curation.stages import EXIF_ORIENTATION_TAG, scan_header
from manifests.imageio import AVIF_SUPPORTED

REPEATS = 5
SMALL_SIDE = 2048  # HEIC / AVIF: x265 and aom take minutes for a 62 MP frame here


def legacy_scan(fileobj: BinaryIO, *, num_bytes: int) -> dict:
    """The header scan before this benchmark's fix: Pillow's ``getexif()`` on every format."""
    with Image.open(fileobj) as im:
        width, height = im.size
        orientation = im.getexif().get(EXIF_ORIENTATION_TAG, 1)
        num_frames = getattr(im, "n_frames", 1)
        return {
            "format": im.format,
            "size": (width, height),
            "orientation": orientation,
            "frames": num_frames,
        }


def build_files(cache: Path, size: tuple[int, int]) -> dict[str, Path]:
    """One zero-filled image per format (cached by size)."""
    cache.mkdir(parents=True, exist_ok=True)
    small = (SMALL_SIDE, SMALL_SIDE)
    specs = {
        "PNG": (size, "RGB", {}),
        "JPEG": (size, "RGB", {"quality": 90}),
        "WEBP": (size, "RGB", {"quality": 80}),
        "TIFF": (size, "RGB", {"compression": "tiff_deflate"}),
        "GIF": (size, "P", {}),
        "HEIF": (small, "RGB", {}),
    } | ({"AVIF": (small, "RGB", {})} if AVIF_SUPPORTED else {})
    files = {}
    for fmt, (dims, mode, params) in specs.items():
        path = cache / f"zeros_{dims[0]}x{dims[1]}.{fmt.lower()}"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            Image.new(mode, dims).save(tmp, fmt, **params)
            tmp.rename(path)
        files[fmt] = path
    return files


def _status_kib(field: str) -> int:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(field + ":"))
    return int(line.split()[1])


def measure(path: Path, variant: str) -> dict:
    """In this process: peak-RSS growth of the scans, and the best time of ``REPEATS`` scans.

    The imports' own peak would hide the scan's, so the peak (VmHWM) is reset to the current RSS first
    (``/proc/self/clear_refs`` ← 5, Linux ≥ 4.0).
    """
    scan = scan_header if variant == "after" else legacy_scan
    Path("/proc/self/clear_refs").write_text("5")
    peak_before = _status_kib("VmHWM")
    seconds = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        with open(path, "rb") as f:
            result = scan(f, num_bytes=path.stat().st_size)
        seconds.append(time.perf_counter() - start)
    peak_after = _status_kib("VmHWM")
    return {"seconds": min(seconds), "peak_rss_mb": (peak_after - peak_before) / 1024, "result": repr(result)}


def measure_in_subprocess(path: Path, variant: str) -> dict:
    command = [sys.executable, "-m", "bench.bench_header_scan", "--measure", str(path), "--variant", variant]
    out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    return json.loads(out.stdout)


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs (shared with other jobs), Python {platform.python_version()}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=9600)
    parser.add_argument("--height", type=int, default=6500)  # 62.4 MP, as in issue 14
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "pixsigma_bench" / "header"
    )
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the child process's job
    parser.add_argument("--variant", choices=("before", "after"), help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.variant)))
        return

    files = build_files(args.cache, (args.width, args.height))
    load_before = os.getloadavg()[0]
    rows = []
    for fmt, path in files.items():
        with Image.open(path) as im:
            megapixels = im.width * im.height / 1e6
        before, after = (measure_in_subprocess(path, v) for v in ("before", "after"))
        rows.append(
            f"| {fmt} | {megapixels:.1f} | {path.stat().st_size / 1024:,.0f} "
            f"| {before['seconds'] * 1000:.2f} | {before['peak_rss_mb']:.1f} "
            f"| {after['seconds'] * 1000:.2f} | {after['peak_rss_mb']:.1f} |"
        )
        print(rows[-1], flush=True)
    load_after = os.getloadavg()[0]
    markdown = "\n".join(
        [
            "## Curation pass 1: header-only scan per format (before / after the PNG fix)",
            "",
            f"Command: `python -m bench.bench_header_scan --width {args.width} --height {args.height}`",
            "",
            f"Machine: {machine()}; 1-minute load average {load_before:.1f} before and {load_after:.1f} after.",
            "",
            "Each cell is one fresh process: growth of peak RSS (VmHWM reset after the imports) and the best"
            f" of {REPEATS} scans. Zero-filled images; HEIC and AVIF at {SMALL_SIDE}×{SMALL_SIDE} (their"
            " encoders take minutes at 62 MP here).",
            "",
            "| format | MP | file KB | before ms | before +peak RSS MB | after ms | after +peak RSS MB |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            "Before, Pillow's `PngImageFile.getexif()` inflated the whole image to look for an eXIf chunk after"
            " IDAT; `scan_header` now walks the chunk headers instead (8 bytes read per chunk, none inflated)."
            " The other formats were already header-only and are unchanged.",
        ]
    )
    if not args.no_write:
        write_section("header_scan", markdown)
    print(markdown)


if __name__ == "__main__":
    main()
