"""The deterministic held-out validation loss (training/val_loss.py): a function of the weights alone, equal
to a plain diffusers-scheduler computation, independent of batch size; and the trainer's records of it."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

import training.main as trainer
from training.diffusion import GaussianDiffusion
from training.model import PRESETS, PixArtSigma
from training.tiny import write_synthetic_shards
from training.val_loss import VAL_LOSS_FILE, HeldOutSample, noise_for, validation_loss

from .conftest import MAX_TOKENS, debug_config

TIMESTEPS = (50, 250, 500, 750, 950)


def _model(seed: int = 0) -> PixArtSigma:
    torch.manual_seed(seed)
    model = PixArtSigma(dataclasses.replace(PRESETS["tiny"], max_token_length=MAX_TOKENS))
    with torch.no_grad():  # the init zeroes the output layer: give the model an output that depends on it all
        model.final_layer.linear.weight.normal_(std=0.05)
        for block in model.blocks:
            block.cross_attn.proj.weight.normal_(std=0.05)
    return model


def _held_out(num: int = 7) -> list[HeldOutSample]:
    """Two latent shapes (two buckets) and captions of different lengths."""
    g = torch.Generator().manual_seed(3)
    shapes = [(4, 8, 8), (4, 4, 8)]
    return [
        HeldOutSample(f"{i:03d}", torch.randn(shapes[i % 2], generator=g), torch.randn(2 + i % 5, 32, generator=g))
        for i in range(num)
    ]  # fmt: skip


def _reference(model: PixArtSigma, samples: list[HeldOutSample], t: int, seed: int) -> float:
    """One sample at a time, noised by diffusers' DDPMScheduler (PixArt's linear 1e-4 → 0.02 betas)."""
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear"
    )
    model.eval()
    losses = []
    with torch.no_grad():
        for i, s in enumerate(samples):
            noise = noise_for(seed, i, t, s.latent.shape)[None]  # (1, C, h, w)
            steps = torch.tensor([t])
            x_t = scheduler.add_noise(s.latent[None], noise, steps)  # (1, C, h, w)
            eps = model(x_t, steps, s.caption[None])[:, :4]  # (1, C, h, w)
            losses.append(float((eps - noise).pow(2).mean()))
    return sum(losses) / len(losses)


def test_equals_a_plain_scheduler_computation_per_timestep() -> None:
    model, samples = _model(), _held_out()
    got = validation_loss(model, GaussianDiffusion(), samples, timesteps=TIMESTEPS, seed=5, batch_size=3)
    for t in TIMESTEPS:
        assert got[f"t{t}"] == pytest.approx(_reference(model, samples, t, seed=5), rel=1e-5)
    assert got["mean"] == pytest.approx(sum(got[f"t{t}"] for t in TIMESTEPS) / len(TIMESTEPS))


def test_same_weights_same_number_whatever_the_batch_size_and_mode() -> None:
    model, samples = _model(), _held_out()
    model.train()
    first = validation_loss(model, GaussianDiffusion(), samples, batch_size=1)
    assert model.training  # put back in the mode it was in
    clone = copy.deepcopy(model)
    for batch_size in (2, 5, 64):
        again = validation_loss(clone, GaussianDiffusion(), samples, batch_size=batch_size)
        assert again == pytest.approx(first, rel=1e-5)
    assert validation_loss(model, GaussianDiffusion(), samples, batch_size=3) == pytest.approx(
        first, rel=1e-5
    )


def test_moves_when_the_weights_change_and_with_the_noise_seed() -> None:
    model, samples = _model(), _held_out()
    before = validation_loss(model, GaussianDiffusion(), samples)
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight.mul_(1.5)
    after = validation_loss(model, GaussianDiffusion(), samples)
    assert all(abs(after[k] - before[k]) > 1e-4 for k in before)
    assert validation_loss(model, GaussianDiffusion(), samples, seed=1)["mean"] != pytest.approx(
        after["mean"]
    )


def test_rejects_timesteps_outside_the_schedule() -> None:
    with pytest.raises(ValueError, match="timesteps"):
        validation_loss(_model(), GaussianDiffusion(), _held_out(2), timesteps=(1000,))


@pytest.fixture(scope="module")
def held_out_shards(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_shards(
        tmp_path_factory.mktemp("held_out"), num_images=4, samples_per_shard=2, t5=str(tiny_models / "t5"),
        max_tokens=MAX_TOKENS,
    )  # fmt: skip


def _run(tiny_models: Path, shards: Path, held: Path, run_dir: Path) -> list[dict]:
    cfg = debug_config(tiny_models, shards, run_dir, "stages.1.steps=5", "stages.2.steps=3", "val_loss.every=2",
                       f"val_loss.shards={held}", "val_loss.num_samples=3", "log.tensorboard=false",
                       "export_stages=false")  # fmt: skip
    cfg.stages = cfg.stages[1:3]
    for stage in cfg.stages:
        stage.validation_prompts = ()
    trainer.main(cfg)
    return [json.loads(line) for line in (run_dir / VAL_LOSS_FILE).read_text().splitlines()]


def test_trainer_records_it_at_each_stage_start_every_n_steps_and_end(
    tiny_models: Path, shards: Path, held_out_shards: Path, tmp_path: Path
) -> None:
    first = _run(tiny_models, shards, held_out_shards, tmp_path / "a")
    where = [(r["stage"], r["step"], r["global_step"]) for r in first]
    # every 2 steps, and each stage's end although 5 and 3 are not multiples of 2
    assert where == [("32px-sdxl-vae", 0, 0), ("32px-sdxl-vae", 2, 2), ("32px-sdxl-vae", 4, 4), ("32px-sdxl-vae", 5, 5),
                     ("64px", 0, 5), ("64px", 2, 7), ("64px", 3, 8)]  # fmt: skip
    assert all(set(r) >= {f"t{t}" for t in TIMESTEPS} | {"mean"} for r in first)
    assert first[0]["mean"] != first[3]["mean"]  # training moved it
    second = _run(tiny_models, shards, held_out_shards, tmp_path / "b")
    assert second == first  # same seed, same weights, same numbers


def test_preflight_refuses_the_training_shards_as_held_out(
    tiny_models: Path, shards: Path, tmp_path: Path
) -> None:
    cfg = debug_config(tiny_models, shards, tmp_path, "val_loss.every=2", f"val_loss.shards={shards}")
    with pytest.raises(trainer.PreflightError, match="held-out"):
        trainer.preflight(cfg)
