"""The sampling CLI: every model source, both samplers, determinism for a seed on CPU, the JSONL rows."""

from __future__ import annotations

import dataclasses
import json
import shutil

import huggingface_hub.constants
import pytest
import torch

from tests.training.conftest import debug_config
from training.config import to_dict
from training.convert import export_diffusers, save_model
from training.diffusion import GaussianDiffusion, sample
from training.model import PRESETS, PixArtSigma
from training.pipeline import FrozenComponents, export_pipeline
from training.sample import (
    IMAGES_FILE,
    RUN_FILE,
    ImageGenerator,
    ImageJob,
    PromptEncoder,
    RespacedDiffusion,
    SamplingSettings,
    dpm_solver_sample,
    guided_denoiser,
    load_source,
    plan_jobs,
    run,
)

TINY = PRESETS["tiny"]
CPU = torch.device("cpu")


def _tiny(kv_layers=(1,), seed: int = 3, **changes) -> PixArtSigma:
    torch.manual_seed(seed)
    model = PixArtSigma(dataclasses.replace(TINY, kv_compress_layers=kv_layers, **changes))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def export(tiny_models, tmp_path_factory):
    """A KV-compressed tiny model exported as a pipeline that references the session's tiny T5 and VAE."""
    components = FrozenComponents.from_paths(str(tiny_models / "t5"), str(tiny_models / "vae"), 0.13025)
    return export_pipeline(_tiny(), tmp_path_factory.mktemp("export") / "final", components)


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def test_cli_is_deterministic_for_a_seed_on_cpu(export, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"key": "k0", "prompt": "a photo of a cat at sunset", "width": 96, "height": 48}\n'
        '{"key": "k1", "prompt": "a red car in the rain", "width": 40, "height": 80}\n'
    )
    common = ["--model", str(export), "--input", str(prompts), "--prompt", "a castle", "--steps", "3",
              "--batch-size", "2", "--device", "cpu"]  # fmt: skip
    run([*common, "--output", str(tmp_path / "a"), "--seed", "7"])
    run([*common, "--output", str(tmp_path / "b"), "--seed", "7"])
    run([*common, "--output", str(tmp_path / "c"), "--seed", "8"])
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    assert set(a) == {"000000.png", "k0.png", "k1.png", IMAGES_FILE, RUN_FILE}
    assert all(a[name] != c[name] for name in a if name.endswith(".png"))
    rows = [json.loads(line) for line in (tmp_path / "a" / IMAGES_FILE).read_text().splitlines()]
    assert [(r["file"], r["prompt"], r["seed"], r["height"], r["width"]) for r in rows] == [
        ("000000.png", "a castle", 7, 64, 64),  # no size in the row: the 1:1 bucket at 64 px
        ("k0.png", "a photo of a cat at sunset", 8, 48, 96),  # the row's aspect 1:2 → bucket 48×96 at 64 px
        ("k1.png", "a red car in the rain", 9, 96, 48),  # 2:1 → bucket 96×48
    ]
    assert {(r["sampler"], r["steps"], r["cfg_scale"], r["model"]) for r in rows} == {
        ("dpm-solver", 3, 4.5, str(export))
    }
    with pytest.raises(SystemExit, match="already holds a sampling run"):
        run([*common, "--output", str(tmp_path / "a")])


def test_cli_iddpm_explicit_size_and_images_per_prompt(export, tmp_path):
    args = ["--model", str(export), "--prompt", "a dog", "--sampler", "iddpm", "--steps", "4", "--height", "32",
            "--width", "48", "--num-images-per-prompt", "2", "--cfg-scale", "3", "--negative-prompt", "blurry",
            "--device", "cpu"]  # fmt: skip
    run([*args, "--output", str(tmp_path / "a")])
    run([*args, "--output", str(tmp_path / "b")])
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    rows = [json.loads(line) for line in (tmp_path / "a" / IMAGES_FILE).read_text().splitlines()]
    assert [(r["seed"], r["height"], r["width"], r["sampler"], r["negative_prompt"]) for r in rows] == [
        (0, 32, 48, "iddpm", "blurry"),
        (1, 32, 48, "iddpm", "blurry"),
    ]


def test_an_image_does_not_depend_on_its_batch(export):
    generator = ImageGenerator.load(load_source(str(export)), device=CPU, dtype=torch.float32)
    jobs = [
        ImageJob(i, p, seed=i, height=48, width=80) for i, p in enumerate(["a cat", "a red car", "a dog"])
    ]
    alone = generator.decode(generator.latents(jobs[1:2], SamplingSettings(steps=3)))
    together = generator.decode(generator.latents(jobs, SamplingSettings(steps=3)))
    assert (alone[0] - together[1]).abs().max() < 1e-5


