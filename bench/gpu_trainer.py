"""GPU benchmark (prepared; one script, under 8 minutes): the PixArt-XL/2 training step from cached features
vs with T5-XXL and the SDXL VAE run on the fly. Random weights, architectures from their configs.

    python -m bench.gpu_trainer [--output OUT] [--seconds 25] [--record]

For 512 and 1024 px it reports img/s, MFU (training/flops.py against the device's bf16 peak), peak memory
and the data-wait share, then the same step with the frozen encoders in the loop, giving the cache's real
speed-up (goal ≥ 1.5×; data-wait goal < 5 %). Needs torch and transformers only: the SDXL VAE encoder is
diffusers' ``AutoencoderKL`` when diffusers is installed, else the same architecture written out below
(timing only; random weights either way). Cached batches come through the trainer's own WebDataset stream
(``training/data.py``, DataLoader workers) over synthetic shards written to a temporary folder, so the
data-wait share is the real decode cost; without webdataset it falls back to in-memory batches.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.flops import forward_flops
from training.model import PRESETS, PixArtSigma

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
    from training.observe import peak_tflops

    peak = peak_tflops(device, 0.0)
    return {
        "resolution": resolution, "batch": batch, "mode": "on the fly" if on_the_fly else "cached",
        "source": source, "images_per_s": batch / step, "step_ms": 1e3 * step,
        "mfu": step_flops / step / (peak * 1e12) if peak else None,
        "data_wait_share": sum(waits) / sum(times), "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "grad_checkpointing": grad_ckpt,
    }  # fmt: skip


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=os.environ.get("OUT", "."))
    parser.add_argument("--seconds", type=float, default=25.0, help="timed seconds per configuration")
    parser.add_argument("--record", action="store_true", help="write the section into docs/benchmarks.md")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
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
    name = torch.cuda.get_device_name(device)
    Path(args.output).mkdir(parents=True, exist_ok=True)
    (Path(args.output) / "gpu_trainer.json").write_text(json.dumps({"device": name, "rows": rows}, indent=2))
    text = markdown(rows, name)
    (Path(args.output) / "gpu_trainer.md").write_text(text)
    print(text)
    if args.record:
        from bench.record import write_section

        write_section("trainer-gpu", text)


if __name__ == "__main__":
    main()
