"""What a stage transition resets and what it must not carry: the EMA (re-seeded from the weights entering
the stage), the PE cache (one stage's grids at most), a SIGTERM at a stage's last step (exit after that step),
and cached latents from another VAE (refused at preflight)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import training.main as trainer
from manifests.buckets import bucket_table
from training.config import load_config
from training.convert import load_diffusers
from training.encoders import ShardFeatures
from training.model import PRESETS, PixArtSigma

from .conftest import DEBUG_CONFIG, MAX_TOKENS, debug_config

STEPS = 3  # per stage
DECAY = 0.9  # far from 1, so an EMA that carried the previous stage differs by far more than float noise


def _two_stages(models: Path, shards: Path, run_dir: Path, *extra: str):
    """The debug preset's cached stages 32px-sdxl-vae → 64px (a resolution transition), STEPS steps each."""
    sets = [f"stages.{i}.steps={STEPS}" for i in (1, 2)] + ["stages.2.validation_prompts=[]"]
    cfg = debug_config(models, shards, run_dir, *sets, *extra)
    cfg.stages = cfg.stages[1:3]
    return cfg


def _records(run_dir: Path) -> list[dict]:
    keys = ("stage", "step", "global_step", "loss", "grad_norm", "lr")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in keys} for r in rows]


# ------------------------------------------------------------------------------------------------
# Per-stage EMA
# ------------------------------------------------------------------------------------------------


def test_ema_restarts_from_the_weights_entering_each_stage(
    tiny_models, shards, tmp_path, monkeypatch
) -> None:
    """EMA after step k of a stage = the plain recurrence e ← d·e + (1-d)·w_k started at the entry weights;
    in-training evaluation sees the weights the stage trains, not the EMA."""
    evaluated = {}  # global step → the weights handed to in-training evaluation (FID itself: test_evaluate)
    monkeypatch.setattr(trainer, "training_eval_prompts", lambda section: [])
    monkeypatch.setattr(trainer, "evaluate_in_training", lambda model, cfg, stage, text, latents, env, metrics, step:
                        evaluated.setdefault(step, {k: v.clone() for k, v in model.state_dict().items()}))  # fmt: skip
    cfg = _two_stages(tiny_models, shards, tmp_path / "run", "checkpoint_every=1", "keep_checkpoints=100",
                      f"optim.ema_decay={DECAY}", "stages.1.validation_prompts=[]", "evaluation.every=1",
                      "evaluation.eval_set=unread")  # fmt: skip
    run_dir = trainer.main(cfg)
    states = {
        int(p.name[:8]): torch.load(p / "state.pt", weights_only=True)
        for p in (run_dir / "checkpoints").iterdir()
    }
    assert sorted(states) == list(range(1, 2 * STEPS + 1))
    entry = states[STEPS]["model"]  # the first stage's last weights enter the second (no new layers at 64 px)
    expected = {k: v.clone() for k, v in entry.items() if v.is_floating_point()}
    for k in range(STEPS + 1, 2 * STEPS + 1):
        weights = states[k]["model"]
        expected = {key: DECAY * e + (1 - DECAY) * weights[key] for key, e in expected.items()}
        ema = states[k]["ema"]
        assert ema.keys() == entry.keys()
        for key in expected:
            torch.testing.assert_close(ema[key], expected[key], rtol=1e-5, atol=1e-7, msg=f"step {k} {key}")
    assert sorted(evaluated) == sorted(states)
    for step, weights in evaluated.items():
        assert all(torch.equal(weights[k], states[step]["model"][k]) for k in weights), step
    # The stage's EMA export is that EMA, and the first stage's export its own (checkpointed) EMA.
    for step, name in ((STEPS, cfg.stages[0].name), (2 * STEPS, cfg.stages[1].name)):
        exported = load_diffusers(
            run_dir / "final_ema" / name, subfolder="transformer", max_token_length=MAX_TOKENS
        )
        ema = states[step]["ema"]
        for key, value in exported.state_dict().items():
            if not key.startswith("y_embedder.y_"):
                torch.testing.assert_close(value, ema[key], rtol=0, atol=0, msg=f"{name} {key}")


