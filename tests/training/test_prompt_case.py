"""One prompt-case policy from features to exports (issue 19 §5): ``text.prompt_case`` cases the captions
materialize caches, the trainer encodes on the fly, its validation/eval prompts and every sampler of the model;
it is recorded in run.json, checkpoints and exports, and every loader restores it."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
import webdataset as wds

import manifests
import training.main as trainer
from manifests.features import PROMPT_CASES
from manifests.materialize import MaterializeConfig, materialize
from manifests.selection import SelectionSpec, select
from tests.manifests.factories import VLM, make_run
from tests.training.conftest import MAX_TOKENS, debug_config
from training.checkpoint import complete_checkpoints
from training.convert import save_model
from training.diffusion import sample
from training.encoders import TEXT_FEATURES_FILE, CaptionEncoder, TextFeatures
from training.export import export_cli
from training.sample import ImageGenerator, ImageJob, SamplingSettings, load_source
from training.tiny import write_synthetic_shards

CPU = torch.device("cpu")
STEPS, CFG = 4, 4.5
# Mixed case, spaces around, and long: far past the tiny model's 16-token budget (the trainer cuts there too)
PROMPTS = ["  A Photo of a CAT on a Red Sofa at Sunset, Golden Light through the Window, highly Detailed  ",
           "A RED Car in the Rain"]  # fmt: skip


def _long_caption(i: int) -> str:
    """A mixed-case caption of well over 100 T5 tokens (Σ captions run to 300)."""
    words = ["A", "Square", "of", "Coloured", "NOISE", "on", "a", "Red", "Sofa", "at", "Sunset,", "Golden", "Light"]
    return "  " + " ".join(f"{w}{i}" if j % 5 == 0 else w for j, w in enumerate(words * 12)) + "  "


@pytest.fixture(scope="module")
def long_caption_run(tmp_path_factory):
    """A run folder (manifests/tests factories) whose VLM captions are long and mixed case, selected whole."""
    root = tmp_path_factory.mktemp("run")
    rows = make_run(root, num_images=4)
    shutil.rmtree(root / "manifests" / "captions")
    captions = [{"key": r["key"], "caption": _long_caption(i), "captioner": VLM, "prompt": "describe",
                 "num_tokens": 200, "status": "kept"} for i, r in enumerate(rows)]  # fmt: skip
    manifests.ManifestWriter(root / "manifests" / "captions", "captions").write(captions, "part-00000")
    select(root, SelectionSpec("all"))
    return root, {c["key"]: c["caption"] for c in captions}


@pytest.mark.parametrize("prompt_case", PROMPT_CASES)
def test_materialized_features_equal_the_trainers_on_the_fly_encoding(
    ray_cluster, long_caption_run, tiny_models, prompt_case
):
    """The T5 features materialize caches for a caption are the trainer's own on-the-fly encoding of it under
    the same text.prompt_case (long, mixed-case captions), and shards.json records the case. Both cases write
    the same folder in turn: the case is part of each shard's plan hash, so the second run rewrites them."""
    root, captions = long_caption_run
    t5 = str(tiny_models / "t5")
    out = materialize(MaterializeConfig(root=str(root), selection="all", name="cased", samples_per_shard=3,
                                        resolutions=(256,), t5=t5, prompt_case=prompt_case))  # fmt: skip
    assert json.loads((out / "shards.json").read_text())["features"]["prompt_case"] == prompt_case
    other = next(c for c in PROMPT_CASES if c != prompt_case)
    encoders = {case: CaptionEncoder(t5, max_tokens=300, device=CPU, cached=False, prompt_case=case)
                for case in PROMPT_CASES}  # fmt: skip
    samples = list(wds.WebDataset(sorted(str(p) for p in out.glob("train-*.tar")), shardshuffle=False))
    assert len(samples) == len(captions)
    for s in samples:
        caption = captions[s["__key__"]]
        cached = np.load(io.BytesIO(s["t5_vlm.npy"])).astype(np.float32)  # (L, C) valid tokens
        states = {}
        for case, encoder in encoders.items():
            y, mask = encoder.encode([caption])  # (1, L, C), (1, L): the trainer's path for uncached captions
            states[case] = y[0, : int(mask.sum())].to(torch.float16).float().numpy()
        assert cached.shape[0] > 100  # long: the T5 budget of a Σ caption, not the tiny model's
        assert cached.shape == states[prompt_case].shape
        np.testing.assert_allclose(cached, states[prompt_case], atol=2e-3)
        # the two policies encode these captions differently: the comparison can tell them apart
        if cached.shape == states[other].shape:
            assert np.abs(cached - states[other]).max() > 1e-2
        else:
            assert cached.shape != states[other].shape


