"""Analytic forward FLOPs of one image through PixArtSigma, for any grid, caption length and KV compression.

Counts matmuls and convolutions as 2 FLOPs per multiply-add — what bounds the step time and what MFU
is measured against. Elementwise work (norms, softmax, GELU, modulation, PE) is left out; it is under
1 % of the total for XL/2. Training costs about 3× the forward (backward = 2× forward), plus one more
forward per block with gradient checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass

from manifests.features import SD_VAE_DOWNSAMPLE
from training.model import TIMESTEP_FREQ_DIM, ModelConfig


@dataclass(frozen=True)
class FlopBreakdown:
    """Forward FLOPs of one image by part; `total` is their sum."""

    embed: int  # patch embed, timestep MLP + adaLN-single linear, caption MLP
    linear: int  # every block's qkv/proj, cross-attention q/kv/proj, MLP
    self_attention: int  # Q·Kᵀ and A·V of self-attention
    cross_attention: int  # Q·Kᵀ and A·V of cross-attention
    kv_compress: int  # the depthwise convs on K and V
    final: int  # final linear

    @property
    def total(self) -> int:
        """All counted FLOPs."""
        return (
            self.embed
            + self.linear
            + self.self_attention
            + self.cross_attention
            + self.kv_compress
            + self.final
        )


def forward_flops(config: ModelConfig, grid_hw: tuple[int, int], num_tokens: int) -> FlopBreakdown:
    """FLOPs of one forward pass for a (h, w) token grid and `num_tokens` valid caption tokens."""
    D = config.hidden_size
    h, w = grid_hw
    N, L = h * w, num_tokens
    R = config.kv_compress_ratio
    M = -(-h // R) * -(-w // R)  # compressed K/V tokens (edge-padded grid)
    patch_in = config.in_channels * config.patch_size**2
    mlp_hidden = int(D * config.mlp_ratio)

    embed = 2 * N * patch_in * D  # patch conv as a matmul
    embed += 2 * (TIMESTEP_FREQ_DIM * D + D * D) + 2 * D * 6 * D  # timestep MLP, adaLN-single
    embed += 2 * L * (config.caption_channels * D + D * D)  # caption MLP on every token

    per_block_linear = 2 * N * D * 3 * D + 2 * N * D * D  # self-attention qkv, proj
    per_block_linear += 2 * N * D * D + 2 * L * D * 2 * D + 2 * N * D * D  # cross-attention q, kv, proj
    per_block_linear += 2 * 2 * N * D * mlp_hidden  # MLP fc1, fc2

    self_attention = kv_compress = 0
    for i in range(config.depth):
        if i in config.kv_compress_layers:
            self_attention += 2 * 2 * N * M * D  # Q·Kᵀ and A·V against M tokens
            kv_compress += 2 * 2 * M * R * R * D  # K and V: each output token sums R² inputs per channel
        else:
            self_attention += 2 * 2 * N * N * D
    cross_attention = config.depth * 2 * 2 * N * L * D
    final = 2 * N * D * config.patch_size**2 * config.out_channels
    return FlopBreakdown(
        embed=embed,
        linear=config.depth * per_block_linear,
        self_attention=self_attention,
        cross_attention=cross_attention,
        kv_compress=kv_compress,
        final=final,
    )


def image_forward_flops(
    config: ModelConfig, resolution_hw: tuple[int, int], num_tokens: int, *, vae_downsample: int = SD_VAE_DOWNSAMPLE
) -> int:
    """Total forward FLOPs for an image of (H, W) pixels (VAE / ``vae_downsample``, then patchified)."""
    cell = vae_downsample * config.patch_size
    H, W = resolution_hw
    if H % cell or W % cell:
        raise ValueError(f"resolution {H}x{W} must be a multiple of {cell}")
    return forward_flops(config, (H // cell, W // cell), num_tokens).total
