"""Tiny ``AutoencoderKL``s trained on the toy world (``manifests.toy``), so decode(encode(x)) ≈ x there.

``python -m training.toy_vae --output DIR --seed 0`` trains two VAEs on CPU (on the shared 2-core machine, 1 thread each: ~6 min weak, ~22 min strong) and saves them
with ``save_pretrained`` to ``DIR/toy_vae_sd`` and ``DIR/toy_vae_sdxl``; they load like real weights
(``AutoencoderKL.from_pretrained``). Both are SD-shaped (4 latent channels, 8× downsample, the layout the
trainer and ``manifests.features`` expect) and stand in for PixArt-Σ's VAE swap (§3: SD VAE → SDXL VAE):

- ``toy_vae_sd`` ("weak"): narrow (8–16 channels), a larger KL weight;
- ``toy_vae_sdxl`` ("strong"): twice as wide, a smaller KL weight — better reconstructions and latents with
  other statistics.

No attention in the mid blocks (``mid_block_add_attention=False``): on the shared 2-core machine it made a
step ~20× slower, and at 8×8 latents a 3×3 conv already sees the whole picture.

Each one's ``scaling_factor`` is 1 / std of its latents (posterior means) over held-out toy images, the rule
the SD and SDXL configs' factors come from (0.18215 ≈ 1 / 5.49; latent-diffusion's ``scale_by_std``), so the
two differ as SD's and SDXL's do. Training images are renders at 4× the crop size resized with
``manifests.buckets.resize_to_cover_and_crop`` (the resize materialize uses), so the VAEs see the edges
the training shards hold. Seeded: the same command gives the same weights on the same library versions.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from manifests.buckets import resize_to_cover_and_crop
from manifests.toy import render, scene_for

log = logging.getLogger(__name__)

SD_DIR, SDXL_DIR = "toy_vae_sd", "toy_vae_sdxl"
# Scenes of the VAEs' training set come from this corpus seed, the held-out ones from the next: toy corpora
# for DiT training use other seeds (curation.toy_world's default is 0), so no picture is shared.
VAE_CORPUS_SEED = 1_000_003
HELD_OUT_SEED = VAE_CORPUS_SEED + 1
# Crop sizes (height, width): the 64 px square bucket and both 2:1 buckets of about the same pixel count.
CROP_SIZES = ((64, 64), (48, 96), (96, 48))


@dataclass(frozen=True)
class ToyVaeSpec:
    """One toy VAE: its width, its KL weight and how long it trains."""

    name: str
    block_out_channels: tuple[int, ...]
    kl_weight: float
    steps: int
    batch_size: int = 8
    lr: float = 2e-3
    # Loss weight of object pixels (saturated ones) against background: objects cover ~10 % of a toy image,
    # and with the plain pixel loss both VAEs learned the grey background and greyed the objects out
    # (measured: adherence 0.0 after a round trip at 1,000 steps, PSNR 21 dB).
    object_weight: float = 1.0

    def __post_init__(self) -> None:
        if len(self.block_out_channels) != 4:
            raise ValueError(
                f"block_out_channels must have 4 entries (8× downsample), got {self.block_out_channels}"
            )
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be ≥ 1, got {self.steps}, {self.batch_size}")


# SD's VAE was trained with a KL weight of 1e-6 (latent-diffusion kl-f8 config); the weak one's is larger,
# so its latents are pulled closer to N(0, 1) and hold less detail.
WEAK = ToyVaeSpec(
    SD_DIR, block_out_channels=(8, 16, 16, 16), kl_weight=1e-4, steps=800, lr=1e-3, object_weight=3.0
)
STRONG = ToyVaeSpec(
    SDXL_DIR, block_out_channels=(16, 32, 32, 32), kl_weight=1e-6, steps=2500, lr=1e-3, object_weight=3.0
)
SPECS = {"sd": WEAK, "sdxl": STRONG}


def build_vae(spec: ToyVaeSpec, *, seed: int) -> AutoencoderKL:
    """An untrained SD-layout AutoencoderKL of the spec's width (scaling_factor set after training)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=spec.block_out_channels,
            layers_per_block=1,
            norm_num_groups=8,
            latent_channels=4,
            sample_size=64,
            mid_block_add_attention=False,
        )


