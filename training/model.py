"""PixArt-Σ diffusion transformer (PixArt-XL/2), readable top to bottom.

Layout and parameter names follow the PixArt-α/Σ reference implementation (``PixArtMS``), so an original
``.pth`` loads with no renaming: ``x_embedder``, ``t_embedder``, ``t_block``, ``y_embedder``, ``blocks``,
``final_layer``. Papers: PixArt-α (arXiv 2310.00426) §2.3 for adaLN-single and the caption path; PixArt-Σ
(arXiv 2403.04692) §3.2 for KV token compression; DiT (arXiv 2212.09748) for the backbone.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from manifests.features import DEFAULT_PROMPT_CASE, check_prompt_case

logger = logging.getLogger(__name__)

PE_REFERENCE_RESOLUTION = 512  # pe_interpolation = resolution / 512 (PixArt-Σ: 0.5, 1, 2, 4 at 256…2K)
TIMESTEP_FREQ_DIM = 256  # sinusoidal frequencies fed to the timestep MLP
NORM_EPS = 1e-6  # every non-affine LayerNorm of the backbone
# PEs kept per model, least recently used dropped first; set_resolution empties it (one stage's grids at most).
# One stage of 40 buckets at width 1152 in fp32 is 0.04 / 0.17 / 0.67 / 2.7 / 5.2 GiB at 256 / 512 / 1024 /
# 2048 / 2880 px; the budget keeps ~7 of the 2880 grids (~133 MiB each), and a miss is computed on the device.
PE_CACHE_BYTES = 1 << 30
NULL_CAPTION_MODES = ("upstream", "diffusers")
KV_INITS = ("conv_avg", "random")  # how newly compressed layers start (enable_kv_compression)


# --------------------------------------------------------------------------------------------------
# Config and presets
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """Shape of one PixArt-Σ DiT; `base_size`/`pe_interpolation` describe the training resolution."""

    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int = 2
    in_channels: int = 4
    learn_sigma: bool = True  # 2·in_channels out: ε and the variance interpolation value v
    caption_channels: int = 4096  # T5-XXL hidden size
    max_token_length: int = 300  # PixArt-Σ caption budget (T5 tokens)
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1  # null caption swapped in during training
    base_size: int = 64  # token grid side at the training resolution (1024 px / VAE 8× / patch 2)
    pe_interpolation: float = 2.0  # training resolution / 512
    kv_compress_layers: tuple[int, ...] = ()
    kv_compress_ratio: int = 2  # R: K/V tokens N → N/R²
    grad_checkpointing: bool = False
    # How a dropped caption is attended (see CaptionEmbedder): "upstream" keeps the sample's own mask over
    # T5("") padded to max_token_length (PixArt's training code and samplers); "diffusers" uses the null
    # caption's own mask (diffusers' negative prompt).
    null_caption: str = "diffusers"
    # How the captions it was trained on were cased before T5 (manifests.features.PROMPT_CASES); samplers
    # case prompts the same way. Not part of the weights' shape: the trainer sets text.prompt_case here.
    prompt_case: str = DEFAULT_PROMPT_CASE

    def __post_init__(self) -> None:
        if self.depth < 1 or self.num_heads < 1 or self.patch_size < 1 or self.in_channels < 1:
            raise ValueError("depth, num_heads, patch_size and in_channels must be >= 1")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}"
            )
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by 4 (2D sin-cos embedding)")
        if self.base_size < 1 or self.pe_interpolation <= 0:
            raise ValueError(
                f"base_size must be >= 1 and pe_interpolation > 0, got {self.base_size}, {self.pe_interpolation}"
            )
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        if self.null_caption not in NULL_CAPTION_MODES:
            raise ValueError(f"null_caption must be one of {NULL_CAPTION_MODES}, got {self.null_caption!r}")
        check_prompt_case(self.prompt_case)
        if self.kv_compress_ratio < 1:
            raise ValueError(f"kv_compress_ratio must be >= 1, got {self.kv_compress_ratio}")
        bad = [i for i in self.kv_compress_layers if not 0 <= i < self.depth]
        if bad or len(set(self.kv_compress_layers)) != len(self.kv_compress_layers):
            raise ValueError(
                f"kv_compress_layers must be distinct indices in [0, {self.depth}), got {self.kv_compress_layers}"
            )

    @property
    def out_channels(self) -> int:
        """Output channels: ε only, or ε and the learned-range variance value."""
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.hidden_size // self.num_heads


def default_kv_layers(depth: int) -> tuple[int, ...]:
    """The second half of the blocks (14–27 of 28), where PixArt-Σ compresses K/V."""
    return tuple(range(depth // 2, depth))


def pe_params_for_resolution(resolution: int, *, patch_size: int = 2, vae_downsample: int) -> tuple[int, float]:
    """(base_size, pe_interpolation) for a training resolution in pixels, e.g. 1024 → (64, 2.0) with an 8× VAE.

    base_size is the token grid side at that resolution: PixArt's ``resolution // 8 // patch_size`` with its
    fixed 8× VAE, ``resolution // vae_downsample // patch_size`` here (a 4× toy VAE: 128 px → 16).
    pe_interpolation depends on the pixels only (PixArt-Σ: 0.5, 1, 2, 4 at 256…2K)."""
    cell = vae_downsample * patch_size
    if vae_downsample < 1 or resolution % cell:
        raise ValueError(
            f"resolution={resolution} must be a multiple of {cell} (VAE {vae_downsample}× · patch {patch_size})"
        )
    return resolution // vae_downsample // patch_size, resolution / PE_REFERENCE_RESOLUTION


PRESETS: dict[str, ModelConfig] = {
    # PixArt-XL/2 as released for PixArt-Σ 1024 px: 28 blocks, width 1152, 16 heads of 72, T5-XXL, 300 tokens.
    "XL/2": ModelConfig(depth=28, hidden_size=1152, num_heads=16),
    # Same, with PixArt-Σ's KV compression (R=2) in blocks 14–27, as used for the 2K/4K stages.
    "XL/2-kv": ModelConfig(
        depth=28, hidden_size=1152, num_heads=16, kv_compress_layers=default_kv_layers(28)
    ),
    # CPU tests: 2 blocks of width 64 (4 heads of 16), 32-d caption features, 16 tokens; trained on
    # 8×8 latents (a 4×4 token grid), pe_interpolation 1.
    "tiny": ModelConfig(
        depth=2,
        hidden_size=64,
        num_heads=4,
        caption_channels=32,
        max_token_length=16,
        base_size=4,
        pe_interpolation=1.0,
    ),
    # CPU benchmark: width 384 (6 heads of 64), 2 blocks, KV compression in the second half (block 1) as in XL/2-kv.
    "small": ModelConfig(
        depth=2,
        hidden_size=384,
        num_heads=6,
        caption_channels=64,
        max_token_length=120,
        base_size=16,
        pe_interpolation=1.0,
        kv_compress_layers=(1,),
    ),
    # CPU ablation bench (issue 21, bench/bench_ablations.py): 6 blocks, so that deep (4–5), middle (2–3),
    # shallow (0–1) and all compressed layers differ (PixArt-Σ §3.2's ablation); width 96 (4 heads of 24).
    "ablation": ModelConfig(
        depth=6,
        hidden_size=96,
        num_heads=4,
        caption_channels=32,
        max_token_length=48,
        base_size=4,
        pe_interpolation=1.0,
    ),
}


# --------------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------------


def timestep_embedding(t: Tensor, dim: int = TIMESTEP_FREQ_DIM, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, [cos, sin] order as in GLIDE/DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


def get_2d_sincos_pos_embed(
    embed_dim: int,
    grid_hw: tuple[int, int],
    *,
    base_size: int,
    pe_interpolation: float,
    device: torch.device | None = None,
) -> Tensor:
    """PixArt 2D sin-cos PE for an (h, w) token grid, (h·w, D) float32, row-major; first D/2 channels encode w.

    Computed in float64 (as the reference's numpy) on ``device`` (the CPU by default).
    """
    h, w = grid_hw
    # Positions are rescaled so that any grid spans [0, base_size / pe_interpolation): a grid twice the
    # training size sees positions at half steps (PixArt-α "lewei_scale", PixArt-Σ "pe_interpolation").
    pos_h = torch.arange(h, dtype=torch.float64, device=device) / (h / base_size) / pe_interpolation  # (h,)
    pos_w = torch.arange(w, dtype=torch.float64, device=device) / (w / base_size) / pe_interpolation  # (w,)
    grid_h, grid_w = torch.meshgrid(pos_h, pos_w, indexing="ij")  # (h, w) each
    emb_w = _sincos_1d(embed_dim // 2, grid_w.reshape(-1))  # (h·w, D/2)
    emb_h = _sincos_1d(embed_dim // 2, grid_h.reshape(-1))  # (h·w, D/2)
    return torch.cat([emb_w, emb_h], dim=1).float()  # (h·w, D)


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """MAE-style 1D sin-cos embedding, [sin, cos] order, in float64."""
    steps = torch.arange(dim // 2, dtype=torch.float64, device=pos.device)
    omega = 1.0 / 10000 ** (steps / (dim / 2.0))  # (dim/2,)
    out = pos[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, dim)


class PatchEmbed(nn.Module):
    """Latents to patch tokens with one strided conv."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, h·w, D)


class TimestepEmbedder(nn.Module):
    """Timestep → 256 sinusoidal frequencies → MLP (Linear, SiLU, Linear)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(TIMESTEP_FREQ_DIM, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t).to(self.mlp[0].weight.dtype))  # (B,) -> (B, D)


class Mlp(nn.Module):
    """Two linears with tanh-GELU between (timm `Mlp` layout: fc1, act, fc2)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """T5 token features → MLP; swaps in the null caption for classifier-free guidance."""

    def __init__(self, caption_channels: int, hidden_size: int, max_token_length: int) -> None:
        super().__init__()
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size)
        # The null caption: the trainer fills it with T5("") (`set_null_caption`); y_mask is its key-padding
        # mask. Which mask a dropped caption is attended with is the model's `null_caption` mode.
        self.register_buffer("y_embedding", torch.zeros(max_token_length, caption_channels))
        self.register_buffer("y_mask", torch.ones(max_token_length, dtype=torch.bool))

    def forward(
        self, y: Tensor, mask: Tensor, drop_ids: Tensor | None, *, keep_own_mask: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Caption MLP; samples in ``drop_ids`` get the null caption, under its mask or (upstream) their own."""
        if drop_ids is not None:
            num_tokens = y.shape[1]
            if num_tokens > self.y_embedding.shape[0]:
                raise ValueError(
                    f"{num_tokens} caption tokens exceed max_token_length={self.y_embedding.shape[0]}"
                )
            drop = drop_ids.to(device=y.device, dtype=torch.bool)  # (B,)
            null = self.y_embedding[:num_tokens].to(y.dtype)  # (L, C)
            y = torch.where(drop[:, None, None], null[None], y)  # (B, L, C)
            if not keep_own_mask:
                mask = torch.where(drop[:, None], self.y_mask[None, :num_tokens], mask)  # (B, L)
        return self.y_proj(y), mask  # (B, L, D), (B, L)


# --------------------------------------------------------------------------------------------------
# Transformer block
# --------------------------------------------------------------------------------------------------


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation x·(1+scale)+shift; shift/scale are (B, 1, D)."""
    return x * (1 + scale) + shift


class Attention(nn.Module):
    """Self-attention (fused qkv) with optional KV token compression (PixArt-Σ §3.2)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = 1
        # `sr` (depthwise R×R conv, stride R) and `norm` (LayerNorm) exist only once compression is
        # enabled; the names are the reference's, so KV-compressed reference checkpoints load as they are.
        self.sr: nn.Conv2d | None = None
        self.norm: nn.LayerNorm | None = None

    def add_kv_compression(self, ratio: int) -> None:
        """Create the conv + LayerNorm shared by K and V, on this module's device and dtype."""
        dim = self.qkv.in_features
        factory = {"device": self.qkv.weight.device, "dtype": self.qkv.weight.dtype}
        self.sr = nn.Conv2d(dim, dim, kernel_size=ratio, stride=ratio, groups=dim, **factory)
        # K/V arrive channels-last (a transpose of (B, N, D) tokens), so the conv runs channels-last and its
        # weight gradient comes back channels-last: (D, 1, R, R) with stride 1 on the size-1 dim. A weight
        # stored the same way keeps DDP's bucket views and the gradients in one layout (no "Grad strides do
        # not match bucket view strides" warning, no copy per step).
        # (`.contiguous(memory_format=torch.channels_last)` would be a no-op: with one input channel the
        # default layout already counts as channels-last, so the strides are set explicitly.)
        shape = self.sr.weight.shape  # (D, 1, R, R)
        weight = torch.empty_strided(shape, (ratio * ratio, 1, ratio, 1), **factory)
        self.sr.weight = nn.Parameter(weight.copy_(self.sr.weight.data))
        self.norm = nn.LayerNorm(dim, **factory)  # affine, eps 1e-5: the reference's nn.LayerNorm(dim)
        self.sr_ratio = ratio

    def compress(self, tokens: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        """(B, h·w, D) → (B, ⌈h/R⌉·⌈w/R⌉, D); a grid not divisible by R is edge-padded first."""
        assert self.sr is not None and self.norm is not None
        B, N, D = tokens.shape
        h, w = grid_hw
        r = self.sr_ratio
        grid = tokens.transpose(1, 2).reshape(B, D, h, w)  # (B, D, h, w)
        pad_h, pad_w = -h % r, -w % r
        if pad_h or pad_w:
            # Replicate the last row/column so the border cell averages real tokens, not zeros.
            grid = F.pad(grid, (0, pad_w, 0, pad_h), mode="replicate")  # (B, D, h', w')
        grid = self.sr(grid)  # (B, D, h'/R, w'/R)
        return self.norm(grid.flatten(2).transpose(1, 2))  # (B, M, D)

    def forward(self, x: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, D).unbind(2)  # (B, N, D) each
        if self.sr is not None:
            k = self.compress(k, grid_hw)  # (B, M, D), M = N / R²
            v = self.compress(v, grid_hw)  # (B, M, D)
        q = q.reshape(B, N, self.num_heads, -1).transpose(1, 2)  # (B, H, N, Dh)
        k = k.reshape(B, k.shape[1], self.num_heads, -1).transpose(1, 2)  # (B, H, M, Dh)
        v = v.reshape(B, v.shape[1], self.num_heads, -1).transpose(1, 2)  # (B, H, M, Dh)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, Dh); no mask, so flash on GPU
        return self.proj(x.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class CrossAttention(nn.Module):
    """Image tokens attend to caption tokens; padding tokens masked out."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
        B, N, D = x.shape
        L = y.shape[1]
        q = self.q_linear(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)  # (B, H, N, Dh)
        k, v = (
            self.kv_linear(y).reshape(B, L, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        )  # (B, H, L, Dh) each
        # Key-padding mask, broadcast over heads and queries. Each caption has >= 1 valid token (T5's EOS).
        attn_mask = mask[:, None, None, :]  # (B, 1, 1, L) bool
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, N, Dh)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class PixArtBlock(nn.Module):
    """Self-attention, cross-attention (no norm, no gate), MLP; adaLN-single modulation."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=NORM_EPS)
        self.attn = Attention(hidden_size, num_heads)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=NORM_EPS)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), hidden_size)
        # Per-block learned offsets added to the shared t0 (adaLN-single): shift/scale/gate for attn, mlp.
        self.scale_shift_table = nn.Parameter(torch.zeros(6, hidden_size))

    def forward(self, x: Tensor, y: Tensor, t0: Tensor, mask: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        B, N, D = x.shape
        mods = self.scale_shift_table[None] + t0.reshape(B, 6, D)  # (B, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.chunk(
            6, dim=1
        )  # (B, 1, D) each
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), grid_hw)  # (B, N, D)
        x = x + self.cross_attn(x, y, mask)  # (B, N, D)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, N, D)
        return x


