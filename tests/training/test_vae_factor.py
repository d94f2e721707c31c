"""The VAE's downsample factor comes from its config, not a constant 8 (issue 21: the toy world's 4× VAEs).

The reference is diffusers: ``PixArtSigmaPipeline`` computes ``vae_scale_factor = 2 ** (len(block_out_channels)
- 1)``, and a plain diffusers process samples the trainer's export of a 4× run. A tiny 4-block VAE (SD/SDXL's
layout) gives 8, a 3-block one 4; a 4× run trains on latents of resolution // 4, validates, exports a transformer
whose grid is resolution // 4 // patch, and samples there as plain diffusers does; a run mixing factors is
refused at preflight."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, PixArtSigmaPipeline
from PIL import Image

import training.main as trainer
from manifests.features import vae_downsample
from tests.training.conftest import REPO, debug_config
from tests.training.test_pipeline import NO_PIXSIGMA
from training.encoders import LatentEncoder
from training.export import export_cli
from training.sample import ImageGenerator, ImageJob, SamplingSettings, load_source
from training.tiny import SDXL_VAE_SCALING_FACTOR, build_tiny_vae, write_synthetic_shards

from .conftest import MAX_TOKENS

CPU = torch.device("cpu")
ATOL = 1e-5  # fp32, as tests/training/test_pipeline.py's export parity
# SD's and SDXL's VAE configs (stabilityai/sd-vae-ft-mse, stabilityai/sdxl-vae config.json): the entries that
# decide the factor.
REAL_VAE_CONFIGS = {
    "sd-vae-ft-mse": {"block_out_channels": [128, 256, 512, 512], "scaling_factor": 0.18215},
    "sdxl-vae": {"block_out_channels": [128, 256, 512, 512], "scaling_factor": 0.13025},
}


@pytest.fixture(scope="module")
def vaes(tmp_path_factory) -> Path:
    """vae8/ (SD layout, 4 blocks) and vae4/ (3 blocks), tiny and calibrated as training.tiny builds them."""
    out = tmp_path_factory.mktemp("vaes")
    build_tiny_vae(out, name="vae8", scaling_factor=SDXL_VAE_SCALING_FACTOR)
    build_tiny_vae(out, name="vae4", scaling_factor=SDXL_VAE_SCALING_FACTOR, downsample=4)
    return out


@pytest.fixture(scope="module")
def shards4(tiny_models, vaes, tmp_path_factory) -> Path:
    """6 images with cached T5 features and the 4× VAE's latents at 32 and 64 px."""
    return write_synthetic_shards(
        tmp_path_factory.mktemp("shards4"), num_images=6, samples_per_shard=3, t5=str(tiny_models / "t5"),
        vae=str(vaes / "vae4"), vae_resolutions=(32, 64), max_tokens=MAX_TOKENS,
    )  # fmt: skip


