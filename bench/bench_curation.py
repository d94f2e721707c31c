"""Curation throughput per core: header scan, pass 2 vs baselines, whole CPU path vs img2dataset.

    python -m bench.bench_curation [--num-4k 16] [--num-mix 200]

Everything runs pinned to one core (the HTTP server that feeds img2dataset runs on another), so the
numbers are images/s per core. Data: generated photo-like 4K JPEGs (a bundled photo upscaled, plus
sensor-like noise so quality 90 gives ~2 MB) and a web-like size mix (most images below 1K).
Writes its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import skimage.data
import torch
from PIL import Image

from bench.record import write_section
from curation import stages
from curation.aesthetic import AestheticScorer, clip_image_size
from curation.config import BUILTIN_HEAD, AestheticConfig, CurationConfig, DecodeConfig, TierConfig
from curation.pipeline import SCANNED, ScanAndDecode, run
from curation.sources import key_for
from curation.tiny import build_tiny_clip
from manifests import ManifestWriter

HEAD = BUILTIN_HEAD  # the LAION v2 head shipped in curation/assets
CLIP_SIDE = 224  # ViT-L/14's input; the baseline resizes to it too


def photo_like(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = Image.fromarray(skimage.data.astronaut() if seed % 2 else skimage.data.chelsea()).convert("RGB")
    image = np.asarray(base.resize(size, Image.Resampling.BICUBIC), np.int16)
    noise = rng.normal(0, 5, (size[1], size[0], 1)).astype(np.int16)
    return Image.fromarray(np.clip(image + noise, 0, 255).astype(np.uint8))


def write_jpeg(path: Path, image: Image.Image) -> None:
    image.save(path, "JPEG", quality=90)


def make_data(root: Path, num_4k: int, num_mix: int) -> tuple[list[Path], list[Path]]:
    four_k = []
    for i in range(num_4k):
        path = root / "4k" / f"img{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jpeg(path, photo_like((3840, 2160), i))
        four_k.append(path)
    rng = np.random.default_rng(0)
    mix = []
    # Web-crawl-like: 80 % below 1K on the short side, 15 % 1K–2K, 5 % 4K.
    for i in range(num_mix):
        u = rng.random()
        if u < 0.05:
            mix.append(four_k[i % len(four_k)])
            continue
        short = int(rng.integers(200, 1000)) if u < 0.85 else int(rng.integers(1024, 1600))
        size = (int(short * rng.uniform(1.0, 1.8)), short)
        path = root / "mix" / f"img{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jpeg(path, photo_like(size, 1000 + i))
        mix.append(path)
    return four_k, mix


def records(paths: list[Path]) -> list[dict]:
    out = []
    for path in paths:
        source = f"file://{path}"
        out.append({"key": key_for(source + str(len(out))), "source": source, "caption_orig": None})
    return out


def timed(fn, repeats: int = 2) -> float:
    """Best wall time of ``repeats`` calls (the cores are shared; the minimum is the least disturbed)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def header_scan(paths: list[Path], out: Path) -> None:
    tiers = TierConfig()
    rows = []
    for path in paths:
        with open(path, "rb") as f:
            header = stages.scan_header(f, num_bytes=os.fstat(f.fileno()).st_size)
        row = {"key": path.name, "source": str(path), "status": "kept"} | header
        tier = stages.assign_tier(header["width"], header["height"], tiers)
        rows.append(
            row | ({"tier": tier} if isinstance(tier, str) else {"status": "rejected", "reason": tier.reason})
        )
    ManifestWriter(out, "images").write(rows, "part-00000")


def pass2(paths: list[Path], scorer: AestheticScorer, clip_size: int) -> list[dict]:
    """What the job does per image after the header: ScanAndDecode.process, then the scorer."""
    stage = ScanAndDecode(TierConfig(), DecodeConfig(), clip_size=clip_size)
    rows = [stage.process(r) for r in records(paths)]
    return scorer(pa.Table.from_pylist(rows, schema=SCANNED)).to_pylist()


