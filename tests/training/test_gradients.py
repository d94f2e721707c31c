"""Gradient mistakes a falling loss hides: clipping not applied, latents taken as the posterior mean.

Neither changes the logged loss much, and the overfitting test (test_learning.py) memorises either way, so
each has its own invariant here: the clipped gradient is the unclipped one scaled to ``grad_clip`` (total
2-norm over every parameter, torch's ``clip_grad_norm_`` definition), and a latent drawn from a cached or
freshly encoded posterior is ``mean + std·ε`` with ε ~ N(0, 1) (diffusers' ``DiagonalGaussianDistribution``).
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
import torch

import training.main as trainer
from training.data import SampleDecoder, make_stream
from training.diffusion import GaussianDiffusion
from training.encoders import CaptionEncoder, LatentEncoder
from training.model import PRESETS, PixArtSigma
from training.tiny import SDXL_VAE_SCALING_FACTOR

from .conftest import MAX_TOKENS, debug_config

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------------
# Gradient clipping
# ------------------------------------------------------------------------------------------------


def _gradients(tiny_models, shards, tmp_path, grad_clip: float) -> tuple[dict[str, torch.Tensor], dict]:
    """One train_step (2 micro-batches of the cached 32 px stage) from fixed weights, data and seed."""
    cfg = debug_config(tiny_models, shards, tmp_path / "run", f"optim.grad_clip={grad_clip}",
                       "optim.grad_accum_steps=2")  # fmt: skip
    torch.manual_seed(0)
    model = PixArtSigma(dataclasses.replace(PRESETS["tiny"], max_token_length=MAX_TOKENS))
    with torch.no_grad():  # off the zero init, so that every parameter has a gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    model.set_null_caption(torch.zeros(1, model.config.caption_channels), torch.ones(1, dtype=torch.bool))
    stream = make_stream(str(shards), resolution=32, batch_size=2, real_prompt_ratio=0.5, seed=0, rank=0,
                         shuffle_buffer=4, cached_latents=True, cached_text=True)  # fmt: skip
    text = CaptionEncoder(str(tiny_models / "t5"), max_tokens=MAX_TOKENS, device=CPU, cached=True)
    vae = str(tiny_models / "vae")
    latents = LatentEncoder(vae, scaling_factor=SDXL_VAE_SCALING_FACTOR, device=CPU, cached=True)
    env = trainer.Dist(0, 1, CPU)
    generator = torch.Generator().manual_seed(0)
    out = trainer.train_step(model, model, stream, GaussianDiffusion(), text, latents, generator, cfg, env, 0)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, out


def _total_norm(grads: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))


def test_the_step_clips_the_total_gradient_norm_to_grad_clip(tiny_models, shards, tmp_path) -> None:
    free, out_free = _gradients(tiny_models, shards, tmp_path, grad_clip=1e9)  # never reached: unclipped
    norm = _total_norm(free)
    assert out_free["grad_norm"] == pytest.approx(norm, rel=1e-4) and norm > 0
    clip = norm / 4
    clipped, out = _gradients(tiny_models, shards, tmp_path, grad_clip=clip)
    assert out["grad_norm"] == pytest.approx(norm, rel=1e-4)  # the logged norm is the norm before clipping
    assert clipped.keys() == free.keys()
    assert _total_norm(clipped) == pytest.approx(clip, rel=1e-4)  # the step's gradient: norm grad_clip
    for name, g in free.items():  # same direction: every parameter scaled by the same factor
        torch.testing.assert_close(clipped[name], g * (clip / norm), rtol=1e-4, atol=1e-9, msg=name)


# ------------------------------------------------------------------------------------------------
# Latents sampled from the posterior
# ------------------------------------------------------------------------------------------------

DRAWS = 200


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_cached_latents_are_drawn_from_the_posterior_not_its_mean() -> None:
    """A sample read again and again: (latent − mean) / std is standard normal, and differs on every read."""
    g = np.random.default_rng(0)
    mean = g.normal(size=(4, 4, 4)).astype(np.float32)  # (C, h, w) for a 32×32 image
    std = g.uniform(0.05, 0.5, size=(4, 4, 4)).astype(np.float32)
    raw = {"__key__": "k", "json": json.dumps({"height": 32, "width": 32, "caption_orig": "a cat"}).encode(),
           "vae32.npy": _npy(np.stack([mean, std]).astype(np.float16))}  # fmt: skip
    decoder = SampleDecoder(resolution=32, real_prompt_ratio=1.0, seed=0, cached_latents=True)
    mean16, std16 = (a.astype(np.float16).astype(np.float32) for a in (mean, std))
    z = np.stack([(decoder(dict(raw)).latent - mean16) / std16 for _ in range(DRAWS)])  # (DRAWS, C, h, w)
    _assert_standard_normal(z)


def test_latents_encoded_on_the_fly_are_drawn_from_the_posterior_not_its_mean(tiny_models) -> None:
    """The VAE's posterior by diffusers itself (AutoencoderKL.encode().latent_dist) is the reference."""
    from diffusers import AutoencoderKL

    path = str(tiny_models / "vae")
    vae = AutoencoderKL.from_pretrained(path).eval()
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (B, 3, H, W)
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
    encoder = LatentEncoder(path, scaling_factor=SDXL_VAE_SCALING_FACTOR, device=CPU, cached=False)
    generator = torch.Generator().manual_seed(0)
    draws = [encoder({"pixels": pixels}, generator) / SDXL_VAE_SCALING_FACTOR for _ in range(DRAWS // 4)]
    z = torch.stack([(d - dist.mean) / dist.std for d in draws]).numpy()  # (DRAWS / 4, B, C, h, w)
    _assert_standard_normal(z)


def _assert_standard_normal(z: np.ndarray) -> None:
    """z over draws × cells: mean 0 and std 1 (a posterior mean alone gives std 0), no two draws alike."""
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05, (z.mean(), z.std())
    assert abs(z.mean(axis=0)).max() < 5 / np.sqrt(len(z))  # every cell centred on its own mean
    assert all(not np.array_equal(a, b) for a, b in zip(z, z[1:], strict=False))