def test_ema_turned_on_at_a_resume_starts_from_the_resumed_weights(tiny_models, shards, tmp_path) -> None:
    """A checkpoint without an EMA (ema_decay was 0), resumed with ema_decay on: the EMA starts from the
    checkpoint's weights, not from the freshly built model."""
    base = ["checkpoint_every=1", "keep_checkpoints=100", "stages.1.validation_prompts=[]"]
    cfg = _two_stages(
        tiny_models, shards, tmp_path / "run", *base, "optim.ema_decay=0", "faults.sigterm_at_step=1"
    )
    cfg.stages = cfg.stages[:1]
    with pytest.raises(trainer.Preempted):
        trainer.main(cfg)  # steps 1 and 2 without an EMA
    cfg = _two_stages(tiny_models, shards, tmp_path / "run", *base, f"optim.ema_decay={DECAY}")
    cfg.stages = cfg.stages[:1]
    run_dir = trainer.main(cfg)  # resumes at step 2, with an EMA
    states = {
        int(p.name[:8]): torch.load(p / "state.pt", weights_only=True)
        for p in (run_dir / "checkpoints").iterdir()
    }
    assert sorted(states) == [1, 2, 3] and states[2]["ema"] is None
    before, after = states[2]["model"], states[3]["model"]
    for key, value in states[3]["ema"].items():
        if value.is_floating_point():
            expected = DECAY * before[key] + (1 - DECAY) * after[key]
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-7, msg=key)


# ------------------------------------------------------------------------------------------------
# PE cache
# ------------------------------------------------------------------------------------------------


