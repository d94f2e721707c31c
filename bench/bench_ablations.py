"""CPU benchmark: PixArt-Σ's weak-to-strong ablations reproduced on the toy world (issue 21, item 4).

Run from the repository root:  python -m bench.bench_ablations [--quick] [--seeds 0 1 2] [--vae-dir DIR]
Writes toy-world training and held-out shards (``manifests.toy`` scenes, square, cached T5 features and the
strong VAE's latents at 64 and 128 px), then trains the ``ablation`` preset (6 blocks, width 96) through the
trainer itself — ``training.main.main(cfg)`` in this process, one call per run, no torchrun — and reads the
deterministic held-out validation loss (``training.val_loss``: ε-MSE at t ∈ {50, 250, 500, 750, 950}, fixed
noise) every ``--every`` steps. Per seed:

- ``pre64``: 64 px from scratch, strong VAE; ``pre64-weak``: the same with the weak VAE (encoded on the fly).
- (a) ``pe-on`` / ``pe-off``: ``pre64`` → 128 px with pe_interpolation 128/512 (PixArt-Σ §3) vs kept at 64/512.
- (b) ``pe-on`` → KV compression R=2 at 128 px: none / deep (4–5) / middle (2–3) / shallow (0–1) / all with
  Conv Avg Init, and deep with random init (PixArt-Σ §3.2).
- (c) ``pre64-weak`` → strong VAE at 64 px: steps until the held-out loss is back at its pre-swap value,
  and how many steps ``pre64`` (strong VAE from scratch) needed for the same value.
- (d) weak-to-strong = ``pre64`` + ``pe-on`` vs 128 px from scratch for the same training FLOPs
  (``training.flops``, forward + backward = 3× forward).

Each arm's mean ± spread (half the min–max range) over the seeds goes into docs/benchmarks.md (section
``ablations``) beside the paper's number or claim, and one PNG per arm (held-out loss vs step) into docs/.
The VAEs: ``--vae-dir`` (``sd/`` weak + ``sdxl/`` strong, as ``python -m training.toy_vae``
writes them, e.g. ``assets/toy_vae``); by default the tiny calibrated random VAEs of ``training.tiny``
(the shipped toy VAEs are trained at 128/256 px and keep no colour yet; the arms run at 64/128 px) (SD-like and SDXL-like scaling factors; their decode is not a picture, the DiT's latent
task is still fixed and learnable) — the table says which.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.bench_model import cpu_name
from bench.record import write_section
from training.config import (
    DataSection,
    LogSection,
    ModelSection,
    OptimSection,
    StageSection,
    TextSection,
    TrainConfig,
    ValLossSection,
)
from training.encoders import vae_downsample_factor
from training.flops import image_forward_flops
from training.main import main as train
from training.model import PRESETS
from training.tiny import (
    SD_VAE_SCALING_FACTOR,
    SDXL_VAE_SCALING_FACTOR,
    build_tiny_t5,
    build_tiny_vae,
    write_synthetic_shards,
)
from training.val_loss import VAL_LOSS_FILE

log = logging.getLogger("bench.ablations")

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
TRAIN_SEED, HELD_OUT_SEED = 21, 22  # toy corpus seeds (the toy VAEs use 1_000_003+, curation.toy_world 0)
LOW, HIGH = 64, 128  # px: 4×4 and 8×8 token grids through 8× VAEs, 8×8 and 16×16 through 4× ones
MAX_TOKENS = 48
SECONDS_FILE = "bench_seconds.json"  # a run's wall-clock training time, beside its records
PRESET = "ablation"
LR = 3e-4  # CAME (PixArt-Σ's optimiser), constant after warm-up (1e-3 diverged from scratch at batch 2)
WARMUP = 20  # steps, runs from scratch only: a fine-tune's first steps are what the arms measure
KV_ARMS = {  # name → (layers, init); PixArt-Σ compresses the deep half (blocks 14–27 of 28)
    "none": ((), "conv_avg"),
    "deep": ((4, 5), "conv_avg"),
    "middle": ((2, 3), "conv_avg"),
    "shallow": ((0, 1), "conv_avg"),
    "all": (tuple(range(6)), "conv_avg"),
    "deep-random": ((4, 5), "random"),
}


@dataclass(frozen=True)
class Budget:
    """Steps per run kind; --quick scales them down (same arms, same directions expected)."""

    pre: int  # 64 px from scratch
    high: int  # after the resolution switch (a), and the KV fine-tunes (b)
    kv: int
    swap: int  # after the VAE swap (c)
    every: int  # steps between held-out evaluations
    num_held_out: int
    batch_size: int


# Sized for the shared 2-core machine (measured under load ~15): full ≈ 8 min per seed, quick ≈ 3 min.
FULL = Budget(pre=300, high=100, kv=60, swap=100, every=10, num_held_out=16, batch_size=4)
QUICK = Budget(pre=120, high=40, kv=30, swap=40, every=5, num_held_out=8, batch_size=4)


# --------------------------------------------------------------------------------------------------
# Data and models
# --------------------------------------------------------------------------------------------------


def prepare(work: Path, vae_dir: Path | None, *, num_train: int) -> dict[str, str]:
    """T5, weak/strong VAEs and both shard folders under ``work`` (reused when already there)."""
    models = work / "models"
    paths = {"t5": str(models / "t5")}
    if vae_dir is not None:
        paths |= {"weak": str(vae_dir / "sd"), "strong": str(vae_dir / "sdxl"),
                  "vaes": f"toy VAEs from {vae_dir}"}  # fmt: skip
    else:
        paths |= {"weak": str(models / "vae_sd"), "strong": str(models / "vae"),
                  "vaes": "tiny calibrated random VAEs (training.tiny; no --vae-dir)"}  # fmt: skip
    if not (models / "t5").exists():
        build_tiny_t5(models)
    if vae_dir is None and not (models / "vae").exists():
        build_tiny_vae(models, scaling_factor=SDXL_VAE_SCALING_FACTOR, name="vae")
        build_tiny_vae(models, scaling_factor=SD_VAE_SCALING_FACTOR, name="vae_sd")
    for name, seed, num in (("train", TRAIN_SEED, num_train), ("held_out", HELD_OUT_SEED, 32)):
        folder = work / f"shards_{name}_{num}"
        if not (folder / "shards.json").exists():
            # square toy scenes rendered at 256 px, cropped to the 64/128 px buckets, T5 + latents cached
            write_synthetic_shards(folder, num_images=num, samples_per_shard=64, resolutions=(LOW, HIGH),
                                   sizes=((64, 64),), t5=paths["t5"], vae=paths["strong"],
                                   vae_resolutions=(LOW, HIGH), max_tokens=MAX_TOKENS, toy_seed=seed)  # fmt: skip
        paths[name] = str(folder)
    return paths


def vae_scaling(path: str) -> float:
    return float(json.loads((Path(path) / "config.json").read_text())["scaling_factor"])


# --------------------------------------------------------------------------------------------------
# Runs (each one call of the trainer)
# --------------------------------------------------------------------------------------------------


def run(
    name: str,
    paths: dict,
    work: Path,
    budget: Budget,
    *,
    seed: int,
    steps: int,
    resolution: int,
    vae: str = "strong",
    init: str = "",
    pe_interpolation: float | None = None,
    kv: tuple[tuple[int, ...], str] = ((), "conv_avg"),
) -> list[dict]:
    """Train one stage in this process; returns its held-out loss records (step 0 = before training)."""
    run_dir = work / "runs" / f"seed{seed}" / name
    records = run_dir / VAL_LOSS_FILE
    if (run_dir / "final" / "transformer").exists() and records.exists():  # done in an earlier invocation
        done = [json.loads(line) for line in records.read_text().splitlines()]
        if done[-1]["step"] != steps:
            raise ValueError(
                f"{run_dir} holds a run of {done[-1]['step']} steps, not {steps}: use another --output"
            )
        return done
    stage = StageSection(
        name=name, resolution=resolution, vae=paths[vae], vae_scaling_factor=vae_scaling(paths[vae]),
        vae_on_the_fly=vae != "strong", pe_interpolation=pe_interpolation, kv_compress_layers=kv[0],
        kv_compress_init=kv[1], steps=steps, batch_size=budget.batch_size, lr=LR, warmup_steps=0 if init else WARMUP,
    )  # fmt: skip
    cfg = TrainConfig(
        run_dir=str(run_dir), stages=[stage], seed=seed, checkpoint_every=10**6, keep_checkpoints=1,
        export_stages=False, model=ModelSection(preset=PRESET, init=init),
        text=TextSection(t5=paths["t5"], max_tokens=MAX_TOKENS, null_caption="diffusers"),
        data=DataSection(shards=paths["train"], real_prompt_ratio=1.0, shuffle_buffer=64),
        optim=OptimSection(name="came", base_lr=LR, grad_clip=1.0, mixed_precision="no"),
        val_loss=ValLossSection(every=budget.every, shards=paths["held_out"], num_samples=budget.num_held_out),
        log=LogSection(every=10, progress_bar=False, tensorboard=False),
    )  # fmt: skip
    started = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - started
    (run_dir / SECONDS_FILE).write_text(json.dumps({"seconds": seconds}))
    log.info("seed %d %s: %d steps in %.0f s", seed, name, steps, seconds)
    return [json.loads(line) for line in records.read_text().splitlines()]


def final(work: Path, seed: int, name: str) -> str:
    """The diffusers transformer folder a run exported (model.init of the runs that continue it)."""
    return str(work / "runs" / f"seed{seed}" / name / "final" / "transformer")


def vae_factor(paths: dict) -> int:
    """Pixels per latent cell of the runs' VAEs (the weak and the strong one must agree: one token grid)."""
    factors = {vae_downsample_factor(paths[name]) for name in ("weak", "strong")}
    if len(factors) != 1 or None in factors:
        raise ValueError(f"the weak and strong VAEs must both downsample by one readable factor, got {factors}")
    return factors.pop()


