"""Frozen encoders whose outputs the training shards can cache: T5 caption features, VAE posteriors.

Both load by HF id or local path through the same ``from_pretrained`` call that real weights use.
PixArt-Σ's maintainers pre-extract these features because encoding T5-XXL and the VAE on the fly
makes training slow; the trainer uses the same classes when a shard has no cached features.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

NULL_CAPTION_FILE = "t5_null.npy"  # T5("") beside cached T5 features; the trainer's null caption
MAX_CAPTION_TOKENS = 300  # PixArt-Σ raised the T5 token budget from 120 (PixArt-α) to 300

# The text T5 sees for a caption or prompt: one policy, applied by every encoder (materialize's cache, the
# trainer on the fly, validation/eval prompts, pixsigma-sample/evaluate) and recorded with the model.
#   lower      — ``prompt.lower().strip()``: what PixArtSigmaPipeline encodes (diffusers'
#                ``_text_preprocessing`` with ``clean_caption=False``, and its fallback without bs4/ftfy), so a
#                plain diffusers call on an export encodes exactly what the model was trained on. Default.
#   as_written — ``prompt.strip()``: PixArt-Σ's own code (tools/extract_features.py ``caption.strip()``,
#                train_scripts/train.py tokenises ``batch[1]`` as is, scripts/inference.py ``prompt.strip()``);
#                plain diffusers lowercases, so such an export samples differently there (its pixsigma.json says so).
PromptCase = Literal["lower", "as_written"]
PROMPT_CASES: tuple[str, ...] = ("lower", "as_written")
DEFAULT_PROMPT_CASE: PromptCase = "lower"
# The case of features, checkpoints and exports written before the case was recorded: encoded as written.
LEGACY_PROMPT_CASE: PromptCase = "as_written"


def check_prompt_case(prompt_case: str) -> str:
    """``prompt_case`` when it is one of PROMPT_CASES; else ValueError naming the allowed values."""
    if prompt_case not in PROMPT_CASES:
        raise ValueError(f"prompt_case must be one of {PROMPT_CASES}, got {prompt_case!r}")
    return prompt_case


def prompt_text(prompt: str, prompt_case: str) -> str:
    """The text T5 encodes for ``prompt`` under ``prompt_case`` (see PROMPT_CASES)."""
    if check_prompt_case(prompt_case) == "lower":
        return prompt.lower().strip()  # diffusers PixArtSigmaPipeline._text_preprocessing(clean_caption=False)
    return prompt.strip()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def t5_states(
    tokenizer, encoder, texts: list[str], *, max_tokens: int, prompt_case: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, max_tokens, D) last hidden states in the encoder's dtype and (B, max_tokens) attention mask, every
    text cased by ``prompt_case`` and tokenised to ``max_tokens`` (PixArt's ``padding="max_length"``)."""
    tokens = tokenizer(
        [prompt_text(t, prompt_case) for t in texts],
        max_length=max_tokens, padding="max_length", truncation=True, return_tensors="pt",
    ).to(encoder.device)  # fmt: skip
    states = encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    return states, tokens.attention_mask


class T5Features:
    """Caption → T5 encoder states of the valid tokens only (never the padding), cased by ``prompt_case``."""

    def __init__(
        self, path: str, *, max_tokens: int = MAX_CAPTION_TOKENS, prompt_case: str = DEFAULT_PROMPT_CASE,
        device: torch.device | None = None,
    ) -> None:  # fmt: skip
        from transformers import AutoTokenizer, T5EncoderModel

        self.device = device or default_device()
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.encoder = (
            T5EncoderModel.from_pretrained(path, dtype=dtype).to(self.device).eval().requires_grad_(False)
        )
        self.max_tokens = max_tokens
        self.prompt_case = check_prompt_case(prompt_case)
        self.dim = self.encoder.config.d_model

    @torch.no_grad()
    def encode_padded(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, max_tokens, D) float32 states and (B, max_tokens) mask, padded to ``max_tokens``."""
        states, mask = t5_states(self.tokenizer, self.encoder, captions, max_tokens=self.max_tokens,
                                 prompt_case=self.prompt_case)  # fmt: skip
        return states.float(), mask  # (B, L, D), (B, L)

    def __call__(self, captions: list[str]) -> list[np.ndarray]:
        """One (num_valid_tokens, D) float16 array per caption."""
        states, mask = self.encode_padded(captions)
        lengths = mask.sum(dim=1).tolist()
        return [states[i, : lengths[i]].cpu().to(torch.float16).numpy() for i in range(len(captions))]


# SD's and SDXL's VAEs: 4 blocks, the last without a downsample (2 ** 3). PixArt-Σ's code hard-codes it
# (``latent_size = image_size // 8``); the toy world's 4× VAEs (training.toy_vae) have 3 blocks.
SD_VAE_DOWNSAMPLE = 8


def vae_downsample(vae_config: Mapping[str, Any]) -> int:
    """Pixels per latent cell of an ``AutoencoderKL`` config: ``2 ** (len(block_out_channels) - 1)``, as
    diffusers' ``PixArtSigmaPipeline`` computes ``vae_scale_factor`` (8 for SD's and SDXL's VAEs)."""
    channels = vae_config.get("block_out_channels")
    if not channels:
        raise ValueError(f"a VAE config needs block_out_channels to give its downsample factor, got {channels!r}")
    return 2 ** (len(channels) - 1)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → (3, H, W) float tensor in [-1, 1], the VAE's input range."""
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return array.float().div(127.5).sub(1.0)


class VaeFeatures:
    """Image (already at its bucket size) → VAE posterior mean and std, unscaled."""

    def __init__(self, path: str, *, device: torch.device | None = None) -> None:
        from diffusers import AutoencoderKL

        self.device = device or default_device()
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.vae = (
            AutoencoderKL.from_pretrained(path, dtype=self.dtype).to(self.device).eval().requires_grad_(False)
        )
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.downsample = vae_downsample(self.vae.config)  # latents are (H / downsample, W / downsample)

    @torch.no_grad()
    def posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) in [-1, 1] → mean and std, each (B, C, H/f, W/f) float32, f = ``self.downsample``."""
        dist = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def __call__(self, images: list[Image.Image]) -> list[np.ndarray]:
        """One (2, C, h, w) float16 array [mean, std] per image; images of one call share a size."""
        mean, std = self.posterior(torch.stack([image_to_tensor(im) for im in images]))
        return [torch.stack([mean[i], std[i]]).cpu().to(torch.float16).numpy() for i in range(len(images))]
