"""Frozen encoders as the trainer sees them: cached features from the shards when they match, else on the fly.

PixArt-Σ pre-extracts T5 and VAE features because running T5-XXL and the VAE every step is slow; the
shards written by ``manifests.materialize`` may hold them. A cached feature is only used when it was made
by the same model the config names (``shards.json`` records which), so a VAE-swap stage whose VAE the
shards were not encoded with runs its VAE on the fly.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from manifests.features import NULL_CAPTION_FILE, T5Features, VaeFeatures

log = logging.getLogger(__name__)

SHARDS_INFO_FILE = "shards.json"


@dataclass(frozen=True)
class ShardFeatures:
    """Which encoders the training shards were materialised with (from ``shards.json``)."""

    t5: str | None = None
    vae: str | None = None
    vae_resolutions: tuple[int, ...] = ()

    @classmethod
    def read(cls, shards: str) -> ShardFeatures:
        """The folder's record, or no cached features when there is none (a glob or a bare tar)."""
        info = Path(shards) / SHARDS_INFO_FILE
        if not info.exists():
            return cls()
        features = json.loads(info.read_text()).get("features", {})
        return cls(features.get("t5"), features.get("vae"), tuple(features.get("vae_resolutions") or ()))

    def has_text(self, t5: str) -> bool:
        return same_model(self.t5, t5)

    def has_latents(self, vae: str, resolution: int) -> bool:
        return same_model(self.vae, vae) and resolution in self.vae_resolutions


def same_model(recorded: str | None, wanted: str) -> bool:
    """Whether a recorded encoder (HF id or path) is the one wanted: same resolved path, or same id."""
    if not recorded:
        return False
    a, b = Path(recorded), Path(wanted)
    if a.exists() and b.exists():
        return a.resolve() == b.resolve()
    return recorded == wanted


class CaptionEncoder:
    """Caption → (B, L, C) T5 states and (B, L) mask: the batch's cached features, else T5 on the fly."""

    def __init__(self, t5: str, *, max_tokens: int, device: torch.device, cached: bool) -> None:
        self.path = t5
        self.max_tokens = max_tokens
        self.device = device
        self.cached = cached
        self._t5: T5Features | None = None

    @property
    def t5(self) -> T5Features:
        """T5 (frozen; bf16 on CUDA), loaded on first use: a run on cached features may never need it."""
        if self._t5 is None:
            log.info("loading T5 %s for on-the-fly caption features", self.path)
            self._t5 = T5Features(self.path, max_tokens=self.max_tokens, device=self.device)
        return self._t5

    def null_caption(self, shards: str) -> torch.Tensor:
        """T5("") valid-token states (L, C): from the shard folder when cached, else computed."""
        cached = Path(shards) / NULL_CAPTION_FILE
        if self.cached and cached.exists():
            return torch.from_numpy(np.load(cached, allow_pickle=False).astype(np.float32))
        return torch.from_numpy(self.t5([""])[0].astype(np.float32))

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, C) features and (B, L) mask for the batch's chosen captions."""
        if "caption_features" in batch:
            features = batch["caption_features"][:, : self.max_tokens]  # (B, L, C)
            mask = batch["caption_mask"][:, : self.max_tokens]  # (B, L)
            return features.to(self.device), mask.to(self.device)
        return self.encode(batch["captions"])

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 on the fly, tokenised to max_tokens; the common padding is trimmed (the mask covers the rest)."""
        states, mask = self.t5.encode_padded(captions)  # (B, max_tokens, C), (B, max_tokens)
        length = int(mask.sum(dim=1).max())
        return states[:, :length].to(self.device), mask[:, :length].bool().to(self.device)


class LatentEncoder:
    """Pixels or cached posteriors → latents × the VAE's scaling factor; decodes for validation."""

    def __init__(self, vae: str, *, scaling_factor: float, device: torch.device, cached: bool) -> None:
        self.path = vae
        self.scaling_factor = scaling_factor
        self.device = device
        self.cached = cached
        self._vae: VaeFeatures | None = None

    @property
    def vae(self) -> VaeFeatures:
        if self._vae is None:
            log.info("loading VAE %s", self.path)
            self._vae = VaeFeatures(self.path, device=self.device)
            recorded = self._vae.scaling_factor
            if abs(recorded - self.scaling_factor) > 1e-6:
                log.warning(
                    "VAE %s says scaling_factor %s; the stage's vae_scaling_factor %s is used",
                    self.path, recorded, self.scaling_factor,
                )  # fmt: skip
        return self._vae

    def __call__(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """Scaled latents (B, C, h, w): the batch's sample from the cached posterior, else the VAE now."""
        if "latents" in batch:
            return batch["latents"].to(self.device) * self.scaling_factor
        mean, std = self.vae.posterior(batch["pixels"])  # (B, C, h, w) each
        noise = torch.randn(mean.shape, device=mean.device, generator=generator)
        return (mean + std * noise).to(self.device) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) → images (B, 3, H, W) in [-1, 1]."""
        vae = self.vae.vae
        images = vae.decode((latents / self.scaling_factor).to(self.device, vae.dtype)).sample
        return images.float().clamp(-1, 1)