def tokens(resolution: int, factor: int) -> int:
    """Token grid side of a square image at ``resolution`` through a VAE of ``factor`` and the preset's patch."""
    return resolution // factor // PRESETS[PRESET].patch_size


def train_flops(resolution: int, steps: int, batch_size: int, factor: int) -> float:
    """Training FLOPs of ``steps`` steps at ``resolution`` through a VAE of ``factor`` (forward + backward ≈ 3 ×
    forward)."""
    config = PRESETS[PRESET]
    flops = image_forward_flops(config, (resolution, resolution), MAX_TOKENS, vae_downsample=factor)
    return 3.0 * steps * batch_size * flops


def one_seed(seed: int, paths: dict, work: Path, b: Budget) -> dict[str, list[dict]]:
    """Every run of one seed, in dependency order; returns name → held-out loss records."""
    out = {}
    out["pre64"] = run("pre64", paths, work, b, seed=seed, steps=b.pre, resolution=LOW)
    out["pre64-weak"] = run("pre64-weak", paths, work, b, seed=seed, steps=b.pre, resolution=LOW, vae="weak")
    pre = final(work, seed, "pre64")
    out["pe-on"] = run("pe-on", paths, work, b, seed=seed, steps=b.high, resolution=HIGH, init=pre)
    out["pe-off"] = run("pe-off", paths, work, b, seed=seed, steps=b.high, resolution=HIGH, init=pre,
                        pe_interpolation=LOW / 512)  # fmt: skip
    high = final(work, seed, "pe-on")
    for arm, kv in KV_ARMS.items():
        out[f"kv-{arm}"] = run(
            f"kv-{arm}", paths, work, b, seed=seed, steps=b.kv, resolution=HIGH, init=high, kv=kv
        )
    out["swap"] = run("swap", paths, work, b, seed=seed, steps=b.swap, resolution=LOW,
                      init=final(work, seed, "pre64-weak"))  # fmt: skip
    factor = vae_factor(paths)
    w2s = train_flops(LOW, b.pre, b.batch_size, factor) + train_flops(HIGH, b.high, b.batch_size, factor)
    scratch_steps = round(w2s / train_flops(HIGH, 1, b.batch_size, factor))
    out["scratch128"] = run("scratch128", paths, work, b, seed=seed, steps=scratch_steps, resolution=HIGH)
    return out