def full_decode_baseline(paths: list[Path]) -> None:
    for path in paths:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            w, h = im.size
            im.resize(
                (round(w * CLIP_SIDE / min(w, h)), round(h * CLIP_SIDE / min(w, h))), Image.Resampling.BICUBIC
            )


def draft_loop(paths: list[Path]) -> None:
    for path in paths:
        with Image.open(path) as im:
            im.draft("RGB", (im.width // 8, im.height // 8))
            im.load()


def cpu_path(paths: list[Path], cfg: AestheticConfig, out: Path) -> None:
    """The whole job (listing → scan → decode → score → dedup → shards → manifest) with the local executor:
    the same phase functions as the Ray job, serially in this process (one core)."""
    run(
        CurationConfig(
            inputs=[str(p) for p in paths], output=str(out), aesthetic=cfg, report=False, executor="local"
        )
    )


def img2dataset_run(paths: list[Path], root: Path, port: int, out: Path) -> None:
    urls = root / f"urls-{out.name}.txt"
    urls.write_text("".join(f"http://127.0.0.1:{port}/{p.relative_to(root)}\n" for p in paths))
    code = (
        "from img2dataset import download; "
        f"download(url_list={str(urls)!r}, output_folder={str(out)!r}, output_format='webdataset', "
        "resize_mode='no', skip_reencode=True, min_image_size=1024, processes_count=1, thread_count=8, "
        "enable_wandb=False, disallowed_header_directives=[])"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-4k", type=int, default=16)
    parser.add_argument("--num-mix", type=int, default=200)
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[0]})
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench_curation_"))
    four_k, mix = make_data(root, args.num_4k, args.num_mix)
    mix = list(dict.fromkeys(mix))  # each file once: the job keys inputs by their source
    clip_dir = build_tiny_clip(root / "models")
    cfg = AestheticConfig(clip_model=f"local-dir:{clip_dir}", pretrained=None, head=str(HEAD), min_score={})
    scorer, clip_size = AestheticScorer(cfg), clip_image_size(cfg.clip_model)
    for path in four_k + mix:  # page cache
        path.read_bytes()

    results = {}
    scan_set = mix * 5
    results["scan"] = len(scan_set) / timed(lambda: header_scan(scan_set, root / "scan"), 3)
    for name, paths in (("4k", four_k), ("mix", mix)):
        results[f"pass2_{name}"] = len(paths) / timed(lambda p=paths: pass2(p, scorer, clip_size))
        results[f"full_{name}"] = len(paths) / timed(lambda p=paths: full_decode_baseline(p))
        results[f"draft_{name}"] = len(paths) / timed(lambda p=paths: draft_loop(p))

    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(root)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        preexec_fn=lambda: os.sched_setaffinity(0, {cores[-1]}),
    )  # fmt: skip
    port = int(server.stdout.readline().split("port ")[1].split()[0])
    counter = iter(range(1000))  # a fresh output folder per timed call
    try:
        # img2dataset's fixed cost (interpreter, imports, process pool) on a one-URL list, subtracted below
        # so that small benchmark sets do not flatter us.
        i2d_fixed = timed(lambda: img2dataset_run(mix[:1], root, port, root / f"i2d-fixed-{next(counter)}"))
        results["i2d_fixed_s"] = i2d_fixed
        # The same for our job's fixed cost per run (listing, chunk plan, DuckDB phases, card): one input.
        cpu_fixed = timed(lambda: cpu_path(four_k[:1], cfg, root / f"cpu-fixed-{next(counter)}"))
        results["cpu_fixed_s"] = cpu_fixed
        for name, paths in (("4k", four_k), ("mix", mix)):
            seconds = timed(lambda p=paths, n=name: cpu_path(p, cfg, root / f"cpu-{n}-{next(counter)}"))
            results[f"cpu_{name}"] = len(paths) / max(seconds - cpu_fixed, 1e-3)
            seconds = timed(
                lambda p=paths, n=name: img2dataset_run(p, root, port, root / f"i2d-{n}-{next(counter)}")
            )
            results[f"i2d_{name}"] = len(paths) / max(seconds - i2d_fixed, 1e-3)
    finally:
        server.terminate()
    md = render(results, args, four_k)
    shutil.rmtree(root, ignore_errors=True)
    print(md)
    if not args.no_write:
        write_section("curation", md)