class FinalLayer(nn.Module):
    """Non-affine LayerNorm, modulation by its own (2, D) table + t, Linear to patch²·C_out."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=NORM_EPS)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, hidden_size))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # (B, 1, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, p²·C_out)


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class PixArtSigma(nn.Module):
    """PixArt-Σ DiT: latents + timestep + T5 caption features → ε (and variance value)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))  # adaLN-single: t0 shared by all blocks
        self.y_embedder = CaptionEmbedder(config.caption_channels, D, config.max_token_length)
        self.blocks = nn.ModuleList(
            PixArtBlock(D, config.num_heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(D, config.patch_size, config.out_channels)
        for i in config.kv_compress_layers:
            self.blocks[i].attn.add_kv_compression(config.kv_compress_ratio)
        self._pe_cache: dict[tuple, Tensor] = {}  # not state: a function of the config and the grid
        self._run_block = _call_block  # the blocks' forward, eager or compiled (`set_compile`)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """All special initialisation (PixArt-α ``initialize``), plus Conv Avg Init for KV compression."""
        D = self.config.hidden_size
        for module in self.modules():
            if isinstance(module, nn.Linear):  # Xavier on every linear, zero bias (DiT)
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # Patch embedding initialised like a linear over its flattened kernel.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        # Timestep MLP, adaLN-single linear and caption MLP: N(0, 0.02).
        for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1]):
            nn.init.normal_(linear.weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        # Modulation tables: N(0, 1/D) as in the reference.
        for block in self.blocks:
            nn.init.normal_(block.scale_shift_table, std=D**-0.5)
        nn.init.normal_(self.final_layer.scale_shift_table, std=D**-0.5)
        # Zero cross-attention output and final linear: each block starts caption-blind, the model outputs 0.
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        # Placeholder null caption until the trainer stores T5(""): random, like the reference's buffer.
        nn.init.normal_(self.y_embedder.y_embedding, std=self.config.caption_channels**-0.5)
        self.y_embedder.y_mask.fill_(True)
        for block in self.blocks:
            if block.attn.sr is not None:
                conv_avg_init_(block.attn)

    # ---------------------------------------------------------------------------------------------
    # Forward
    # ---------------------------------------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        timestep: Tensor,
        y: Tensor,
        mask: Tensor | None = None,
        *,
        force_drop_ids: Tensor | None = None,
    ) -> Tensor:
        """x (B, C, H, W), timestep (B,), y (B, L, C_cap), mask (B, L) 1 = valid → (B, C_out, H, W)."""
        cfg = self.config
        B, _, H, W = x.shape
        if H % cfg.patch_size or W % cfg.patch_size:
            raise ValueError(f"latent size {H}x{W} must be divisible by patch_size={cfg.patch_size}")
        if y.ndim != 3 or y.shape[0] != B:
            raise ValueError(f"y must be (B={B}, L, {cfg.caption_channels}), got {tuple(y.shape)}")
        h, w = H // cfg.patch_size, W // cfg.patch_size
        if mask is None:
            mask = torch.ones(y.shape[:2], dtype=torch.bool, device=y.device)
        mask = mask.bool()  # (B, L)
        drop_ids = force_drop_ids
        if drop_ids is None and self.training and cfg.class_dropout_prob > 0:
            drop_ids = torch.rand(B, device=x.device) < cfg.class_dropout_prob  # (B,)

        pos = self.pos_embed(h, w, device=x.device, dtype=x.dtype)  # (h·w, D), cached per grid
        x = self.x_embedder(x) + pos[None]  # (B, N, D), N = h·w
        t = self.t_embedder(timestep)  # (B, D)
        t0 = self.t_block(t)  # (B, 6·D)
        keep_own_mask = cfg.null_caption == "upstream"
        y, mask = self.y_embedder(y, mask, drop_ids, keep_own_mask=keep_own_mask)  # (B, L, D), (B, L)
        # Compiled blocks for training only: sampling (no grad) would add graphs for little gain.
        run_block = self._run_block if torch.is_grad_enabled() else _call_block
        for block in self.blocks:
            if cfg.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(run_block, block, x, y, t0, mask, (h, w), use_reentrant=False)  # (B, N, D)
            else:
                x = run_block(block, x, y, t0, mask, (h, w))  # (B, N, D)
        x = self.final_layer(x, t)  # (B, N, p²·C_out)
        return self.unpatchify(x, h, w)  # (B, C_out, H, W)

    def forward_with_cfg(
        self,
        x: Tensor,
        timestep: Tensor,
        y: Tensor,
        mask: Tensor | None = None,
        *,
        cfg_scale: float,
    ) -> Tensor:
        """Caption and null-caption passes in one batch; guidance on the ε channels, σ from the caption pass."""
        B = x.shape[0]
        C = self.config.in_channels
        mask = torch.ones(y.shape[:2], dtype=torch.bool, device=y.device) if mask is None else mask
        drop = torch.arange(2 * B, device=x.device) >= B  # (2B,): second half gets the null caption
        out = self.forward(
            torch.cat([x, x]), torch.cat([timestep, timestep]), torch.cat([y, y]), torch.cat([mask, mask]),
            force_drop_ids=drop,
        )  # (2B, C_out, H, W)  # fmt: skip
        cond, uncond = out.chunk(2)  # (B, C_out, H, W) each
        # All in_channels ε channels are guided (the DiT/PixArt reference guides `[:, :3]`, an RGB leftover).
        eps = uncond[:, :C] + cfg_scale * (cond[:, :C] - uncond[:, :C])  # (B, C, H, W)
        return torch.cat([eps, cond[:, C:]], dim=1)  # (B, C_out, H, W)

    def pos_embed(
        self, h: int, w: int, *, device: torch.device | None = None, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """Sin-cos PE for an (h, w) grid at the model's base_size / pe_interpolation, (h·w, D), cached.

        Computed on ``device`` (float64 on the CPU cost ~0.8 s and a 140 MiB copy per forward at 2K), and
        kept per (grid, base_size, pe_interpolation, device, dtype) within PE_CACHE_BYTES, least recently
        used dropped first; ``set_resolution`` empties the cache.
        """
        cfg = self.config
        device = torch.device("cpu") if device is None else torch.device(device)
        key = (h, w, cfg.base_size, cfg.pe_interpolation, device, dtype)
        pe = self._pe_cache.pop(key, None)
        if pe is None:
            where = device if device.type in ("cpu", "cuda") else torch.device("cpu")  # float64 there
            with (
                torch.inference_mode(False),
                torch.no_grad(),
            ):  # a plain tensor even if built in inference mode
                pe = get_2d_sincos_pos_embed(
                    cfg.hidden_size,
                    (h, w),
                    base_size=cfg.base_size,
                    pe_interpolation=cfg.pe_interpolation,
                    device=where,
                ).to(device=device, dtype=dtype)  # (h·w, D)
        self._pe_cache[key] = pe  # (re)inserted last: the most recently used
        cached = sum(t.nbytes for t in self._pe_cache.values())
        while cached > PE_CACHE_BYTES and len(self._pe_cache) > 1:
            cached -= self._pe_cache.pop(next(iter(self._pe_cache))).nbytes
        return pe

    def unpatchify(self, x: Tensor, h: int, w: int) -> Tensor:
        """(B, h·w, p²·C) → (B, C, h·p, w·p)."""
        p, c = self.config.patch_size, self.config.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c)  # (B, h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (B, C, h, p, w, p)
        return x.reshape(x.shape[0], c, h * p, w * p)  # (B, C, H, W)

    # ---------------------------------------------------------------------------------------------
    # Changes the trainer makes between stages
    # ---------------------------------------------------------------------------------------------

    def set_resolution(self, base_size: int, pe_interpolation: float) -> None:
        """Move to a new training resolution; the PE follows, and the previous stage's cached PEs are freed.

        The cache then holds one stage's grids at most (one per bucket, 40): kept across stages, one PE per
        bucket of every sigma stage at width 1152 in fp32 would be 8.8 GiB on the device.
        """
        self.config = dataclasses.replace(self.config, base_size=base_size, pe_interpolation=pe_interpolation)
        self._pe_cache.clear()

    def set_compile(self, enabled: bool, *, backend: str | Callable = "inductor") -> None:
        """torch.compile the transformer blocks (one graph for all blocks alike), or run them eagerly again.

        Shapes are dynamic: the token grid (one per aspect-ratio bucket), caption length and batch size
        vary, and a static compile would recompile per bucket until Dynamo's limit makes it fall back to
        eager. What still specialises: plain vs KV blocks (2 graphs), a batch of 1, and for KV blocks a grid
        side not divisible by R (edge padding) or compressed to 1 — a handful of graphs, not one per bucket.
        The PE (cached per grid), embeddings and final layer stay outside; the module is not wrapped, so
        state_dict names and DDP's ``no_sync`` are unchanged. Sampling (no grad) runs the blocks eagerly.
        """
        self._run_block = (
            torch.compile(_call_block, dynamic=True, backend=backend) if enabled else _call_block
        )

    def set_grad_checkpointing(self, enabled: bool) -> None:
        """Turn per-block activation checkpointing on or off."""
        self.config = dataclasses.replace(self.config, grad_checkpointing=enabled)

    def enable_kv_compression(self, layers: Iterable[int], ratio: int = 2, *, init: str = "conv_avg") -> None:
        """Add KV compression to `layers`, Conv Avg Init by default; every existing weight is kept.

        ``init="random"`` leaves the new conv at PyTorch's default (Kaiming-uniform) init and the LayerNorm
        at identity: PixArt-Σ §3.2's ablation baseline for Conv Avg Init.
        """
        if init not in KV_INITS:
            raise ValueError(f"init must be one of {KV_INITS}, got {init!r}")
        layers = sorted(set(layers))
        cfg = self.config
        if cfg.kv_compress_layers and ratio != cfg.kv_compress_ratio:
            raise ValueError(
                f"ratio={ratio} differs from the model's kv_compress_ratio={cfg.kv_compress_ratio}"
            )
        new_layers = [i for i in layers if i not in cfg.kv_compress_layers]
        merged = tuple(sorted(set(cfg.kv_compress_layers) | set(layers)))
        self.config = dataclasses.replace(
            cfg, kv_compress_layers=merged, kv_compress_ratio=ratio
        )  # validates
        for i in new_layers:
            self.blocks[i].attn.add_kv_compression(ratio)
            if init == "conv_avg":
                conv_avg_init_(self.blocks[i].attn)
        logger.info(
            "KV compression R=%d now in layers %s (new: %s, %s init)", ratio, list(merged), new_layers, init
        )

    def set_prompt_case(self, prompt_case: str) -> None:
        """Record how the captions this model trains (or was trained) on are cased (ModelConfig.prompt_case)."""
        self.config = dataclasses.replace(self.config, prompt_case=prompt_case)  # validates

    def set_null_caption(self, features: Tensor, mask: Tensor, *, mode: str | None = None) -> None:
        """Store T5("") features (L, C) and mask (L,) as the null caption, zero-padded to max_token_length.

        ``mode`` (``upstream`` or ``diffusers``, see ModelConfig.null_caption) changes how it is attended;
        for ``upstream`` pass T5("") padded to max_token_length, every row, as PixArt's code stores it.
        """
        if mode is not None:
            self.config = dataclasses.replace(self.config, null_caption=mode)  # validates
        max_len = self.config.max_token_length
        features, mask = features.reshape(-1, features.shape[-1]), mask.reshape(-1)
        if features.shape[0] > max_len or features.shape != (mask.shape[0], self.config.caption_channels):
            raise ValueError(
                f"null caption must be (L<={max_len}, {self.config.caption_channels}) with a (L,) mask, "
                f"got {tuple(features.shape)} and {tuple(mask.shape)}"
            )
        buf, buf_mask = self.y_embedder.y_embedding, self.y_embedder.y_mask
        num = features.shape[0]
        with torch.no_grad():
            buf.zero_()
            buf[:num] = features.to(buf)
            buf_mask.fill_(False)
            buf_mask[:num] = mask.to(device=buf_mask.device, dtype=torch.bool)


def _call_block(
    block: PixArtBlock, x: Tensor, y: Tensor, t0: Tensor, mask: Tensor, grid_hw: tuple[int, int]
) -> Tensor:
    """One block's forward; a function of the block so that one compiled graph serves every block."""
    return block(x, y, t0, mask, grid_hw)


def conv_avg_init_(attn: Attention) -> None:
    """Conv Avg Init (PixArt-Σ §3.2): weight 1/R², bias 0, so the conv starts as R×R average pooling."""
    assert attn.sr is not None and attn.norm is not None
    with torch.no_grad():
        attn.sr.weight.fill_(1.0 / attn.sr_ratio**2)
        attn.sr.bias.zero_()
        attn.norm.reset_parameters()


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (buffers such as the null caption are not counted)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
