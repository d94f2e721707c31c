"""Running it for real: pre-emption (a real SIGTERM) and exact mid-segment resume, what is logged, T5 once
per run, the optimiser's own eps, the VAE scaling check, the null-caption modes, and starting from
PixArt-α/Σ weights (120 → 300 tokens, KV layers from the keys)."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import training.main as trainer
from training.config import LogSection, OptimSection
from training.encoders import TextFeatures, compute_text_features
from training.model import PRESETS, PixArtSigma
from training.observe import MetricsSink

from .conftest import MAX_TOKENS, debug_config

CPU = torch.device("cpu")
TINY = PRESETS["tiny"]
KEYS = ("stage", "step", "global_step", "loss", "mse", "vb", "grad_norm", "lr", "latent_std", "skipped")


def _one_stage(models, shards, run_dir, *extra):
    """The debug preset's cached 32 px stage alone (SDXL-like latents, cached T5)."""
    cfg = debug_config(models, shards, run_dir, *extra)
    cfg.stages = cfg.stages[1:2]
    return cfg


def _records(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in KEYS} for r in rows]


# ------------------------------------------------------------------------------------------------
# Pre-emption
# ------------------------------------------------------------------------------------------------


def test_sigterm_checkpoints_mid_segment_and_the_rerun_resumes_exactly(tiny_models, shards, tmp_path) -> None:
    base = [
        "stages.1.steps=7",
        "stages.1.validation_prompts=[]",
        "checkpoint_every=4",
        "optim.grad_accum_steps=2",
    ]
    full = trainer.main(_one_stage(tiny_models, shards, tmp_path / "full", *base))
    cfg = _one_stage(tiny_models, shards, tmp_path / "run", *base, "faults.sigterm_at_step=2")
    with pytest.raises(trainer.Preempted) as stopped:
        trainer.main(cfg)  # a real SIGTERM to this process before global step 2: it finishes that step, saves
    assert stopped.value.code == 143
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["00000003-32px-sdxl-vae"]  # mid-segment (segments are 4 steps)
    state = torch.load(tmp_path / "run" / "checkpoints" / checkpoints[0] / "state.pt", weights_only=True)
    assert state["data"][0]["batches_read"] == 6
    trainer.main(cfg)  # the same command again: resumes at step 3, replaying the 6 batches already read
    assert _records(tmp_path / "run") == _records(full)
    for folder in ("final", "final_ema"):
        weights = Path(folder) / "transformer" / "diffusion_pytorch_model.safetensors"  # pipeline folders
        a, b = load_file(tmp_path / "run" / weights), load_file(full / weights)
        assert all(torch.equal(a[k], b[k]) for k in a), folder
    rows = _records(full)
    for r in rows:  # the two loss terms are logged, and they add up to the loss
        assert r["loss"] == pytest.approx(r["mse"] + r["vb"], rel=1e-5) and r["vb"] > 0 and r["mse"] > 0


def test_progress_is_a_log_line_when_stderr_is_not_a_terminal(tmp_path, caplog) -> None:
    sink = MetricsSink(
        tmp_path, LogSection(every=1, progress_every_s=0, tensorboard=False), enabled=True, total_steps=4,
        resume_global_step=0,
    )  # fmt: skip
    assert sink.bar is None  # pytest captures stderr: no tqdm, whose \r frames garble a log file
    with caplog.at_level(logging.INFO, logger="training.observe"):
        for step in range(4):
            record = {"stage": "s", "step": step, "global_step": step + 1, "loss": 0.5, "force": step == 3}
            sink.step(record, seconds=0.1, data_seconds=0.0, images=2, flops=0, peak=0.0)
    sink.close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train: ")]
    assert len(lines) == 4 and "\r" not in "".join(lines)
    assert "steps/s, ETA" in lines[0] and lines[-1].startswith("train: 4/4 (100.0%)")
    assert lines[-1].endswith("stage s, loss 0.5000")


# ------------------------------------------------------------------------------------------------
# T5 once, optimiser eps
# ------------------------------------------------------------------------------------------------


def test_t5_runs_once_per_run_and_never_at_validation(tiny_models, shards, tmp_path, monkeypatch) -> None:
    """Cached T5 features: T5 loads once at the start (null caption, prompts) and a later launch not at all."""
    import manifests.features

    loads = []
    real = manifests.features.T5Features

    def counting(*args, **kwargs):
        loads.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr("training.encoders.T5Features", counting)
    run_dir = tmp_path / "run"
    cfg = debug_config(tiny_models, shards, run_dir, "stages.1.steps=2", "validation.every=1")
    cfg.stages = cfg.stages[1:2]
    trainer.main(cfg)
    assert len(loads) == 1 and (run_dir / "text_features.safetensors").exists()
    assert len(list((run_dir / "samples" / "32px-sdxl-vae").glob("*.png"))) == 4  # 2 validations × raw, EMA
    cfg = debug_config(
        tiny_models, shards, run_dir, "stages.1.steps=2", "stages.2.steps=2", "validation.every=1"
    )
    cfg.stages = cfg.stages[1:3]
    trainer.main(cfg)  # a second launch with one more stage: resumes, validates, never loads T5
    assert len(loads) == 1


