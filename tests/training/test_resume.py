"""Exact resume under torchrun: 2 CPU ranks (gloo), a rank SIGKILLed mid-stage, auto-resume from the newest
complete checkpoint. The loss sequence and the final weights (and EMA) must equal an uninterrupted run's.

The same runs check two more things of the issue: 2 ranks over an odd number of shards (3) run the same
number of steps, and a NaN on one rank skips that step on every rank (the all-reduced flag).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import DEBUG_CONFIG, path_overrides, torchrun

STEPS = 4  # per stage, 4 stages: the debug schedule's transitions, shortened
KILL_AT = 15  # global step 15 = stage 4 (KV on), step 3; the newest checkpoint is at global step 14
NAN_AT = 5  # rank 1's loss is NaN at global step 5 (stage 2, step 1)


def _args(models: Path, shards: Path, run_dir: Path, *extra: str) -> list[str]:
    sets = [*path_overrides(models, shards), "checkpoint_every=2", "keep_checkpoints=2", "log.progress_bar=false",
            "log.tensorboard=false", f"faults.inject_nan_steps=[{NAN_AT}]", "faults.inject_rank=1", *extra]  # fmt: skip
    sets += [f"stages.{i}.steps={STEPS}" for i in range(4)] + [
        f"stages.{i}.validation_prompts=[]" for i in range(4)
    ]
    return ["--config", str(DEBUG_CONFIG), "--output", str(run_dir), *[a for s in sets for a in ("--set", s)]]


def _losses(run_dir: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["global_step"], r["loss"], r["skipped"]) for r in rows]


def _assert_same_weights(a: Path, b: Path) -> None:
    for name in ("final", "final_ema"):  # PixArtSigmaPipeline folders (training/pipeline.py)
        weights = Path("transformer") / "diffusion_pytorch_model.safetensors"
        wa, wb = load_file(a / name / weights), load_file(b / name / weights)
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), (name, key)


@pytest.fixture(scope="module")
def uninterrupted(tiny_models, shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = torchrun(_args(tiny_models, shards, run_dir))
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


def test_two_ranks_odd_shards_same_steps_and_nan_skipped_everywhere(uninterrupted, shards) -> None:
    assert len(list(shards.glob("train-*.tar"))) == 3
    losses = _losses(uninterrupted)
    assert [g for _, _, g, _, _ in losses] == list(range(1, 4 * STEPS + 1))
    skipped = [g for _, _, g, _, s in losses if s]
    assert skipped == [NAN_AT + 1]  # rank 0's own loss was finite: it skipped because rank 1 flagged
    final = sorted((uninterrupted / "checkpoints").iterdir())[-1]
    state = torch.load(final / "state.pt", weights_only=True)
    assert [d["batches_read"] for d in state["data"]] == [STEPS, STEPS]  # both ranks, same position
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])


def test_sigkill_under_max_restarts_resumes_exactly(uninterrupted, tiny_models, shards, tmp_path) -> None:
    run_dir = tmp_path / "run"
    faults = [f"faults.kill_at_step={KILL_AT}", "faults.kill_rank=1"]
    result = torchrun(_args(tiny_models, shards, run_dir, *faults), extra=["--max-restarts=1"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert "SIGKILL rank 1 before global step 15" in result.stderr
    assert "resuming from" in result.stderr and "00000014-64px-kv" in result.stderr
    assert _losses(run_dir) == _losses(uninterrupted)
    _assert_same_weights(run_dir, uninterrupted)


def test_sigkill_then_a_new_launch_resumes_exactly(uninterrupted, tiny_models, shards, tmp_path) -> None:
    run_dir = tmp_path / "run"
    faults = [f"faults.kill_at_step={KILL_AT}", "faults.kill_rank=0"]
    killed = torchrun(_args(tiny_models, shards, run_dir, *faults))
    assert killed.returncode != 0 and not (run_dir / "final" / "model_index.json").exists()
    # the three stages that ended before the kill were exported, and pruning left them alone
    assert sorted(p.name for p in (run_dir / "final").iterdir()) == ["32px-sd-vae", "32px-sdxl-vae", "64px"]
    assert (run_dir / "checkpoints" / "00000014-64px-kv" / "COMPLETE").exists()
    again = torchrun(_args(tiny_models, shards, run_dir, *faults))  # the same command: it resumes
    assert again.returncode == 0, again.stderr[-4000:]
    assert _losses(run_dir) == _losses(uninterrupted)
    _assert_same_weights(run_dir, uninterrupted)