def test_cached_features_of_another_case_are_refused(tiny_models, shards, tmp_path):
    """Shards cached with one case, a run with the other (or shards from before the case was recorded, which
    were encoded as written): preflight refuses, naming the ways out; on-the-fly encoding is allowed."""
    assert json.loads((shards / "shards.json").read_text())["features"]["prompt_case"] == "lower"
    with pytest.raises(trainer.PreflightError, match="prompt_case = 'as_written'.*cased 'lower'.*--prompt-case"):
        trainer.preflight(debug_config(tiny_models, shards, tmp_path / "a", 'text.prompt_case="as_written"'))
    trainer.preflight(debug_config(tiny_models, shards, tmp_path / "b", 'text.prompt_case="as_written"',
                                   "data.use_cached_features=false"))  # fmt: skip
    trainer.preflight(debug_config(tiny_models, shards, tmp_path / "c"))  # lower = lower
    legacy = tmp_path / "legacy_shards"
    shutil.copytree(shards, legacy)
    info = json.loads((legacy / "shards.json").read_text())
    del info["features"]["prompt_case"]
    (legacy / "shards.json").write_text(json.dumps(info))
    with pytest.raises(trainer.PreflightError, match="prompt_case = 'lower'.*cased 'as_written'"):
        trainer.preflight(debug_config(tiny_models, legacy, tmp_path / "d"))


@pytest.fixture(scope="module", params=PROMPT_CASES)
def trained(request, tiny_models, shards, tmp_path_factory):
    """One debug stage (64 px, 2 steps) trained with each prompt case on shards cached with that case (T5 is
    then loaded only for the null caption and PROMPTS, its validation prompts)."""
    case = request.param
    run_dir = tmp_path_factory.mktemp(case) / "run"
    if case != "lower":  # the shared fixture caches lowercased captions
        shards = write_synthetic_shards(
            tmp_path_factory.mktemp("shards"), num_images=9, samples_per_shard=3, t5=str(tiny_models / "t5"),
            vae=str(tiny_models / "vae"), vae_resolutions=(32, 64), max_tokens=MAX_TOKENS, prompt_case=case,
        )  # fmt: skip
    extra = [f'text.prompt_case="{case}"', "stages.2.steps=2", f"stages.2.validation_prompts={json.dumps(PROMPTS)}"]
    cfg = debug_config(tiny_models, shards, run_dir, *extra)
    cfg.stages = cfg.stages[2:3]
    trainer.main(cfg)
    return case, run_dir


