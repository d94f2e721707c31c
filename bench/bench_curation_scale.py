"""Growth of the post-scoring phases (thresholds → dedup → shard plan → manifest) on 1M–8M scored rows.

    python -m bench.bench_curation_scale [--rows 1000000 4000000 8000000] [--num-cpus 2]

Each size runs in a fresh process (so the driver's peak RSS is the phases' alone) on a private in-process
Ray cluster of ``--num-cpus`` CPUs, the phases as Ray tasks (``curation.executor.RayExecutor``), reading
synthetic scored chunks from Parquet (``curation.synthetic``: 70 % kept, 1 % byte copies, 1 % pHash
copies 1–4 bits away; chunk files of the job's default 4096 rows). Reported per size: seconds per phase,
driver and worker peak RSS, candidate pairs of the near search, duplicates found; then the growth
exponent between sizes and a 33M extrapolation on 16 cores. Writes its section of docs/benchmarks.md.
Shards are planned and named but not written (the synthetic rows have no image bytes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.record import write_section

TARGET_ROWS = 33_000_000
TARGET_CORES = 16
SERIAL_PHASES = ("dedup_resolve",)  # one task by design; the rest are partitioned


def generate(rows: int, folder: Path) -> list[dict]:
    """Write the synthetic scored chunks; returns their plan (paths and key ranges)."""
    from curation.config import CurationConfig
    from curation.synthetic import scored_table, write_chunks

    table = scored_table(rows, seed=rows)
    parts = write_chunks(table, folder, chunk_rows=CurationConfig.chunk_size)
    return [{"path": p.path, "lo": p.lo, "hi": p.hi, "num_rows": p.num_rows} for p in parts]


def measure(plan_file: Path, root: Path, num_cpus: int) -> dict:
    """Run the post-scoring phases on a private Ray cluster; return timings and peak RSS."""
    import ray

    from curation.config import AestheticConfig, CurationConfig, DedupConfig, ShardConfig
    from curation.executor import RayExecutor, peak_rss_mib
    from curation.phases import PostConfig, ScoredPart, post_scoring

    parts = [ScoredPart(**p) for p in json.loads(plan_file.read_text())]
    dedup, defaults = DedupConfig(), CurationConfig(inputs=["-"], output="-")
    cfg = PostConfig(
        min_score=AestheticConfig().min_score,
        max_hamming=dedup.max_hamming,
        phash_splits=dedup.phash_splits,
        semantic_threshold=None,  # synthetic rows carry no embeddings
        semantic_cluster_size=dedup.semantic_cluster_size,
        samples_per_shard=ShardConfig().samples_per_shard,
        rows_per_partition=defaults.manifest_rows_per_part,
        write_shards=False,
    )
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    driver_before = peak_rss_mib()
    started = time.perf_counter()
    result = post_scoring(parts, cfg, root=root, scratch=root / "scratch", executor=RayExecutor())
    seconds = time.perf_counter() - started
    ray.shutdown()
    return {
        "rows": sum(p.num_rows for p in parts),
        "seconds": seconds,
        "phases": result.seconds,
        "driver_peak_rss_mib": peak_rss_mib(),
        "driver_rss_before_mib": driver_before,
        "worker_peak_rss_mib": result.worker_peak_rss_mib,
        "dedup": result.counts["dedup"],
        "kept": result.counts["kept"],
        "shards": len(result.shards),
        "parts": result.num_parts,
    }


def dedup_layout(dedup) -> list:
    from curation.dedup import band_layout

    return band_layout(dedup.max_hamming, dedup.phash_splits)


def fit(rows: list[int], seconds: list[float]) -> float:
    """Least-squares exponent b of seconds ≈ a · rows^b."""
    return float(np.polyfit(np.log(rows), np.log(seconds), 1)[0])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 4_000_000, 8_000_000])
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md alone")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one size
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--render", type=Path, help="re-render saved results (JSON) without measuring")
    args = parser.parse_args(argv)
    if args.render:
        saved = json.loads(args.render.read_text())
        args.rows = [r["rows"] for r in saved["results"]]
        md = render(saved["results"], args, saved["load"])
        print(md)
        if not args.no_write:
            write_section("curation-scale", md)
        return
    if args.one:
        plan = args.work / "plan.json"
        if not plan.exists():
            plan.write_text(json.dumps(generate(args.one, args.work / "scored")))
            return
        print(json.dumps(measure(plan, args.work / "run", args.num_cpus)))
        return

    results = []
    load = [os.getloadavg()[0]]
    for rows in args.rows:
        work = Path(tempfile.mkdtemp(prefix=f"bench_scale_{rows}_"))
        try:
            command = [sys.executable, "-m", "bench.bench_curation_scale", "--one", str(rows), "--work", str(work),
                       "--num-cpus", str(args.num_cpus)]  # fmt: skip
            subprocess.run(command, check=True)  # generate, in its own process
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
            load.append(os.getloadavg()[0])
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"results": results, "load": load}), flush=True)  # for --render
    md = render(results, args, load)
    print(md)
    if not args.no_write:
        write_section("curation-scale", md)


def render(results: list[dict], args: argparse.Namespace, load: list[float]) -> str:
    from curation.config import DedupConfig

    dedup = DedupConfig()
    rows = [r["rows"] for r in results]
    seconds = [r["seconds"] for r in results]
    candidates = [r["dedup"].get("near_candidates", 0) for r in results]
    # Every distinct hash has 33 index entries per 32-bit band (itself and its 32 one-bit neighbours).
    entries = [33 * len(dedup_layout(dedup)) * r["dedup"].get("distinct_phash", 0) for r in results]
    exponent = fit(rows, seconds)
    candidate_exponent = fit(rows, [max(c, 1) for c in candidates])
    entry_exponent = fit(rows, [max(e, 1) for e in entries])
    serial = [sum(r["phases"].get(p, 0.0) for p in SERIAL_PHASES) for r in results]
    last = results[-1]
    distinct = max(1, last["dedup"].get("distinct_phash", 1))
    per_hash = candidates[-1] / distinct
    crossover = distinct * 66 / max(per_hash, 1e-9)
    growth = max(1.0, exponent)  # never extrapolate below linear, whatever the noise made of the fit
    scale = (TARGET_ROWS / last["rows"]) ** growth
    parallel_33m = (last["seconds"] - serial[-1]) * scale * args.num_cpus / TARGET_CORES
    serial_33m = serial[-1] * (TARGET_ROWS / last["rows"]) ** max(
        1.0, fit(rows, [max(s, 1e-3) for s in serial])
    )
    table = [
        "| rows | seconds | driver peak RSS | worker peak RSS | near-search index entries | candidate pairs "
        "checked | duplicates | kept | shards | seconds per phase |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r, n_entries in zip(results, entries, strict=True):
        phases = ", ".join(f"{k} {v:.0f}" for k, v in r["phases"].items())
        table.append(
            f"| {r['rows']:,} | {r['seconds']:.1f} | {r['driver_peak_rss_mib']:.0f} MiB | "
            f"{r['worker_peak_rss_mib']:.0f} MiB | {n_entries:,} | {r['dedup'].get('near_candidates', 0):,} | "
            f"{r['dedup'].get('duplicates', 0):,} | {r['kept']:,} | {r['shards']:,} | {phases} |"
        )
    ratios = ", ".join(
        f"{rows[i] // 1_000_000}M→{rows[i + 1] // 1_000_000}M: ×{seconds[i + 1] / seconds[i]:.2f} time for "
        f"×{rows[i + 1] / rows[i]:.0f} rows (N^{math.log(seconds[i + 1] / seconds[i]) / math.log(rows[i + 1] / rows[i]):.2f})"
        for i in range(len(rows) - 1)
    )
    return f"""## Curation at scale: post-scoring phases on 1M–8M rows

