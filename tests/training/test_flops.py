"""Analytic FLOP counter: a hand count, torch's own FLOP counter, and the XL/2 figures from the papers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from training.flops import forward_flops, image_forward_flops
from training.model import PRESETS, PixArtSigma

TINY = PRESETS["tiny"]


def test_hand_count_tiny():
    # tiny: D = 64, depth 2, MLP 256, caption 32 channels, patch 2, 4 → 8 channels; grid 4×4 (N = 16), L = 5
    D, N, L = 64, 16, 5
    embed = 2 * N * 16 * D + 2 * (256 * D + D * D) + 2 * D * 6 * D + 2 * L * (32 * D + D * D)
    block = (
        2 * N * D * 3 * D  # qkv
        + 2 * 2 * N * N * D  # Q·Kᵀ, A·V
        + 2 * N * D * D  # proj
        + 2 * N * D * D
        + 2 * L * D * 2 * D
        + 2 * 2 * N * L * D
        + 2 * N * D * D  # cross: q, kv, attention, proj
        + 2 * 2 * N * D * 256  # MLP
    )
    final = 2 * N * D * 4 * 8
    assert forward_flops(TINY, (4, 4), L).total == embed + 2 * block + final == 4_255_744
    # KV compression R = 2 in block 1: 4 K/V tokens instead of 16, plus the two depthwise convs
    kv = dataclasses.replace(TINY, kv_compress_layers=(1,))
    saved = 2 * 2 * N * (N - 4) * D
    conv = 2 * 2 * 4 * 4 * D
    assert forward_flops(kv, (4, 4), L).total == 4_255_744 - saved + conv


@pytest.mark.parametrize("kv_layers", [(), (1,), (0, 1)])
@pytest.mark.parametrize(("grid", "num_tokens"), [((4, 4), 7), ((3, 5), 16), ((6, 4), 1)])
def test_matches_torch_flop_counter(kv_layers, grid, num_tokens):
    config = dataclasses.replace(TINY, kv_compress_layers=kv_layers)
    model = PixArtSigma(config).eval()
    x = torch.randn(1, 4, grid[0] * 2, grid[1] * 2)
    y = torch.randn(1, num_tokens, TINY.caption_channels)
    # The math backend decomposes attention into bmm, which the counter sees.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, torch.tensor([3]), y)
    assert forward_flops(config, grid, num_tokens).total == counter.get_total_flops()


def test_xl2_figures():
    xl, xl_kv = PRESETS["XL/2"], PRESETS["XL/2-kv"]
    # ≈ 6.6 TFLOP per 1024² image with 300 tokens
    assert image_forward_flops(xl, (1024, 1024), 300) == pytest.approx(6.634e12, rel=1e-3)
    cut = {
        r: 1 - image_forward_flops(xl_kv, (r, r), 300) / image_forward_flops(xl, (r, r), 300)
        for r in (1024, 2048, 4096)
    }
    assert cut[4096] == pytest.approx(0.333, abs=0.005)  # PixArt-Σ: KV compression saves ~ a third at 4K
    assert 0 < cut[1024] < cut[2048] < cut[4096]  # the saving grows with the token count
    breakdown = forward_flops(xl, (64, 64), 300)
    assert breakdown.kv_compress == 0 and breakdown.total == sum(
        getattr(breakdown, f.name) for f in dataclasses.fields(breakdown)
    )
    with pytest.raises(ValueError, match="multiple of 16"):
        image_forward_flops(xl, (1000, 1024), 300)
