"""Proof that it trains: a tiny model overfits four images with distinct captions, then samples each.

A real check of the loss, the conditioning and the sampler together: the loss must fall well below its
start, and the image sampled for each caption must be nearer (pixel MSE) to that caption's image than to
the others. The tiny VAE is random, so "that caption's image" is its reconstruction through the VAE.
AdamW at 1e-3 memorises in 1500 steps; CAME at PixArt's settings needs far more steps than a CPU test has.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from training.config import load_config
from training.convert import load_diffusers
from training.diffusion import sample
from training.encoders import CaptionEncoder, LatentEncoder
from training.main import main
from training.tiny import write_synthetic_shards

from .conftest import MAX_TOKENS

NUM_IMAGES = 4
STEPS = 1500

CONFIG = """
run_dir = "{run}"
seed = 0
checkpoint_every = 1000
[text]
t5 = "{t5}"
max_tokens = {max_tokens}
[data]
shards = "{shards}"
real_prompt_ratio = 1.0
shuffle_buffer = 4
[optim]
name = "adamw"
grad_clip = 1.0
mixed_precision = "no"
[log]
progress_bar = false
tensorboard = false
every = 10
[[stages]]
name = "overfit"
resolution = 32
vae = "{vae}"
vae_scaling_factor = 0.13025
steps = {steps}
batch_size = {num_images}
lr = 1e-3
warmup_steps = 10
"""


def test_tiny_model_overfits_and_follows_its_captions(tiny_models: Path, tmp_path: Path) -> None:
    vae = str(tiny_models / "vae")
    shards = write_synthetic_shards(
        tmp_path / "shards", num_images=NUM_IMAGES, samples_per_shard=NUM_IMAGES, sizes=((64, 64),),
        t5=str(tiny_models / "t5"), vae=vae, vae_resolutions=(32,), max_tokens=MAX_TOKENS,
    )  # fmt: skip
    config = tmp_path / "overfit.toml"
    config.write_text(CONFIG.format(run=tmp_path / "run", t5=tiny_models / "t5", shards=shards, vae=vae,
                                    max_tokens=MAX_TOKENS, steps=STEPS, num_images=NUM_IMAGES))  # fmt: skip
    run_dir = main(load_config(config))

    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(losses[-5:]) < 0.5 * losses[0], losses

    model = load_diffusers(run_dir / "final", subfolder="transformer", max_token_length=MAX_TOKENS).eval()
    text = CaptionEncoder(
        str(tiny_models / "t5"), max_tokens=MAX_TOKENS, device=torch.device("cpu"), cached=False
    )
    null = text.null_caption(str(shards))
    model.set_null_caption(null, torch.ones(null.shape[0], dtype=torch.bool))
    captions = [f"a photo of a {s} at sunset" for s in ("cat", "dog", "astronaut", "rocket")]
    y, mask = text.encode(captions)  # the training captions (synthetic_caption 0..3)
    latents = LatentEncoder(vae, scaling_factor=0.13025, device=torch.device("cpu"), cached=True)
    generator = torch.Generator().manual_seed(0)
    sampled = latents.decode(
        sample(model, y, mask, latent_size=(4, 4), generator=generator)
    )  # (4, 3, 32, 32)

    targets = reconstructions(shards, latents)  # (4, 3, 32, 32)
    mse = ((sampled[:, None] - targets[None]) ** 2).mean(dim=(2, 3, 4))  # (samples, images)
    assert torch.equal(mse.argmin(dim=1), torch.arange(NUM_IMAGES)), mse


def reconstructions(shards: Path, latents: LatentEncoder) -> torch.Tensor:
    """Each training image through the VAE (its cached posterior mean, decoded), in key order."""
    import io
    import tarfile

    with tarfile.open(next(shards.glob("train-*.tar"))) as tar:
        means = [
            torch.from_numpy(
                np.load(io.BytesIO(tar.extractfile(f"{i:06d}.vae32.npy").read())).astype(np.float32)[0]
            )
            for i in range(NUM_IMAGES)
        ]
    return latents.decode(torch.stack(means) * latents.scaling_factor)
