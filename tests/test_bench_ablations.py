"""The ablation bench (bench/bench_ablations.py): its summaries against brute force, and a smoke run at a tiny
size through the real trainer (the numbers themselves live in docs/benchmarks.md, not here)."""

from __future__ import annotations

import json
import math

import numpy as np

from bench.bench_ablations import KV_ARMS, main, stat, steps_to, train_flops, vae_factor
from tests.conftest import REPO


def _records(values: list[float], every: int = 5) -> list[dict]:
    return [{"step": i * every, "mean": v} for i, v in enumerate(values)]


def test_steps_to_is_the_first_evaluation_at_or_below_the_target() -> None:
    values = [1.0, 0.8, 0.9, 0.5, 0.7]
    records = _records(values)
    for target in (1.2, 1.0, 0.85, 0.8, 0.6, 0.5, 0.4):
        expected = next((i * 5 for i, v in enumerate(values) if v <= target), math.inf)
        assert steps_to(records, target) == expected


def test_stat_is_mean_and_half_range_and_counts_seeds_that_never_got_there() -> None:
    assert stat([1.0, 2.0, 4.0]) == f"{np.mean([1, 2, 4]):.4g} ± 1.5"
    assert stat([1.0, math.inf, 3.0]) == "2 ± 1 (1 seed(s) never)"
    assert stat([math.inf]) == "not reached"


def test_smoke_run_through_the_trainer(tmp_path) -> None:
    main(
        [
            "--steps-scale",
            "0.02",
            "--seeds",
            "0",
            "--num-train",
            "8",
            "--no-record",
            "--output",
            str(tmp_path),
        ]
    )
    work = tmp_path / "full"
    table = (work / "ablations.md").read_text()
    assert table.count("\n| (") == 2 + len(KV_ARMS) + 3 + 2  # every row of every arm
    (runs,) = json.loads((work / "runs.json").read_text())
    for name, records in runs.items():
        assert records[0]["step"] == 0 and records[-1]["step"] > 0, name  # before training, and at its end
        assert all(math.isfinite(r["mean"]) for r in records), name
    # (d): the scratch run trained as many FLOPs as the weak-to-strong pair, to one 128 px step
    pre, high = runs["pre64"][-1]["step"], runs["pe-on"][-1]["step"]
    scratch = runs["scratch128"][-1]["step"]
    models = work / "models"
    factor = vae_factor({"weak": str(models / "vae_sd"), "strong": str(models / "vae")})
    assert factor == 8 and "VAE 8×" in table  # the random tiny VAEs (no --vae-dir); 4× toy VAEs give 4
    w2s = train_flops(64, pre, 2, factor) + train_flops(128, high, 2, factor)
    assert abs(train_flops(128, scratch, 2, factor) - w2s) <= train_flops(128, 1, 2, factor) / 2


def test_flops_follow_the_vae_factor():
    """A 4× VAE makes 4× the latent cells of an 8× one, so more tokens: equal compute needs fewer 128 px steps."""
    assert vae_factor({"weak": str(REPO / "assets/toy_vae/sd"), "strong": str(REPO / "assets/toy_vae/sdxl")}) == 4
    assert train_flops(128, 1, 2, 4) > 3 * train_flops(128, 1, 2, 8)
