"""Frozen encoders as the trainer sees them: cached features from the shards when they match, else on the fly.

PixArt-Σ pre-extracts T5 and VAE features because running T5-XXL and the VAE every step is slow; the
shards written by ``manifests.materialize`` may hold them. A cached feature is only used when it was made
by the same model the config names (``shards.json`` records which). Latents cached with another VAE are
refused at preflight (training/main.py ``check_cached_vae``) unless the stage sets ``vae_on_the_fly``, as
the weak stage of a VAE swap does, whose VAE the shards were not encoded with.

What the run needs from T5 besides the batches (the null caption, the validation prompts) is computed
once at the start, saved in the run folder and T5 freed (``TextFeatures``): a run on cached features
never keeps T5-XXL (~9.5 GB) resident.
"""

from __future__ import annotations

import gc
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from manifests.features import LEGACY_PROMPT_CASE, NULL_CAPTION_FILE, T5Features, VaeFeatures, vae_downsample

log = logging.getLogger(__name__)

SHARDS_INFO_FILE = "shards.json"
TEXT_FEATURES_FILE = "text_features.safetensors"


@dataclass(frozen=True)
class ShardFeatures:
    """Which encoders the training shards were materialised with (from ``shards.json``)."""

    t5: str | None = None
    vae: str | None = None
    vae_resolutions: tuple[int, ...] = ()
    vae_scaling_factor: float | None = (
        None  # the VAE's own factor (shards written before it was recorded: None)
    )
    prompt_case: str | None = None  # how cached captions were cased (None: no cached T5 features)

    @classmethod
    def read(cls, shards: str) -> ShardFeatures:
        """The folder's record, or no cached features when there is none (a glob or a bare tar)."""
        info = Path(shards) / SHARDS_INFO_FILE
        if not info.exists():
            return cls()
        features = json.loads(info.read_text()).get("features", {})
        return cls(
            features.get("t5"),
            features.get("vae"),
            tuple(features.get("vae_resolutions") or ()),
            features.get("vae_scaling_factor"),
            # shards cached before the case was recorded hold captions encoded as written
            features.get("prompt_case", LEGACY_PROMPT_CASE) if features.get("t5") else None,
        )

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


def vae_config(vae: str) -> dict | None:
    """A VAE's config (reads config.json only, no weights), or None when it cannot be read."""
    local = Path(vae) / "config.json"
    if local.is_file():  # a local folder: no need to import diffusers for a few numbers
        return json.loads(local.read_text())
    from diffusers import AutoencoderKL

    try:
        return dict(AutoencoderKL.load_config(vae))
    except (OSError, ValueError) as err:  # not a local folder and not reachable/cached on the hub
        log.debug("cannot read the config of VAE %s: %s", vae, err)
        return None


def vae_scaling_factor(vae: str) -> float | None:
    """The ``scaling_factor`` in a VAE's config, or None when it cannot be read."""
    config = vae_config(vae)
    value = None if config is None else config.get("scaling_factor")
    return float(value) if value is not None else None


def vae_downsample_factor(vae: str) -> int | None:
    """Pixels per latent cell of a VAE (``manifests.features.vae_downsample``), or None when its config
    cannot be read."""
    config = vae_config(vae)
    return None if config is None else vae_downsample(config)