Command: `python -m bench.bench_curation_scale --rows {" ".join(map(str, args.rows))} --num-cpus {args.num_cpus}`

Machine: {os.cpu_count()} cores visible, shared with other engineers (1-minute load average {min(load):.1f}–{max(load):.1f}
during the run); a private Ray cluster of {args.num_cpus} CPUs, every phase as Ray tasks. Input: synthetic scored
chunks in Parquet (4096 rows each, 70 % kept, 1 % byte copies, 1 % pHash copies ≤ 4 bits away), default
config (`max_hamming` {dedup.max_hamming}, {dedup.phash_splits} split of 32-bit bands: exact; thresholds 5.0; partitions
of 100k rows; 1000 samples per shard). Thresholds → exact + near dedup → keepers → shard plan and names →
manifest parts; shards not written (no image bytes).

{chr(10).join(table)}

Growth: {ratios}; fitted exponent over all sizes **N^{exponent:.2f}** (goal ≤ 1.15; the shared machine's load
moved during the run, so read it as "about linear", not as sub-linear). Near search: its work, the index
entries sorted, is N^{entry_exponent:.2f} (33 per distinct hash and 32-bit band); the candidate pairs that share an entry
grow N^{candidate_exponent:.2f}: a 32-bit bucket holds 33·M/2³² entries of the M distinct hashes, so a hash meets
about 33²·M/2³² others ({per_hash:.2f} per distinct hash at {rows[-1] // 1_000_000}M, ~{per_hash * TARGET_ROWS / rows[-1]:.1f} at 33M), each checked with one
popcount, against 66 index entries per hash: the N² term overtakes the linear index work only near
{crossover / 1e6:.0f}M distinct hashes. Driver peak RSS is
{"flat" if max(r["driver_peak_rss_mib"] for r in results) < 1.2 * min(r["driver_peak_rss_mib"] for r in results) else "not flat"}
({", ".join(f"{r['driver_peak_rss_mib']:.0f}" for r in results)} MiB: plans and counts) against the goal of < 1 GB at 8M; worker
peak RSS grows slowly ({", ".join(f"{r['worker_peak_rss_mib']:.0f}" for r in results)} MiB), the near-search tasks holding every
distinct hash (8 bytes each, a few arrays: an estimated ~1.2 GB at 33M).

Extrapolated to {TARGET_ROWS // 1_000_000}M rows on {TARGET_CORES} cores: the partitioned phases
{parallel_33m / 60:.1f} min (the {last["rows"] // 1_000_000}M time × (33/{last["rows"] // 1_000_000})^{growth:.2f}, spread
from {args.num_cpus} to {TARGET_CORES} cores) + the single-task keeper phase {serial_33m / 60:.1f} min = **{(parallel_33m + serial_33m) / 60:.1f} min**
(goal < 60 min). Not included: scan + score (GPU-bound, per image) and listing.
"""


if __name__ == "__main__":
    main()