def test_plan_jobs_sizes_and_keys():
    rows = [{"prompt": "a", "key": "x/y", "width": 3000, "height": 1000}, {"prompt": "b"}]
    jobs = plan_jobs(rows, resolution=1024, seed=5, num_images_per_prompt=2, aspect_ratio=(9, 16))
    assert [(j.index, j.seed, j.height, j.width, j.file_name) for j in jobs] == [
        (0, 5, 576, 1728, "x_y-0.png"), (1, 6, 576, 1728, "x_y-1.png"),  # 1:3 → nearest bucket 576×1728
        (2, 7, 768, 1344, "000002.png"), (3, 8, 768, 1344, "000003.png"),  # 9:16 → 768×1344
    ]  # fmt: skip
    with pytest.raises(ValueError, match="multiples of 16"):
        plan_jobs(rows, resolution=1024, seed=0, size=(100, 64))


# --------------------------------------------------------------------------------------------------
# Samplers against reference computations
# --------------------------------------------------------------------------------------------------


def test_dpm_solver_with_empty_negative_prompt_equals_the_trainers_sampler(tiny_models):
    """Guidance against T5("") here == the trainer's validation sampler against the null-caption buffer."""
    ref = lambda name: type("Ref", (), {"path": str(tiny_models / name), "subfolder": None})()  # noqa: E731
    text = PromptEncoder(
        ref("t5"), ref("t5"), max_tokens=TINY.max_token_length, device=CPU, dtype=torch.float32,
        prompt_case="lower",
    )
    model = _tiny()
    null, null_mask = text([""])
    model.set_null_caption(null[0], null_mask[0])
    y, mask = text(["a photo of a cat at sunset", "a red car"])
    noise = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = sample(model, y, mask, latent_size=(6, 10), num_steps=4, cfg_scale=4.5, latents=noise)
        y_neg, mask_neg = text(["", ""])
        denoise = guided_denoiser(model, y, mask, y_neg, mask_neg, 4.5)
        got = dpm_solver_sample(denoise, noise, steps=4, in_channels=4)
    assert (got - expected).abs().max().item() <= 1e-5


def test_an_upstream_model_is_guided_against_its_own_null_caption_under_the_prompts_mask(tiny_models):
    """null_caption = "upstream" (issue 13 §10): the sampler guides against the stored padded T5("") under
    the prompt's mask, as PixArt's samplers and the trainer's validation do, and never encodes ""."""
    ref = lambda name: type("Ref", (), {"path": str(tiny_models / name), "subfolder": None})()  # noqa: E731
    encoder = PromptEncoder(
        ref("t5"), ref("t5"), max_tokens=TINY.max_token_length, device=CPU, dtype=torch.float32,
        prompt_case="lower",
    )
    asked: list[str] = []

    def text(prompts):
        asked.extend(prompts)
        return encoder(prompts)

    prompts = ["a photo of a cat at sunset", "a red car"]
    y, mask = encoder(prompts)
    null, null_mask = encoder([""])
    latents = {}
    for mode in ("upstream", "diffusers"):
        model = _tiny()
        model.set_null_caption(null[0], null_mask[0], mode=mode)
        generator = ImageGenerator(model, text, lambda z, tile: z, name=mode, resolution=64, vae_downsample=8, device=CPU)
        jobs = [ImageJob(i, p, seed=i, height=48, width=80) for i, p in enumerate(prompts)]
        asked.clear()
        latents[mode] = generator.latents(jobs, SamplingSettings(steps=4, cfg_scale=4.5))
        assert ("" in asked) == (mode == "diffusers")
        if mode == "upstream":
            noise = torch.stack(
                [torch.randn(4, 6, 10, generator=torch.Generator().manual_seed(i)) for i in range(2)]
            )
            with torch.no_grad():
                expected = sample(
                    model, y, mask, latent_size=(6, 10), num_steps=4, cfg_scale=4.5, latents=noise
                )
            assert (latents[mode] - expected).abs().max().item() <= 1e-5
    # the two semantics attend the null caption under different masks: different images
    assert (latents["upstream"] - latents["diffusers"]).abs().max().item() > 1e-3


def test_respaced_tables_at_full_length_are_the_training_tables():
    base, full = GaussianDiffusion(), RespacedDiffusion(1000)
    assert torch.equal(full.timesteps, torch.arange(1000))
    for name in ("betas", "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1",
                 "posterior_mean_coef2", "alphas_cumprod"):  # fmt: skip
        assert torch.allclose(getattr(full, name), getattr(base, name), rtol=1e-12, atol=0), name


def test_respaced_timesteps_and_betas_keep_the_marginals():
    spaced = RespacedDiffusion(10)
    # PixArt's IDDPM("10"): space_timesteps(1000, "10")
    assert spaced.timesteps.tolist() == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    base = GaussianDiffusion()
    # ᾱ of the short chain is the product of its own (1 - β): the training marginal at each kept timestep.
    assert torch.allclose(
        torch.cumprod(1 - spaced.betas, 0), base.alphas_cumprod[spaced.timesteps], rtol=1e-12
    )
    with pytest.raises(ValueError, match="num_steps"):
        RespacedDiffusion(1)