def test_validation_decodes_tiled_one_image_at_a_time(tiny_models) -> None:
    """2K/4K grids decode in tiles (diffusers' AutoencoderKL tiling), switched on for decoding only."""
    from training.encoders import LatentEncoder

    latents = LatentEncoder(str(tiny_models / "vae"), scaling_factor=0.13025, device=CPU, cached=True)
    vae = latents.vae.vae
    seen = []
    decode = vae.decode
    vae.decode = lambda z, **kw: seen.append((vae.use_tiling, z.shape[0])) or decode(z, **kw)
    images = latents.decode(torch.randn(3, 4, 8, 8))
    assert images.shape == (3, 3, 64, 64) and seen == [(True, 1)] * 3 and not vae.use_tiling


def test_adamw_uses_its_own_eps_and_came_its_own() -> None:
    model = torch.nn.Linear(2, 2)
    adamw = trainer.build_optimizer(model, OptimSection(name="adamw"), 1e-3)
    assert adamw.param_groups[0]["eps"] == 1e-8 and adamw.param_groups[0]["betas"] == (0.9, 0.999)
    came = trainer.build_optimizer(model, OptimSection(name="came"), 1e-3)
    assert came.param_groups[0]["eps"] == (1e-30, 1e-16)


# ------------------------------------------------------------------------------------------------
# VAE scaling factor
# ------------------------------------------------------------------------------------------------


def test_vae_scaling_mismatch_with_cached_latents_is_an_error_at_start(tiny_models, shards, tmp_path) -> None:
    cfg = _one_stage(tiny_models, shards, tmp_path / "run", "stages.1.vae_scaling_factor=0.18215")
    with pytest.raises(trainer.PreflightError, match=r"stages\.0\.vae_scaling_factor = 0\.18215, but shards\.json "
                       r"\(latents made with .*vae\) says 0\.13025: set --set stages\.0\.vae_scaling_factor=0\.13025"):  # fmt: skip
        trainer.main(cfg)
    assert not (tmp_path / "run").exists()  # before anything was built or written
    # Shards written before the factor was recorded: the VAE's own config decides.
    older = tmp_path / "older"
    shutil.copytree(shards, older)
    info = json.loads((older / "shards.json").read_text())
    del info["features"]["vae_scaling_factor"]
    (older / "shards.json").write_text(json.dumps(info))
    cfg = _one_stage(tiny_models, older, tmp_path / "run", "stages.1.vae_scaling_factor=0.18215")
    with pytest.raises(trainer.PreflightError, match=r"but the config of VAE .*vae says 0\.13025"):
        trainer.main(cfg)


def test_vae_scaling_mismatch_on_the_fly_is_an_error_at_start(tiny_models, shards, tmp_path) -> None:
    cfg = debug_config(tiny_models, shards, tmp_path / "run", "stages.0.vae_scaling_factor=0.13025")
    with pytest.raises(trainer.PreflightError, match=r"stages\.0\.vae_scaling_factor = 0\.13025, but the config "
                       r"of VAE .*vae_sd says 0\.18215"):  # fmt: skip
        trainer.main(cfg)


# ------------------------------------------------------------------------------------------------
# Null caption: upstream vs diffusers
# ------------------------------------------------------------------------------------------------