def test_pe_cache_holds_one_stage_of_the_sigma_buckets_at_most() -> None:
    """Every bucket of every stage of configs/sigma.toml (manifests/buckets.py tables), stage after stage."""
    stages = load_config(DEBUG_CONFIG.parent / "sigma.toml").stages
    torch.manual_seed(0)
    model = PixArtSigma(dataclasses.replace(PRESETS["tiny"], hidden_size=16, num_heads=2))
    cell = 8 * model.config.patch_size  # pixels per token
    for stage in stages:
        tiny_stage = dataclasses.replace(
            stage, kv_compress_layers=()
        )  # XL's KV layers: not in the tiny model
        trainer.apply_stage(model, tiny_stage, vae_downsample=8)
        table = bucket_table(stage.resolution)
        current = (model.config.base_size, model.config.pe_interpolation)
        for height, width in table:
            model.pos_embed(height // cell, width // cell)
            cached = list(model._pe_cache)
            assert len(cached) <= len(table), stage.name
            assert {(key[2], key[3]) for key in cached} == {current}, stage.name  # no earlier stage's PE


def test_pe_cache_keeps_its_byte_budget_dropping_the_least_recently_used(monkeypatch) -> None:
    import training.model

    model = PixArtSigma(PRESETS["tiny"])  # width 64: a 4×4 grid's PE is 16·64·4 = 4 KiB in fp32
    monkeypatch.setattr(training.model, "PE_CACHE_BYTES", 3 * 16 * 64 * 4)  # three 4×4-sized PEs
    a, b, c = (model.pos_embed(4, 4 + i) for i in range(3))  # 4×4, 4×5, 4×6: 4, 5, 6 KiB
    assert list(model._pe_cache.values()) == [b, c]  # 4 + 5 + 6 > 12 KiB: the oldest, a, went
    assert model.pos_embed(4, 5) is b  # a hit, now the most recent
    model.pos_embed(4, 4)  # a again: computed anew, and c (least recently used) goes
    assert [t.shape[0] for t in model._pe_cache.values()] == [20, 16]
    assert sum(t.nbytes for t in model._pe_cache.values()) <= training.model.PE_CACHE_BYTES
    torch.testing.assert_close(model.pos_embed(4, 4), a, rtol=0, atol=0)  # recomputed, the same numbers


# ------------------------------------------------------------------------------------------------
# SIGTERM at a stage's last step
# ------------------------------------------------------------------------------------------------


def _record_evaluations(monkeypatch) -> list[int]:
    """The global steps in-training evaluation runs at, in order (FID itself: test_evaluate)."""
    steps: list[int] = []
    monkeypatch.setattr(trainer, "training_eval_prompts", lambda section: [])
    monkeypatch.setattr(trainer, "evaluate_in_training", lambda model, cfg, stage, text, latents, env, metrics, step:
                        steps.append(step))  # fmt: skip
    return steps


EVALUATE = ["evaluation.every=3", "evaluation.eval_set=unread"]  # at each stage's end (STEPS = 3)


def test_sigterm_at_a_stages_last_step_exits_after_it_and_resumes_exactly(
    tiny_models, shards, tmp_path, monkeypatch
) -> None:
    base = ["checkpoint_every=2", "keep_checkpoints=5", *EVALUATE]
    evaluated = _record_evaluations(monkeypatch)
    full = trainer.main(_two_stages(tiny_models, shards, tmp_path / "full", *base))
    assert evaluated == [STEPS, 2 * STEPS]
    evaluated.clear()
    # A real SIGTERM to this process before global step STEPS - 1: the first stage's last step.
    cfg = _two_stages(tiny_models, shards, tmp_path / "run", *base, f"faults.sigterm_at_step={STEPS - 1}")
    first, second = (s.name for s in cfg.stages)
    with pytest.raises(trainer.Preempted) as stopped:
        trainer.main(cfg)
    assert stopped.value.code == 143
    run_dir = tmp_path / "run"
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == [f"00000002-{first}", f"00000003-{first}"]  # that step, checkpointed; none after
    assert [r["global_step"] for r in _records(run_dir)] == [1, 2, 3]
    assert not (run_dir / "final").exists()  # no export (nor validation, nor next stage) before exiting
    assert not list(run_dir.glob("samples/**/*.png"))
    assert evaluated == []

    trainer.main(cfg)  # the same command: the first stage's end (validation, evaluation, export), the second
    assert _records(run_dir) == _records(full)
    assert evaluated == [STEPS, 2 * STEPS]  # the stage-end evaluation the stopped run did not reach
    weights = Path("transformer") / "diffusion_pytorch_model.safetensors"
    for folder in ("final", "final_ema", f"final/{first}", f"final_ema/{first}", f"final/{second}"):
        a, b = load_file(run_dir / folder / weights), load_file(full / folder / weights)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
    assert sorted(p.name for p in (run_dir / "samples" / first).glob("*.png")) == [
        f"{STEPS:08d}-ema.png",
        f"{STEPS:08d}.png",
    ]


def test_sigterm_during_a_stages_validation_exits_before_the_next_stage(
    tiny_models, shards, tmp_path, monkeypatch
) -> None:
    """A SIGTERM that lands while the stage's end runs (validation grids): exit before its export and the next
    stage; the resumed run exports without validating or evaluating that stage again."""
    base = ["checkpoint_every=2", "keep_checkpoints=5", *EVALUATE]
    evaluated = _record_evaluations(monkeypatch)
    full = trainer.main(_two_stages(tiny_models, shards, tmp_path / "full", *base))
    validate, sent, validated = trainer.validate, [], []

    def validate_then_sigterm(*args, **kwargs):
        validate(*args, **kwargs)
        validated.append(args[-1])  # the global step
        if not sent:  # the first launch only: a real SIGTERM to this process
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer, "validate", validate_then_sigterm)
    cfg = _two_stages(tiny_models, shards, tmp_path / "run", *base)
    first = cfg.stages[0].name
    with pytest.raises(trainer.Preempted):
        trainer.main(cfg)
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        f"00000002-{first}",
        f"00000003-{first}",
    ]
    assert [r["global_step"] for r in _records(run_dir)] == [1, 2, 3]  # not one step of the next stage
    assert not (run_dir / "final" / first).exists()  # exited before the stage's export
    trainer.main(cfg)
    assert _records(run_dir) == _records(full)
    assert validated == [STEPS, 2 * STEPS]  # each stage's end once: none run twice
    assert evaluated == [STEPS, 2 * STEPS] * 2  # the full run's, then this run's (its first stage's once)
    weights = Path("transformer") / "diffusion_pytorch_model.safetensors"
    for folder in ("final", "final_ema"):
        a, b = load_file(run_dir / folder / weights), load_file(full / folder / weights)
        assert all(torch.equal(a[k], b[k]) for k in a), folder


