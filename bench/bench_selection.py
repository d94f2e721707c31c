"""Selection benchmark: DuckDB queries over a synthetic 10M-row manifest, and shard materialisation.

Run from the repository root:  python -m bench.bench_selection [--rows 10000000] [--images 256]
The synthetic manifest (seeded) is cached under --cache (default /tmp/pixsigma_bench/selection) and reused
while its row count and seed match. Writes its markdown section into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

import manifests
from bench.record import write_section
from manifests.materialize import MaterializeConfig, materialize
from manifests.selection import SelectionSpec, select
from manifests.tars import json_bytes, write_shard

ROWS_PER_PART = 1_000_000
REASONS = (
    "too_small",
    "duplicate",
    "unreadable: truncated",
    "aspect_ratio",
    "too_many_pixels",
    "animated: 4 frames",
)
_HEX = np.frombuffer(b"".join(f"{i:02x}".encode() for i in range(256)), np.uint8).reshape(256, 2)
_WORDS = (
    "a photo of red blue green old young small large wooden glass mountain river city street dog cat bird "
    "woman man child house car tree flower sky sunset night beach forest painting portrait close-up view "
    "with in on under near at the of and bright dark misty snowy sunny rainy golden"
).split()

QUERIES = {
    "counts per tier and reason": (
        "SELECT status, tier, split_part(reason, ':', 1) AS reason, count(*) FROM images GROUP BY ALL"
    ),
    "aesthetic quantiles per tier": (
        "SELECT tier, quantile_cont(aesthetic, [0.1, 0.5, 0.9]) FROM images WHERE status = 'kept' GROUP BY tier"
    ),
    "caption-length stats": (
        "SELECT captioner, count(*), avg(num_tokens), quantile_cont(length(caption), 0.5), max(num_tokens) "
        "FROM captions WHERE status = 'kept' GROUP BY captioner"
    ),
    "image–caption join (per tier: rows, with VLM caption, mean length)": (
        "SELECT tier, count(*), count(caption_vlm), avg(length(caption_vlm)) FROM image_captions GROUP BY tier"
    ),
    "filtered selection with 10 % sample (to Arrow)": SelectionSpec(
        "bench", "tier = '4k' AND aesthetic >= 5.5 AND caption_vlm IS NOT NULL", sample_fraction=0.1, seed=0
    ).sql(),
    "shards view (curated shard → count per tier)": "SELECT count(*), sum(num_samples) FROM shards",
}


def hex_strings(rng: np.random.Generator, n: int, num_bytes: int) -> pa.Array:
    """``n`` random lowercase hex strings of ``2 * num_bytes`` characters, built without Python strings."""
    chars = _HEX[rng.integers(0, 256, (n, num_bytes), dtype=np.uint8)].reshape(-1)
    offsets = np.arange(0, n + 1, dtype=np.int32) * (2 * num_bytes)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(chars)])


def caption_pool(rng: np.random.Generator, size: int = 50_000) -> pa.Array:
    lengths = rng.integers(4, 60, size)
    return pa.array([" ".join(rng.choice(_WORDS, n)) for n in lengths])


def synthetic_part(part: int, n: int, seed: int, pool: pa.Array) -> tuple[pa.Table, pa.Table]:
    """One part of the images manifest and its captions (85 % kept; 95 % of kept have a VLM caption)."""
    rng = np.random.default_rng([seed, part])
    keys = hex_strings(rng, n, 10)
    kept = rng.random(n) < 0.85
    status = np.where(kept, "kept", "rejected")
    reason = pa.array(np.array(REASONS)[rng.integers(0, len(REASONS), n)], mask=kept)
    tier = pa.array(np.where(rng.random(n) < 0.1, "4k", "1k"), mask=~kept)
    shard_no = np.arange(n) // 1000 + part * (n // 1000 + 1)
    shard = pc.binary_join_element_wise(
        "shards/curated/", tier, "/", pa.array(shard_no.astype(str)), ".tar", ""
    )
    short = rng.integers(1024, 2160, n)
    long = (short * rng.uniform(1.0, 2.0, n)).astype(np.int32)
    portrait = rng.random(n) < 0.3
    images = pa.table(
        {
            "key": keys,
            "source": pc.binary_join_element_wise("file:///data/", keys, ".jpg", ""),
            "status": status,
            "reason": reason,
            "width": np.where(portrait, short, long).astype(np.int32),
            "height": np.where(portrait, long, short).astype(np.int32),
            "format": np.where(rng.random(n) < 0.8, "JPEG", "PNG"),
            "num_bytes": rng.integers(100_000, 8_000_000, n),
            "sha256": hex_strings(rng, n, 32),
            "tier": tier,
            "shard": shard,
            "caption_orig": pool.take(pa.array(rng.integers(0, len(pool), n))),
            "aesthetic": pa.array(rng.normal(5.5, 0.8, n).astype(np.float32), mask=~kept),
            "aesthetic_model": pa.array(np.full(n, "laion-aesthetic-v2"), mask=~kept),
            "clip_model": pa.array(np.full(n, "ViT-L-14/openai"), mask=~kept),
            "phash": rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64),
        }
    )
    captioned = kept & (rng.random(n) < 0.95)
    m = int(captioned.sum())
    captions = pa.table(
        {
            "key": keys.filter(pa.array(captioned)),
            "caption": pool.take(pa.array(rng.integers(0, len(pool), m))),
            "captioner": np.full(m, "llava-v1.6-34b@abc123"),
            "prompt": np.full(m, "Describe this image and its style in a very detailed manner."),
            "num_tokens": rng.integers(10, 300, m).astype(np.int32),
            "truncated": rng.random(m) < 0.01,
            "status": np.full(m, "kept"),
            "seconds": rng.uniform(0.5, 2.0, m).astype(np.float32),
        }
    )
    return images, captions


def build_manifest(root: Path, num_rows: int, seed: int) -> float:
    """Write (or reuse) the synthetic manifest under ``root``; returns the seconds spent generating."""
    stamp = root / "bench_manifest.json"
    wanted = {"rows": num_rows, "seed": seed, "rows_per_part": ROWS_PER_PART}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return 0.0
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    pool = caption_pool(np.random.default_rng(seed))
    images = manifests.ManifestWriter(root / "manifests" / "images", "images")
    captions = manifests.ManifestWriter(root / "manifests" / "captions", "captions")
    for part, first in enumerate(range(0, num_rows, ROWS_PER_PART)):
        image_table, caption_table = synthetic_part(part, min(ROWS_PER_PART, num_rows - first), seed, pool)
        images.write(image_table, f"part-{part:05d}")
        captions.write(caption_table, f"part-{part:05d}")
    stamp.write_text(json.dumps(wanted))
    return time.perf_counter() - start


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def time_queries(root: Path, repeats: int) -> list[tuple[str, float, int]]:
    """(query name, best seconds, result rows) per query, on a connection limited to 2 threads."""
    con = manifests.connect(root)
    con.execute("SET threads = 2")
    results = []
    for name, sql in QUERIES.items():
        num_rows = con.sql(sql).to_arrow_table().num_rows  # warm-up (file metadata, OS cache)
        results.append((name, best_of(lambda sql=sql: con.sql(sql).to_arrow_table(), repeats), num_rows))
    return results


def jpeg(rng: np.random.Generator, height: int, width: int) -> bytes:
    """A smooth gradient with noise (compresses like a photo, unlike pure noise)."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], -1)
    pixels = np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def build_image_run(root: Path, num_images: int, seed: int) -> None:
    """A small curated run: ~1024-short-side JPEGs in curated shards, manifests with both captions."""
    rng = np.random.default_rng(seed)
    pool = caption_pool(rng, 1000).to_pylist()
    shapes = ((1024, 1024), (1024, 1536), (1536, 1024), (1024, 1792), (1280, 1024))
    rows, samples = [], []
    for i in range(num_images):
        height, width = shapes[i % len(shapes)]
        data = jpeg(rng, height, width)
        key = f"{i:020x}"
        rows.append(
            {"key": key, "source": f"file:///{key}.jpg", "status": "kept", "width": width, "height": height,
             "format": "JPEG", "num_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "tier": "1k",
             "shard": f"shards/curated/1k/1k-{i // 64:06d}.tar", "caption_orig": pool[i % 1000]}
        )  # fmt: skip
        samples.append({"__key__": key, "jpg": data, "json": json_bytes({"key": key})})
    for n, start in enumerate(range(0, num_images, 64)):
        write_shard(root / f"shards/curated/1k/1k-{n:06d}.tar", samples[start : start + 64])
    manifests.ManifestWriter(root / "manifests" / "images", "images").write(rows, "part-00000")
    captions = [
        {
            "key": r["key"],
            "caption": pool[(i * 7) % 1000],
            "captioner": "vlm",
            "prompt": "p",
            "status": "kept",
        }
        for i, r in enumerate(rows)
    ]
    manifests.ManifestWriter(root / "manifests" / "captions", "captions").write(captions, "part-00000")
    select(root, SelectionSpec("bench"))


