"""Batched vs one-by-one captioning throughput: `python -m bench.bench_captioning [--model PATH] [--num-images N]`.

Without ``--model`` it builds the tiny LLaVA in a temporary folder. Every caption is forced to exactly
``--new-tokens`` tokens (``min_new_tokens``) so batch sizes compare equal work. Writes its section (images/s
per batch size and the ratio to batch size 1, measured in the same run) into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from bench.record import write_section
from captioning.captioner import generate_captions, load_vlm
from captioning.config import PROMPTS, ModelConfig
from captioning.tiny import build_tiny_llava


def images(num: int, size: tuple[int, int] = (336, 336)) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(num)]


def throughput(model, processor, batch: list[Image.Image], batch_size: int, new_tokens: int) -> float:
    """Images per second captioning ``batch`` in chunks of ``batch_size``."""
    gen = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    prompt = PROMPTS["share-captioner"]
    generate_captions(model, processor, batch[:batch_size], [prompt] * batch_size, gen)  # warm-up
    started = time.perf_counter()
    for i in range(0, len(batch), batch_size):
        chunk = batch[i : i + batch_size]
        generate_captions(model, processor, chunk, [prompt] * len(chunk), gen)
    return len(batch) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="VLM path or id (default: a freshly built tiny LLaVA)")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model or str(build_tiny_llava(tmp))
        processor, model = load_vlm(ModelConfig(model=model_path))
        batch = images(args.num_images)
        device = (
            torch.cuda.get_device_name()
            if torch.cuda.is_available()
            else f"CPU, {torch.get_num_threads()} threads"
        )
        command = " ".join(["python -m bench.bench_captioning", *map(shlex.quote, sys.argv[1:])])
        lines = [
            "## Captioning: batched generate vs one image at a time",
            "",
            f"Command: `{command}`",
            "",
            f"Machine: {platform.processor() or platform.machine()}, {device}; model {'tiny LLaVA (built offline)' if not args.model else model_path}, "
            f"{model.dtype}, {args.num_images} images, exactly {args.new_tokens} new tokens each (left padding).",
            "",
            "| batch size | images/s | × batch 1 |",
            "|---:|---:|---:|",
        ]
        base = None
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            rate = throughput(model, processor, batch, batch_size, args.new_tokens)
            base = base or rate
            lines.append(f"| {batch_size} | {rate:.1f} | {rate / base:.1f} |")
            print(lines[-1], flush=True)
    lines += [
        "",
        f"1-minute load average before/after: {load_before:.1f}/{os.getloadavg()[0]:.1f} (shared machine: noisy).",
    ]
    print(f"wrote {write_section('captioning', chr(10).join(lines))}")


if __name__ == "__main__":
    main()
