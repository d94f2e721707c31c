"""PixArtSigma: exact XL/2 size, PE interpolation, KV compression, masking, null caption, CFG."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import PixArtTransformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed as diffusers_pos_embed

from training.model import (
    PRESETS,
    ModelConfig,
    PixArtBlock,
    PixArtSigma,
    count_parameters,
    default_kv_layers,
    get_2d_sincos_pos_embed,
    pe_params_for_resolution,
)

TINY = PRESETS["tiny"]
XL2_PARAMS = 610_856_096  # PixArt-XL/2 (Σ, no micro-conditions); diffusers reports the same count
KV_PARAMS_PER_LAYER_1152 = 1152 * 2 * 2 + 1152 + 2 * 1152  # depthwise 2×2 weights + bias, LayerNorm w + b


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every weight so zero-initialised layers (final linear, cross-attn proj) matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def _tiny(seed: int = 0, **overrides) -> PixArtSigma:
    torch.manual_seed(seed)
    return _randomize(PixArtSigma(dataclasses.replace(TINY, **overrides)), seed).eval()


def _inputs(batch: int = 2, hw: tuple[int, int] = (8, 8), num_tokens: int = 6, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *hw, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    y = torch.randn(batch, num_tokens, TINY.caption_channels, generator=gen)
    mask = torch.ones(batch, num_tokens, dtype=torch.long)
    mask[0, num_tokens // 2 :] = 0  # first caption padded
    return x, t, y, mask


# --------------------------------------------------------------------------------------------------
# Size
# --------------------------------------------------------------------------------------------------


def test_xl2_parameter_count_is_exact_and_matches_diffusers():
    with torch.device("meta"):
        ours = PixArtSigma(PRESETS["XL/2"])
        ours_kv = PixArtSigma(PRESETS["XL/2-kv"])
        theirs = PixArtTransformer2DModel(
            sample_size=128, interpolation_scale=2, use_additional_conditions=False, caption_channels=4096
        )
    assert count_parameters(ours) == XL2_PARAMS
    assert count_parameters(theirs) == XL2_PARAMS
    assert count_parameters(ours_kv) - XL2_PARAMS == 14 * 8_064 == 112_896
    # 28 blocks of width 1152, 16 heads of 72 and a (300, 4096) null caption that is not a parameter
    assert len(ours.blocks) == 28 and ours.blocks[0].attn.num_heads == 16 and PRESETS["XL/2"].head_dim == 72
    assert ours.y_embedder.y_embedding.shape == (300, 4096)


def test_kv_compression_adds_8064_parameters_per_layer_at_width_1152():
    with torch.device("meta"):
        block = PixArtBlock(1152, 16, 4.0)
        before = count_parameters(block)
        block.attn.add_kv_compression(2)
    assert count_parameters(block) - before == KV_PARAMS_PER_LAYER_1152 == 8_064


def test_count_parameters_ignores_buffers_and_can_count_trainable_only():
    model = PixArtSigma(TINY)
    total = sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == total
    model.x_embedder.requires_grad_(False)
    frozen = sum(p.numel() for p in model.x_embedder.parameters())
    assert count_parameters(model, trainable_only=True) == total - frozen


# --------------------------------------------------------------------------------------------------
# Positional embedding
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resolution", "base_size", "pe_interpolation"),
    [(256, 16, 0.5), (512, 32, 1.0), (1024, 64, 2.0), (2048, 128, 4.0), (4096, 256, 8.0)],
)
def test_pe_interpolation_table(resolution, base_size, pe_interpolation):
    assert pe_params_for_resolution(resolution, vae_downsample=8) == (base_size, pe_interpolation)
    # At its own resolution every stage sees positions 0, 1/pe, 2/pe, … up to 512/16 = 32 (exclusive).
    emb = get_2d_sincos_pos_embed(8, (base_size, 1), base_size=base_size, pe_interpolation=pe_interpolation)
    last_h = emb[-1, 4 + 0]  # sin(h·ω0), ω0 = 1, of the last row
    assert last_h.item() == pytest.approx(math.sin((base_size - 1) / pe_interpolation), abs=1e-6)


def test_pe_values_by_hand():
    # D = 8: channels [sin(w·ω), cos(w·ω)] then [sin(h·ω), cos(h·ω)] with ω = (1, 1/100); grid (h, w) = (2, 3)
    # trained at base_size 2, pe_interpolation 0.5: positions = arange(g) / (g / 2) / 0.5.
    emb = get_2d_sincos_pos_embed(8, (2, 3), base_size=2, pe_interpolation=0.5)
    pos_h = [0.0, 2.0]
    pos_w = [0.0, 4.0 / 3.0, 8.0 / 3.0]
    expected = []
    for ph in pos_h:
        for pw in pos_w:
            row = []
            for p in (pw, ph):
                row += [math.sin(p), math.sin(p / 100), math.cos(p), math.cos(p / 100)]
            expected.append(row)
    torch.testing.assert_close(emb, torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("grid", "base_size", "pe"), [((4, 4), 4, 1.0), ((3, 5), 4, 0.5), ((6, 4), 32, 2.0), ((8, 2), 16, 4.0)]
)
def test_pe_equals_diffusers(grid, base_size, pe):
    ours = get_2d_sincos_pos_embed(64, grid, base_size=base_size, pe_interpolation=pe)
    theirs = diffusers_pos_embed(
        64, grid, base_size=base_size, interpolation_scale=pe, output_type="pt"
    ).float()
    assert ours.shape == (grid[0] * grid[1], 64)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_non_square_grid_is_not_the_transpose_and_runs_through_the_model():
    a = get_2d_sincos_pos_embed(16, (3, 5), base_size=4, pe_interpolation=1.0)
    b = get_2d_sincos_pos_embed(16, (5, 3), base_size=4, pe_interpolation=1.0)
    # Token (i, j) of the 3×5 grid: w-channels come from column j, h-channels from row i.
    b_t = b.reshape(5, 3, 16).transpose(0, 1).reshape(15, 16)
    torch.testing.assert_close(a[:, :8], b_t[:, 8:])
    torch.testing.assert_close(a[:, 8:], b_t[:, :8])
    model = _tiny()
    x, t, y, mask = _inputs(hw=(6, 10))
    with torch.no_grad():
        assert model(x, t, y, mask).shape == (2, 8, 6, 10)


def test_set_resolution_recomputes_pe():
    model = _tiny()
    before = model.pos_embed(8, 8)
    model.set_resolution(*pe_params_for_resolution(128, vae_downsample=8))  # (8, 0.25)
    assert (model.config.base_size, model.config.pe_interpolation) == (8, 0.25)
    torch.testing.assert_close(
        model.pos_embed(8, 8), get_2d_sincos_pos_embed(64, (8, 8), base_size=8, pe_interpolation=0.25)
    )
    assert not torch.allclose(before, model.pos_embed(8, 8))


# --------------------------------------------------------------------------------------------------
# KV compression
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [2, 4])
def test_kv_compression_at_conv_avg_init_is_layernorm_of_avg_pooled_kv(ratio):
    model = _tiny()
    model.enable_kv_compression([1], ratio=ratio)
    attn = model.blocks[1].attn
    h, w = 4, 8
    x = torch.randn(2, h * w, 64)
    with torch.no_grad():
        _, k, v = attn.qkv(x).reshape(2, h * w, 3, 64).unbind(2)
        for tokens in (k, v):
            grid = tokens.transpose(1, 2).reshape(2, 64, h, w)
            pooled = F.avg_pool2d(grid, ratio).flatten(2).transpose(1, 2)  # (2, N/R², 64)
            expected = F.layer_norm(pooled, (64,), eps=1e-5)
            torch.testing.assert_close(attn.compress(tokens, (h, w)), expected, atol=1e-5, rtol=1e-5)
        # and the attention itself is plain attention against those tokens
        q = attn.qkv(x).reshape(2, h * w, 3, 4, 16)[:, :, 0].transpose(1, 2)
        kc = attn.compress(k, (h, w)).reshape(2, -1, 4, 16).transpose(1, 2)
        vc = attn.compress(v, (h, w)).reshape(2, -1, 4, 16).transpose(1, 2)
        ref = attn.proj(
            (q @ kc.transpose(-1, -2) / 4.0).softmax(-1).matmul(vc).transpose(1, 2).reshape(2, h * w, 64)
        )
        torch.testing.assert_close(attn(x, (h, w)), ref, atol=1e-5, rtol=1e-5)


def test_enable_kv_compression_keeps_every_weight_and_output_shape():
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, t, y, mask = _inputs()
    with torch.no_grad():
        out_before = model(x, t, y, mask)
    model.enable_kv_compression([1], ratio=2)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    new = sorted(set(after) - set(before))
    assert new == [
        "blocks.1.attn.norm.bias",
        "blocks.1.attn.norm.weight",
        "blocks.1.attn.sr.bias",
        "blocks.1.attn.sr.weight",
    ]
    assert torch.all(after["blocks.1.attn.sr.weight"] == 0.25) and torch.all(
        after["blocks.1.attn.sr.bias"] == 0
    )
    assert model.config.kv_compress_layers == (1,)
    with torch.no_grad():
        out_after = model(x, t, y, mask)
    assert out_after.shape == out_before.shape == (2, 8, 8, 8)
    assert not torch.allclose(out_after, out_before)  # block 1 now attends to 4 pooled K/V tokens, not 16
    with pytest.raises(ValueError, match="kv_compress_ratio"):
        model.enable_kv_compression([0], ratio=4)


def test_config_built_with_kv_layers_equals_enabling_later():
    built = PixArtSigma(dataclasses.replace(TINY, kv_compress_layers=(1,)))
    later = PixArtSigma(TINY)
    later.enable_kv_compression([1])
    assert built.config == later.config
    assert built.state_dict().keys() == later.state_dict().keys()
    torch.testing.assert_close(built.blocks[1].attn.sr.weight, later.blocks[1].attn.sr.weight)


@pytest.mark.parametrize("hw", [(6, 10), (10, 6), (6, 6)])  # token grids 3×5, 5×3, 3×3: not divisible by 2
def test_kv_compression_handles_grids_not_divisible_by_ratio(hw):
    model = _tiny()
    model.enable_kv_compression([0, 1])  # after the random weights, so at Conv Avg Init
    attn = model.blocks[0].attn
    h, w = hw[0] // 2, hw[1] // 2
    k = torch.randn(1, h * w, 64)
    compressed = attn.compress(k, (h, w))
    assert compressed.shape == (1, math.ceil(h / 2) * math.ceil(w / 2), 64)
    # Both sides odd: the bottom-right 2×2 cell holds only the last token (edge-replicated), so at Conv Avg
    # Init it is exactly that token, not a quarter of it as zero padding would give.
    grid = k.transpose(1, 2).reshape(1, 64, h, w)
    torch.testing.assert_close(
        compressed[:, -1], F.layer_norm(grid[..., -1, -1], (64,), eps=1e-5), atol=1e-5, rtol=0
    )
    # and a full interior cell is the plain 2×2 average
    torch.testing.assert_close(
        compressed[:, 0], F.layer_norm(grid[..., :2, :2].mean((-2, -1)), (64,), eps=1e-5), atol=1e-5, rtol=0
    )
    x, t, y, mask = _inputs(hw=hw)
    with torch.no_grad():
        assert model(x, t, y, mask).shape == (2, 8, *hw)


# --------------------------------------------------------------------------------------------------
# Forward: shapes, masking, null caption, CFG, checkpointing, init
# --------------------------------------------------------------------------------------------------


def test_output_channels_follow_learn_sigma():
    x, t, y, mask = _inputs()
    with torch.no_grad():
        assert _tiny()(x, t, y, mask).shape == (2, 8, 8, 8)
        assert _tiny(learn_sigma=False)(x, t, y, mask).shape == (2, 4, 8, 8)


def test_padding_tokens_are_masked():
    model = _tiny()
    x, t, y, mask = _inputs(num_tokens=6)
    y2 = y.clone()
    y2[0, 3:] = 100.0  # garbage in the padded slots of caption 0
    with torch.no_grad():
        out = model(x, t, y, mask)
        assert torch.equal(out, model(x, t, y2, mask))
        # same as the caption cut to its valid tokens
        torch.testing.assert_close(out[:1], model(x[:1], t[:1], y[:1, :3], mask[:1, :3]), atol=1e-5, rtol=0)
        # while a valid token does matter
        y3 = y.clone()
        y3[0, 0] += 1.0
        assert not torch.allclose(out[0], model(x, t, y3, mask)[0])


def test_force_drop_swaps_in_the_null_caption_and_its_mask():
    model = _tiny()
    null = torch.randn(2, TINY.caption_channels)
    model.set_null_caption(null, torch.tensor([1, 1]))
    assert model.y_embedder.y_mask.tolist() == [True, True] + [False] * (TINY.max_token_length - 2)
    x, t, y, mask = _inputs(num_tokens=6)
    with torch.no_grad():
        dropped = model(x, t, y, mask, force_drop_ids=torch.tensor([1, 0]))
        kept = model(x, t, y, mask)
        explicit = model(x[:1], t[:1], null[None], torch.ones(1, 2))
    torch.testing.assert_close(dropped[:1], explicit, atol=1e-5, rtol=0)
    assert torch.equal(dropped[1], kept[1])


def test_training_mode_drops_captions_at_class_dropout_prob():
    model = _tiny(class_dropout_prob=0.5).train()
    x, t, y, mask = _inputs(batch=1)
    torch.manual_seed(0)
    with torch.no_grad():
        cond = model(x, t, y, mask, force_drop_ids=torch.tensor([0]))
        null = model(x, t, y, mask, force_drop_ids=torch.tensor([1]))
        outs = [model(x, t, y, mask) for _ in range(40)]
    num_null = sum(torch.equal(o, null) for o in outs)
    assert sum(torch.equal(o, cond) for o in outs) + num_null == 40
    assert 8 <= num_null <= 32  # Binomial(40, 0.5)
    model.eval()
    with torch.no_grad():
        assert all(torch.equal(model(x, t, y, mask), cond) for _ in range(5))


def test_forward_with_cfg_guides_eps_channels_only():
    model = _tiny()
    x, t, y, mask = _inputs()
    with torch.no_grad():
        guided = model.forward_with_cfg(x, t, y, mask, cfg_scale=4.5)
        cond = model(x, t, y, mask)
        uncond = model(x, t, y, mask, force_drop_ids=torch.ones(2))
    torch.testing.assert_close(
        guided[:, :4], uncond[:, :4] + 4.5 * (cond[:, :4] - uncond[:, :4]), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(guided[:, 4:], cond[:, 4:], atol=1e-5, rtol=0)


def test_grad_checkpointing_gives_the_same_output_and_gradients():
    x, t, y, mask = _inputs()
    grads = []
    for enabled in (False, True):
        model = _tiny(kv_compress_layers=(1,))
        model.set_grad_checkpointing(enabled)
        model(x, t, y, mask).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_initialisation():
    model = PixArtSigma(PRESETS["small"])
    x = torch.randn(1, 4, 8, 8)
    y = torch.randn(1, 3, PRESETS["small"].caption_channels)
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor([10]), y), torch.zeros(1, 8, 8, 8))  # zero final linear
    for block in model.blocks:
        assert torch.count_nonzero(block.cross_attn.proj.weight) == 0
        # Xavier uniform bound √(6 / (fan_in + fan_out)) on the other linears
        bound = math.sqrt(6 / (384 + 3 * 384))
        assert block.attn.qkv.weight.abs().max() <= bound and block.attn.qkv.weight.abs().max() > 0.9 * bound
        assert torch.count_nonzero(block.attn.qkv.bias) == 0
    for linear in (model.t_embedder.mlp[0], model.t_block[1], model.y_embedder.y_proj.fc1):
        assert linear.weight.std().item() == pytest.approx(0.02, rel=0.05)
    attn = model.blocks[1].attn  # compressed in the preset
    assert torch.all(attn.sr.weight == 0.25) and torch.all(attn.sr.bias == 0)


def test_config_validation():
    with pytest.raises(ValueError, match="num_heads"):
        ModelConfig(depth=2, hidden_size=66, num_heads=4)
    with pytest.raises(ValueError, match="kv_compress_layers"):
        ModelConfig(depth=2, hidden_size=64, num_heads=4, kv_compress_layers=(2,))
    with pytest.raises(ValueError, match="patch_size"):
        _tiny()(torch.randn(1, 4, 7, 8), torch.tensor([1]), torch.randn(1, 2, 32))
    assert default_kv_layers(28) == tuple(range(14, 28))
    assert PRESETS["XL/2-kv"].kv_compress_layers == tuple(range(14, 28))