@dataclass
class TextFeatures:
    """T5 outputs a run needs besides its batches: the null caption and each validation prompt's states."""

    null: torch.Tensor  # (L, C): T5("") — valid tokens (diffusers) or padded to max_tokens (upstream)
    null_mask: torch.Tensor  # (L,) bool
    prompts: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # (L_p, C), (L_p,)

    def prompt_batch(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, L, C) states and (P, L) mask of ``prompts``, zero-padded to the longest."""
        states = [self.prompts[p][0] for p in prompts]
        length = max(s.shape[0] for s in states)
        y = torch.zeros(len(states), length, states[0].shape[1])  # (P, L, C)
        mask = torch.zeros(len(states), length, dtype=torch.bool)  # (P, L)
        for i, prompt in enumerate(prompts):
            s, m = self.prompts[prompt]
            y[i, : s.shape[0]], mask[i, : s.shape[0]] = s, m
        return y, mask

    def save(self, path: Path, key: dict) -> None:
        """Safetensors with ``key`` (the settings it was computed for) in its metadata."""
        tensors = {"null": self.null.contiguous(), "null_mask": self.null_mask.contiguous()}
        for i, (states, mask) in enumerate(self.prompts.values()):
            tensors[f"prompt.{i}"], tensors[f"prompt_mask.{i}"] = states.contiguous(), mask.contiguous()
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata={"key": json.dumps(key, sort_keys=True)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, key: dict) -> TextFeatures | None:
        """The saved features when they were computed for ``key``, else None."""
        if not path.exists():
            return None
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            saved = json.loads((f.metadata() or {}).get("key", "null"))
        if saved != json.loads(json.dumps(key, sort_keys=True)):
            return None
        tensors = load_file(str(path))
        prompts = {
            p: (tensors[f"prompt.{i}"], tensors[f"prompt_mask.{i}"]) for i, p in enumerate(key["prompts"])
        }
        return cls(tensors["null"], tensors["null_mask"], prompts)


def compute_text_features(
    t5: str,
    *,
    max_tokens: int,
    mode: str,
    prompts: list[str],
    prompt_case: str,
    device: torch.device,
    cached_null: Path | None = None,
    encoder: T5Features | None = None,
) -> TextFeatures:
    """T5("") for ``mode`` and the prompts' states; loads T5 only when needed and frees it after.

    ``upstream`` keeps T5("") padded to ``max_tokens``, every row (PixArt's ``null_embed``), since a
    dropped caption is attended under the sample's own mask; ``diffusers`` keeps its valid tokens. A
    shard folder's ``t5_null.npy`` (valid tokens) serves ``diffusers`` without T5. ``encoder`` is reused
    when the run keeps T5 loaded anyway (captions encoded on the fly). Prompts are cased by ``prompt_case``
    (T5("") is the same either way).
    """
    needs_t5 = bool(prompts) or mode == "upstream" or cached_null is None
    if not needs_t5:
        null = torch.from_numpy(np.load(cached_null, allow_pickle=False).astype(np.float32))  # (L, C)
        return TextFeatures(null, torch.ones(null.shape[0], dtype=torch.bool))
    owned = encoder is None
    if owned:
        log.info("loading T5 %s once for the null caption and %d validation prompts", t5, len(prompts))
        encoder = T5Features(t5, max_tokens=max_tokens, prompt_case=prompt_case, device=device)
    if encoder.prompt_case != prompt_case:
        raise ValueError(f"the T5 encoder cases prompts {encoder.prompt_case!r}, the run {prompt_case!r}")
    states, mask = encoder.encode_padded(["", *prompts])  # (1 + P, max_tokens, C), (1 + P, max_tokens)
    states, mask = states.float().cpu(), mask.bool().cpu()
    lengths = mask.sum(dim=1).tolist()
    if mode == "upstream":
        null, null_mask = states[0], mask[0]
    else:
        null, null_mask = states[0, : lengths[0]], mask[0, : lengths[0]]
    features = TextFeatures(null.clone(), null_mask.clone())
    for i, prompt in enumerate(prompts, start=1):
        features.prompts[prompt] = (states[i, : lengths[i]].clone(), mask[i, : lengths[i]].clone())
    if owned:
        del encoder
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return features


class CaptionEncoder:
    """Caption → (B, L, C) T5 states and (B, L) mask: the batch's cached features, else T5 on the fly, captions
    cased by ``prompt_case`` (cached ones were cased so by materialize; preflight refuses other caches)."""

    def __init__(
        self, t5: str, *, max_tokens: int, device: torch.device, cached: bool, prompt_case: str = "lower"
    ) -> None:
        self.path = t5
        self.max_tokens = max_tokens
        self.prompt_case = prompt_case
        self.device = device
        self.cached = cached
        self._t5: T5Features | None = None

    @property
    def t5(self) -> T5Features:
        """T5 (frozen; bf16 on CUDA), loaded on first use: a run on cached features may never need it."""
        if self._t5 is None:
            log.info("loading T5 %s for on-the-fly caption features", self.path)
            self._t5 = T5Features(
                self.path, max_tokens=self.max_tokens, prompt_case=self.prompt_case, device=self.device
            )
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
            return features.to(self.device).float(), mask.to(self.device)
        return self.encode(batch["captions"])

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 on the fly, tokenised to max_tokens; the common padding is trimmed (the mask covers the rest)."""
        states, mask = self.t5.encode_padded(captions)  # (B, max_tokens, C), (B, max_tokens)
        length = int(mask.sum(dim=1).max())
        return states[:, :length].to(self.device), mask[:, :length].bool().to(self.device)


class LatentEncoder:
    """Pixels or cached posteriors → latents × the VAE's scaling factor; decodes for validation."""

    def __init__(
        self, vae: str, *, scaling_factor: float, device: torch.device, cached: bool, downsample: int | None = None
    ) -> None:
        self.path = vae
        self.scaling_factor = scaling_factor
        self.device = device
        self.cached = cached
        self._downsample = downsample  # the run's factor (training.main); None: read from the VAE's config
        self._vae: VaeFeatures | None = None

    @property
    def downsample(self) -> int:
        """Pixels per latent cell: the run's factor, else the VAE config's (no weights loaded)."""
        if self._downsample is None:
            factor = vae_downsample_factor(self.path)
            if factor is None:
                raise ValueError(f"cannot read the config of VAE {self.path} to know its downsample factor")
            self._downsample = factor
        return self._downsample

    @property
    def vae(self) -> VaeFeatures:
        if self._vae is None:
            log.info("loading VAE %s", self.path)
            vae = VaeFeatures(self.path, device=self.device)
            if abs(vae.scaling_factor - self.scaling_factor) > 1e-6:
                raise ValueError(
                    f"VAE {self.path} has scaling_factor {vae.scaling_factor}, the stage sets vae_scaling_factor "
                    f"{self.scaling_factor}: set it to {vae.scaling_factor} (SD {0.18215}, SDXL {0.13025})"
                )
            if self._downsample is not None and vae.downsample != self._downsample:
                raise ValueError(
                    f"VAE {self.path} downsamples {vae.downsample}×, the run's latents are {self._downsample}× "
                    "(one factor for every stage: training.main.run_vae_downsample)"
                )
            self._vae = vae
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
        """Scaled latents (B, C, h, w) → images (B, 3, H, W) in [-1, 1], on the CPU.

        One image at a time, tiled: a 2K/4K decode in one piece needs tens of GB of activations. Tiling
        is switched on only here, so on-the-fly training latents stay those of the whole image (as cached).
        """
        vae = self.vae.vae
        vae.enable_tiling()
        try:
            images = [
                vae.decode((z[None] / self.scaling_factor).to(self.device, vae.dtype)).sample.float().cpu()
                for z in latents
            ]
        finally:
            vae.disable_tiling()
        return torch.cat(images).clamp(-1, 1)