# --------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------


def curve(records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(steps, mean held-out loss) of one run."""
    return np.array([r["step"] for r in records]), np.array([r["mean"] for r in records])


def steps_to(records: list[dict], target: float) -> float:
    """The first evaluated step whose held-out loss is ≤ target (inf when never)."""
    steps, values = curve(records)
    hit = np.nonzero(values <= target)[0]
    return float(steps[hit[0]]) if len(hit) else float("inf")


def stat(values: list[float]) -> str:
    """mean ± half the range over seeds (inf: 'not reached' by n seeds)."""
    finite = [v for v in values if np.isfinite(v)]
    if not finite:
        return "not reached"
    text = f"{np.mean(finite):.4g} ± {(max(finite) - min(finite)) / 2:.2g}"
    return text if len(finite) == len(values) else f"{text} ({len(values) - len(finite)} seed(s) never)"


def end(records: list[dict]) -> float:
    """The run's end level: mean over its last quarter of evaluations (at least 2), so one noisy step
    (batch 4, constant lr) does not decide a comparison."""
    tail = max(2, len(records) // 4)
    return float(np.mean([r["mean"] for r in records[-tail:]]))


def rows_a(runs: list[dict]) -> list[list[str]]:
    """(a) PE interpolation on vs off: loss right after the switch, at the end, steps to the off arm's end."""
    target = [max(end(r["pe-on"]), end(r["pe-off"])) for r in runs]  # the level the worse arm ends at
    rows = []
    for arm in ("pe-on", "pe-off"):
        rows.append([f"(a) 64→128 px, PE interpolation {arm[3:]}", stat([r[arm][0]["mean"] for r in runs]),
                     stat([end(r[arm]) for r in runs]),
                     "steps to the worse arm's end loss "
                     + stat([steps_to(r[arm], t) for r, t in zip(runs, target, strict=True)])])  # fmt: skip
    return rows


def rows_b(runs: list[dict]) -> list[list[str]]:
    """(b) KV compression: loss at step 0 (the init's cost), at the end, and the end's excess over 'none'."""
    rows = []
    for arm in KV_ARMS:
        excess = [end(r[f"kv-{arm}"]) - end(r["kv-none"]) for r in runs]
        rows.append([f"(b) KV R=2 {arm}", stat([r[f"kv-{arm}"][0]["mean"] for r in runs]),
                     stat([end(r[f"kv-{arm}"]) for r in runs]), f"Δ end vs none {stat(excess)}"])  # fmt: skip
    return rows


def rows_c(runs: list[dict]) -> list[list[str]]:
    """(c) VAE swap: steps until the pre-swap loss is reached again, vs the strong VAE from scratch."""
    target = [end(r["pre64-weak"]) for r in runs]
    swap = [steps_to(r["swap"], t) for r, t in zip(runs, target, strict=True)]
    scratch = [steps_to(r["pre64"], t) for r, t in zip(runs, target, strict=True)]
    # The strong VAE's latents may be harder to model than the weak one's (then the pre-swap level is out of
    # reach for both): also the steps each strong-VAE run needs to reach the level the swap run ends at.
    level = [end(r["swap"]) for r in runs]
    swap_level = [steps_to(r["swap"], t) for r, t in zip(runs, level, strict=True)]
    scratch_level = [steps_to(r["pre64"], t) for r, t in zip(runs, level, strict=True)]
    return [
        ["(c) weak VAE, before the swap", "", stat(target), ""],
        ["(c) after the swap to the strong VAE", stat([r["swap"][0]["mean"] for r in runs]), stat(level),
         f"steps to the pre-swap loss {stat(swap)}; to its own end level {stat(swap_level)}"],
        ["(c) strong VAE from scratch", stat([r["pre64"][0]["mean"] for r in runs]),
         stat([end(r["pre64"]) for r in runs]),
         f"steps to the pre-swap loss {stat(scratch)}; to the swap run's end level {stat(scratch_level)}"],
    ]  # fmt: skip


def rows_d(runs: list[dict], b: Budget, factor: int) -> list[list[str]]:
    """(d) weak-to-strong vs 128 px from scratch at equal training FLOPs: the end loss at 128 px."""
    flops = train_flops(LOW, b.pre, b.batch_size, factor) + train_flops(HIGH, b.high, b.batch_size, factor)
    return [
        [f"(d) 64 px {b.pre} steps → 128 px {b.high} steps ({flops / 1e12:.2f} TFLOP)", "",
         stat([end(r["pe-on"]) for r in runs]), ""],
        [f"(d) 128 px from scratch, {runs[0]['scratch128'][-1]['step']} steps (same FLOPs)", "",
         stat([end(r["scratch128"]) for r in runs]),
         f"Δ vs weak-to-strong {stat([end(r['scratch128']) - end(r['pe-on']) for r in runs])}"],
    ]  # fmt: skip


def _seeds(flags: list[bool]) -> str:
    return f"{sum(flags)}/{len(flags)} seeds"


def directions(runs: list[dict]) -> list[str]:
    """Each arm's direction against the paper's, from the per-seed numbers (written, not judged by hand)."""
    first = lambda arm: [r[arm][0]["mean"] for r in runs]  # noqa: E731
    last = lambda arm: [end(r[arm]) for r in runs]  # noqa: E731
    on0, off0, on1, off1 = first("pe-on"), first("pe-off"), last("pe-on"), last("pe-off")
    order = lambda values: " < ".join(sorted(KV_ARMS, key=lambda a: np.mean(values(f"kv-{a}"))))  # noqa: E731
    level = [end(r["swap"]) for r in runs]
    swap_steps = [steps_to(r["swap"], t) for r, t in zip(runs, level, strict=True)]
    scratch_steps = [steps_to(r["pre64"], t) for r, t in zip(runs, level, strict=True)]
    recovered = [steps_to(r["swap"], end(r["pre64-weak"])) < math.inf for r in runs]
    w2s, scratch = last("pe-on"), last("scratch128")
    return [
        f"- (a) PE interpolation on below off right after the switch in {_seeds([a < b for a, b in zip(on0, off0, strict=True)])} "
        f"(mean Δ {np.mean(off0) - np.mean(on0):+.4f}); at the end in {_seeds([a < b for a, b in zip(on1, off1, strict=True)])} "
        f"(mean Δ {np.mean(off1) - np.mean(on1):+.4f}).",
        f"- (b) order at step 0 (the init's cost): {order(first)}; at the end: {order(last)}. Deep below "
        f"deep-random at step 0 in {_seeds([a < b for a, b in zip(first('kv-deep'), first('kv-deep-random'), strict=True)])}, "
        f"at the end in {_seeds([a < b for a, b in zip(last('kv-deep'), last('kv-deep-random'), strict=True)])}.",
        f"- (c) the swap run got back to the weak VAE's pre-swap loss in {_seeds(recovered)}; it reached its own "
        f"end level sooner than the strong VAE from scratch did in "
        f"{_seeds([a < b for a, b in zip(swap_steps, scratch_steps, strict=True)])}.",
        f"- (d) weak-to-strong below 128 px from scratch at equal FLOPs in "
        f"{_seeds([a < b for a, b in zip(w2s, scratch, strict=True)])} (mean Δ {np.mean(scratch) - np.mean(w2s):+.4f}).",
    ]  # fmt: skip


def plot(
    runs: list[dict],
    arms: list[str],
    title: str,
    path: Path,
    *,
    offsets: dict[str, float] | None = None,
    xlabel: str = "step in the run",
) -> Path:
    """Held-out loss vs step (+ an offset per run kind), mean over seeds with the min–max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for arm in arms:
        steps = curve(runs[0][arm])[0] + (offsets or {}).get(arm, 0.0)
        values = np.stack([curve(r[arm])[1] for r in runs])  # (seeds, evaluations)
        ax.plot(steps, values.mean(0), label=arm)
        ax.fill_between(steps, values.min(0), values.max(0), alpha=0.2)
    ax.set(xlabel=xlabel, ylabel="held-out ε-MSE (mean of 5 t)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


PAPER = {  # PixArt-Σ (arXiv 2403.04692); the toy analogue of each claim
    "a": "§3 (resolution adaptation): with PE interpolation the higher-resolution model is usable after "
    "~100 steps; without, training starts from a broken PE and converges slower → pe-on below pe-off.",
    "b": "§3.2 + the KV-compression ablation: FID 8.244 uncompressed vs 8.532 deep (14–27); shallow and "
    "middle worse than deep; Conv Avg Init adapts in ~100 steps where random init does not → "
    "none ≤ deep < middle/shallow/all, deep < deep-random.",
    "c": "§3 (VAE adaptation, SD → SDXL VAE): the model adapts in ~2K steps, a small fraction of training "
    "from scratch → steps to recover ≪ steps from scratch.",
    "d": "§3 / weak-to-strong: fine-tuning from the weaker (lower-resolution) model is far cheaper than training "
    "the stronger one from scratch → weak-to-strong below scratch at equal compute.",
}


def markdown(runs: list[dict], b: Budget, meta: dict) -> str:
    header = ["run", "held-out loss at step 0", "at the end (last ¼ of evaluations)", "comparison"]
    rows = rows_a(runs) + rows_b(runs) + rows_c(runs) + rows_d(runs, b, meta['factor'])
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    paper = [f"- ({k}) {v}" for k, v in PAPER.items()]
    plots = [f"![{k}]({meta['plot']}{k}.png)" for k in "abcd"]
    return "\n".join([
        f"## Weak-to-strong ablations on the toy world (issue 21){' — quick' if meta['quick'] else ''}", "",
        f"Command: `{meta['command']}`", "",
        f"Machine: {meta['machine']}; 1 torch thread; load average {meta['load']} at the start — shared with six "
        f"other engineers' jobs (timings are not the point here; losses are deterministic per seed). "
        f"Seeds {meta['seeds']}; {meta['minutes']:.1f} min in this invocation, {meta['train_minutes']} min of trainer "
        "calls recorded for these runs.", "",
        f"Setup: preset `{PRESET}` (6 blocks, width 96), CAME lr {LR}, batch {b.batch_size}, {meta['num_train']} "
        f"toy scenes (square, {LOW} px = {tokens(LOW, meta['factor'])}² tokens, {HIGH} px = "
        f"{tokens(HIGH, meta['factor'])}², VAE {meta['factor']}×), {meta['vaes']}; tiny T5. Steps: pre {b.pre}, "
        f"after the resolution switch {b.high}, KV fine-tune {b.kv}, after the VAE swap {b.swap}. Metric: "
        f"`training.val_loss` on {b.num_held_out} held-out scenes every {b.every} steps (ε-MSE, mean of t = 50, "
        "250, 500, 750, 950, fixed noise; lower is better). Values: mean ± half the min–max range over seeds.", "",
        *table, "",
        "Paper's claims, and what the toy analogue should show:", "", *paper, "",
        "Directions measured here (per seed):", "", *directions(runs), "",
        *plots,
    ])  # fmt: skip


# --------------------------------------------------------------------------------------------------


def recorded_minutes(work: Path, seeds: list[int]) -> str:
    """Sum of the recorded trainer-call times of these seeds' runs (runs made by an older bench have none)."""
    files = [f for seed in seeds for f in (work / "runs" / f"seed{seed}").glob(f"*/{SECONDS_FILE}")]
    total = sum(json.loads(f.read_text())["seconds"] for f in files) / 60
    count = sum(1 for seed in seeds for d in (work / "runs" / f"seed{seed}").glob("*/final"))
    return f"{total:.1f}" + ("" if len(files) == count else f" (recorded for {len(files)} of {count} runs)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("--quick", action="store_true", help=f"shorter runs: {QUICK}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--vae-dir", type=Path, help="sd/ + sdxl/ (e.g. assets/toy_vae); default: tiny random VAEs"
    )
    parser.add_argument("--num-train", type=int, default=512, help="toy scenes in the training shards")
    parser.add_argument("--output", type=Path, default=Path(tempfile.gettempdir()) / "pixsigma_bench_ablations",
                        help="work folder (shards, runs; a rerun reuses finished runs)")  # fmt: skip
    parser.add_argument("--no-record", action="store_true", help="do not write docs/ (smoke runs)")
    parser.add_argument(
        "--steps-scale", type=float, default=1.0, help=argparse.SUPPRESS
    )  # the suite's smoke test
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    torch.set_num_threads(1)
    started = time.perf_counter()
    load = os.getloadavg()
    vae_dir = args.vae_dir  # None: training.tiny's random VAEs (the module docstring says why)
    b = QUICK if args.quick else FULL
    if args.steps_scale != 1.0:
        s = args.steps_scale
        b = Budget(pre=max(2, round(b.pre * s)), high=max(2, round(b.high * s)), kv=max(2, round(b.kv * s)),
                   swap=max(2, round(b.swap * s)), every=max(1, round(b.every * s)), num_held_out=2, batch_size=2)  # fmt: skip
    work = args.output / ("quick" if args.quick else "full")
    paths = prepare(work, vae_dir, num_train=args.num_train)
    runs = [one_seed(seed, paths, work, b) for seed in args.seeds]
    meta = {"command": "python -m bench.bench_ablations " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "machine": f"{cpu_name()[0]}, {os.cpu_count()} logical CPUs, {platform.system()}",
            "load": f"{load[0]:.1f}", "seeds": args.seeds, "minutes": (time.perf_counter() - started) / 60,
            "vaes": paths["vaes"], "factor": vae_factor(paths), "num_train": args.num_train, "quick": args.quick,
            "train_minutes": recorded_minutes(work, args.seeds),
            "plot": "ablation_quick_" if args.quick else "ablation_"}  # fmt: skip
    text = markdown(runs, b, meta)
    print(text)
    (work / "ablations.md").write_text(text + "\n")
    (work / "runs.json").write_text(json.dumps(runs))
    if not args.no_record:
        arms = {"a": ["pe-on", "pe-off"], "b": [f"kv-{k}" for k in KV_ARMS], "c": ["pre64-weak", "swap", "pre64"],
                "d": ["pe-on", "scratch128"]}  # fmt: skip
        titles = {"a": "(a) 64→128 px: PE interpolation on/off", "b": "(b) KV compression at 128 px",
                  "c": "(c) VAE swap weak→strong at 64 px", "d": "(d) 128 px: fine-tune vs scratch (equal FLOPs)"}  # fmt: skip
        for k, names in arms.items():
            if k == "d":  # one x axis for both: 128 px step equivalents of training FLOPs
                factor = meta["factor"]
                pre = train_flops(LOW, b.pre, b.batch_size, factor) / train_flops(HIGH, 1, b.batch_size, factor)
                plot(runs, names, titles[k], DOCS / f"{meta['plot']}{k}.png", offsets={"pe-on": pre},
                     xlabel="training FLOPs in 128 px steps (weak-to-strong: after its 64 px stage)")  # fmt: skip
            else:
                plot(runs, names, titles[k], DOCS / f"{meta['plot']}{k}.png")
        write_section("ablations-quick" if args.quick else "ablations", text)


if __name__ == "__main__":
    main()
