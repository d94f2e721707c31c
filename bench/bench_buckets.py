"""Simulation benchmark: how full are the bucket sampler's batches at each sigma stage (issue 20)?

Run from the repository root:  python -m bench.bench_buckets [--samples 20000] [--replay 3000]

20k simulated samples with a web-like aspect mix and 50/50 short (alt text, 10–40 tokens) / long (300-token
VLM) captions whose cached T5-XXL states are fp16 (4096 channels: 8 KiB per token), and SDXL latent
posteriors (fp16, 2 × 4 × h/8 × w/8) at the stage's bucket. Per stage of configs/sigma.toml (resolution,
batch size, default ``bucket_buffer_mb``), the same sample sequence goes through

* before: the sampler of main 3194f92 (``old_bucket_batches`` below, kept verbatim as the baseline): decoded
  samples (T5 states + float32 latent) wait in the bucket buffers; past the budget the OLDEST bucket
  yields a short batch;
* after: ``training.data.bucket_batches`` as the planner runs it: selected samples whose heavy members are
  ``MemberRef``s (file, offset, size; nothing read) wait, sized by ``raw_nbytes``; past the budget the
  SMALLEST bucket yields.

The stream is endless in training, so the remainders still waiting when the input ends are not batches:
they are reported as "left waiting". Then the cost of that design on resume: the planner replays a
stage's batches reading tar headers and JSON only (``make_stream(skip=N)``), timed on local shards.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
import tomllib
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from bench.bench_model import cpu_name
from bench.record import write_section
from manifests.buckets import nearest_bucket
from manifests.tars import json_bytes, npy_bytes, write_shard
from training.config import DataSection
from training.data import MIB, MemberRef, bucket_batches, make_stream, max_waiting_samples, raw_nbytes

SIGMA_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sigma.toml"
T5_CHANNELS = 4096  # T5-XXL d_model; cached fp16 → 8 KiB per token
LATENT_CHANNELS = 4  # SDXL VAE
# A web-like mix of aspect ratios (h/w): mostly landscape photos, some square and portrait, a long tail
# (the mix of tests/training/test_data.py).
COMMON = {3 / 4: 0.30, 2 / 3: 0.20, 1.0: 0.15, 9 / 16: 0.12, 4 / 3: 0.08, 3 / 2: 0.05}
WORDS = "a photo of the red old wooden house near river at sunset with trees and people walking".split()


def simulated_images(num: int, *, long_share: float, seed: int = 0) -> list[dict]:
    """(height, width, caption tokens, caption text) per sample; ``long_share`` of them 300-token captions."""
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        if rng.random() < sum(COMMON.values()):
            ratio = rng.choices(list(COMMON), weights=list(COMMON.values()))[0]
        else:  # the tail: log-uniform over PixArt's 1:4 … 4:1 range
            ratio = 4 ** rng.uniform(-1, 1)
        side = rng.randint(512, 4096)
        height, width = max(1, round(side * math.sqrt(ratio))), max(1, round(side / math.sqrt(ratio)))
        tokens = 300 if rng.random() < long_share else rng.randint(10, 40)
        caption = " ".join(rng.choice(WORDS) for _ in range(round(tokens * 0.8)))  # ~1.25 T5 tokens a word
        out.append({"height": height, "width": width, "tokens": tokens, "caption": caption})
    return out


class SimSample:
    """A decoded sample as the old sampler held it: T5 states (fp16) + sampled latent (float32)."""

    def __init__(self, bucket: tuple[int, int], tokens: int) -> None:
        self.bucket = bucket
        latent = LATENT_CHANNELS * (bucket[0] // 8) * (bucket[1] // 8) * 4
        self.nbytes = 256 + tokens * T5_CHANNELS * 2 + latent  # as training.data.Sample.nbytes counts


def old_bucket_batches(
    samples: Iterable[SimSample], batch_size: int, *, max_buffered: int, max_bytes: float = math.inf
) -> Iterator[list[SimSample]]:
    """main 3194f92's training.data.bucket_batches: past the budget the OLDEST waiting bucket yields."""
    buffers: OrderedDict[tuple[int, int], list[SimSample]] = OrderedDict()
    num_buffered = held = 0
    for sample in samples:
        bucket = buffers.setdefault(sample.bucket, [])
        bucket.append(sample)
        num_buffered += 1
        held += sample.nbytes
        if len(bucket) == batch_size:
            del buffers[sample.bucket]
            num_buffered -= batch_size
            held -= sum(s.nbytes for s in bucket)
            yield bucket
        while buffers and (num_buffered > max_buffered or held > max_bytes):
            _, oldest = buffers.popitem(last=False)
            num_buffered -= len(oldest)
            held -= sum(s.nbytes for s in oldest)
            yield oldest