def toy_batch(seed: int, start: int, num: int, size: tuple[int, int]) -> torch.Tensor:
    """(num, 3, H, W) toy images in [-1, 1]: scenes ``start…start+num`` of corpus ``seed``, resized as materialize does."""
    height, width = size
    images = []
    for index in range(start, start + num):
        big = render(scene_for(seed, index), width * 4, height * 4)
        small = resize_to_cover_and_crop(big, (height, width))
        images.append(np.asarray(small, np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), over the whole batch."""
    mse = torch.mean((reference.clamp(-1, 1) - reconstruction.clamp(-1, 1)) ** 2).item()
    return 10.0 * math.log10(4.0 / max(mse, 1e-12))


def object_weights(pixels: torch.Tensor, object_weight: float) -> torch.Tensor:
    """(B, 1, H, W) per-pixel loss weights: ``object_weight`` where the target is saturated (an object)."""
    high, low = pixels.amax(dim=1, keepdim=True), pixels.amin(dim=1, keepdim=True)  # in [-1, 1]
    saturation = (high - low) / (high + 1).clamp(min=1e-3)  # HSV saturation of (x + 1) / 2
    return 1.0 + (object_weight - 1.0) * (saturation > 0.45).float()


def train_vae(spec: ToyVaeSpec, *, seed: int) -> AutoencoderKL:
    """Train one toy VAE: weighted L1 + MSE on pixels + ``kl_weight`` · KL, Adam, cosine decay, fixed data order."""
    vae = build_vae(spec, seed=seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=spec.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=spec.steps)
    generator = torch.Generator().manual_seed(seed)
    vae.train()
    started = time.monotonic()
    for step in range(spec.steps):
        size = CROP_SIZES[step % len(CROP_SIZES)]
        pixels = toy_batch(VAE_CORPUS_SEED, step * spec.batch_size, spec.batch_size, size)  # (B, 3, H, W)
        posterior = vae.encode(pixels).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample  # (B, 3, H, W)
        error = (reconstruction - pixels) * object_weights(pixels, spec.object_weight)
        loss = error.abs().mean() + (error**2).mean() + spec.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == spec.steps - 1:
            log.info("%s step %d/%d: loss %.4f (%.0f s)", spec.name, step, spec.steps, loss.item(),
                     time.monotonic() - started)  # fmt: skip
    return vae.eval()


@torch.no_grad()
def latent_std(vae: AutoencoderKL, pixels: torch.Tensor) -> float:
    """Std of the posterior means over a batch: 1 / the scaling factor (latent-diffusion ``scale_by_std``)."""
    return vae.encode(pixels).latent_dist.mean.std().item()


@torch.no_grad()
def round_trip(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """decode(encode(x)) with the posterior mean, as materialize's cached mean would be decoded."""
    return vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)


def held_out(num: int = 32, size: tuple[int, int] = (64, 64)) -> torch.Tensor:
    """Held-out toy images (scenes the VAEs never saw) for the scaling factor and PSNR."""
    return toy_batch(HELD_OUT_SEED, 0, num, size)


TRAINING_FILE = "toy_training.json"  # beside config.json: how the weights were made


def build_toy_vae(out_dir: Path, spec: ToyVaeSpec, *, seed: int = 0) -> Path:
    """Train one spec's VAE, set its scaling factor from its latents, save it to ``out_dir/<name>``."""
    vae = train_vae(spec, seed=seed)
    std = latent_std(vae, held_out(64))
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    vae_dir = Path(out_dir) / spec.name
    vae.save_pretrained(str(vae_dir))
    stats = {
        "scaling_factor": vae.config.scaling_factor,
        "params": sum(p.numel() for p in vae.parameters()),
        "spec": asdict(spec),
        "seed": seed,
        "command": f"python -m training.toy_vae --output {out_dir} --seed {seed} --vae "
        + next(k for k, v in SPECS.items() if v.name == spec.name),
    }
    (vae_dir / TRAINING_FILE).write_text(json.dumps(stats, indent=1, sort_keys=True) + "\n")
    log.info("%s: %s", spec.name, stats)
    return vae_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--output", required=True, type=Path, help="folder for toy_vae_sd/ and toy_vae_sdxl/")
    parser.add_argument("--seed", type=int, default=0, help="weights and noise seed")
    parser.add_argument("--vae", choices=(*SPECS, "both"), default="both", help="which VAE to train")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: fastest when shared)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    for name in SPECS if args.vae == "both" else (args.vae,):
        build_toy_vae(args.output, SPECS[name], seed=args.seed)


if __name__ == "__main__":
    main()