def test_null_caption_modes_attend_the_dropped_caption_differently() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    y = torch.randn(2, 6, TINY.caption_channels, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    null = torch.randn(TINY.max_token_length, TINY.caption_channels, generator=g)  # T5("") padded: every row
    null_mask = torch.zeros(TINY.max_token_length, dtype=torch.bool)
    null_mask[0] = True
    model = PixArtSigma(TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        drop = torch.tensor([True, True])
        model.set_null_caption(null, null_mask, mode="upstream")
        upstream = model(x, t, y, mask, force_drop_ids=drop)  # the sample's own mask over T5("") padded
        own = model(x, t, null[None, :6].expand(2, -1, -1), mask)
        torch.testing.assert_close(upstream, own, atol=1e-5, rtol=0)
        model.set_null_caption(null, null_mask, mode="diffusers")
        diffusers = model(x, t, y, mask, force_drop_ids=drop)  # T5("")'s own mask: its one valid token
        single = model(x, t, null[None, :1].expand(2, -1, -1), torch.ones(2, 1, dtype=torch.bool))
        torch.testing.assert_close(diffusers, single, atol=1e-5, rtol=0)
        assert not torch.allclose(upstream, diffusers, atol=1e-3)


def test_null_caption_mode_follows_the_init(tiny_models, shards, tmp_path) -> None:
    def mode(*extra):
        return trainer.null_caption_mode(debug_config(tiny_models, shards, tmp_path / "r", *extra))

    pth, ours, theirs = _alpha_pth(tmp_path, tokens=120), tmp_path / "ours", tmp_path / "theirs"
    from training.convert import export_diffusers, save_model

    model = PixArtSigma(dataclasses.replace(TINY, null_caption="upstream"))
    save_model(model, ours)
    export_diffusers(model, theirs)
    assert mode() == "diffusers"  # from scratch: as diffusers samples
    assert mode(f"model.init={pth}") == "upstream" and mode(f"model.init={theirs}") == "upstream"  # official
    assert mode(f"model.init={ours}") == "upstream"  # the init's own choice
    assert mode(f"model.init={pth}", 'text.null_caption="diffusers"') == "diffusers"  # asked for


def test_upstream_null_caption_is_t5_of_empty_padded_to_max_tokens(tiny_models) -> None:
    t5 = str(tiny_models / "t5")
    upstream = compute_text_features(
        t5, max_tokens=MAX_TOKENS, mode="upstream", prompts=["a cat"], prompt_case="lower", device=CPU
    )
    diffusers = compute_text_features(t5, max_tokens=MAX_TOKENS, mode="diffusers", prompts=[], prompt_case="lower",
                                      device=CPU)
    assert upstream.null.shape == (MAX_TOKENS, 32) and upstream.null_mask.tolist() == [True] + [False] * 15
    assert upstream.null[1:].abs().sum() > 0  # T5's outputs at the padding positions, as PixArt stores them
    assert diffusers.null.shape == (1, 32) and torch.equal(diffusers.null, upstream.null[:1])
    y, mask = upstream.prompt_batch(["a cat"])
    assert y.shape[0] == 1 and mask.all()


# ------------------------------------------------------------------------------------------------
# Starting from PixArt-α / Σ weights
# ------------------------------------------------------------------------------------------------


def _source(kv_layers: tuple[int, ...] = ()) -> PixArtSigma:
    torch.manual_seed(3)
    source = PixArtSigma(dataclasses.replace(TINY, kv_compress_layers=kv_layers))
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    return source


def _alpha_pth(tmp_path: Path, *, tokens: int, kv_layers: tuple[int, ...] = ()) -> Path:
    """A reference-layout .pth (our names are the reference's): ``tokens`` null-caption rows, a training PE."""
    state = {k: v for k, v in _source(kv_layers).state_dict().items() if k != "y_embedder.y_mask"}
    state["y_embedder.y_embedding"] = torch.randn(tokens, TINY.caption_channels)
    state["pos_embed"] = torch.randn(1, 16, TINY.hidden_size)
    path = tmp_path / f"PixArt-{tokens}-{len(kv_layers)}.pth"
    torch.save({"state_dict": state}, path)
    return path


def _null(tokens: int) -> TextFeatures:
    null = torch.randn(tokens, TINY.caption_channels)
    return TextFeatures(null, torch.arange(tokens) < 1)


@pytest.mark.parametrize("kv_layers", [(), (1,)], ids=["alpha-120-tokens", "sigma-kv"])
def test_init_from_a_pth_with_another_token_count_and_kv_layers(
    tiny_models, shards, tmp_path, caplog, kv_layers
):
    pth = _alpha_pth(tmp_path, tokens=120, kv_layers=kv_layers)
    cfg = debug_config(tiny_models, shards, tmp_path / "run", f"model.init={pth}", "text.max_tokens=300")
    with caplog.at_level(logging.INFO, logger="training"):
        model = trainer.build_model(cfg, _null(300), CPU, vae_downsample=8)
    assert model.config.max_token_length == 300 and model.y_embedder.y_embedding.shape == (300, 32)
    assert model.config.kv_compress_layers == kv_layers and model.config.null_caption == "upstream"
    source = _source(kv_layers).state_dict()
    for key, value in model.state_dict().items():
        if not key.startswith("y_embedder.y_"):
            assert torch.equal(value, source[key]), key
    assert "caption tokens 120 → 300 (PixArt-α → Σ)" in caplog.text


def test_init_from_a_diffusers_folder_gives_no_null_caption_warning(
    tiny_models, shards, tmp_path, caplog
) -> None:
    from training.convert import export_diffusers

    export_diffusers(_source(), tmp_path / "init")
    cfg = debug_config(tiny_models, shards, tmp_path / "run", f"model.init={tmp_path / 'init'}")
    with caplog.at_level(logging.WARNING):
        trainer.build_model(cfg, _null(3), CPU, vae_downsample=8)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
