"""Evaluation: FID and CLIP score against reference computations, the job's outputs, compare mode, torchrun."""

from __future__ import annotations

import hashlib
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
            "--clip-model", eval_models["clip"], "--steps", "3", "--batch-size", "2", "--device", "cpu", "--allow-small-fid", *extra]  # fmt: skip


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


def _image_folder(folder, seeds, *, level: int, size=(320, 448)):
    """Noisy PNGs of one size (torch-fidelity batches a folder), larger than 299 and full of high frequencies,
    so that the resize to 299 (downsampling: antialiased or not) matters; ``level`` sets the mean colour."""
    folder.mkdir(parents=True)
    for seed in seeds:
        rng = np.random.default_rng(seed)
        pixels = rng.integers(0, 256, (*size, 3)) // 2 + rng.integers(0, level, (1, 1, 3)) // 2
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{seed:05d}.png")
    return folder


def _folder_fid(metric: FidMetric, real, fake) -> float:
    for folder, real_side in ((real, True), (fake, False)):
        images = torch.stack([pil_to_uint8(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))])
        for batch in images.split(16):
            metric.update(batch, real=real_side)
    return metric.compute()


def _torch_fidelity_fid(real, fake, weights) -> float:
    import torch_fidelity

    return torch_fidelity.calculate_metrics(
        input1=str(fake), input2=str(real), fid=True, feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=str(weights), feature_layer_fid="64", cuda=False, cache=False,
        verbose=False, batch_size=16, save_cpu_ram=True,
    )["frechet_inception_distance"]  # fmt: skip


@pytest.fixture(scope="module")
def fid_folders(eval_models, tmp_path_factory):
    """Two folders of 32 images and torch-fidelity's FID between them (64-d tap: small and quick on CPU)."""
    root = tmp_path_factory.mktemp("fid")
    real = _image_folder(root / "real", range(32), level=256)
    fake = _image_folder(root / "fake", range(500, 532), level=128)
    return real, fake, _torch_fidelity_fid(real, fake, eval_models["inception"])


def test_default_fid_is_torch_fidelitys_on_two_folders(eval_models, fid_folders):
    """The standard FID (TF-compatible bilinear resize): torch-fidelity's calculate_metrics, same weights file."""
    real, fake, theirs = fid_folders
    weights = eval_models["inception"]
    ours = _folder_fid(FidMetric(device=CPU, inception=weights, features=64), real, fake)
    assert abs(ours - theirs) <= 1e-3, (ours, theirs)
    # torchmetrics' own default (antialiased resize) is another number
    antialiased = FidMetric(device=CPU, inception=weights, features=64)
    antialiased.metric.inception.use_antialias = True
    assert abs(_folder_fid(antialiased, real, fake) - theirs) > 0.1