def planned_sample(index: int, image: dict, resolution: int) -> dict:
    """A selected raw sample as the planner holds it: JSON (both captions) + references to the heavy members."""
    bucket = nearest_bucket(image["height"], image["width"], resolution)
    meta = {"key": f"{index:09d}", "height": image["height"], "width": image["width"],
            "caption_orig": image["caption"][:200], "caption_vlm": image["caption"],
            "buckets": {str(resolution): list(bucket)}}  # fmt: skip
    url = "/data/train_shards/sigma/train-000123.tar"
    latent = 2 * LATENT_CHANNELS * (bucket[0] // 8) * (bucket[1] // 8) * 2 + 128
    return {"__key__": meta["key"], "__url__": url, "meta": meta, "which": "vlm", "bucket": bucket,
            "json": json_bytes(meta), "t5.npy": MemberRef(url, 512 * index, image["tokens"] * T5_CHANNELS * 2 + 128),
            f"vae{resolution}.npy": MemberRef(url, 512 * index + 1, latent)}  # fmt: skip


def stats(batches: list[list], batch_size: int, num_fed: int, peak_bytes: int) -> dict:
    sizes = [len(b) for b in batches]
    emitted = sum(sizes)
    return {
        "full": sum(s == batch_size for s in sizes) / len(sizes),
        "mean": statistics.fmean(sizes),
        "median": statistics.median(sizes),
        "in_partial": sum(s for s in sizes if s < batch_size) / emitted,
        "steps": len(sizes),
        "left": num_fed - emitted,
        "peak_mib": peak_bytes / MIB,
    }


def run_stage(images: list[dict], resolution: int, batch_size: int, budget_mb: float) -> dict[str, dict]:
    """Before and after on the same samples; the buffers' peak bytes from what was fed minus what left.

    Batches yielded once the input is exhausted are the remainders a finite input ends with; the training
    stream is endless, so they are counted as left waiting, not as batches.
    """
    max_buffered = max_waiting_samples(batch_size)  # as both samplers' streams set it
    old_input = [SimSample(nearest_bucket(i["height"], i["width"], resolution), i["tokens"]) for i in images]
    new_input = [planned_sample(n, i, resolution) for n, i in enumerate(images)]
    runs = {
        "before": (old_input, lambda s: s.nbytes,
                   lambda f: old_bucket_batches(f, batch_size, max_buffered=max_buffered, max_bytes=budget_mb * MIB)),
        "after": (new_input, raw_nbytes,
                  lambda f: bucket_batches(f, batch_size, max_buffered=max_buffered, max_bytes=budget_mb * MIB,
                                           bucket_of=lambda r: r["bucket"], nbytes_of=raw_nbytes)),
    }  # fmt: skip
    out = {}
    for name, (samples, nbytes, sampler) in runs.items():
        state = {"held": 0, "peak": 0, "exhausted": False}

        def feed(samples=samples, nbytes=nbytes, state=state):
            for s in samples:
                state["held"] += nbytes(s)
                state["peak"] = max(state["peak"], state["held"])
                yield s
            state["exhausted"] = True

        batches = []
        for batch in sampler(feed()):
            if state["exhausted"]:
                break
            state["held"] -= sum(map(nbytes, batch))
            batches.append(batch)
        out[name] = stats(batches, batch_size, len(samples), state["peak"])
    return out


def sigma_stages() -> list[tuple[str, int, int]]:
    """(name, resolution, batch size) of each stage of configs/sigma.toml."""
    cfg = tomllib.loads(SIGMA_CONFIG.read_text())
    return [(s["name"], s["resolution"], s["batch_size"]) for s in cfg["stages"]]


def replay_rate(tmp: Path, *, num_samples: int) -> dict:
    """Batches/s and samples/s the planner replays on resume (headers + JSON; 3 referenced members a sample)."""
    rng = np.random.default_rng(0)
    per_shard = 500
    for first in range(0, num_samples, per_shard):
        samples = []
        for index in range(first, min(first + per_shard, num_samples)):
            h, w = rng.choice([(1024, 1024), (768, 1344), (1344, 768)])
            bucket = nearest_bucket(int(h), int(w), 1024)
            meta = {"key": f"{index:09d}", "height": int(h), "width": int(w), "caption_orig": "alt text " * 5,
                    "caption_vlm": "a long VLM caption " * 60, "buckets": {"1024": list(bucket)}}  # fmt: skip
            member = npy_bytes(np.zeros(2048, np.float16))  # 4 KiB: referenced, never read when replaying
            samples.append({"__key__": meta["key"], "json": json_bytes(meta), "t5_orig.npy": member,
                            "t5_vlm.npy": member, "vae1024.npy": member})  # fmt: skip
        write_shard(tmp / f"train-{first // per_shard:06d}.tar", samples)
    batch_size = 12
    num_batches = num_samples // batch_size // 2  # the resampled stream revisits shards; stay well inside
    started = time.perf_counter()
    make_stream(str(tmp), resolution=1024, batch_size=batch_size, seed=0, rank=0, skip=num_batches,
                shuffle_buffer=1000)  # fmt: skip
    seconds = time.perf_counter() - started
    return {"batches": num_batches, "seconds": seconds, "samples_per_s": num_batches * batch_size / seconds}


def markdown(rows: list[tuple[str, int, dict]], replay: dict, args: argparse.Namespace, budget: float) -> str:
    name, threads = cpu_name()
    load = os.getloadavg()[0]
    lines = [
        "## Bucket sampler: full batches at the sigma stages (simulation, issue 20)",
        "",
        f"Command: `{shlex.join(['python', '-m', 'bench.bench_buckets', *sys.argv[1:]])}`",
        "",
        f"Machine: {name} ({platform.machine()}), {threads} torch threads; 1-minute load average {load:.1f} "
        "(2 cores shared with other engineers' jobs; the table is a count, not a timing). "
        f"{args.samples} simulated samples per row (web-like aspect mix, 50/50 alt-text 10–40-token / 300-token "
        "captions, cached T5-XXL fp16 at 8 KiB per token, SDXL posteriors fp16), fed in the same order to the "
        f"sampler of main 3194f92 (before) and to this one (after), each with the default bucket_buffer_mb = "
        f"{budget:g} and configs/sigma.toml's batch size. Full = batches of the stage's batch size, over all "
        "batches the stream yielded; left = samples still waiting when the input ended (an endless stream keeps "
        "them); peak = the most bytes the bucket buffers held.",
        "",
        "| stage | batch | sampler | full batches | mean size | median size | samples in partial batches "
        "| steps | left | peak MiB |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, batch_size, result in rows:
        for which in ("before", "after"):
            r = result[which]
            lines.append(
                f"| {label} | {batch_size} | {which} | {100 * r['full']:.1f} % | {r['mean']:.1f} | {r['median']:g} | "
                f"{100 * r['in_partial']:.1f} % | {r['steps']} | {r['left']} | {r['peak_mib']:.1f} |"
            )
    lines += [
        "",
        "Before, the decoded T5 states (~2.4 MiB for a 300-token caption) fill 256 MiB with ~200 samples, fewer "
        "than one batch per active bucket at 256/512 px, and the oldest bucket leaves short. After, a waiting "
        "sample is its JSON and two references, T5 states and latent (~1–4 KiB): the same budget holds tens of "
        "thousands, so no bucket is evicted at these batch sizes and every batch is full; the features are read "
        "when the batch is complete. The before rows are harsher than the issue's table (31 / 56 / 97 % full at 256 / 512 / "
        "1024 px) at the same budget: the issue does not state its short-caption length or image-size mix, and "
        "here alt texts have 10–40 tokens and the remainders of a finite input are not counted as batches.",
        "",
        "The price is paid on resume: the planner replays the stage's batches from its start, reading tar "
        f"headers and JSON only: {replay['batches']} batches of 12 ({replay['batches'] * 12} samples, 3 "
        f"referenced members each, after a 1000-sample shuffle buffer filled) in {replay['seconds']:.2f} s, "
        f"{replay['samples_per_s']:.0f} samples/s on this loaded machine (local disk, page cache warm). At that "
        "rate a resume at the end of the 10,000-step 512 px stage (480k samples per rank, ranks in parallel) "
        f"replays for ~{480_000 / replay['samples_per_s'] / 60:.1f} min, once per resume.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=20_000, help="simulated samples per row")
    parser.add_argument(
        "--replay", type=int, default=6_000, help="samples in the shards of the replay timing"
    )
    args = parser.parse_args()
    logging_quiet()
    budget = DataSection().bucket_buffer_mb
    mixed = simulated_images(args.samples, long_share=0.5)
    long_only = simulated_images(args.samples, long_share=1.0)
    rows = []
    for stage, resolution, batch_size in sigma_stages():
        rows.append(
            (f"{stage} ({resolution} px)", batch_size, run_stage(mixed, resolution, batch_size, budget))
        )
        if resolution == 256:
            label = f"{stage}, 300-token captions only"
            rows.append((label, batch_size, run_stage(long_only, resolution, batch_size, budget)))
        print(rows[-1][0], {k: f"{100 * v['full']:.1f} % full" for k, v in rows[-1][2].items()}, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        replay = replay_rate(Path(tmp), num_samples=args.replay)
    print(replay)
    path = write_section("buckets", markdown(rows, replay, args, budget))
    print(f"wrote {path}")


def logging_quiet() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)


if __name__ == "__main__":
    main()
