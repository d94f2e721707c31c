"""Evaluation: FID and CLIP score against reference computations, the job's outputs, compare mode, torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.linalg
import torch
from PIL import Image

from manifests.buckets import nearest_bucket
from tests.training.conftest import REPO
from tests.training.eval_factories import (
    EVAL_SIZES,
    PROMPTS,
    build_eval_models,
    build_eval_set,
    real_images,
    tiny_export,
)
from training.evaluate import ClipScorer, FidMetric, clip_score, pil_to_uint8, run

CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def eval_models(tmp_path_factory):
    """A random Inception-v3 in torch-fidelity's layout, and a tiny open_clip trained a few steps on the eval set."""
    return build_eval_models(tmp_path_factory.getbasetemp() / "eval_models")


@pytest.fixture(scope="session")
def eval_set(tmp_path_factory):
    return build_eval_set(tmp_path_factory.mktemp("eval_shards") / "eval")


@pytest.fixture(scope="module")
def exports(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return [
        tiny_export(tiny_models, root / "run_a" / "final", 1),
        tiny_export(tiny_models, root / "run_b" / "final", 2, ()),
    ]


def _args(eval_models, eval_set, *extra):
    return ["--input", str(eval_set), "--inception", str(eval_models["inception"]), "--fid-features", "64",
            "--clip-model", eval_models["clip"], "--steps", "3", "--batch-size", "2", "--device", "cpu", *extra]  # fmt: skip


# --------------------------------------------------------------------------------------------------
# The numbers against reference computations
# --------------------------------------------------------------------------------------------------


class _Features(torch.nn.Module):
    """A fixed "extractor": the input rows are the features (the FID code path after Inception)."""

    num_features = 6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double()


def _reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of the two sample Gaussians with scipy's matrix square root (FID's formula)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def _fid(real: np.ndarray, fake: np.ndarray) -> float:
    metric = FidMetric(device=CPU, extractor=_Features())
    for chunk in np.array_split(real, 3):  # statistics are sums: updates in pieces, as ranks do
        metric.update(torch.from_numpy(chunk), real=True)
    for chunk in np.array_split(fake, 2):
        metric.update(torch.from_numpy(chunk), real=False)
    return metric.compute()


def test_fid_on_fixed_features_matches_the_reference():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    assert abs(_fid(real, real)) < 1e-6  # a set against itself
    shift = np.array([0.5, -1.0, 0.0, 2.0, 0.0, 0.0])
    assert _fid(real, real + shift) == pytest.approx(float((shift**2).sum()), rel=1e-6)  # same covariance
    other = rng.normal(size=(150, 6)) * 1.5 + 0.3
    assert _fid(real, other) == pytest.approx(_reference_fid(real, other), rel=1e-5)
    assert _fid(real, other) > _fid(real, real + 0.1)


