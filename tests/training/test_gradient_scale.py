"""The gradient of one optimizer step weighs every sample the same, under accumulation and across ranks.

Reference: the same samples (same latents, timesteps and noise, recorded from the trainer's own draws) in
ONE plain forward/backward of the tiny model, loss = the mean of the per-sample diffusion losses. The
trainer's ``train_step`` must give that gradient whatever the micro-batch sizes (the bucket sampler can
emit short batches), the number of micro-batches and the number of ranks (2 gloo processes, DDP). Planted
mutants that fail here: the loss not divided by the micro-batch count ("gradient ×N under accumulation"),
the old per-micro-batch mean (``terms["loss"].mean() / num_micro``), DDP's rank average left uncorrected.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from training.config import FaultSection, OptimSection, StageSection, TrainConfig
from training.diffusion import GaussianDiffusion
from training.encoders import CaptionEncoder, LatentEncoder
from training.main import Dist, train_step
from training.model import PRESETS, PixArtSigma

CHANNELS, TOKENS, LATENT = 32, 5, 8  # the tiny preset's caption width; 8×8 latents (its 4×4 token grid)


class RecordingDiffusion(GaussianDiffusion):
    """The trainer's diffusion, keeping what each loss call saw (x0, t, noise) for the reference."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, ...]] = []

    def training_losses(self, model_output, x_start, t, noise):
        self.calls.append((x_start.detach().clone(), t.clone(), noise.clone()))
        return super().training_losses(model_output, x_start, t, noise)


def _model() -> PixArtSigma:
    """The tiny DiT, no caption dropout (the weighting is what is tested), every weight non-zero."""
    torch.manual_seed(0)
    model = PixArtSigma(dataclasses.replace(PRESETS["tiny"], class_dropout_prob=0.0))
    model.set_null_caption(torch.zeros(1, CHANNELS), torch.ones(1, dtype=torch.bool))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # PixArt zero-inits the output layers: perturb, so every gradient is informative
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


def _batch(size: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "keys": [f"{seed}-{i}" for i in range(size)],
        "latents": torch.randn(size, 4, LATENT, LATENT, generator=g),  # (B, 4, h, w)
        "caption_features": torch.randn(size, TOKENS, CHANNELS, generator=g),  # (B, L, C)
        "caption_mask": torch.ones(size, TOKENS, dtype=torch.bool),  # (B, L)
        "null_caption": torch.zeros(size, dtype=torch.bool),  # (B,)
        "partial": size < 4,
    }


def _config(tmp: Path, grad_accum_steps: int) -> TrainConfig:
    return TrainConfig(
        run_dir=str(tmp),
        stages=[StageSection(name="s", resolution=64, vae="unused", batch_size=4)],
        optim=OptimSection(grad_accum_steps=grad_accum_steps, grad_clip=1e9, mixed_precision="no"),
        faults=FaultSection(),
    )


def _trainer_step(rank: int, world_size: int, sizes: list[int], tmp: Path) -> dict:
    """One train_step on this rank's micro-batches; its gradient and what the diffusion saw."""
    model = _model()
    net = DistributedDataParallel(model) if world_size > 1 else model
    device = torch.device("cpu")
    diffusion = RecordingDiffusion()
    text = CaptionEncoder("unused", max_tokens=16, device=device, cached=True)
    latents = LatentEncoder("unused", scaling_factor=1.0, device=device, cached=True)
    generator = torch.Generator().manual_seed(10 + rank)
    stream = iter([_batch(size, seed=100 * rank + i) for i, size in enumerate(sizes)])
    cfg = _config(tmp, grad_accum_steps=len(sizes))
    out = train_step(
        net, model, stream, diffusion, text, latents, generator, cfg, Dist(rank, world_size, device), 0
    )
    batches = [_batch(size, seed=100 * rank + i) for i, size in enumerate(sizes)]
    return {
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        "calls": [
            (*call, b["caption_features"], b["caption_mask"])
            for call, b in zip(diffusion.calls, batches, strict=True)
        ],
        "loss": out["loss"],
        "samples": out["samples"],
        "partial_batches": out["partial_batches"],
    }


def _rank_main(tmp: str, sizes: list[list[int]]) -> None:
    """One torchrun rank (this file run as a script): its step, saved for the test."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.save(_trainer_step(rank, world_size, sizes[rank], Path(tmp)), f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _reference(calls: list[tuple[torch.Tensor, ...]]) -> tuple[dict, float]:
    """One forward/backward over every sample of the step; loss = mean of the per-sample losses."""
    model = _model()
    diffusion = GaussianDiffusion()
    losses = []
    for x0, t, noise, y, mask in calls:
        x_t = diffusion.q_sample(x0, t, noise).float()
        out = model(x_t, t, y.float(), mask, force_drop_ids=torch.zeros(len(t), dtype=torch.bool))
        losses.append(diffusion.training_losses(out.float(), x0, t, noise)["loss"])  # (B,)
    loss = torch.cat(losses).mean()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, loss.item()


def _assert_same_gradient(grads: dict, reference: dict) -> None:
    worst = max(
        ((grads[n] - reference[n]).norm() / reference[n].norm().clamp_min(1e-12)).item() for n in reference
    )
    assert worst < 1e-4, f"relative gradient error {worst:.3g}"


@pytest.mark.parametrize("sizes", [[4, 1, 2], [4], [1, 4]], ids=["4+1+2", "4", "1+4"])
def test_accumulated_gradient_equals_the_full_batch_gradient(sizes, tmp_path) -> None:
    step = _trainer_step(0, 1, sizes, tmp_path)
    reference, loss = _reference(step["calls"])
    _assert_same_gradient(step["grads"], reference)
    assert step["loss"] == pytest.approx(loss, rel=1e-5)  # the logged loss is the per-sample mean too
    assert step["samples"] == sum(sizes) and step["partial_batches"] == sum(s < 4 for s in sizes)


def test_gradient_across_two_ranks_equals_the_full_batch_gradient(tmp_path) -> None:
    sizes = [[4, 1], [2, 4]]  # rank 0: 5 samples, rank 1: 6, in micro-batches of unequal size
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*torchrun, __file__, str(tmp_path), json.dumps(sizes)], env=env,
                            capture_output=True, text=True, timeout=240)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for name, grad in steps[0]["grads"].items():  # DDP: both ranks hold the same averaged gradient
        assert torch.equal(grad, steps[1]["grads"][name]), name
    reference, loss = _reference(steps[0]["calls"] + steps[1]["calls"])
    _assert_same_gradient(steps[0]["grads"], reference)
    assert steps[0]["loss"] == pytest.approx(loss, rel=1e-5) and steps[0]["samples"] == 11
    assert steps[0]["partial_batches"] == 2


if __name__ == "__main__":
    _rank_main(sys.argv[1], json.loads(sys.argv[2]))