def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    return next(
        (line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?"
    )


def render(r: dict[str, float], args: argparse.Namespace, four_k: list[Path]) -> str:
    mb = np.mean([p.stat().st_size for p in four_k]) / 1e6
    return f"""## Curation: throughput per core

Command: `python -m bench.bench_curation --num-4k {args.num_4k} --num-mix {args.num_mix}`

Machine: {lscpu_model()}, {os.cpu_count()} cores visible (shared with other jobs); this process pinned to one
core, torch 1 thread; the loopback HTTP server for img2dataset on another core. Best of 2–3 timed repeats.
Data: {args.num_4k} photo-like 3840×2160 JPEGs (quality 90, mean {mb:.1f} MB) and a web-like mix of
{args.num_mix} JPEGs (80 % short side < 1K, 15 % 1K–1.6K, 5 % the 4K files). Scorer: the tiny 64 px CLIP
(the ViT-L/14 cost is a GPU number, `bench/gpu_clip.py`), with the real LAION head.

| measurement | images/s/core | ratio |
|---|---:|---|
| 1. header scan + tier + manifest write (mix, page cache) | {r["scan"]:.0f} | goal ≥ 5000 |
| 2. pass 2, 4K (reduced decode + sha256 + pHash + thumbnail + tiny CLIP) | {r["pass2_4k"]:.1f} | {r["pass2_4k"] / r["full_4k"]:.2f}× full decode (goal ≥ 4×); {r["pass2_4k"] / r["draft_4k"]:.0%} of bare draft loop (goal ≥ 80 %) |
| — baseline: full Pillow decode + resize, 4K | {r["full_4k"]:.1f} | |
| — bare Pillow draft-decode loop (1/8), 4K | {r["draft_4k"]:.1f} | |
| 2. pass 2, mix | {r["pass2_mix"]:.1f} | {r["pass2_mix"] / r["full_mix"]:.2f}× full decode; {r["pass2_mix"] / r["draft_mix"]:.0%} of draft loop |
| — full decode, mix / draft loop, mix | {r["full_mix"]:.1f} / {r["draft_mix"]:.1f} | |
| 3. whole CPU path (listing → scan → decode → score → dedup → shards → manifest), 4K, net of its {r["cpu_fixed_s"]:.1f} s per run | {r["cpu_4k"]:.1f} | {r["cpu_4k"] / r["i2d_4k"]:.2f}× img2dataset (goal ≥ 2×) |
| — img2dataset on loopback (`resize_mode=no`, `skip_reencode=True`, `min_image_size=1024`), 4K, net of its {r["i2d_fixed_s"]:.1f} s start-up | {r["i2d_4k"]:.1f} | |
| 3. whole CPU path, mix | {r["cpu_mix"]:.1f} | {r["cpu_mix"] / r["i2d_mix"]:.2f}× img2dataset |
| — img2dataset on loopback, mix | {r["i2d_mix"]:.1f} | |

The whole CPU path here is the job itself (`curation.pipeline.run` with `executor="local"`: the same phase
functions as the Ray job, serially in one process), net of its fixed cost per run measured on a one-image
input; a Ray run adds a fixed start-up (cluster join, actor model load), measured in "Curation: the Ray job
vs img2dataset". img2dataset's time is net of its fixed start-up (measured on a one-URL list in the same
run) and includes HTTP transfer on loopback; ours reads local files. Each of its runs uses 1 process, 8
threads. With 24 4K images img2dataset's net time is a difference of a few seconds over its ~11 s start-up,
so its 4K figure varies severalfold between runs on this shared machine; the mix rows rest on larger
differences.
"""


if __name__ == "__main__":
    main()