def test_clip_score_formula_on_fixed_embeddings():
    image = torch.tensor([[3.0, 4.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    text = torch.tensor([[6.0, 8.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]])
    # 100 · max(cos, 0): identical directions, orthogonal, opposite (clamped to 0)
    assert clip_score(image, text).tolist() == pytest.approx([100.0, 0.0, 0.0])
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 16)), rng.normal(size=(5, 16))
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    expected = 100 * np.maximum(cos, 0)
    assert clip_score(torch.from_numpy(a), torch.from_numpy(b)).numpy() == pytest.approx(expected, abs=1e-9)


def test_clip_score_of_matching_prompts_beats_shuffled(eval_models):
    """On the tiny CLIP trained for a few steps: real images score higher with their own prompts."""
    clip = ClipScorer(eval_models["clip"], None, device=CPU)
    images = real_images()
    matching = clip(images, list(PROMPTS))
    shuffled = clip(images, list(PROMPTS[1:] + PROMPTS[:1]))
    assert matching.mean() > 0 and matching.mean() > shuffled.mean() + 5


def test_inception_weights_must_be_a_plain_state_dict(tmp_path):
    with pytest.raises(FileNotFoundError, match="--inception"):
        FidMetric(device=CPU, inception=tmp_path / "missing.pth")
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not torch-fidelity's Inception-v3"):
        FidMetric(device=CPU, inception=tmp_path / "other.pth")


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single(exports, eval_models, eval_set):
    """One model, two images per prompt, in this process; output in the default <run>/eval/<name>."""
    metrics = run(["--model", str(exports[0]), *_args(eval_models, eval_set, "--num-images-per-prompt", "2")])
    return metrics, exports[0].parent / "eval" / "eval"


def test_evaluate_writes_metrics_scores_tensorboard_and_page(single, eval_models):
    metrics, out = single
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert (metrics["num_prompts"], metrics["num_images"], metrics["fid_features"]) == (5, 10, 64)
    assert np.isfinite(metrics["fid"]) and metrics["fid"] > 0

    table = pq.read_table(out / "clip_scores.parquet").to_pylist()
    assert [r["file"] for r in table] == [f"k{i:03d}-{j}.png" for i in range(5) for j in range(2)]
    # each generated image lands in the bucket nearest to its real image's aspect (64 px table)
    assert [(r["height"], r["width"]) for r in table[::2]] == [
        nearest_bucket(h, w, 64) for h, w in EVAL_SIZES
    ]
    assert metrics["clip_score_real"] > 0  # the trained tiny CLIP knows the real pairs
    # The written numbers are those of the saved files, recomputed here from disk.
    clip = ClipScorer(eval_models["clip"], None, device=CPU)
    images = [Image.open(out / "images" / r["file"]).convert("RGB") for r in table]
    recomputed = clip(images, [r["prompt"] for r in table])
    assert [r["clip_score"] for r in table] == pytest.approx(recomputed.tolist(), abs=1e-4)
    assert metrics["clip_score"] == pytest.approx(float(recomputed.mean()), abs=1e-4)
    fid = FidMetric(device=CPU, inception=eval_models["inception"], features=64)
    for r in table[::2]:
        fid.update(pil_to_uint8(Image.open(out / "real" / r["real_file"]))[None], real=True)
    for image in images:
        fid.update(pil_to_uint8(image)[None], real=False)
    assert metrics["fid"] == pytest.approx(fid.compute(), rel=1e-5)

    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    page = (out / "index.html").read_text()
    assert "Worst 8 CLIP scores" in page and "Best 8 CLIP scores" in page
    assert (
        "a bowl of fruit on a wooden table" in page
        and "images/k004-1.png" in page
        and "real/k004.png" in page
    )


def test_torchrun_two_ranks_give_the_single_process_numbers(single, exports, eval_models, eval_set, tmp_path):
    """Rank-sharded generation and all-reduced FID statistics: the same numbers as one process."""
    metrics, out = single
    cmd = [str(os.path.join(os.path.dirname(sys.executable), "torchrun")), "--standalone", "--nproc_per_node=2",
           "-m", "training.evaluate", "--model", str(exports[0]),
           *_args(eval_models, eval_set, "--num-images-per-prompt", "2", "--output", str(tmp_path / "ddp"))]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert (ddp["world_size"], metrics["world_size"], ddp["num_images"]) == (2, 1, 10)
    assert ddp["fid"] == pytest.approx(metrics["fid"], rel=1e-3)
    assert ddp["clip_score"] == pytest.approx(metrics["clip_score"], abs=1e-2)
    rows = pq.read_table(tmp_path / "ddp" / "clip_scores.parquet").to_pylist()
    assert [r["file"] for r in rows] == [
        f"k{i:03d}-{j}.png" for i in range(5) for j in range(2)
    ]  # both ranks'
    assert sorted(p.name for p in (tmp_path / "ddp" / "images").iterdir()) == [r["file"] for r in rows]


def test_compare_mode_puts_two_models_side_by_side(exports, eval_models, eval_set, tmp_path):
    models = ["--model", str(exports[0]), "--model", str(exports[1])]
    result = run([*models, *_args(eval_models, eval_set, "--num-samples", "3", "--output", str(tmp_path))])
    assert result["labels"] == ["run_a_final", "run_b_final"]
    assert json.loads((tmp_path / "compare.json").read_text()) == result
    first, second = result["models"]
    assert (first["model"], second["model"]) == (str(exports[0]), str(exports[1]))
    assert first["num_images"] == second["num_images"] == 3 and first["fid"] != second["fid"]
    for label in result["labels"]:
        assert json.loads((tmp_path / label / "metrics.json").read_text())["num_prompts"] == 3
    page = (tmp_path / "index.html").read_text()
    assert "run_a_final/images/k002.png" in page and "run_b_final/images/k002.png" in page
    assert "real/k002.png" in page and "an oil painting of a castle" not in page  # only the first 3 prompts


# --------------------------------------------------------------------------------------------------
# Inside the trainer
# --------------------------------------------------------------------------------------------------


def test_trainer_exports_every_stage_and_evaluates_during_training(
    tiny_models, shards, eval_models, eval_set, tmp_path, monkeypatch
):
    """Two stages of the debug schedule (64 px, then KV on), in-training FID / CLIP every 2 steps; the eval
    prompts' T5 states are computed once at the start with the validation prompts, never on the fly."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import training.main as trainer
    from tests.training.conftest import debug_config
    from training.encoders import CaptionEncoder
    from training.evaluate import training_eval_prompts
    from training.sample import ImageGenerator, ImageJob, SamplingSettings, load_source

    on_the_fly: list[str] = []
    encode = CaptionEncoder.encode
    monkeypatch.setattr(CaptionEncoder, "encode", lambda self, c: (on_the_fly.extend(c), encode(self, c))[1])

    evaluation = ["evaluation.every=2", f"evaluation.eval_set={eval_set}", "evaluation.num_samples=2",
                  f"evaluation.inception={eval_models['inception']}", "evaluation.fid_features=64",
                  f"evaluation.clip_model={eval_models['clip']}", "evaluation.steps=2"]  # fmt: skip
    stages = [f"stages.{i}.{k}" for i in (2, 3) for k in ("steps=2", "validation_prompts=[]")]
    cfg = debug_config(tiny_models, shards, tmp_path / "run", "log.progress_bar=false", *evaluation, *stages)
    cfg.stages = cfg.stages[2:]
    run_dir = trainer.main(cfg)

    rows = [json.loads(line) for line in (run_dir / "eval" / "in_training.jsonl").read_text().splitlines()]
    assert [(r["global_step"], r["num_images"]) for r in rows] == [(2, 2), (4, 2)]
    eval_prompts = training_eval_prompts(cfg.evaluation)
    assert len(eval_prompts) == 3 and not set(eval_prompts) & set(on_the_fly)
    assert set(eval_prompts) <= set(trainer.text_features_key(cfg)["prompts"])
    assert all(np.isfinite(r["fid"]) and r["clip_score"] >= 0 for r in rows)
    assert sorted(p.name for p in (run_dir / "eval" / "in_training" / "00000004" / "images").iterdir()) == [
        "k000.png",
        "k001.png",
    ]
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/fid")] == [2, 4]
    for folder in ("final", "final_ema"):
        assert json.loads((run_dir / folder / "model_index.json").read_text())["transformer"][1] == (
            "PixArtKVTransformer2DModel"
        )
        assert (
            json.loads((run_dir / folder / "64px" / "pixsigma.json").read_text())["model"][
                "kv_compress_layers"
            ]
            == []
        )
        assert (run_dir / folder / "64px-kv" / "transformer").is_dir()
    generator = ImageGenerator.load(
        load_source(str(run_dir)), device=CPU
    )  # the EMA export, T5/VAE as recorded
    image = generator.decode(generator.latents([ImageJob(0, "a cat", 0, 48, 80)], SamplingSettings(steps=2)))
    assert image.shape == (1, 3, 48, 80)
