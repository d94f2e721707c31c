"""GPU benchmark: PixArt-XL/2 sampling time per image at 1K/2K/4K, with and without KV compression (bf16).

Run from the repository root on a CUDA machine (about 3 minutes on an H100; PixArt-Σ Table 4 is the anchor):
    python -m bench.gpu_sampling --output "$OUT/gpu_sampling.md"
Each image is what ``training.sample`` does: 20 DPM-Solver++ steps of the guided denoiser (prompt and
negative prompt in one batch of 2), random XL/2 weights (timings do not depend on them), 300 caption
tokens (180 valid), bf16 weights. The VAE decode is not included (no weights here; with the SDXL VAE it is
~0.1 s at 1K and needs ``--vae-tiling`` from 2K). ``--dry-run`` prints the plan and FLOP counts without a
GPU; ``--device cpu --depth 1 --grids 8 --steps 1`` runs the whole path on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from manifests.features import SD_VAE_DOWNSAMPLE
from training.flops import forward_flops
from training.model import PRESETS, PixArtSigma, default_kv_layers, pe_params_for_resolution
from training.sample import dpm_solver_sample, guided_denoiser

DEFAULT_GRIDS = (64, 128, 256)  # token grid sides of 1024, 2048 and 4096 px images (VAE 8 × patch 2)
NUM_TOKENS, NUM_VALID_TOKENS = 300, 180


def sample_seconds(model: PixArtSigma, grid: int, *, steps: int, device: torch.device) -> float:
    """Wall seconds for one image: ``steps`` guided DPM-Solver++ steps on a grid × grid token latent."""
    cfg = model.config
    dtype = next(model.parameters()).dtype
    y = torch.randn(1, NUM_TOKENS, cfg.caption_channels, device=device, dtype=dtype)
    mask = (torch.arange(NUM_TOKENS, device=device) < NUM_VALID_TOKENS)[None]
    y_neg, mask_neg = torch.randn(1, 1, cfg.caption_channels, device=device, dtype=dtype), mask[:, :1]
    noise = torch.randn(1, cfg.in_channels, grid * cfg.patch_size, grid * cfg.patch_size, device=device)
    denoise = guided_denoiser(model, y, mask, y_neg, mask_neg, cfg_scale=4.5)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        dpm_solver_sample(denoise, noise, steps=1, in_channels=cfg.in_channels)  # warm-up
        sync()
        start = time.perf_counter()
        dpm_solver_sample(denoise, noise, steps=steps, in_channels=cfg.in_channels)
        sync()
    return time.perf_counter() - start


def measure(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    rows = []
    for preset in ("XL/2", "XL/2-kv"):
        config = PRESETS[preset]
        if args.depth:  # smoke runs: fewer blocks, the second half still compressed for the KV preset
            kv = default_kv_layers(args.depth) if config.kv_compress_layers else ()
            config = dataclasses.replace(config, depth=args.depth, kv_compress_layers=kv)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = PixArtSigma(config).to(device, dtype).eval()
        for grid in args.grids:
            model.set_resolution(*pe_params_for_resolution(grid * 16, vae_downsample=SD_VAE_DOWNSAMPLE))
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            seconds = sample_seconds(model, grid, steps=args.steps, device=device)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            flops = (
                2 * args.steps * forward_flops(config, (grid, grid), NUM_TOKENS).total
            )  # CFG: 2 forwards/step
            rows.append({"preset": preset, "px": grid * 16, "grid": grid, "steps": args.steps, "seconds": seconds,
                         "peak_gib": peak, "tflops": flops / seconds / 1e12})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
        del model
    return rows


def markdown(rows: list[dict], header: dict) -> str:
    by = {(r["preset"], r["px"]): r for r in rows}
    lines = [
        "## Sampling: PixArt-XL/2 time per image on GPU, with and without KV compression",
        "",
        f"Command: `{header['command']}`",
        "",
        f"Device: {header['device']}, torch {header['torch']}, CUDA {header['cuda']}; {header['dtype']} weights, "
        f"{rows[0]['steps']} DPM-Solver++ steps with CFG (batch 2), {NUM_TOKENS} caption tokens; VAE decode excluded.",
        "",
        "| px | s/image plain | s/image KV | ratio KV/plain | peak GiB plain | peak GiB KV | TFLOP/s plain |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for px in sorted({r["px"] for r in rows}):
        plain, kv = by[("XL/2", px)], by[("XL/2-kv", px)]
        mem = lambda r: f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a"  # noqa: E731
        lines.append(f"| {px} | {plain['seconds']:.2f} | {kv['seconds']:.2f} | {kv['seconds'] / plain['seconds']:.3f} | "
                     f"{mem(plain)} | {mem(kv)} | {plain['tflops']:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--grids", type=int, nargs="+", default=list(DEFAULT_GRIDS), help="token grid sides")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--depth", type=int, default=None, help="fewer blocks (smoke runs only)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--output", type=Path, help="markdown file for docs/benchmarks.md")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and FLOPs, run nothing")
    args = parser.parse_args()
    if args.dry_run:
        for preset in ("XL/2", "XL/2-kv"):
            for grid in args.grids:
                tflop = 2 * args.steps * forward_flops(PRESETS[preset], (grid, grid), NUM_TOKENS).total / 1e12
                print(f"{preset:8s} {grid * 16:5d} px ({grid}² tokens): {tflop:9.1f} TFLOP per image")
        return
    rows = measure(args)
    device = torch.device(args.device)
    header = {
        "command": "python -m bench.gpu_sampling " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": "bf16" if device.type == "cuda" else "fp32",
    }
    text = markdown(rows, header)
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
