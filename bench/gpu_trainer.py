"""GPU benchmark (prepared; one call, under 9 minutes): the PixArt-XL/2 training step.

    python -m bench.gpu_trainer [--output OUT] [--part all|cache|highres] [--seconds 20] [--record]
    python -m bench.gpu_trainer --smoke        # CPU, tiny preset and small sizes: checks every code path

Part ``cache`` (512 and 1024 px): img/s, MFU, peak memory and data-wait share of the step from cached
features vs with T5-XXL and the SDXL VAE run on the fly, giving the cache's real speed-up (goal ≥ 1.5×;
data-wait goal < 5 %). Cached batches come through the trainer's own WebDataset stream (training/data.py,
DataLoader workers) over synthetic shards written to a temporary folder.

Part ``highres`` (2K = the 2048 table's square bucket, 128² tokens; 4K = the 2880 table's, 180² tokens):
the trainer's own step (``training.main.train_step``: CAME, bf16 autocast, grad clip, EMA-free) with KV
compression off and on (R = 2 in blocks 14–27, as configs/sigma.toml) and gradient checkpointing on and
off, reporting step time, img/s, MFU against the device's bf16 peak (training/flops.py) and peak memory.
Configurations that do not fit are reported as OOM. ``--compile`` adds the per-block compiled variant.

Random weights, architectures from their configs; needs torch, transformers (T5-XXL config) and, for the
SDXL VAE, diffusers (else a replica of its encoder below, timing only).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import itertools
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.flops import forward_flops
from training.model import PRESETS, PixArtSigma
from training.observe import peak_tflops

T5_TOKENS = 300  # PixArt-Σ's caption budget
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64}
SDXL_VAE_CHANNELS = (128, 256, 512, 512)
RESOLUTIONS = {512: 32, 1024: 8}  # batch per GPU at each resolution (1024 with gradient checkpointing)


# ------------------------------------------------------------------------------------------------
# Frozen encoders, random weights
# ------------------------------------------------------------------------------------------------


def t5_xxl(device: torch.device) -> nn.Module:
    """T5 v1.1 XXL encoder (PixArt-Σ's text encoder) from its config, bf16, frozen."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(**T5_XXL, feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=False)
    with torch.device(device):
        model = T5EncoderModel(config).to(torch.bfloat16)
    return model.eval().requires_grad_(False)


class _Resnet(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(32, cin, eps=1e-6), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(32, cout, eps=1e-6), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class _Attention(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.qkv, self.out = nn.Linear(channels, 3 * channels), nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.out(h).transpose(1, 2).reshape(B, C, H, W)


class SdxlVaeEncoder(nn.Module):
    """The SDXL VAE encoder (diffusers ``Encoder``: 4 down blocks of 2 resnets, mid attention) + quant_conv."""

    def __init__(self) -> None:
        super().__init__()
        ch = SDXL_VAE_CHANNELS
        layers: list[nn.Module] = [nn.Conv2d(3, ch[0], 3, padding=1)]
        cin = ch[0]
        for i, cout in enumerate(ch):
            layers += [_Resnet(cin, cout), _Resnet(cout, cout)]
            if i < len(ch) - 1:
                layers.append(nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(cout, cout, 3, stride=2)))
            cin = cout
        layers += [_Resnet(cin, cin), _Attention(cin), _Resnet(cin, cin)]
        layers += [
            nn.GroupNorm(32, cin, eps=1e-6),
            nn.SiLU(),
            nn.Conv2d(cin, 8, 3, padding=1),
            nn.Conv2d(8, 8, 1),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        mean, logvar = self.net(pixels).chunk(2, dim=1)  # (B, 4, H/8, W/8) each
        return mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn_like(mean)


def sdxl_vae_encoder(device: torch.device) -> nn.Module:
    """diffusers' AutoencoderKL built from the SDXL VAE config when available, else the replica above."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        return SdxlVaeEncoder().to(device, torch.bfloat16).eval().requires_grad_(False)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=SDXL_VAE_CHANNELS, layers_per_block=2, latent_channels=4, sample_size=1024,
        scaling_factor=0.13025,
    ).to(device, torch.bfloat16).eval().requires_grad_(False)  # fmt: skip

    class _Encode(nn.Module):
        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return vae.encode(pixels).latent_dist.sample()

    return _Encode()


# ------------------------------------------------------------------------------------------------
# Cached batches through the trainer's stream
# ------------------------------------------------------------------------------------------------


def write_cached_shards(folder: Path, resolution: int, *, num_samples: int = 256, per_shard: int = 64) -> str:
    """Synthetic shards with cached T5 features (300 × 4096 fp16) and a square-bucket latent posterior."""
    import webdataset as wds

    rng = np.random.default_rng(0)
    h = resolution // 8
    features = rng.standard_normal((T5_TOKENS, 4096)).astype(np.float16)
    posterior = np.stack([rng.standard_normal((4, h, h)), np.full((4, h, h), 0.01)]).astype(np.float16)

    def npy(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.getvalue()

    for shard in range(num_samples // per_shard):
        with wds.TarWriter(str(folder / f"train-{shard:06d}.tar")) as sink:
            for i in range(per_shard):
                key = f"{shard:03d}{i:05d}"
                meta = {"key": key, "width": resolution, "height": resolution, "caption_orig": "x", "caption_vlm": "y",
                        "buckets": {str(resolution): [resolution, resolution]}}  # fmt: skip
                sink.write({"__key__": key, "json": json.dumps(meta).encode(), "t5_orig.npy": npy(features),
                            "t5_vlm.npy": npy(features), f"vae{resolution}.npy": npy(posterior)})  # fmt: skip
    return str(folder)


def cached_batches(folder: Path, resolution: int, batch: int):
    """The trainer's stream over cached shards, else (no webdataset) in-memory batches."""
    try:
        from training.data import make_stream

        shards = write_cached_shards(folder, resolution)
        return make_stream(shards, resolution=resolution, batch_size=batch, real_prompt_ratio=0.5, seed=0, rank=0,
                           shuffle_buffer=64, num_workers=6), "WebDataset stream, 6 workers"  # fmt: skip
    except ImportError:
        h = resolution // 8
        item = {"latents": torch.randn(batch, 4, h, h), "caption_features": torch.randn(batch, T5_TOKENS, 4096),
                "caption_mask": torch.ones(batch, T5_TOKENS, dtype=torch.bool)}  # fmt: skip

        def forever():
            while True:
                yield item

        return forever(), "in-memory batches (webdataset missing)"


# ------------------------------------------------------------------------------------------------
# The step
# ------------------------------------------------------------------------------------------------


def measure(
    resolution: int, batch: int, *, on_the_fly: bool, seconds: float, device: torch.device, tmp: Path
) -> dict:
    """Train XL/2 for ~``seconds`` after warm-up; returns img/s, MFU, memory, data-wait share."""
    torch.cuda.reset_peak_memory_stats()
    grad_ckpt = resolution >= 1024
    config = dataclasses.replace(PRESETS["XL/2"], base_size=resolution // 16, pe_interpolation=resolution / 512,
                                 grad_checkpointing=grad_ckpt)  # fmt: skip
    model = PixArtSigma(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, fused=True)
    h = resolution // 8
    if on_the_fly:
        t5, vae = t5_xxl(device), sdxl_vae_encoder(device)
        tokens = torch.randint(0, T5_XXL["vocab_size"], (batch, T5_TOKENS), device=device)
        pixels = torch.rand(batch, 3, resolution, resolution, device=device, dtype=torch.bfloat16) * 2 - 1
        stream, source = None, "random pixels and token ids on the GPU"
    else:
        stream, source = cached_batches(tmp, resolution, batch)
    step_flops = (4 if grad_ckpt else 3) * batch * forward_flops(config, (h // 2, h // 2), T5_TOKENS).total
    times, waits = [], []
    start = time.perf_counter()
    while True:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if on_the_fly:
            with torch.no_grad():
                y = t5(input_ids=tokens).last_hidden_state.float()  # (B, 300, 4096)
                x0 = vae(pixels).float() * 0.13025  # (B, 4, h, w)
            mask = torch.ones(batch, T5_TOKENS, dtype=torch.bool, device=device)
        else:
            b = next(stream)
            x0 = b["latents"].to(device, non_blocking=True) * 0.13025
            y, mask = b["caption_features"].to(device, non_blocking=True), b["caption_mask"].to(device)
        t1 = time.perf_counter()
        t = torch.randint(0, 1000, (batch,), device=device)
        noise = torch.randn_like(x0)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x0 + noise, t, y, mask)
        loss = (out[:, :4].float() - noise).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        times.append(t2 - t0)
        waits.append(t1 - t0 if not on_the_fly else 0.0)
        if time.perf_counter() - start > seconds and len(times) > 5:
            break
    times, waits = times[3:], waits[3:]  # warm-up
    step = sum(times) / len(times)
    peak = peak_tflops(device, 0.0)
    return {
        "resolution": resolution, "batch": batch, "mode": "on the fly" if on_the_fly else "cached",
        "source": source, "images_per_s": batch / step, "step_ms": 1e3 * step,
        "mfu": step_flops / step / (peak * 1e12) if peak else None,
        "data_wait_share": sum(waits) / sum(times), "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "grad_checkpointing": grad_ckpt,
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------
# 2K / 4K: the trainer's own step, KV compression and gradient checkpointing on and off
# ------------------------------------------------------------------------------------------------

# (name, resolution, batch per GPU, KV compression, gradient checkpointing)
HIGH_RES = (
    ("2K", 2048, 2, False, True),
    ("2K", 2048, 2, True, True),
    ("2K", 2048, 2, True, False),
    ("4K", 2880, 1, False, True),
    ("4K", 2880, 1, True, True),
    ("4K", 2880, 1, True, False),
)
SMOKE_SIZES = {2048: 64, 2880: 96}  # --smoke: the same runs at tiny size on the CPU


def trainer_config(*, kv: bool, grad_ckpt: bool, compiled: bool, smoke: bool):
    """configs/sigma.toml (XL/2, CAME, bf16, clip 0.01) or, for --smoke, configs/debug.toml's tiny preset."""
    from training.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    preset = "debug.toml" if smoke else "sigma.toml"
    overrides = [f"model.grad_checkpointing={str(grad_ckpt).lower()}", f"model.compile={str(compiled).lower()}",
                 "optim.ema_decay=0.0", "optim.mixed_precision=\"bf16\""]  # fmt: skip
    if smoke:
        overrides.append('model.compile_backend="eager"')
    cfg = load_config(root / preset, overrides=overrides)
    depth = PRESETS[cfg.model.preset].depth
    layers = tuple(range(depth // 2, depth)) if kv else ()  # 14–27 of 28, as the 2K/4K stages
    return cfg, layers


def measure_highres(
    name: str, resolution: int, batch: int, *, kv: bool, grad_ckpt: bool, compiled: bool, seconds: float,
    device: torch.device, smoke: bool,
) -> dict:  # fmt: skip
    """Time ``training.main.train_step`` plus the optimizer step on random cached-like batches."""
    import training.main as trainer
    from training.diffusion import GaussianDiffusion
    from training.encoders import CaptionEncoder, LatentEncoder

    cfg, layers = trainer_config(kv=kv, grad_ckpt=grad_ckpt, compiled=compiled, smoke=smoke)
    size = SMOKE_SIZES[resolution] if smoke else resolution
    preset = PRESETS[cfg.model.preset]
    base_size = size // 16
    config = dataclasses.replace(
        preset, base_size=base_size, pe_interpolation=size / 512, grad_checkpointing=grad_ckpt
    )
    model = PixArtSigma(config).to(device).train()
    if layers:
        model.enable_kv_compression(layers, 2)
    stage = dataclasses.replace(cfg.stages[0], compile=compiled)
    env = trainer.Dist(0, 1, device)
    net = trainer.wrap_model(model, stage, cfg, env)
    optimizer = trainer.build_optimizer(model, cfg.optim, 2e-5)
    tokens = 16 if smoke else T5_TOKENS
    h = size // 8
    batch_data = {
        "latents": torch.randn(batch, 4, h, h), "null_caption": torch.zeros(batch, dtype=torch.bool),
        "caption_features": torch.randn(batch, tokens, preset.caption_channels, dtype=torch.float16),
        "caption_mask": torch.ones(batch, tokens, dtype=torch.bool),
    }  # fmt: skip
    stream = iter(lambda: batch_data, None)
    text = CaptionEncoder("unused", max_tokens=tokens, device=device, cached=True)
    latents = LatentEncoder("unused", scaling_factor=0.13025, device=device, cached=True)
    generator = torch.Generator(device=device).manual_seed(0)
    diffusion = GaussianDiffusion()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times: list[float] = []
    started = time.perf_counter()
    while True:
        _sync(device)
        t0 = time.perf_counter()
        out = trainer.train_step(
            net, model, stream, diffusion, text, latents, generator, cfg, env, len(times)
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
        if (time.perf_counter() - started > seconds and len(times) > 4) or (smoke and len(times) >= 3):
            break
    steady = times[2:] if len(times) > 3 else times[-1:]  # warm-up (and compilation) excluded
    step = sum(steady) / len(steady)
    flops = out["flops"]
    peak = peak_tflops(device, 0.0)
    return {
        "name": name, "resolution": size, "batch": batch, "kv": bool(layers), "grad_checkpointing": grad_ckpt,
        "compiled": compiled, "tokens": (size // 16) ** 2, "step_ms": 1e3 * step, "images_per_s": batch / step,
        "tflops": flops / step / 1e12, "mfu": flops / step / (peak * 1e12) if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "loss": out["loss"],
    }  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def markdown_highres(rows: list[dict], device: str, command: str) -> str:
    lines = [
        "## Trainer on GPU at 2K and 4K: KV compression and gradient checkpointing",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {device}, torch {torch.__version__}. The trainer's own step (training.main.train_step: CAME, "
        "bf16 autocast, grad clip 0.01) on random latents and 300-token captions, PixArt-XL/2, square bucket "
        "(2K: 2048 px, 128² tokens; 4K: 2880 px, 180² tokens), KV compression R = 2 in blocks 14–27. MFU counts "
        "training/flops.py's FLOPs (forward ×3, ×4 with checkpointing) against the data-sheet bf16 peak.",
        "",
        "| size | px | batch | KV | grad ckpt | compiled | step (ms) | img/s | TFLOP/s | MFU | peak mem (GiB) |",
        "|---|---:|---:|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "oom" in r:
            lines.append(f"| {r['name']} | {r['resolution']} | {r['batch']} | {'on' if r['kv'] else 'off'} | "
                         f"{'on' if r['grad_checkpointing'] else 'off'} | {'yes' if r['compiled'] else 'no'} | OOM | | | | |")  # fmt: skip
            continue
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "n/a"
        lines.append(f"| {r['name']} | {r['resolution']} | {r['batch']} | {'on' if r['kv'] else 'off'} | "
                     f"{'on' if r['grad_checkpointing'] else 'off'} | {'yes' if r['compiled'] else 'no'} | "
                     f"{r['step_ms']:.0f} | {r['images_per_s']:.2f} | {r['tflops']:.0f} | {mfu} | {mem} |")  # fmt: skip
    return "\n".join(lines + [""])


def run_highres(args, device: torch.device) -> list[dict]:
    rows = []
    variants = [False, True] if args.compile else [False]
    for (name, resolution, batch, kv, grad_ckpt), compiled in itertools.product(HIGH_RES, variants):
        spec = {"name": name, "resolution": resolution, "batch": batch, "kv": kv, "grad_checkpointing": grad_ckpt,
                "compiled": compiled}  # fmt: skip
        try:
            rows.append(measure_highres(name, resolution, batch, kv=kv, grad_ckpt=grad_ckpt, compiled=compiled,
                                        seconds=args.seconds, device=device, smoke=args.smoke))  # fmt: skip
        except torch.OutOfMemoryError:
            rows.append({**spec, "oom": True})
        print(json.dumps(rows[-1]), flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict], device: str) -> str:
    lines = [
        "## Trainer on GPU: PixArt-XL/2 step, cached features vs T5-XXL + SDXL VAE on the fly",
        "",
        "Command: `python -m bench.gpu_trainer --record`",
        "",
        f"Machine: {device}, torch {torch.__version__}, bf16 autocast, AdamW (fused), random weights.",
        "",
        "| px | batch | mode | img/s | step (ms) | MFU | data-wait | peak mem (GiB) | speed-up cached/on-the-fly |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        other = next(
            (o for o in rows if o["resolution"] == r["resolution"] and o["mode"] == "on the fly"), None
        )
        speed = f"{r['images_per_s'] / other['images_per_s']:.2f}×" if other and r["mode"] == "cached" else ""
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a"
        lines.append(f"| {r['resolution']} | {r['batch']} | {r['mode']} | {r['images_per_s']:.1f} | {r['step_ms']:.0f} | "
                     f"{mfu} | {100 * r['data_wait_share']:.1f} % | {r['peak_memory_gib']:.1f} | {speed} |")  # fmt: skip
    return "\n".join(lines + [""])


def run_cache(args, device: torch.device) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for resolution, batch in RESOLUTIONS.items():
            for on_the_fly in (False, True):
                folder = Path(tmp) / f"{resolution}"
                folder.mkdir(exist_ok=True)
                with contextlib.suppress(torch.OutOfMemoryError):
                    rows.append(measure(resolution, batch, on_the_fly=on_the_fly, seconds=args.seconds,
                                        device=device, tmp=folder))  # fmt: skip
                    print(json.dumps(rows[-1]), flush=True)
                torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--output", default=os.environ.get("OUT", "."), help="folder for gpu_trainer.{json,md}"
    )
    parser.add_argument("--part", choices=("all", "cache", "highres"), default="all")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per configuration")
    parser.add_argument(
        "--compile", action="store_true", help="also time the per-block compiled step (highres)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, tiny preset, 3 steps per run (highres part)"
    )
    parser.add_argument("--record", action="store_true", help="write the sections into docs/benchmarks.md")
    args = parser.parse_args(argv)
    command = (
        "python -m bench.gpu_trainer " + shlex.join(argv if argv is not None else sys.argv[1:])
    ).strip()
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run)"
    result: dict = {"device": name}
    texts = []
    if args.part in ("all", "cache") and not args.smoke:
        result["cache"] = run_cache(args, device)
        texts.append(("trainer-gpu", markdown(result["cache"], name)))
    if args.part in ("all", "highres"):
        result["highres"] = run_highres(args, device)
        texts.append(("trainer-gpu-highres", markdown_highres(result["highres"], name, command)))
    Path(args.output).mkdir(parents=True, exist_ok=True)
    (Path(args.output) / "gpu_trainer.json").write_text(json.dumps(result, indent=2))
    (Path(args.output) / "gpu_trainer.md").write_text("\n".join(text for _, text in texts))
    for _, text in texts:
        print(text)
    if args.record and not args.smoke:
        from bench.record import write_section

        for section, text in texts:
            write_section(section, text)


if __name__ == "__main__":
    main()
