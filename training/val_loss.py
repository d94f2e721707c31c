"""Deterministic held-out validation loss at a fixed grid of timesteps (issue 21, item 3).

The training loss is noisy twice over: each step draws its timesteps and its noise. To compare runs (the
ablation bench, bench/bench_ablations.py) and to watch a stage converge, the held-out loss fixes both: the
same held-out latents and captions (the first ``num_samples`` samples of a shard folder in key order, each
encoded with the stage's VAE posterior *mean*, its ``orig`` caption), the same timesteps
(``VAL_TIMESTEPS``) and the same noise per (sample, timestep), drawn from a generator seeded by the pair —
so the number is a function of the weights alone, whatever the batch size it is computed with.
The value is the ε-prediction MSE (DDPM's "simple" loss, the ``mse`` term of training_losses), per
timestep and their mean; captions are never dropped.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from training.data import SampleDecoder, scan_tar, shard_urls
from training.diffusion import GaussianDiffusion
from training.model import PixArtSigma

log = logging.getLogger(__name__)

# A coarse grid over the 1000 IDDPM steps: near-clean (detail), middle (layout), near-noise (composition).
VAL_TIMESTEPS = (50, 250, 500, 750, 950)
VAL_LOSS_FILE = "val_loss.jsonl"  # one record per evaluation in the run folder, beside metrics.jsonl


@dataclass(frozen=True)
class HeldOutSample:
    """One held-out sample: its scaled latent and its caption's T5 states."""

    key: str
    latent: Tensor  # (C, h, w), posterior mean × scaling factor
    caption: Tensor  # (L, C_cap), valid tokens only


def noise_for(seed: int, index: int, timestep: int, shape: Sequence[int]) -> Tensor:
    """The fixed noise of held-out sample ``index`` at ``timestep``: its own generator, not a running one."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index * 1_009 + timestep)
    return torch.randn(tuple(shape), generator=generator)  # (C, h, w)


def load_held_out(
    shards: str,
    *,
    num_samples: int,
    resolution: int,
    encode_pixels: Callable[[Tensor], Tensor],
    encode_captions: Callable[[list[str]], tuple[Tensor, Tensor]],
) -> list[HeldOutSample]:
    """The first ``num_samples`` samples (shards in name order) at ``resolution``'s buckets, encoded.

    ``encode_pixels`` maps (1, 3, H, W) pixels in [-1, 1] to (1, C, h, w) scaled latents (the stage's VAE,
    posterior mean); ``encode_captions`` maps captions to (B, L, C) states and a (B, L) mask (T5).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be ≥ 1, got {num_samples}")
    # orig captions only (real_prompt_ratio 1), pixels decoded at the bucket (never the shards' cached latents:
    # those are a posterior *sample*, and of the shards' VAE, not necessarily the stage's).
    decoder = SampleDecoder(resolution=resolution, real_prompt_ratio=1.0, seed=0)
    decoded = []
    for url in shard_urls(shards):
        for raw in scan_tar(url):
            decoded.append(decoder(raw))
            if len(decoded) == num_samples:
                break
        if len(decoded) == num_samples:
            break
    if len(decoded) < num_samples:
        raise ValueError(
            f"val_loss.shards={shards} holds {len(decoded)} samples, num_samples asks {num_samples}"
        )
    states, mask = encode_captions([s.caption for s in decoded])  # (N, L, C), (N, L)
    out = []
    for i, s in enumerate(decoded):
        pixels = (
            torch.from_numpy(np.array(s.pixels)).permute(2, 0, 1)[None].float().div(127.5).sub(1.0)
        )  # (1, 3, H, W)
        latent = encode_pixels(pixels)[0].float().cpu()  # (C, h, w)
        out.append(HeldOutSample(s.key, latent, states[i][mask[i].bool()].float().cpu()))
    return out


@torch.no_grad()
def validation_loss(
    model: PixArtSigma,
    diffusion: GaussianDiffusion,
    samples: Sequence[HeldOutSample],
    *,
    timesteps: Sequence[int] = VAL_TIMESTEPS,
    seed: int = 0,
    batch_size: int = 8,
) -> dict[str, float]:
    """Mean ε-MSE over ``samples`` at each timestep (``t50``, …) and over all of them (``mean``).

    Samples of one latent shape are batched together (``batch_size`` at most); captions are zero-padded to the
    chunk's longest under a mask, so the chunking changes no sample's loss. The model runs in eval mode (no
    caption dropout) and is put back in the mode it was in.
    """
    if not samples:
        raise ValueError("validation_loss needs at least one held-out sample")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    bad = [t for t in timesteps if not 0 <= t < diffusion.num_timesteps]
    if bad or not timesteps:
        raise ValueError(f"timesteps must be in [0, {diffusion.num_timesteps}), got {list(timesteps)}")
    device = next(model.parameters()).device
    groups: dict[tuple, list[int]] = defaultdict(list)  # latent shape → sample indices
    for i, s in enumerate(samples):
        groups[tuple(s.latent.shape)].append(i)
    was_training = model.training
    model.eval()
    try:
        out = {}
        for t in timesteps:
            total = 0.0
            for indices in groups.values():
                for start in range(0, len(indices), batch_size):
                    total += _chunk_loss(model, diffusion, samples, indices[start : start + batch_size],
                                         t=t, seed=seed, device=device)  # fmt: skip
            out[f"t{t}"] = total / len(samples)
    finally:
        model.train(was_training)
    out["mean"] = sum(out[f"t{t}"] for t in timesteps) / len(timesteps)
    return out


def _chunk_loss(
    model: PixArtSigma,
    diffusion: GaussianDiffusion,
    samples: Sequence[HeldOutSample],
    indices: list[int],
    *,
    t: int,
    seed: int,
    device: torch.device,
) -> float:
    """The sum of the chunk's per-sample ε-MSE at timestep ``t``."""
    x0 = torch.stack([samples[i].latent for i in indices]).to(device)  # (B, C, h, w)
    noise = torch.stack([noise_for(seed, i, t, x0.shape[1:]) for i in indices]).to(device)  # (B, C, h, w)
    length = max(samples[i].caption.shape[0] for i in indices)
    y = torch.zeros(len(indices), length, samples[indices[0]].caption.shape[1], device=device)  # (B, L, C)
    mask = torch.zeros(len(indices), length, dtype=torch.bool, device=device)  # (B, L)
    for row, i in enumerate(indices):
        y[row, : samples[i].caption.shape[0]] = samples[i].caption.to(device)
        mask[row, : samples[i].caption.shape[0]] = True
    steps = torch.full((len(indices),), t, dtype=torch.long, device=device)  # (B,)
    x_t = diffusion.q_sample(x0, steps, noise).float()  # (B, C, h, w)
    model_out = model(x_t, steps, y, mask)  # (B, C_out, h, w)
    return float(diffusion.training_losses(model_out.float(), x0, steps, noise)["mse"].sum())
