"""Tiny offline T5 and VAEs: built by the CLI, loaded back through ``from_pretrained``, shapes right."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from transformers import AutoTokenizer, T5EncoderModel

from training import tiny

CAPTIONS = [
    "a photo of a cat at sunset, highly detailed.",
    'A gradient with the word "SIGMA" in red letters.',
]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    tiny.main(["--output", str(out)])
    return out


def test_t5_round_trip(models: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(models / "t5")
    encoder = T5EncoderModel.from_pretrained(models / "t5").eval()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert encoder.config.vocab_size == len(tokenizer)
    batch = tokenizer(CAPTIONS, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    assert batch.input_ids.shape == (2, 32)
    assert tokenizer.unk_token_id not in batch.input_ids[0].tolist()
    lengths = batch.attention_mask.sum(dim=1)  # (B,)
    assert batch.input_ids[0, lengths[0] - 1] == tokenizer.eos_token_id
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state  # (B, L, D)
    assert hidden.shape == (2, 32, 32) and torch.isfinite(hidden).all()


def test_t5_build_is_deterministic(models: Path, tmp_path: Path) -> None:
    again = tiny.build_tiny_t5(tmp_path)
    for name in ("spiece.model", "model.safetensors", "tokenizer.json"):
        assert (again / name).read_bytes() == (models / "t5" / name).read_bytes(), name


@pytest.mark.parametrize(("name", "scaling_factor"), [("vae", 0.13025), ("vae_sd", 0.18215)])
def test_vae_round_trip(models: Path, name: str, scaling_factor: float) -> None:
    vae = AutoencoderKL.from_pretrained(models / name).eval()
    assert vae.config.scaling_factor == scaling_factor
    image = Image.new("RGB", (96, 64), (200, 80, 30))
    pixels = torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)[
        None
    ]  # (1, 3, 64, 96)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor  # (1, 4, 8, 12)
        decoded = vae.decode(latents / vae.config.scaling_factor).sample  # (1, 3, 64, 96)
    assert latents.shape == (1, 4, 64 // tiny.VAE_DOWNSAMPLE, 96 // tiny.VAE_DOWNSAMPLE)
    assert decoded.shape == pixels.shape


def test_the_two_vaes_differ(models: Path) -> None:
    weights = (models / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert weights != (models / "vae_sd" / "diffusion_pytorch_model.safetensors").read_bytes()
