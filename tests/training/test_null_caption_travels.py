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


def _rewrite_checkpoint(source, target, **changes) -> None:
    """A copy of checkpoint ``source`` at ``target`` with ``changes`` applied to its state (None deletes)."""
    import shutil

    shutil.copytree(source, target)
    state = torch.load(target / "state.pt", map_location="cpu", weights_only=True)
    for key, value in changes.items():
        if value is None:
            state.pop(key, None)
        else:
            state[key] = value
    torch.save(state, target / "state.pt")


def test_a_checkpoint_whose_init_folder_is_gone_still_samples_upstream(upstream_run, tiny_models, tmp_path):
    """Trained with ``auto`` from an init of ours that has since moved (a checkpoint copied off the cluster):
    the mode stored in the checkpoint is used, the init is not looked for."""
    run_dir, live = upstream_run
    checkpoint = complete_checkpoints(run_dir)[-1]
    state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
    assert state["null_caption"] == "upstream"
    config = copy.deepcopy(state["config"])
    config["text"]["null_caption"] = "auto"
    config["model"]["init"] = str(tmp_path / "moved-init")  # never created: the init folder is gone
    moved = tmp_path / "copied" / checkpoint.name
    _rewrite_checkpoint(checkpoint, moved, config=config)
    loaded = load_source(str(moved))
    assert loaded.model.config.null_caption == "upstream"
    generator = ImageGenerator.load(loaded, device=CPU)
    jobs = [ImageJob(i, p, seed=i, height=48, width=80) for i, p in enumerate(PROMPTS)]
    got = generator.latents(jobs, SamplingSettings(steps=STEPS, cfg_scale=CFG))
    assert torch.equal(got, _trainer_latents(live["64px-kv"]["ema"], generator, jobs))
    # a checkpoint from before the mode was stored: resolved from the init, which must then exist
    old = tmp_path / "old" / checkpoint.name
    _rewrite_checkpoint(checkpoint, old, config=config, null_caption=None)
    with pytest.raises(ValueError, match="init that is gone"):
        load_source(str(old))
    config["text"]["null_caption"] = "upstream"
    older = tmp_path / "older" / checkpoint.name
    _rewrite_checkpoint(checkpoint, older, config=config, null_caption=None)
    assert load_source(str(older)).model.config.null_caption == "upstream"


# The rule (training.config ``text.null_caption``): ``auto`` is upstream for the released PixArt-α/Σ weights
# (an original .pth, a diffusers folder), an init of ours keeps its own mode, no init is diffusers; an
# explicit setting wins over the init.
EXPECTED_MODE = {
    ("auto", ""): "diffusers",
    ("auto", "pth"): "upstream",
    ("auto", "diffusers-folder"): "upstream",
    ("auto", "ours-upstream"): "upstream",
    ("auto", "ours-diffusers"): "diffusers",
    **{(s, i): s for s in ("upstream", "diffusers")
       for i in ("", "pth", "diffusers-folder", "ours-upstream", "ours-diffusers")},
}  # fmt: skip


@pytest.mark.parametrize(("setting", "init"), sorted(EXPECTED_MODE))
def test_null_caption_mode_resolves_to_the_documented_mode(tiny_models, shards, tmp_path, setting, init):
    """The trainer's mode (and the loaders', the same function) against literal expected values."""
    from training.convert import export_diffusers, save_model
    from training.model import PRESETS

    paths = {"": ""}
    if init == "pth":
        paths[init] = str(tmp_path / "x.pth")
    elif init.startswith("ours"):
        mode = init.split("-")[1]
        save_model(PixArtSigma(dataclasses.replace(PRESETS["tiny"], null_caption=mode)), tmp_path / init)
        paths[init] = str(tmp_path / init)
    elif init == "diffusers-folder":
        export_diffusers(PixArtSigma(PRESETS["tiny"]), tmp_path / init)
        paths[init] = str(tmp_path / init)
    extra = [f'text.null_caption="{setting}"'] + ([f"model.init={paths[init]}"] if init else [])
    cfg = debug_config(tiny_models, shards, tmp_path / "run", *extra)
    assert trainer.null_caption_mode(cfg) == EXPECTED_MODE[setting, init]
    assert resolve_null_caption(setting, paths[init] or None) == EXPECTED_MODE[setting, init]
