"""Trainer pieces: non-finite abort, per-rank streams, checkpoint RNG round trip, EMA, external init."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest
import torch

import training.main as trainer
from training.checkpoint import capture_rng, restore_rng
from training.data import make_stream
from training.encoders import TextFeatures
from training.model import PRESETS, PixArtSigma

from .conftest import debug_config


def _keys(stream, n: int) -> list[list[str]]:
    return [batch["keys"] for batch in itertools.islice(stream, n)]


def test_nonfinite_steps_abort_after_k_in_a_row(tiny_models, shards, tmp_path) -> None:
    one_stage = ["stages.0.steps=6", "stages.0.validation_prompts=[]", "faults.max_nonfinite_steps=2",
                 "faults.inject_nan_steps=[1, 3, 4]"]  # fmt: skip
    cfg = debug_config(tiny_models, shards, tmp_path / "run", *one_stage)
    cfg.stages = cfg.stages[:1]
    with pytest.raises(
        FloatingPointError, match=r"step 4: 2 non-finite steps in a row .*max_nonfinite_steps=2"
    ):
        trainer.main(cfg)  # step 1 alone is skipped; steps 3 and 4 in a row abort


def test_streams_are_per_rank_deterministic_and_one_bucket_per_batch(shards) -> None:
    kwargs = {"resolution": 64, "batch_size": 2, "real_prompt_ratio": 0.5, "seed": 3, "shuffle_buffer": 4}
    rank0, again, rank1 = (make_stream(str(shards), rank=r, **kwargs) for r in (0, 0, 1))
    first = _keys(rank0, 6)
    assert first == _keys(again, 6) and first != _keys(rank1, 6)
    for batch in itertools.islice(make_stream(str(shards), rank=0, **kwargs), 6):
        assert batch["latents"].shape[0] == 2 and batch["caption_features"].shape[0] == 2  # one bucket


def test_uncached_stream_decodes_pixels_at_the_bucket_size(shards) -> None:
    stream = make_stream(str(shards), resolution=32, batch_size=2, real_prompt_ratio=1.0, seed=0, rank=0,
                         shuffle_buffer=4, cached_latents=False, cached_text=False)  # fmt: skip
    batch = next(stream)
    assert "latents" not in batch and "caption_features" not in batch
    assert batch["pixels"].shape[1] == 3 and batch["pixels"].abs().max() <= 1.0
    assert all(c.startswith("a photo of") for c in batch["captions"])  # real_prompt_ratio 1: originals


def test_rng_round_trip() -> None:
    generator = torch.Generator().manual_seed(1)
    state = capture_rng(generator)
    expected = torch.rand(3), torch.rand(3, generator=generator)
    restore_rng(state, generator)
    assert torch.equal(torch.rand(3), expected[0]) and torch.equal(
        torch.rand(3, generator=generator), expected[1]
    )


def test_update_ema() -> None:
    torch.manual_seed(0)
    model, ema = PixArtSigma(PRESETS["tiny"]), PixArtSigma(PRESETS["tiny"])
    expected = [0.9 * e + 0.1 * p for e, p in zip(ema.parameters(), model.parameters(), strict=True)]
    trainer.update_ema(ema, model, 0.9)
    for got, want in zip(ema.parameters(), expected, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("fmt", ["diffusers", "ours"])
def test_external_init(fmt: str, tiny_models, shards, tmp_path: Path) -> None:
    from training.convert import export_diffusers, save_model

    cfg = debug_config(tiny_models, shards, tmp_path / "run")
    null = TextFeatures(torch.zeros(3, 32), torch.ones(3, dtype=torch.bool))
    torch.manual_seed(5)
    source = PixArtSigma(dataclasses.replace(PRESETS["tiny"], caption_channels=32))
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    (export_diffusers if fmt == "diffusers" else save_model)(source, tmp_path / "init")
    cfg.model.init = str(tmp_path / "init")
    model = trainer.build_model(cfg, null, torch.device("cpu"), vae_downsample=8)
    for key, value in source.state_dict().items():
        if not key.startswith("y_embedder.y_"):
            assert torch.equal(model.state_dict()[key], value), key


def test_decoder_reads_every_image_format_a_curated_shard_holds():
    """A still GIF/BMP/TIFF that curation keeps must decode in training too (not only jpg/png/webp)."""
    import io as _io
    import json as _json

    from PIL import Image as _Image

    from training.data import SampleDecoder

    buffer = _io.BytesIO()
    _Image.new("RGB", (80, 64), "blue").save(buffer, "GIF")
    meta = {"key": "k", "width": 80, "height": 64, "caption_orig": "a blue square", "caption_vlm": None}
    raw = {"__key__": "k", "gif": buffer.getvalue(), "json": _json.dumps(meta).encode()}
    sample = SampleDecoder(resolution=64, real_prompt_ratio=1.0, seed=0)(raw)
    assert (
        sample.pixels is not None and sample.pixels.shape == (48, 64, 3) and sample.caption == "a blue square"
    )