def test_sigterm_during_a_mid_stage_evaluation_checkpoints_that_step_and_resumes_exactly(
    tiny_models, shards, tmp_path, monkeypatch
) -> None:
    """Evaluation at every step; a SIGTERM while it runs after global step 1 (not a checkpoint step): exit
    without another training step, then resume exactly, evaluating each step once."""
    base = ["checkpoint_every=2", "keep_checkpoints=5", "evaluation.every=1", "evaluation.eval_set=unread"]
    evaluated = _record_evaluations(monkeypatch)
    full = trainer.main(_two_stages(tiny_models, shards, tmp_path / "full", *base))
    assert evaluated == list(range(1, 2 * STEPS + 1))
    evaluated.clear()
    record = trainer.evaluate_in_training

    def evaluate_then_sigterm(*args):
        record(*args)
        if len(evaluated) == 1:  # the first evaluation of the first launch: a real SIGTERM to this process
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer, "evaluate_in_training", evaluate_then_sigterm)
    cfg = _two_stages(tiny_models, shards, tmp_path / "run", *base)
    with pytest.raises(trainer.Preempted):
        trainer.main(cfg)
    run_dir = tmp_path / "run"
    assert [r["global_step"] for r in _records(run_dir)] == [1]  # no step after the SIGTERM
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"00000001-{cfg.stages[0].name}"]
    trainer.main(cfg)
    assert _records(run_dir) == _records(full)
    assert evaluated == list(range(1, 2 * STEPS + 1))  # step 1 not evaluated again
    weights = Path("transformer") / "diffusion_pytorch_model.safetensors"
    a, b = load_file(run_dir / "final" / weights), load_file(full / "final" / weights)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------
# Cached latents from another VAE
# ------------------------------------------------------------------------------------------------


def test_cached_latents_from_another_vae_are_refused_naming_both(tiny_models, shards, tmp_path) -> None:
    # The debug preset's first stage (SD-like VAE) over shards cached with the SDXL-like one, not asking for
    # its VAE on the fly.
    cfg = debug_config(tiny_models, shards, tmp_path / "run", "stages.0.vae_on_the_fly=false")
    sd, sdxl = tiny_models / "vae_sd", tiny_models / "vae"
    with pytest.raises(trainer.PreflightError) as refused:
        trainer.main(cfg)
    message = str(refused.value)
    assert "\n" not in message and f"stages.0.vae = {sd}," in message
    assert f"at 32 px were made with VAE {sdxl}:" in message and "stages.0.vae_on_the_fly=true" in message
    assert not (tmp_path / "run").exists()  # refused before anything was built

    features = ShardFeatures.read(str(shards))
    asked = debug_config(tiny_models, shards, tmp_path / "run")  # the preset asks: vae_on_the_fly = true
    assert asked.stages[0].vae_on_the_fly and not trainer.latents_cached(asked, asked.stages[0], features)
    assert trainer.latents_cached(asked, asked.stages[1], features)  # the shards' own VAE: cached
    trainer.check_cached_vae(0, cfg.stages[0], features, use_cached=False)  # nothing cached is used: no error
    uncached = dataclasses.replace(cfg.stages[0], resolution=128)  # the shards cache 32 and 64 px only
    trainer.check_cached_vae(0, uncached, features, use_cached=True)  # no cached latents at 128 px to refuse
    on_the_fly = debug_config(tiny_models, shards, tmp_path / "run", "stages.1.vae_on_the_fly=true")
    assert not trainer.latents_cached(on_the_fly, on_the_fly.stages[1], features)  # asked for, even if cached