@pytest.mark.parametrize(("name", "factor"), [("vae8", 8), ("vae4", 4)])
def test_factor_is_diffusers_vae_scale_factor_and_the_latent_grid(vaes, name: str, factor: int) -> None:
    vae = AutoencoderKL.from_pretrained(str(vaes / name))
    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=None, scheduler=None)
    assert vae_downsample(vae.config) == pipe.vae_scale_factor == factor
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 64, 96)).latent_dist.mean
    assert latents.shape == (1, 4, 64 // factor, 96 // factor)


@pytest.mark.parametrize("name", list(REAL_VAE_CONFIGS))
def test_real_sd_and_sdxl_vaes_keep_8(name: str) -> None:
    assert vae_downsample(REAL_VAE_CONFIGS[name]) == 8


def test_a_config_without_blocks_is_refused() -> None:
    with pytest.raises(ValueError, match="block_out_channels"):
        vae_downsample({"scaling_factor": 0.13025})


def _four_x_run(tiny_models: Path, vaes: Path, shards: Path, run_dir: Path, *extra: str):
    """Debug stages 32 px → 64 px on the 4× VAE (its latents cached in the shards), 2 steps each, validated."""
    sets = [f"stages.{i}.{k}" for i in (1, 2) for k in ("steps=2", f"vae={vaes / 'vae4'}")]
    cfg = debug_config(tiny_models, shards, run_dir, "validation.every=2", *sets, *extra)
    cfg.stages = cfg.stages[1:3]
    return cfg


# A process where pixsigma cannot be imported samples the standalone export with plain diffusers.
PLAIN_DIFFUSERS = NO_PIXSIGMA + """
import json
import torch
from diffusers import PixArtSigmaPipeline

pipe = PixArtSigmaPipeline.from_pretrained(sys.argv[2])
pipe.set_progress_bar_config(disable=True)
inputs = torch.load(sys.argv[3])
call = json.load(open(sys.argv[2] + "/pixsigma.json"))["diffusers_call"]  # no size: the pipeline's default
images = pipe(inputs["prompts"], negative_prompt="", num_inference_steps=4, guidance_scale=4.5,
              latents=inputs["noise"], output_type="pt", **call).images
# given latents fix the grid whatever the size; without them the pipeline draws them at its default size
default = pipe(inputs["prompts"][0], num_inference_steps=1, output_type="pt", **call).images
torch.save({"images": images, "default_shape": default.shape, "vae_scale_factor": pipe.vae_scale_factor},
           sys.argv[3] + ".out")
"""


def test_a_4x_run_trains_validates_exports_and_samples_at_resolution_over_4(
    tiny_models, vaes, shards4, tmp_path
) -> None:
    run_dir = trainer.main(_four_x_run(tiny_models, vaes, shards4, tmp_path / "run"))
    # validation grids of the debug stage's 2 prompts, side by side: 64 px images (16×16 latents, decoded 4×)
    grids = sorted((run_dir / "samples" / "64px").glob("*.png"))
    assert grids and all(Image.open(path).size == (2 * 64, 64) for path in grids)
    final = run_dir / "final"
    info = json.loads((final / "pixsigma.json").read_text())
    transformer = json.loads((final / "transformer" / "config.json").read_text())
    assert info["resolution"] == 64  # the last stage's: token grid 8 × patch 2 × VAE 4
    assert transformer["sample_size"] == 64 // 4  # diffusers' latent side at the training resolution
    assert info["model"]["base_size"] == 64 // 4 // 2
    # diffusers would bin a sample_size-16 transformer as 8× (128 px, or refuse): the call turns binning off, and
    # the pipeline's default size (sample_size × the VAE's vae_scale_factor 4) is the trained 64 px
    assert info["diffusers_call"] == {"max_sequence_length": 16, "clean_caption": False,
                                      "use_resolution_binning": False}  # fmt: skip

    loaded = load_source(str(final))
    assert loaded.resolution == 64
    ours = ImageGenerator.load(loaded, device=CPU, dtype=torch.float32)
    prompts = ["a photo of a cat at sunset", "a red car"]
    jobs = [ImageJob(i, p, seed=10 + i, height=64, width=64) for i, p in enumerate(prompts)]
    latents = ours.latents(jobs, SamplingSettings(steps=4, cfg_scale=4.5))
    assert latents.shape == (2, 4, 16, 16)
    expected = ours.decode(latents)  # (2, 3, 64, 64) in [0, 1]

    standalone = export_cli(["--input", str(final), "--output", str(tmp_path / "standalone"), "--standalone"])
    noise = torch.stack([torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(j.seed)) for j in jobs])
    torch.save({"prompts": prompts, "noise": noise}, tmp_path / "inputs.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_DIFFUSERS, str(REPO), str(standalone), str(tmp_path / "inputs.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    got = torch.load(tmp_path / "inputs.pt.out")
    assert got["vae_scale_factor"] == 4
    assert got["images"].shape == expected.shape == (2, 3, 64, 64)
    assert tuple(got["default_shape"]) == (1, 3, 64, 64)  # the recorded call alone samples at the trained size
    assert expected.std() > 0.01
    assert (got["images"] - expected).abs().max().item() <= ATOL


def test_a_decoder_of_another_factor_than_the_trained_grid_is_refused(tiny_models, vaes, shards4, tmp_path):
    run_dir = trainer.main(_four_x_run(tiny_models, vaes, shards4, tmp_path / "run"))
    loaded = load_source(str(run_dir / "final"), vae=str(vaes / "vae8"))  # an 8× VAE for a 4×-trained model
    with pytest.raises(ValueError, match=r"trained at 64 px on a 8-token grid, but its VAE .* downsamples 8× \(128 px\)"):
        ImageGenerator.load(loaded, device=CPU, dtype=torch.float32)


def test_stages_whose_vaes_downsample_differently_are_refused(tiny_models, vaes, shards4, tmp_path) -> None:
    cfg = _four_x_run(tiny_models, vaes, shards4, tmp_path / "run", f"stages.2.vae={vaes / 'vae8'}",
                      "stages.2.vae_on_the_fly=true")  # fmt: skip
    with pytest.raises(trainer.PreflightError, match=r"different factors .*vae4: 4×.*vae8: 8×"):
        trainer.preflight(cfg)


def test_a_vae_of_another_factor_than_the_runs_is_refused_when_loaded(vaes) -> None:
    encoder = LatentEncoder(str(vaes / "vae8"), scaling_factor=SDXL_VAE_SCALING_FACTOR, device=CPU, cached=False,
                            downsample=4)  # fmt: skip
    with pytest.raises(ValueError, match="downsamples 8×, the run's latents are 4×"):
        encoder({"pixels": torch.zeros(1, 3, 32, 32)}, torch.Generator())
    assert LatentEncoder(str(vaes / "vae4"), scaling_factor=1.0, device=CPU, cached=True).downsample == 4


def test_an_unreadable_vae_config_is_taken_as_8_with_a_warning(tiny_models, vaes, tmp_path, caplog) -> None:
    """Exports record a resolution for a hub VAE not in the cache as SD/SDXL's (the loaded VAE sizes latents)."""
    from training.pipeline import FrozenComponents

    def components(vae: Path) -> FrozenComponents:
        return FrozenComponents.from_paths(str(tiny_models / "t5"), str(vae), SDXL_VAE_SCALING_FACTOR)

    assert components(vaes / "vae4").vae_downsample() == 4 and not caplog.text
    assert components(tmp_path / "no-such-vae").vae_downsample() == 8
    assert "cannot read the config of VAE" in caplog.text
