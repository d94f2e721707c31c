"""A model trained with ``text.null_caption = "upstream"`` samples as the trainer's own validation sampler did,
from every place its weights land: the run folder, a checkpoint, ``final/<stage>/``, a diffusers pipeline or
transformer folder, an original ``.pth`` (issue 19 §1). Bit for bit on CPU."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

import training.main as trainer
from tests.training.conftest import debug_config
from training.checkpoint import complete_checkpoints
from training.convert import NULL_CAPTION_FILE, resolve_null_caption
from training.diffusion import sample
from training.export import export_cli
from training.model import PixArtSigma
from training.sample import ImageGenerator, ImageJob, SamplingSettings, load_source

CPU = torch.device("cpu")
PROMPTS = ["a photo of a cat at sunset", "a red car"]
STEPS, CFG = 4, 4.5


@pytest.fixture(scope="module")
def upstream_run(tiny_models, shards, tmp_path_factory):
    """Two debug stages (64 px, then KV on), upstream null caption; the trainer's live weights at each stage's
    end, as its validation sampler sees them, kept by wrapping ``export_stage``."""
    live: dict[str, dict[str, PixArtSigma]] = {}
    export_stage = trainer.export_stage

    def keep(model, ema, stage, cfg, env):
        live[stage.name] = {"model": copy.deepcopy(model).eval(), "ema": copy.deepcopy(ema).eval()}
        return export_stage(model, ema, stage, cfg, env)

    stages = [f"stages.{i}.{k}" for i in (2, 3) for k in ("steps=2", "validation_prompts=[]")]
    cfg = debug_config(tiny_models, shards, tmp_path_factory.mktemp("up") / "run", 'text.null_caption="upstream"',
                       *stages)  # fmt: skip
    cfg.stages = cfg.stages[2:]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "export_stage", keep)
        run_dir = trainer.main(cfg)
    return run_dir, live


def _trainer_latents(model: PixArtSigma, generator: ImageGenerator, jobs: list[ImageJob]) -> torch.Tensor:
    """training.diffusion.sample (the validation sampler) on the trainer's model, same prompts and noise."""
    y, mask = generator.text([j.prompt for j in jobs])
    noise = torch.stack([torch.randn(4, 6, 10, generator=torch.Generator().manual_seed(j.seed)) for j in jobs])
    return sample(model, y, mask, latent_size=(6, 10), num_steps=STEPS, cfg_scale=CFG, latents=noise)


def _sources(run_dir, tmp_path, live, flags):
    """(spec, load_source kwargs, the live weights it must sample as) for every load path."""
    checkpoint = complete_checkpoints(run_dir)[-1]
    exported = export_cli(["--input", str(checkpoint), "--output", str(tmp_path / "exported"), "--components",
                           "copy"])  # fmt: skip
    pth = tmp_path / "PixArt-tiny.pth"  # the reference layout: no y_mask (PixArt keeps none)
    state = {k: v for k, v in live["64px-kv"]["ema"].state_dict().items() if k != "y_embedder.y_mask"}
    torch.save({"state_dict": state}, pth)
    last, first = live["64px-kv"], live["64px"]
    return [
        ("run folder (EMA)", run_dir, {}, last["ema"]),
        ("run folder (raw)", run_dir, {"weights": "model"}, last["model"]),
        ("checkpoint", checkpoint, {}, last["ema"]),
        ("final/<stage>", run_dir / "final" / "64px", {}, first["model"]),
        ("final_ema/<stage>", run_dir / "final_ema" / "64px", {}, first["ema"]),
        ("pixsigma-export folder", exported, {}, last["ema"]),
        ("diffusers transformer folder", run_dir / "final" / "64px" / "transformer", flags, first["model"]),
        ("original .pth", pth, {"preset": "tiny", "resolution": 64, **flags}, last["ema"]),
    ]


def test_every_load_path_samples_an_upstream_model_as_the_trainer(upstream_run, tiny_models, tmp_path):
    run_dir, live = upstream_run
    assert json.loads((run_dir / "run.json").read_text())["null_caption"] == "upstream"
    assert (run_dir / "final_ema" / "transformer" / NULL_CAPTION_FILE).is_file()
    flags = {"t5": str(tiny_models / "t5"), "vae": str(tiny_models / "vae")}
    jobs = [ImageJob(i, p, seed=i, height=48, width=80) for i, p in enumerate(PROMPTS)]
    for name, spec, kwargs, weights in _sources(run_dir, tmp_path, live, flags):
        loaded = load_source(str(spec), **kwargs)
        assert loaded.model.config.null_caption == "upstream", name
        generator = ImageGenerator.load(loaded, device=CPU)
        got = generator.latents(jobs, SamplingSettings(steps=STEPS, cfg_scale=CFG))
        expected = _trainer_latents(weights, generator, jobs)
        assert torch.equal(got, expected), (name, (got - expected).abs().max().item())


def test_an_export_that_lost_its_upstream_null_caption_is_refused(upstream_run, tmp_path):
    run_dir, _ = upstream_run
    import shutil

    old = tmp_path / "old_export"
    shutil.copytree(run_dir / "final_ema", old)
    (old / "transformer" / NULL_CAPTION_FILE).unlink()  # as exports before issue 19 were
    with pytest.raises(ValueError, match="null_caption='upstream'.*export it again"):
        load_source(str(old))


@pytest.mark.parametrize("setting", ["auto", "upstream", "diffusers"])
@pytest.mark.parametrize("init", ["", "pth", "ours-upstream", "ours-diffusers", "diffusers-folder"])
def test_checkpoint_null_caption_resolves_as_the_trainer(tiny_models, shards, tmp_path, setting, init):
    """A checkpoint keeps the config, not the resolved mode: the loader resolves ``auto`` as the trainer."""
    from training.convert import export_diffusers, save_model
    from training.model import PRESETS

    model = PixArtSigma(PRESETS["tiny"])
    paths = {"": ""}
    if init == "pth":
        paths[init] = str(tmp_path / "x.pth")
    elif init.startswith("ours"):
        mode = init.split("-")[1]
        save_model(PixArtSigma(dataclasses.replace(PRESETS["tiny"], null_caption=mode)), tmp_path / init)
        paths[init] = str(tmp_path / init)
    elif init == "diffusers-folder":
        export_diffusers(model, tmp_path / init)
        paths[init] = str(tmp_path / init)
    extra = [f'text.null_caption="{setting}"'] + ([f"model.init={paths[init]}"] if init else [])
    cfg = debug_config(tiny_models, shards, tmp_path / "run", *extra)
    assert resolve_null_caption(cfg.text.null_caption, cfg.model.init) == trainer.null_caption_mode(cfg)
