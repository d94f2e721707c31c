"""The 30K protocol: reference statistics saved and loaded (pytorch-fid's .npz), a sampled folder scored against
them, prompt files, and the batched Inception / CLIP passes against one image at a time."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from tests.training.conftest import REPO
from tests.training.eval_factories import PROMPTS, build_eval_models, real_images, tiny_export
from tests.training.test_evaluate import _Features, _folder_fid, _image_folder, _torch_fidelity_fid
from training.evaluate import ClipScorer, FidMetric, pil_to_uint8, run
from training.reference_stats import load_reference_stats

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def eval_models(tmp_path_factory):
    return build_eval_models(tmp_path_factory.getbasetemp() / "eval_models")


@pytest.fixture(scope="module")
def folders(eval_models, tmp_path_factory):
    """32 real and 32 "generated" noisy images (the fake ones as pixsigma-sample leaves them: images.jsonl), the
    real ones' statistics saved by the CLI, and torch-fidelity's FID between the two folders."""
    root = tmp_path_factory.mktemp("fid30k")
    real = _image_folder(root / "real", range(32), level=256)
    fake = _image_folder(root / "fake", range(500, 532), level=128)
    rows = [{"index": i, "file": p.name, "prompt": PROMPTS[i % len(PROMPTS)], "model": "m", "sampler": "dpm-solver",
             "steps": 20, "cfg_scale": 4.5, "negative_prompt": "", "seed": i, "width": 448, "height": 320}
            for i, p in enumerate(sorted(fake.glob("*.png")))]  # fmt: skip
    (fake / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = root / "real_stats.npz"
    run(["--save-reference-stats", str(stats), "--input", str(real), *_flags(eval_models), "--feature-batch-size", "5"])
    return real, fake, stats, _torch_fidelity_fid(real, fake, eval_models["inception"])


def _flags(eval_models, *extra):
    return ["--inception", eval_models["inception"], "--fid-features", "64", "--clip-model", eval_models["clip"],
            "--device", "cpu", "--allow-small-fid", *extra]  # fmt: skip


def test_saved_statistics_are_pytorch_fids_layout_with_our_record(folders, eval_models):
    real, _, stats, _ = folders
    with np.load(stats, allow_pickle=False) as data:  # what pytorch-fid's calculate_frechet_distance reads
        assert data["mu"].dtype == data["sigma"].dtype == np.float64
        assert data["mu"].shape == (64,) and data["sigma"].shape == (64, 64)
        assert np.allclose(data["sigma"], data["sigma"].T)
        with open(eval_models["inception"], "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()
        assert (str(data["fid_resize"]), str(data["inception_sha256"]), int(data["num_images"])) == ("tf", sha, 32)


def test_fid_from_saved_statistics_equals_fid_from_the_folders(folders, eval_models, tmp_path):
    real, fake, stats, theirs = folders
    from_folders = _folder_fid(FidMetric(device=CPU, inception=eval_models["inception"], features=64), real, fake)
    metric = FidMetric(device=CPU, inception=eval_models["inception"], features=64)
    metric.use_reference(load_reference_stats(stats), stats)
    images = [pil_to_uint8(Image.open(p).convert("RGB")) for p in sorted(fake.glob("*.png"))]
    metric.update_images(images, real=False, batch_size=7)
    assert metric.compute() == pytest.approx(from_folders, rel=1e-5)
    assert abs(metric.compute() - theirs) <= 1e-3  # torch-fidelity's calculate_metrics on the two folders

    # --images: the sampled folder scored against the statistics, in batches of 6
    metrics = run(["--images", str(fake), "--reference-stats", str(stats), "--output", str(tmp_path / "e"),
                   *_flags(eval_models, "--feature-batch-size", "6")])  # fmt: skip
    assert abs(metrics["fid"] - theirs) <= 1e-3
    assert json.loads((tmp_path / "e" / "metrics.json").read_text()) == metrics
    assert metrics["reference_stats"] == str(stats)
    assert metrics["reference_stats_sha256"] == hashlib.sha256(stats.read_bytes()).hexdigest()
    assert (metrics["num_real_images"], metrics["num_generated_images"], metrics["fid_small_n"]) == (32, 32, True)
    assert metrics["clip_score_real"] is None and metrics["sampling"]["sampler"] == "dpm-solver"
    clip = ClipScorer(eval_models["clip"], None, device=CPU)
    rows = [json.loads(line) for line in (fake / "images.jsonl").read_text().splitlines()]
    one_by_one = [float(clip([Image.open(fake / r["file"]).convert("RGB")], [r["prompt"]])[0]) for r in rows]
    assert metrics["clip_score"] == pytest.approx(float(np.mean(one_by_one)), abs=1e-4)
    page = (tmp_path / "e" / "index.html").read_text()  # the sampled images, linked where they are
    assert f"src='{os.path.relpath(fake, tmp_path / 'e')}/{rows[0]['file']}'" in page and "<th>real</th>" not in page


def test_a_prompt_over_clips_77_tokens_is_counted_and_flagged_in_an_images_run(folders, eval_models, tmp_path):
    """--images on a sampled folder whose prompts include one over CLIP's context (open_clip's own BPE: 77 tokens,
    start and end included) and one of exactly 77: metrics.json's clip_prompts_cut is 1, and only that row's
    clip_prompt_cut is set in clip_scores.parquet."""
    import shutil

    import open_clip
    import pyarrow.parquet as pq

    _, fake, stats, _ = folders
    folder = tmp_path / "sampled"
    shutil.copytree(fake, folder)
    tokenizer = open_clip.get_tokenizer(eval_models["clip"])
    context = tokenizer.context_length
    fits = " ".join(["cat"] * (context - 2))
    cut = " ".join(["a red car in the rain"] * 15)
    assert len(tokenizer.encode(fits)) + 2 == context < len(tokenizer.encode(cut)) + 2
    rows = [json.loads(line) for line in (folder / "images.jsonl").read_text().splitlines()]
    rows[3]["prompt"], rows[5]["prompt"] = cut, fits
    (folder / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = run(["--images", str(folder), "--reference-stats", str(stats), "--output", str(tmp_path / "e"),
                   *_flags(eval_models, "--feature-batch-size", "8")])  # fmt: skip
    assert metrics["clip_prompts_cut"] == 1
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["clip_prompts_cut"] == 1
    scores = pq.read_table(tmp_path / "e" / "clip_scores.parquet").to_pylist()
    assert len(scores) == len(rows)
    assert [r["file"] for r in scores if r["clip_prompt_cut"]] == [rows[3]["file"]]


def test_a_numpy_npz_with_only_mu_and_sigma_loads(tmp_path):
    """What pytorch-fid and clean-fid ship: mu and sigma, nothing else; FID against it is the Fréchet formula."""
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    fake = rng.normal(size=(200, 6)) * 1.3 + 0.2
    np.savez(tmp_path / "theirs.npz", mu=real.mean(0), sigma=np.cov(real, rowvar=False))
    stats = load_reference_stats(tmp_path / "theirs.npz")
    assert (stats.fid_resize, stats.inception_sha256, stats.num_images) == (None, None, None)
    metric = FidMetric(device=CPU, extractor=_Features())
    metric.use_reference(stats, tmp_path / "theirs.npz")
    for chunk in np.array_split(fake, 3):
        metric.update(torch.from_numpy(chunk), real=False)
    mu_a, mu_b, cov_a, cov_b = real.mean(0), fake.mean(0), np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real)
    assert metric.compute() == pytest.approx(float(expected), rel=1e-6)


def test_statistics_made_another_way_are_refused(folders, eval_models, tmp_path):
    _, _, stats, _ = folders
    loaded = load_reference_stats(stats)
    clean = FidMetric(device=CPU, inception=eval_models["inception"], features=64, resize="clean")
    with pytest.raises(ValueError, match=r"made with fid_resize 'tf' \(this run: 'clean'\)"):
        clean.use_reference(loaded, stats)
    with np.load(stats) as data:
        np.savez(tmp_path / "other.npz", **{**data, "inception_sha256": np.asarray("0" * 64)})
    standard = FidMetric(device=CPU, inception=eval_models["inception"], features=64)
    with pytest.raises(ValueError, match=r"made with inception_sha256 '0000"):
        standard.use_reference(load_reference_stats(tmp_path / "other.npz"), tmp_path / "other.npz")
    with pytest.raises(ValueError, match="holds 64-d statistics, this run's Inception tap gives 192"):
        FidMetric(device=CPU, inception=eval_models["inception"], features=192).use_reference(loaded, stats)
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match=r"no \['sigma'\] array"):
        load_reference_stats(tmp_path / "bad.npz")


def test_batched_features_equal_one_at_a_time_for_mixed_sizes(eval_models):
    """Inception statistics and CLIP scores of batches (images of three sizes interleaved) equal the
    one-image-at-a-time ones."""
    images = [pil_to_uint8(im) for im in real_images()] * 3  # 15 images, sizes mixed
    one, batched = (FidMetric(device=CPU, inception=eval_models["inception"], features=64) for _ in range(2))
    for image in images:
        one.update(image[None], real=True)
    batched.update_images(images, real=True, batch_size=4)
    (mean_1, cov_1, n_1), (mean_b, cov_b, n_b) = one.statistics(real=True), batched.statistics(real=True)
    assert n_1 == n_b == 15
    assert torch.allclose(mean_b, mean_1, rtol=1e-5, atol=1e-6) and torch.allclose(cov_b, cov_1, rtol=1e-4, atol=1e-6)
    clip = ClipScorer(eval_models["clip"], None, device=CPU)
    pictures, prompts = real_images() * 2, list(PROMPTS) * 2
    alone = torch.cat([clip([im], [p]) for im, p in zip(pictures, prompts, strict=True)])
    assert torch.allclose(clip.score_batched(pictures, prompts, batch_size=3), alone, atol=1e-4)


def test_a_prompt_file_is_evaluated_against_reference_statistics(folders, eval_models, tiny_models, tmp_path):
    _, _, stats, _ = folders
    model = tiny_export(tiny_models, tmp_path / "run" / "final", seed=4)
    prompts = tmp_path / "coco.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "id": f"c{i}"}) + "\n" for i, p in enumerate(PROMPTS)))
    args = ["--model", str(model), "--input", str(prompts), "--steps", "2", *_flags(eval_models)]
    with pytest.raises(ValueError, match="a prompt file, with no real images: pass --reference-stats"):
        run(args)
    metrics = run([*args, "--reference-stats", str(stats), "--feature-batch-size", "2"])
    assert metrics["name"] == "coco" and (tmp_path / "run" / "eval" / "coco" / "metrics.json").is_file()
    assert (metrics["num_real_images"], metrics["num_generated_images"]) == (32, 5)
    assert metrics["clip_score_real"] is None and np.isfinite(metrics["fid"])
    assert metrics["prompt_case"] == "lower"  # as the export was trained (tiny_export's default)
    out = tmp_path / "run" / "eval" / "coco"
    fid = FidMetric(device=CPU, inception=eval_models["inception"], features=64)
    fid.use_reference(load_reference_stats(stats), stats)
    fid.update_images([pil_to_uint8(Image.open(out / "images" / f"c{i}.png")) for i in range(5)], real=False,
                      batch_size=1)  # fmt: skip
    assert metrics["fid"] == pytest.approx(fid.compute(), rel=1e-5)


def test_torchrun_two_ranks_give_the_single_process_statistics_and_scores(folders, eval_models, tmp_path):
    """--save-reference-stats and --images sharded over 2 ranks (CPU, gloo): the one-process numbers."""
    real, fake, stats, _ = folders
    single = run(["--images", str(fake), "--reference-stats", str(stats), "--output", str(tmp_path / "one"),
                  *_flags(eval_models)])  # fmt: skip
    torchrun = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node=2",
                "-m", "training.evaluate"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for args in (["--save-reference-stats", str(tmp_path / "two.npz"), "--input", str(real)],
                 ["--images", str(fake), "--reference-stats", str(tmp_path / "two.npz"), "--output", str(tmp_path / "two")]):  # fmt: skip
        result = subprocess.run([*torchrun, *args, *_flags(eval_models, "--feature-batch-size", "3")], cwd=REPO,
                                env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with np.load(stats) as a, np.load(tmp_path / "two.npz") as b:
        assert int(b["num_images"]) == 32
        assert np.allclose(a["mu"], b["mu"], rtol=1e-5, atol=1e-7) and np.allclose(a["sigma"], b["sigma"], rtol=1e-4, atol=1e-7)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert (two["world_size"], two["num_generated_images"]) == (2, 32)
    assert two["fid"] == pytest.approx(single["fid"], rel=1e-4)
    assert two["clip_score"] == pytest.approx(single["clip_score"], abs=1e-4)


def test_a_sampled_folders_metrics_record_the_case_and_weights_it_was_sampled_with(
    folders, eval_models, tiny_models, tmp_path
):
    """pixsigma-sample with --prompt-case as_written, then --images: metrics.json says as_written and names the
    sampled weights (their sha256 as sampling_run.json records them); a folder without the record says None."""
    from training.sample import RUN_FILE
    from training.sample import run as sample

    _, fake, stats, _ = folders
    model = tiny_export(tiny_models, tmp_path / "run" / "final", seed=4)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS[:3]) + "\n")
    sampled = tmp_path / "sampled"
    sample(["--model", str(model), "--input", str(prompts), "--steps", "2", "--device", "cpu",
            "--prompt-case", "as_written", "--output", str(sampled)])  # fmt: skip
    metrics = run(["--images", str(sampled), "--reference-stats", str(stats), *_flags(eval_models)])
    record = json.loads((sampled / RUN_FILE).read_text())["generator"]
    assert metrics["prompt_case"] == "as_written" and metrics["generator"] == record
    assert metrics["binning"] == "pixart"  # the default, as sampling_run.json records it
    assert json.loads((sampled / "eval" / "metrics.json").read_text())["generator"]["model_sha256"] == (
        record["model_sha256"]
    )
    other = run(["--images", str(fake), "--reference-stats", str(stats), "--output", str(tmp_path / "o"),
                 *_flags(eval_models)])  # fmt: skip
    assert (other["prompt_case"], other["generator"], other["binning"]) == (None, None, None)


def test_a_diffusers_binned_sample_has_diffusers_own_sizes_and_its_metrics_say_so(
    folders, eval_models, tiny_models, tmp_path
):
    """pixsigma-sample --binning diffusers on a 512 px export (sample_size 64: ASPECT_RATIO_512_BIN): each
    row's image is generated at the bucket diffusers' own classify_height_width_bin picks for its size (sizes
    where PixArt's tables pick otherwise), sampling_run.json records the choice, and --images' metrics.json
    says diffusers; an exact --height/--width sample records "exact"."""
    import dataclasses

    from diffusers.image_processor import PixArtImageProcessor
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_512_BIN

    from manifests.buckets import nearest_bucket
    from training.model import PRESETS, PixArtSigma
    from training.pipeline import FrozenComponents, export_pipeline
    from training.sample import RUN_FILE
    from training.sample import run as sample

    _, _, stats, _ = folders
    torch.manual_seed(0)
    model = PixArtSigma(dataclasses.replace(PRESETS["tiny"], base_size=32)).eval()  # 512 px, sample_size 64
    components = FrozenComponents.from_paths(str(tiny_models / "t5"), str(tiny_models / "vae"), 0.13025)
    export = export_pipeline(model, tmp_path / "final", components)
    sizes = [(200, 733), (570, 200), (274, 1061)]  # (height, width): PixArt's 512 px table picks otherwise
    picks = [tuple(PixArtImageProcessor.classify_height_width_bin(h, w, ratios=ASPECT_RATIO_512_BIN)) for h, w in sizes]
    assert all(pick != nearest_bucket(h, w, 512) for pick, (h, w) in zip(picks, sizes, strict=True))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": PROMPTS[i], "id": f"p{i}", "height": h, "width": w}) + "\n"
                               for i, (h, w) in enumerate(sizes)))  # fmt: skip
    sampled = tmp_path / "sampled"
    sample(["--model", str(export), "--input", str(prompts), "--steps", "1", "--device", "cpu", "--binning",
            "diffusers", "--output", str(sampled)])  # fmt: skip
    rows = [json.loads(line) for line in (sampled / "images.jsonl").read_text().splitlines()]
    for row, theirs in zip(rows, picks, strict=True):
        assert tuple(row["bucket"]) == (row["height"], row["width"]) == theirs
        with Image.open(sampled / row["file"]) as image:
            assert image.size == (theirs[1], theirs[0])
    assert json.loads((sampled / RUN_FILE).read_text())["binning"] == "diffusers"
    metrics = run(["--images", str(sampled), "--reference-stats", str(stats), *_flags(eval_models)])
    assert metrics["binning"] == "diffusers"
    assert json.loads((sampled / "eval" / "metrics.json").read_text())["binning"] == "diffusers"
    # --height/--width under the default --binning pixart are exact (no table): the record says so, not "pixart"
    exact = tmp_path / "exact"
    sample(["--model", str(export), "--prompt", PROMPTS[0], "--steps", "1", "--device", "cpu", "--height", "48",
            "--width", "80", "--output", str(exact)])  # fmt: skip
    assert nearest_bucket(48, 80, 512) != (48, 80)  # a table would have moved it
    with Image.open(exact / json.loads((exact / "images.jsonl").read_text())["file"]) as image:
        assert image.size == (80, 48)
    assert json.loads((exact / RUN_FILE).read_text())["binning"] == "exact"


def test_saved_statistics_of_exif_rotated_jpegs_give_torch_fidelitys_fid(folders, eval_models, tmp_path):
    """Real JPEGs, half tagged EXIF orientation 6 (rotate 90°): torch-fidelity, pytorch-fid and clean-fid read
    them as stored (``Image.open(…).convert("RGB")``), so the statistics must too; FID against them equals
    torch-fidelity's calculate_metrics on the two folders."""
    _, fake, _, _ = folders
    real = tmp_path / "real_jpeg"
    real.mkdir()
    for seed in range(32):
        rng = np.random.default_rng(seed)
        pixels = rng.integers(0, 256, (320, 448, 3)) // 2 + rng.integers(0, 256, (1, 1, 3)) // 2
        exif = Image.Exif()
        if seed % 2:
            exif[0x0112] = 6  # Orientation: an EXIF-aware reader turns it to 448 × 320
        Image.fromarray(pixels.astype(np.uint8)).save(real / f"{seed:05d}.jpg", quality=95, exif=exif)
    stats = tmp_path / "jpeg_stats.npz"
    run(["--save-reference-stats", str(stats), "--input", str(real), *_flags(eval_models)])
    metric = FidMetric(device=CPU, inception=eval_models["inception"], features=64)
    metric.use_reference(load_reference_stats(stats), stats)
    metric.update_images([pil_to_uint8(Image.open(p).convert("RGB")) for p in sorted(fake.glob("*.png"))],
                         real=False, batch_size=8)  # fmt: skip
    theirs = _torch_fidelity_fid(real, fake, eval_models["inception"])
    assert abs(metric.compute() - theirs) <= 1e-3, (metric.compute(), theirs)


def test_a_real_folder_of_shards_and_loose_images_is_refused(tmp_path):
    """Shards and image files side by side: reading one kind would leave the other out of the statistics."""
    import io
    import tarfile

    from training.evaluate import real_image_sources
    from training.ranks import Dist

    image = io.BytesIO()
    Image.new("RGB", (8, 8)).save(image, format="PNG")
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        member = tarfile.TarInfo("k0.png")
        member.size = len(image.getvalue())
        tar.addfile(member, io.BytesIO(image.getvalue()))
    assert real_image_sources(tmp_path, Dist())[0] == 1
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "k1.png").write_bytes(image.getvalue())
    with pytest.raises(ValueError, match=r"both \.tar shards \(1\) and image files \(1"):
        real_image_sources(tmp_path, Dist())


def test_prompt_case_is_refused_where_nothing_is_sampled(capsys):
    """--images and --save-reference-stats sample nothing: a --prompt-case there would be ignored silently."""
    from training.evaluate import parse_args

    for mode in (["--images", "S", "--reference-stats", "r.npz"], ["--save-reference-stats", "r.npz", "--input", "R"]):
        parse_args(mode)  # fine without it
        with pytest.raises(SystemExit):
            parse_args([*mode, "--prompt-case", "as_written"])
        assert "samples nothing: --prompt-case applies where images are sampled" in capsys.readouterr().err
