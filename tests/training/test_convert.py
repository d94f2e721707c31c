"""Import/export against diffusers itself, the reference .pth layout, and our own folder."""

from __future__ import annotations

import dataclasses
import io
import json
import random

import numpy as np
import pytest
import sentencepiece as spm
import torch
from diffusers import AutoencoderKL, PixArtSigmaPipeline, PixArtTransformer2DModel
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from training.convert import (
    diffusers_config,
    export_diffusers,
    load_diffusers,
    load_model,
    load_original_checkpoint,
    save_model,
)
from training.diffusion import GaussianDiffusion
from training.model import PRESETS, PixArtSigma

TINY = PRESETS["tiny"]
ATOL = 1e-5  # fp32 parity required by the issue


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturb every weight so the zero-initialised layers take part in the comparison."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return module.eval()


def _tiny_diffusers(seed: int = 0, *, interpolation_scale: float = 1.0) -> PixArtTransformer2DModel:
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=64,
        sample_size=8,
        caption_channels=TINY.caption_channels,
        interpolation_scale=interpolation_scale,
        use_additional_conditions=False,
    )
    return _randomize(model, seed)


def _run_diffusers(model: PixArtTransformer2DModel, x, t, y, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask, return_dict=False)[
            0
        ]


def _run_ours(model: PixArtSigma, x, t, y, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(x, t, y, mask)


def _inputs(hw: tuple[int, int], seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, *hw, generator=gen)
    t = torch.tensor([7, 811])
    y = torch.randn(2, 6, TINY.caption_channels, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])  # first caption padded
    return x, t, y, mask


# --------------------------------------------------------------------------------------------------
# diffusers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interpolation_scale", [1.0, 0.5])
def test_import_from_diffusers_gives_identical_outputs(tmp_path, interpolation_scale):
    theirs = _tiny_diffusers(interpolation_scale=interpolation_scale)
    theirs.save_pretrained(tmp_path / "transformer")
    ours = load_diffusers(tmp_path / "transformer", max_token_length=TINY.max_token_length).eval()
    assert (ours.config.base_size, ours.config.pe_interpolation) == (4, interpolation_scale)
    for hw in [(8, 8), (8, 12), (12, 6)]:  # square (the training grid), wide, tall
        x, t, y, mask = _inputs(hw)
        expected = _run_diffusers(theirs, x, t, y, mask)
        assert expected.abs().max() > 0.1  # a non-trivial output, not two zeros
        diff = (_run_ours(ours, x, t, y, mask) - expected).abs().max().item()
        assert diff <= ATOL, (hw, diff)


def test_export_to_diffusers_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    ours = _randomize(PixArtSigma(dataclasses.replace(TINY, pe_interpolation=0.5)), seed=5)
    export_diffusers(ours, tmp_path / "transformer")
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    assert config["use_additional_conditions"] is False and config["interpolation_scale"] == 0.5
    assert config["sample_size"] == 8 and config["out_channels"] == 8 and config["num_layers"] == 2
    theirs = PixArtTransformer2DModel.from_pretrained(tmp_path / "transformer").eval()
    for hw in [(8, 8), (6, 10)]:
        x, t, y, mask = _inputs(hw)
        diff = (_run_diffusers(theirs, x, t, y, mask) - _run_ours(ours, x, t, y, mask)).abs().max().item()
        assert diff <= ATOL, (hw, diff)


def test_xl2_diffusers_config_is_sigma_1024():
    config = diffusers_config(PRESETS["XL/2"])
    assert config["sample_size"] == 128 and config["interpolation_scale"] == 2.0
    assert config["use_additional_conditions"] is False  # diffusers would default to True at sample_size 128
    assert (config["num_layers"], config["num_attention_heads"], config["attention_head_dim"]) == (28, 16, 72)
    assert (config["caption_channels"], config["out_channels"]) == (4096, 8)


def test_diffusers_export_of_kv_compressed_model_is_refused(tmp_path):
    model = PixArtSigma(TINY)
    model.enable_kv_compression([1])
    with pytest.raises(
        ValueError, match=r"KV compression \(layers \[1\]\) has no diffusers equivalent.*save_model"
    ):
        export_diffusers(model, tmp_path / "transformer")
    assert not (tmp_path / "transformer").exists()