def test_iddpm_step_is_the_training_posterior():
    """One respaced step at full length: mean and variance are the trainer's p_mean_log_variance."""
    base, full = GaussianDiffusion(), RespacedDiffusion(1000)
    gen = torch.Generator().manual_seed(0)
    x, eps, v = (torch.randn(2, 4, 3, 3, generator=gen) for _ in range(3))
    v = v.tanh()
    k = 500
    mean, log_var = base.p_mean_log_variance(eps, v, x, torch.full((2,), k))
    noise = torch.randn(2, 4, 3, 3, generator=gen)
    got = full.step(k, x, torch.cat([eps, v], 1), noise)
    assert torch.allclose(got, mean + torch.exp(0.5 * log_var) * noise, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


def _same_weights(a: PixArtSigma, b: PixArtSigma) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith("y_embedder.y_"))


def test_checkpoint_and_run_folder_sources(tiny_models, tmp_path):
    """A trainer checkpoint: the shape from its config and weights, the stage's resolution, T5 and VAE."""
    cfg = debug_config(tiny_models, tmp_path / "shards", tmp_path / "run")
    stage = cfg.stages[3]  # 64px-kv
    model = _tiny(caption_channels=32, pe_interpolation=stage.pe_interpolation)
    ema = _tiny(seed=9, caption_channels=32, pe_interpolation=stage.pe_interpolation)
    checkpoint = tmp_path / "run" / "checkpoints" / "00000048-64px-kv"
    checkpoint.mkdir(parents=True)
    (checkpoint / "COMPLETE").write_text("")
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "config": to_dict(cfg),
             "position": {"stage_index": 3, "stage": stage.name, "step": 12, "global_step": 48}}  # fmt: skip
    torch.save(state, checkpoint / "state.pt")
    for spec, weights, expected in [
        (checkpoint, "ema", ema),
        (checkpoint, "model", model),
        (tmp_path / "run", "ema", ema),
    ]:
        loaded = load_source(str(spec), weights=weights)
        assert loaded.model.config == dataclasses.replace(
            model.config, class_dropout_prob=TINY.class_dropout_prob
        )
        assert _same_weights(loaded.model, expected) and loaded.resolution == 64
        assert loaded.components.vae.path == str((tiny_models / "vae").resolve())
        assert loaded.components.vae_scaling_factor == stage.vae_scaling_factor
        assert loaded.components.text_encoder.path == str((tiny_models / "t5").resolve())


def test_folder_pth_and_cached_hub_sources(tiny_models, export, tmp_path, monkeypatch):
    model = _tiny()
    save_model(model, tmp_path / "ours")
    flags = {"t5": str(tiny_models / "t5"), "vae": str(tiny_models / "vae")}
    assert load_source(str(tmp_path / "ours")).components is None  # nothing recorded: --t5/--vae needed
    with pytest.raises(ValueError, match="pass --t5 and --vae"):
        ImageGenerator.load(load_source(str(tmp_path / "ours")), device=CPU)
    loaded = load_source(str(tmp_path / "ours"), **flags)
    assert _same_weights(loaded.model, model) and loaded.components.vae_scaling_factor == pytest.approx(
        0.13025
    )

    plain = _tiny(kv_layers=())
    export_diffusers(plain, tmp_path / "transformer")
    assert _same_weights(load_source(str(tmp_path / "transformer"), **flags).model, plain)

    torch.save({"state_dict": {k: v for k, v in plain.state_dict().items() if k != "y_embedder.y_mask"}},
               tmp_path / "PixArt-tiny.pth")  # fmt: skip
    from_pth = load_source(str(tmp_path / "PixArt-tiny.pth"), preset="tiny", resolution=64, **flags)
    assert _same_weights(from_pth.model, plain) and from_pth.resolution == 64

    # A hub id resolves through the HF cache only (offline): a snapshot laid out as huggingface_hub does.
    cache = tmp_path / "hub"
    revision = "0" * 40
    repo = cache / "models--pixsigma--tiny-sigma"
    shutil.copytree(export, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    from_hub = load_source("pixsigma/tiny-sigma")
    assert from_hub.model.config.kv_compress_layers == (1,) and from_hub.components is not None
    with pytest.raises(ValueError, match="not in the HF cache"):
        load_source("pixsigma/not-downloaded")


def test_vae_tiling_and_slicing_reach_the_decoder(export):
    generator = ImageGenerator.load(load_source(str(export)), device=CPU, vae_tiling="on", vae_slicing=True)
    latents = torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(0))  # 128×192 px
    images = generator.decode(latents)
    vae = generator.decoder.vae
    assert vae.use_tiling and vae.use_slicing and images.shape == (2, 3, 128, 192)
    assert 0 <= images.min() and images.max() <= 1
    auto = ImageGenerator.load(load_source(str(export)), device=CPU)  # auto: tiles only from 2048 px
    auto.decode(latents)
    assert not auto.decoder.vae.use_tiling