def test_default_2048_d_tap_is_torch_fidelitys_on_the_same_folders(eval_models, fid_folders):
    """The default tap (--fid-features 2048, pool3: the features every paper's FID reads) on images of the same
    folders: per image, torch-fidelity's own inception-v3-compat extractor (same weights file, what its
    calculate_metrics feeds the FID) gives our features. The statistics and the Fréchet distance over them do not
    depend on the tap (test_fid_on_fixed_features_matches_the_reference; calculate_metrics end to end at 64-d
    above); a full 2048-d calculate_metrics (~100 s) was compared once by hand on these folders (rel 3e-7)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    real, fake, _ = fid_folders
    weights = eval_models["inception"]
    reference = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights)
    ours = FidMetric(device=CPU, inception=weights)  # the default tap
    assert ours.num_features == 2048
    files = sorted(real.glob("*.png"))[:4] + sorted(fake.glob("*.png"))[:4]
    images = torch.stack([pil_to_uint8(Image.open(p).convert("RGB")) for p in files])  # (8, 3, 320, 448) uint8
    with torch.no_grad():
        [theirs] = reference.eval()(images)  # (8, 2048)
        mine = ours.metric.inception(images)  # (8, 2048): what FidMetric.update accumulates
    assert theirs.shape == mine.shape == (8, 2048) and theirs.std() > 0
    assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-4), (mine - theirs).abs().max()


def test_clean_resize_fid_is_torch_fidelitys_on_pil_bicubic_299_images(eval_models, fid_folders, tmp_path):
    """--fid-resize clean: PIL bicubic (per channel, float) to 299 first; torch-fidelity on those 299² images
    (its TF resize is then the identity) is the reference."""
    real, fake, standard = fid_folders
    for folder in (real, fake):
        (tmp_path / folder.name).mkdir()
        for path in sorted(folder.glob("*.png")):
            channels = [Image.fromarray(np.asarray(c, np.float32), mode="F").resize((299, 299), Image.BICUBIC)
                        for c in Image.open(path).convert("RGB").split()]  # fmt: skip
            pixels = np.stack([np.asarray(c) for c in channels], -1).clip(0, 255).round().astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / folder.name / path.name)
    weights = eval_models["inception"]
    theirs = _torch_fidelity_fid(tmp_path / "real", tmp_path / "fake", weights)
    clean = _folder_fid(FidMetric(device=CPU, inception=weights, features=64, resize="clean"), real, fake)
    assert abs(clean - theirs) <= 1e-3, (clean, theirs)
    assert abs(clean - standard) > 0.1  # the two resizes are two protocols


def test_clip_counts_prompts_cut_at_its_context_length(eval_models):
    """CLIP reads 77 tokens (start and end included): a prompt one BPE token over is scored on its start only."""
    clip = ClipScorer(eval_models["clip"], None, device=CPU)
    context = clip.tokenizer.context_length
    fits = " ".join(["cat"] * (context - 2))
    assert len(clip.tokenizer.encode(fits)) + 2 == context  # open_clip's BPE: one token per word here
    assert not clip.is_cut("a red car in the rain") and not clip.is_cut(fits)
    assert clip.is_cut(fits + " dog")


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
    # what the FID was computed on: counts per side, the resize protocol, the exact weights file
    assert (metrics["num_real_images"], metrics["num_generated_images"], metrics["fid_resize"]) == (5, 10, "tf")
    with open(eval_models["inception"], "rb") as f:
        assert metrics["inception_sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert metrics["fid_small_n"] and "trend only" in metrics["fid_note"]  # 5 / 10 images: marked
    assert metrics["clip_prompts_cut"] == 0  # the eval prompts are short
    assert "trend only" in (out / "index.html").read_text()
    assert np.isfinite(metrics["fid"]) and metrics["fid"] > 0

    table = pq.read_table(out / "clip_scores.parquet").to_pylist()
    assert [r["file"] for r in table] == [f"k{i:03d}-{j}.png" for i in range(5) for j in range(2)]
    assert not any(r["clip_prompt_cut"] for r in table)
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


def test_small_fid_is_refused_without_the_flag_and_marked_with_it(exports, eval_models, eval_set, tmp_path, capsys):
    args = _args(eval_models, eval_set, "--num-samples", "2", "--output", str(tmp_path / "e"))
    args.remove("--allow-small-fid")
    with pytest.raises(ValueError, match="2 real and 2 generated images: below 2048 per side.*--allow-small-fid"):
        run(["--model", str(exports[0]), *args])
    assert not (tmp_path / "e").exists()  # refused before anything was generated
    metrics = run(["--model", str(exports[0]), *args, "--allow-small-fid"])
    assert metrics["fid_small_n"] and "[trend only: fewer than 2048 images per side]" in capsys.readouterr().out


def test_the_small_n_threshold_is_2048_per_side():
    from training.evaluate import small_fid

    assert not small_fid(2048, 2048) and not small_fid(30_000, 2048)
    assert small_fid(2047, 30_000) and small_fid(30_000, 2047)


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
    # 2 images: logged as a trend, labelled so (never under the tag a reportable FID uses)
    assert [e.step for e in events.Scalars("eval/fid_trend_small_n")] == [2, 4]
    assert "eval/fid" not in events.Tags()["scalars"] and all(r["fid_small_n"] for r in rows)
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