def time_materialize(root: Path, models: Path, repeats: int) -> list[tuple[str, float]]:
    """(configuration, best seconds) for shards without features, with T5, with T5 + VAE at 256."""
    configs = {
        "no features": {},
        "T5 (tiny) caption features": {"t5": str(models / "t5")},
        "T5 + VAE@256 (tiny) features": {"t5": str(models / "t5"), "vae": str(models / "vae"),
                                          "vae_resolutions": (256,)},
    }  # fmt: skip
    results = []
    for label, extra in configs.items():

        def run(extra=extra) -> None:
            shutil.rmtree(root / "train_shards" / "bench", ignore_errors=True)
            materialize(
                MaterializeConfig(
                    root=str(root), selection="bench", samples_per_shard=64, num_workers=2, **extra
                )
            )

        results.append((label, best_of(run, repeats)))
    return results


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    return next(
        (line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "pixsigma_bench" / "selection"
    )
    parser.add_argument("--images", type=int, default=384, help="images in the materialisation run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print the section, leave docs/ alone")
    args = parser.parse_args(argv)
    for key, value in {
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }.items():
        os.environ.setdefault(key, value)  # a CLI, not library code: offline before ray/transformers start

    manifest_root = args.cache / f"manifest_{args.rows}_{args.seed}"
    gen_seconds = build_manifest(manifest_root, args.rows, args.seed)
    size_mb = sum(p.stat().st_size for p in manifest_root.glob("manifests/*/*.parquet")) / 1e6
    queries = time_queries(manifest_root, args.repeats)
    start = time.perf_counter()
    select(manifest_root, SelectionSpec("bench", "tier = '4k' AND aesthetic >= 6.5", sample_fraction=0.5))
    select_seconds = time.perf_counter() - start

    from training.tiny import build_tiny_t5, build_tiny_vae  # the bench's tiny models, built offline

    with tempfile.TemporaryDirectory(prefix="bench_sel") as tmp:
        tmp = Path(tmp)
        build_tiny_t5(tmp / "models")
        build_tiny_vae(tmp / "models")
        build_image_run(tmp / "run", args.images, args.seed)
        import ray

        ray.init(num_cpus=2, log_to_driver=False, configure_logging=False, include_dashboard=False)
        shard_times = time_materialize(tmp / "run", tmp / "models", max(1, args.repeats - 1))
        ray.shutdown()

    num_parts = -(-args.rows // ROWS_PER_PART)
    command = "python -m bench.bench_selection " + shlex.join(sys.argv[1:] if argv is None else argv)
    lines = [
        "## Selection: DuckDB over a 10M-row manifest, and training-shard materialisation",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} logical CPUs (shared with other jobs); DuckDB "
        f"{duckdb.__version__} with `threads = 2`; best of {args.repeats} after one warm-up.",
        "",
        f"Synthetic manifest: {args.rows:,} `images` rows (85 % kept, 10 % of kept 4k) and their `captions` "
        f"(95 % of kept), seed {args.seed}, {num_parts} zstd Parquet parts per manifest, "
        f"{size_mb:.0f} MB in all"
        + (f", generated in {gen_seconds:.0f} s." if gen_seconds else " (reused from the cache)."),
        "",
        "| query | seconds | result rows | goal < 2 s |",
        "|---|---:|---:|:---:|",
        *[f"| {name} | {sec:.2f} | {n:,} | {'yes' if sec < 2 else 'no'} |" for name, sec, n in queries],
        f"| `select()` end to end: query, write rows.parquet, sha256 of {2 * num_parts} "
        f"input parts | {select_seconds:.2f} | | {'yes' if select_seconds < 2 else 'no'} |",
        "",
        f"Materialisation: {args.images} JPEGs of 1024–1792 px (short side 1024) → training shards of 64, "
        "2 plain Ray actors (manifests.actors) on 2 CPUs, tiny T5 (d_model 32) and tiny VAE (8× down) on CPU; each time "
        f"includes the actors' start and model loads; best of {max(1, args.repeats - 1)}.",
        "",
        "| configuration | seconds | images/s | time vs no features |",
        "|---|---:|---:|---:|",
        *[
            f"| {label} | {sec:.2f} | {args.images / sec:.1f} | {sec / shard_times[0][1]:.2f}× |"
            for label, sec in shard_times
        ],
        "",
        "Tiny encoders make the feature columns a measure of the pipeline's own cost (decode, resize-to-cover "
        "+ crop, tokenise, npy packing) rather than of T5-XXL or the SDXL VAE, which run on GPU actors "
        "(`--num-gpus`) in a real run.",
    ]
    markdown = "\n".join(lines)
    print(markdown)
    if not args.no_write:
        write_section("selection", markdown)


if __name__ == "__main__":
    main()