def _trainer_text(run_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation prompts' T5 states as the trainer computed them (its text_features.safetensors)."""
    from safetensors import safe_open

    path = run_dir / TEXT_FEATURES_FILE
    with safe_open(str(path), "pt") as f:
        key = json.loads(f.metadata()["key"])
    features = TextFeatures.load(path, key)
    assert features is not None and set(PROMPTS) <= set(features.prompts)
    return features.prompt_batch(PROMPTS)  # (P, L, C), (P, L)


def test_every_load_path_samples_prompts_cased_as_the_model_was_trained(trained, tiny_models, tmp_path):
    """run.json, the checkpoint and every export record the case; every loader's prompt encoder gives the
    trainer's own validation-prompt states, and samples as the trainer's validation sampler on them."""
    case, run_dir = trained
    assert json.loads((run_dir / "run.json").read_text())["prompt_case"] == case
    checkpoint = complete_checkpoints(run_dir)[-1]
    assert torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)["prompt_case"] == case
    assert json.loads((run_dir / "final_ema" / "pixsigma.json").read_text())["prompt_case"] == case
    exported = export_cli(["--input", str(checkpoint), "--output", str(tmp_path / "exported")])
    ours = tmp_path / "ours"
    save_model(load_source(str(run_dir)).model, ours)
    flags = {"t5": str(tiny_models / "t5"), "vae": str(tiny_models / "vae")}
    sources = [("run folder", run_dir, {}), ("checkpoint", checkpoint, {}), ("final_ema/<stage>",
               run_dir / "final_ema" / "64px", {}), ("final (raw)", run_dir / "final", {}),
               ("pixsigma-export folder", exported, {}), ("diffusers transformer folder",
               run_dir / "final_ema" / "transformer", flags), ("pixsigma folder", ours, flags)]  # fmt: skip
    y, mask = _trainer_text(run_dir)
    jobs = [ImageJob(i, p, seed=i, height=48, width=80) for i, p in enumerate(PROMPTS)]
    noise = torch.stack([torch.randn(4, 6, 10, generator=torch.Generator().manual_seed(j.seed)) for j in jobs])
    for name, spec, kwargs in sources:
        loaded = load_source(str(spec), **kwargs)
        assert loaded.model.config.prompt_case == case, name
        generator = ImageGenerator.load(loaded, device=CPU)
        got_y, got_mask = generator.text(PROMPTS)
        assert torch.equal(got_mask, mask), name  # positions past a prompt's end are masked out (never read)
        assert torch.allclose(got_y[mask], y[mask], atol=1e-5, rtol=0), (name, (got_y - y)[mask].abs().max())
        got = generator.latents(jobs, SamplingSettings(steps=STEPS, cfg_scale=CFG))
        expected = sample(loaded.model, y, mask, latent_size=(6, 10), num_steps=STEPS, cfg_scale=CFG, latents=noise)
        assert (got - expected).abs().max().item() <= 1e-5, name


def test_a_model_saved_before_the_case_was_recorded_loads_as_written(trained, tmp_path):
    """Exports and checkpoints from before text.prompt_case existed were trained on captions as written."""
    from safetensors.torch import load_file, save_file

    _, run_dir = trained  # meaningful for the lower run; the as_written one keeps its case
    old = tmp_path / "old_export"
    shutil.copytree(run_dir / "final_ema", old)
    sidecar = old / "transformer" / "null_caption.safetensors"
    save_file(load_file(str(sidecar)), str(sidecar), metadata={"format": "pt", "null_caption": "diffusers"})
    assert load_source(str(old)).model.config.prompt_case == "as_written"
    checkpoint = complete_checkpoints(run_dir)[-1]
    state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
    del state["prompt_case"], state["config"]["text"]["prompt_case"]
    shutil.copytree(checkpoint, tmp_path / "old" / checkpoint.name)
    torch.save(state, tmp_path / "old" / checkpoint.name / "state.pt")
    assert load_source(str(tmp_path / "old" / checkpoint.name)).model.config.prompt_case == "as_written"


def test_sampling_with_another_case_warns_and_changes_the_text(trained, caplog):
    case, run_dir = trained
    other = next(c for c in PROMPT_CASES if c != case)
    loaded = load_source(str(run_dir))
    with caplog.at_level("WARNING", logger="training.sample"):
        generator = ImageGenerator.load(loaded, device=CPU, prompt_case=other)
    assert f"cased {case!r}; prompts are cased {other!r}" in caplog.text
    y, mask = _trainer_text(run_dir)
    got, got_mask = generator.text(PROMPTS)
    assert got.shape != y.shape or (got - y)[mask & got_mask].abs().max() > 1e-3
