"""Speed bugs, tested by their mechanism (timings live in bench/): the PE is computed once per grid, the
compiled blocks serve every bucket with one graph, DDP skips the all-reduce on non-final micro-batches,
and the KV-compression conv's gradient has its parameter's layout (no DDP stride warning, no copy)."""

from __future__ import annotations

import dataclasses
import itertools
import warnings

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import training.main as trainer
import training.model as model_module
from training.config import load_config
from training.encoders import CaptionEncoder, LatentEncoder
from training.model import PRESETS, PixArtSigma

from .conftest import DEBUG_CONFIG

TINY = PRESETS["tiny"]
CPU = torch.device("cpu")


def _inputs(hw: tuple[int, int], batch: int, tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *hw, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randn(batch, tokens, TINY.caption_channels, generator=g)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[0, tokens // 2 :] = False
    return x, t, y, mask


def test_pe_is_computed_once_per_grid_device_and_dtype(monkeypatch) -> None:
    calls = []
    original = model_module.get_2d_sincos_pos_embed
    monkeypatch.setattr(
        model_module, "get_2d_sincos_pos_embed", lambda *a, **k: calls.append(a[1]) or original(*a, **k)
    )
    model = PixArtSigma(TINY).eval()
    with torch.no_grad():
        for _ in range(3):
            model(*_inputs((4, 4), 2, 5))
        assert calls == [(2, 2)]
        model(*_inputs((4, 8), 2, 5))  # another bucket: its own PE
        assert calls == [(2, 2), (2, 4)]
        model.set_resolution(4, 2.0)  # a resolution stage: new PE parameters
        model(*_inputs((4, 4), 2, 5))
    assert calls == [(2, 2), (2, 4), (2, 2)]
    a = model.pos_embed(2, 2, device=CPU, dtype=torch.float32)
    assert a is model.pos_embed(2, 2, device=CPU, dtype=torch.float32)
    assert model.pos_embed(2, 2, device=CPU, dtype=torch.float64).dtype == torch.float64 and len(calls) == 4


def test_compiled_blocks_serve_two_buckets_with_one_graph_per_block_kind() -> None:
    """Two bucket shapes (and caption lengths, batch sizes): no recompile, same numbers as eager."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = PixArtSigma(dataclasses.replace(TINY, kv_compress_layers=(1,))).eval()  # eval: no caption dropout
    for p in model.parameters():  # move off the zero init so outputs and gradients are not trivially 0
        p.data.add_(0.05 * torch.randn_like(p))
    # latent grids → token grids 4×4, 4×8, 8×4, 6×6 (KV: 2×2, 2×4, 4×2, 3×3); batch ≥ 2 (1 specialises)
    shapes = [((8, 8), 2, 5), ((8, 16), 3, 7), ((16, 8), 2, 3), ((12, 12), 4, 4)]
    eager = [_forward_backward(model, *s) for s in shapes]
    counter = CompileCounter()
    model.set_compile(True, backend=counter)
    compiled = [_forward_backward(model, *s) for s in shapes]
    assert counter.frame_count == 2  # one graph for plain blocks, one for the KV block; no recompiles
    for (out_e, grad_e), (out_c, grad_c) in zip(eager, compiled, strict=True):
        torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad_c, grad_e, atol=1e-5, rtol=1e-5)
    model.set_compile(False)
    _forward_backward(model, *shapes[0])
    assert counter.frame_count == 2  # eager again
    assert all(not k.startswith("_orig_mod") for k in model.state_dict())


def _forward_backward(model, hw, batch, tokens):
    model.zero_grad(set_to_none=True)
    out = model(*_inputs(hw, batch, tokens))
    out.square().mean().backward()
    return out.detach(), model.blocks[0].attn.qkv.weight.grad.clone()


@pytest.fixture
def gloo_group(tmp_path):
    """A one-process gloo group, so DDP runs for real (its reducer, buckets and comm hooks) in this process."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _batches(batch: int = 2):
    g = torch.Generator().manual_seed(1)
    while True:
        yield {
            "latents": torch.randn(batch, 4, 8, 8, generator=g),
            "caption_features": torch.randn(batch, 5, TINY.caption_channels, generator=g),
            "caption_mask": torch.ones(batch, 5, dtype=torch.bool),
            "null_caption": torch.zeros(batch, dtype=torch.bool),
            "keys": [f"sample-{i}" for i in range(batch)],  # collate's keys: the step counts samples by them
        }


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_grad_accumulation_under_ddp_all_reduces_only_the_last_micro_batch(gloo_group, compiled) -> None:
    cfg = load_config(DEBUG_CONFIG, overrides=["optim.grad_accum_steps=3", f"model.compile={str(compiled).lower()}",
                                                "model.compile_backend=\"eager\""])  # fmt: skip
    model = PixArtSigma(TINY)
    # The trainer's wrapping for a multi-rank run; the all-reduces are counted by a comm hook.
    net = trainer.wrap_model(model, cfg.stages[0], cfg, trainer.Dist(0, 2, CPU))
    assert isinstance(net, DistributedDataParallel)
    reduced = []

    def count(state, bucket):
        reduced.append(bucket.index())
        future = torch.futures.Future()
        future.set_result(bucket.buffer())
        return future

    net.register_comm_hook(None, count)
    text = CaptionEncoder("unused", max_tokens=16, device=CPU, cached=True)
    latents = LatentEncoder("unused", scaling_factor=1.0, device=CPU, cached=True)
    args = (
        trainer.GaussianDiffusion(),
        text,
        latents,
        torch.Generator().manual_seed(0),
        cfg,
        trainer.Dist(0, 1, CPU),
    )
    stream = _batches()
    for step in range(2):
        out = trainer.train_step(net, model, stream, *args, global_step=step)
        assert out["finite"]
    num_buckets = len(set(reduced))
    assert len(reduced) == 2 * num_buckets  # once per optimizer step, not once per micro-batch
    model.set_compile(False)


def test_kv_conv_gradient_has_its_parameter_layout_under_ddp(gloo_group) -> None:
    model = PixArtSigma(TINY)
    model.enable_kv_compression([1], 2)
    net = DistributedDataParallel(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for hw in ((4, 4), (6, 2)):  # a grid divisible by R and one that is edge-padded
            out = net(*_inputs(hw, 2, 5))
            out.square().mean().backward()
    for name, p in itertools.chain(model.named_parameters()):
        assert p.grad.stride() == p.stride(), name  # what DDP's bucket view checks
    assert not [w for w in caught if "Grad strides" in str(w.message)]
