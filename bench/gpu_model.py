"""GPU benchmark (torch only): PixArt-XL/2 bf16 training step time, memory, img/s and MFU.

Run from the repository root on a CUDA machine (about 2 minutes on an H100, well under 8):
    python -m bench.gpu_model --output "$OUT/gpu_model.md"
Measures 512, 1024 and 2048 px with gradient checkpointing, without and with KV compression (R=2 in
blocks 14–27). `--dry-run` prints the plan and FLOP counts with no GPU; `--device cpu --depth 1
--plan 128:1 --steps 1 --warmup 0` exercises the whole step on a CPU.
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
from training.flops import image_forward_flops
from training.model import PRESETS, ModelConfig, PixArtSigma, default_kv_layers, pe_params_for_resolution

# (resolution px, batch per GPU): batches sized so XL/2 with checkpointing fits 80 GB with room to spare.
DEFAULT_PLAN = ((512, 32), (1024, 8), (2048, 2))
NUM_TOKENS = 300  # PixArt-Σ caption budget; ~40 % padding below, as real captions are shorter
NUM_VALID_TOKENS = 180
# Dense bf16 tensor-core peaks (TFLOP/s), from the vendor datasheets (SXM parts).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """Peak dense bf16 TFLOP/s of this device, from the table or --peak-tflops."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def batch_for(config: ModelConfig, resolution: int, batch: int, device: torch.device):
    """Random latents, timesteps, captions and masks for one step."""
    latent = resolution // 8
    x = torch.randn(batch, config.in_channels, latent, latent, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.randn(batch, NUM_TOKENS, config.caption_channels, device=device)
    mask = (torch.arange(NUM_TOKENS, device=device) < NUM_VALID_TOKENS).expand(batch, -1)
    return x, t, y, mask


def train_step(model: PixArtSigma, optimizer: torch.optim.Optimizer, inputs, device: torch.device) -> None:
    """One mixed-precision step: bf16 autocast forward/backward, fp32 master weights, AdamW."""
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        out = model(*inputs)
    out.float().square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(model, resolution: int, batch: int, *, steps: int, warmup: int, device: torch.device) -> dict:
    """Seconds per step and peak memory at one resolution."""
    model.set_resolution(*pe_params_for_resolution(resolution, vae_downsample=SD_VAE_DOWNSAMPLE))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.03, fused=device.type == "cuda")
    inputs = batch_for(model.config, resolution, batch, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        train_step(model, optimizer, inputs, device)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, inputs, device)
    sync()
    seconds = (time.perf_counter() - start) / steps
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del optimizer
    return {"seconds": seconds, "peak_gib": peak_gib}


def row(config: ModelConfig, resolution: int, batch: int, result: dict, peak: float | None) -> dict:
    """Derived numbers: img/s, achieved model TFLOP/s and MFU (3× forward FLOPs; recompute not counted)."""
    fwd = image_forward_flops(config, (resolution, resolution), NUM_TOKENS)  # padded tokens are computed too
    img_s = batch / result["seconds"]
    tflops = 3 * fwd * img_s / 1e12
    return {
        "resolution": resolution, "kv": bool(config.kv_compress_layers), "batch": batch,
        "step_s": result["seconds"], "img_s": img_s, "peak_gib": result["peak_gib"],
        "fwd_tflop_per_img": fwd / 1e12, "model_tflops": tflops,
        "mfu": tflops / peak if peak else None,
        # with checkpointing the hardware also redoes each block's forward: 4× instead of 3×
        "hfu": 4 / 3 * tflops / peak if peak else None,
    }  # fmt: skip


def markdown(rows: list[dict], header: dict) -> str:
    """Table for docs/benchmarks.md."""
    lines = [
        "## Model: PixArt-XL/2 training step on GPU (bf16 autocast, gradient checkpointing, AdamW)",
        "",
        f"Command: `{header['command']}`",
        "",
        f"Device: {header['device']}, torch {header['torch']}, CUDA {header['cuda']}; peak bf16 "
        f"{header['peak_tflops']} TFLOP/s; {header['steps']} timed steps after {header['warmup']} warm-up; "
        f"captions {NUM_TOKENS} tokens, {NUM_VALID_TOKENS} valid. MFU counts 3× forward FLOPs per image "
        "(HFU adds the checkpointing recompute).",
        "",
        "| px | KV | batch | step (s) | img/s | peak mem (GiB) | fwd TFLOP/img | model TFLOP/s | MFU | HFU |",
        "|---:|:--:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] else "n/a"
        hfu = f"{100 * r['hfu']:.1f} %" if r["hfu"] else "n/a"
        mem = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a"
        lines.append(
            f"| {r['resolution']} | {'yes' if r['kv'] else 'no'} | {r['batch']} | {r['step_s']:.3f} | {r['img_s']:.2f} | "
            f"{mem} | {r['fwd_tflop_per_img']:.2f} | {r['model_tflops']:.0f} | {mfu} | {hfu} |"
        )
    return "\n".join(lines) + "\n"


def parse_plan(items: list[str]) -> tuple[tuple[int, int], ...]:
    """["512:32", "1024:8"] → ((512, 32), (1024, 8))."""
    return tuple((int(a), int(b)) for a, b in (item.split(":") for item in items))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--plan", nargs="+", default=None, help="resolution:batch pairs, default 512:32 1024:8 2048:2"
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--depth", type=int, default=None, help="fewer blocks (smoke runs only)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--no-kv", action="store_true", help="skip the KV-compressed runs")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and FLOPs, touch no device")
    parser.add_argument(
        "--output", type=Path, default=None, help="markdown file; a .json twin is written beside it"
    )
    args = parser.parse_args()

    plan = parse_plan(args.plan) if args.plan else DEFAULT_PLAN
    base = PRESETS["XL/2"]
    if args.depth is not None:
        base = dataclasses.replace(base, depth=args.depth)
    base = dataclasses.replace(base, grad_checkpointing=True)
    kv_layers = default_kv_layers(base.depth)
    if args.dry_run:
        kv = dataclasses.replace(base, kv_compress_layers=kv_layers)
        for resolution, batch in plan:
            f, fk = (image_forward_flops(c, (resolution, resolution), NUM_TOKENS) for c in (base, kv))
            print(
                f"{resolution} px, batch {batch}: fwd {f / 1e12:.2f} TFLOP/img, with KV {fk / 1e12:.2f} ({1 - fk / f:.1%} less)"
            )
        return

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: use --dry-run, or --device cpu for a smoke run")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak = peak_tflops(device, args.peak_tflops)
    torch.manual_seed(0)
    with torch.device(device):
        model = PixArtSigma(base).train()
    rows = []
    for kv in (False, True):
        if kv:
            if args.no_kv:
                break
            model.enable_kv_compression(kv_layers, ratio=2)
        for resolution, batch in plan:
            result = measure(model, resolution, batch, steps=args.steps, warmup=args.warmup, device=device)
            rows.append(row(model.config, resolution, batch, result, peak))
            print(json.dumps(rows[-1]), flush=True)

    header = {
        "command": "python -m bench.gpu_model " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "peak_tflops": peak,
        "steps": args.steps,
        "warmup": args.warmup,
    }
    text = markdown(rows, header)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        args.output.with_suffix(".json").write_text(
            json.dumps({"header": header, "rows": rows}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