def test_micro_conditioned_diffusers_model_is_refused(tmp_path):
    torch.manual_seed(0)
    alpha = PixArtTransformer2DModel(
        num_attention_heads=4, attention_head_dim=16, num_layers=1, cross_attention_dim=64, sample_size=8,
        caption_channels=32, use_additional_conditions=True,
    )  # fmt: skip
    alpha.save_pretrained(tmp_path / "alpha")
    with pytest.raises(ValueError, match="micro-conditioning"):
        load_diffusers(tmp_path / "alpha")


# --------------------------------------------------------------------------------------------------
# Our folder (KV-compressed models)
# --------------------------------------------------------------------------------------------------


def test_kv_compressed_model_round_trips_through_our_folder(tmp_path):
    torch.manual_seed(0)
    model = _randomize(PixArtSigma(dataclasses.replace(TINY, kv_compress_layers=(1,))), seed=2)
    model.set_null_caption(torch.randn(3, TINY.caption_channels), torch.tensor([1, 1, 0]))
    save_model(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(tmp_path / "ckpt").eval()
    assert loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x, t, y, mask = _inputs((6, 10))
    assert torch.equal(_run_ours(loaded, x, t, y, mask), _run_ours(model, x, t, y, mask))
    export_diffusers(PixArtSigma(TINY), tmp_path / "diffusers")
    with pytest.raises(ValueError, match="not a pixsigma"):
        load_model(tmp_path / "diffusers")


# --------------------------------------------------------------------------------------------------
# Original PixArt .pth
# --------------------------------------------------------------------------------------------------


def _reference_state_dict(theirs: PixArtTransformer2DModel, y_embedding: torch.Tensor) -> dict:
    """diffusers → the reference's own key names, written out as PixArt's tools/convert_diffusers_to_pixart does."""
    d = theirs.state_dict()
    ref = {
        "x_embedder.proj.weight": d["pos_embed.proj.weight"],
        "x_embedder.proj.bias": d["pos_embed.proj.bias"],
        "t_embedder.mlp.0.weight": d["adaln_single.emb.timestep_embedder.linear_1.weight"],
        "t_embedder.mlp.0.bias": d["adaln_single.emb.timestep_embedder.linear_1.bias"],
        "t_embedder.mlp.2.weight": d["adaln_single.emb.timestep_embedder.linear_2.weight"],
        "t_embedder.mlp.2.bias": d["adaln_single.emb.timestep_embedder.linear_2.bias"],
        "t_block.1.weight": d["adaln_single.linear.weight"],
        "t_block.1.bias": d["adaln_single.linear.bias"],
        "y_embedder.y_proj.fc1.weight": d["caption_projection.linear_1.weight"],
        "y_embedder.y_proj.fc1.bias": d["caption_projection.linear_1.bias"],
        "y_embedder.y_proj.fc2.weight": d["caption_projection.linear_2.weight"],
        "y_embedder.y_proj.fc2.bias": d["caption_projection.linear_2.bias"],
        "y_embedder.y_embedding": y_embedding,
        "pos_embed": torch.randn(1, 16, 64),  # the training-grid PE: must be dropped, not used
        "final_layer.linear.weight": d["proj_out.weight"],
        "final_layer.linear.bias": d["proj_out.bias"],
        "final_layer.scale_shift_table": d["scale_shift_table"],
    }
    for i in range(2):
        b, r = f"transformer_blocks.{i}.", f"blocks.{i}."
        ref[r + "scale_shift_table"] = d[b + "scale_shift_table"]
        for s in ("weight", "bias"):
            ref[r + f"attn.qkv.{s}"] = torch.cat([d[b + f"attn1.to_{n}.{s}"] for n in "qkv"])
            ref[r + f"attn.proj.{s}"] = d[b + f"attn1.to_out.0.{s}"]
            ref[r + f"cross_attn.q_linear.{s}"] = d[b + f"attn2.to_q.{s}"]
            ref[r + f"cross_attn.kv_linear.{s}"] = torch.cat([d[b + f"attn2.to_{n}.{s}"] for n in "kv"])
            ref[r + f"cross_attn.proj.{s}"] = d[b + f"attn2.to_out.0.{s}"]
            ref[r + f"mlp.fc1.{s}"] = d[b + f"ff.net.0.proj.{s}"]
            ref[r + f"mlp.fc2.{s}"] = d[b + f"ff.net.2.{s}"]
    return ref


def test_original_pth_loads_and_matches_diffusers(tmp_path):
    theirs = _tiny_diffusers(seed=4)
    y_embedding = torch.randn(TINY.max_token_length, TINY.caption_channels)
    torch.save({"state_dict": _reference_state_dict(theirs, y_embedding)}, tmp_path / "PixArt-tiny.pth")
    ours = load_original_checkpoint(tmp_path / "PixArt-tiny.pth", TINY).eval()
    assert torch.equal(ours.y_embedder.y_embedding, y_embedding)  # the null caption is kept
    for hw in [(8, 8), (10, 6)]:
        x, t, y, mask = _inputs(hw)
        diff = (_run_ours(ours, x, t, y, mask) - _run_diffusers(theirs, x, t, y, mask)).abs().max().item()
        assert diff <= ATOL, (hw, diff)


def test_original_pth_errors(tmp_path):
    theirs = _tiny_diffusers(seed=4)
    ref = _reference_state_dict(theirs, torch.zeros(TINY.max_token_length, TINY.caption_channels))
    torch.save({"state_dict": {**ref, "csize_embedder.mlp.0.weight": torch.zeros(1)}}, tmp_path / "ms.pth")
    with pytest.raises(ValueError, match="micro-conditioning"):
        load_original_checkpoint(tmp_path / "ms.pth", TINY)
    torch.save({"state_dict": ref}, tmp_path / "ok.pth")
    # KV compression is read from the keys, not taken from the config: this .pth has none.
    loaded = load_original_checkpoint(tmp_path / "ok.pth", dataclasses.replace(TINY, kv_compress_layers=(1,)))
    assert loaded.config.kv_compress_layers == ()
    torch.save(
        {"state_dict": {k: v for k, v in ref.items() if k != "blocks.1.attn.proj.bias"}}, tmp_path / "cut.pth"
    )
    with pytest.raises(ValueError, match=r"unexpected keys \[\].*missing keys \['blocks.1.attn.proj.bias'"):
        load_original_checkpoint(tmp_path / "cut.pth", TINY)
    # weights_only=True: a pickle carrying arbitrary objects is rejected by torch
    torch.save({"state_dict": ref, "extra": random.Random(0)}, tmp_path / "unsafe.pth")
    with pytest.raises(Exception, match="weights_only"):
        load_original_checkpoint(tmp_path / "unsafe.pth", TINY)


# --------------------------------------------------------------------------------------------------
# The exported model inside diffusers' PixArtSigmaPipeline
# --------------------------------------------------------------------------------------------------


def _tiny_tokenizer(folder) -> T5Tokenizer:
    """A 50-piece unigram sentencepiece model trained offline, loaded like a real T5 tokenizer folder."""
    words = (
        "a photo of red cat sitting on the blue mat under bright sun with green trees and small dog".split()
    )
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(200)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=50, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    folder.mkdir(parents=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    return T5Tokenizer.from_pretrained(folder, extra_ids=0)


def test_exported_model_runs_in_pixart_sigma_pipeline(tmp_path):
    torch.manual_seed(0)
    export_diffusers(_randomize(PixArtSigma(TINY), seed=6), tmp_path / "transformer")
    tokenizer = _tiny_tokenizer(tmp_path / "tokenizer")
    T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=TINY.caption_channels,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_heads=4,
        )
    ).save_pretrained(tmp_path / "text_encoder")
    AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=8, layers_per_block=1, sample_size=16,
    ).save_pretrained(tmp_path / "vae")  # fmt: skip
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=T5EncoderModel.from_pretrained(tmp_path / "text_encoder"),
        vae=AutoencoderKL.from_pretrained(tmp_path / "vae"),
        transformer=PixArtTransformer2DModel.from_pretrained(tmp_path / "transformer"),
        scheduler=GaussianDiffusion().scheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red cat on the blue mat",
        height=16,
        width=24,  # latents 8×12: a non-square grid
        num_inference_steps=4,
        guidance_scale=4.5,
        max_sequence_length=TINY.max_token_length,
        clean_caption=False,
        use_resolution_binning=False,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, 16, 24, 3)
    assert np.isfinite(image).all() and 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0
