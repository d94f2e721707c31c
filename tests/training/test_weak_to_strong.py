"""The whole weak-to-strong schedule on 2 CPU ranks, tiny: PixArt-α-style init (120-token null caption, SD
VAE) → VAE swap → four resolutions → KV compression on, torch.compile for one stage, a real SIGTERM mid-stage
and a resume with the same command, and an export at the end of every stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.model import PRESETS, PixArtSigma
from training.tiny import write_synthetic_shards

from .conftest import MAX_TOKENS, torchrun

STEPS = 3  # per stage; checkpoints every 2 steps, so the SIGTERM checkpoint falls inside a data segment
SIGTERM_AT = 12  # before global step 12 = stage 5 (128px), its step 0; saved after it: global step 13

CONFIG = """
run_dir = "{run}"
seed = 0
checkpoint_every = 2
keep_checkpoints = 2
[model]
preset = "tiny"
init = "{init}"
compile_backend = "eager"  # Dynamo graph capture (dynamic shapes, under DDP); no code generation on a CPU box
[text]
t5 = "{models}/t5"
max_tokens = 300  # PixArt-Σ's; the init has PixArt-α's 120
[data]
shards = "{shards}"
[optim]
name = "adamw"
base_lr = 1e-4
grad_clip = 1.0
mixed_precision = "no"
ema_decay = 0.9
[validation]
num_steps = 4
[log]
tensorboard = false
[faults]
sigterm_at_step = {sigterm_at}
sigterm_rank = 1
{stages}
"""

STAGES = [  # (name, resolution, vae, scaling, kv layers, compile)
    ("32px-sd-vae", 32, "vae_sd", 0.18215, [], False),  # PixArt-α's own VAE, now with 300 tokens
    ("32px-sdxl-vae", 32, "vae", 0.13025, [], False),  # VAE swap
    ("64px", 64, "vae", 0.13025, [], False),
    ("96px", 96, "vae", 0.13025, [], True),  # compiled blocks for this stage only
    ("128px", 128, "vae", 0.13025, [], False),
    ("128px-kv", 128, "vae", 0.13025, [1], False),  # KV compression on, Conv Avg Init
]


def _stages(models: Path) -> str:
    tables = []
    for name, res, vae, scaling, kv, compile_ in STAGES:
        prompts = '["a photo of a cat at sunset"]' if name == "128px-kv" else "[]"
        tables.append(
            f'[[stages]]\nname = "{name}"\nresolution = {res}\nvae = "{models / vae}"\nvae_scaling_factor = {scaling}\n'
            f"kv_compress_layers = {kv}\ncompile = {str(compile_).lower()}\nsteps = {STEPS}\nbatch_size = 2\n"
            f"validation_prompts = {prompts}\n"
            + ("vae_on_the_fly = true\n" if vae == "vae_sd" else "")  # its latents are not in the shards
        )
    return "\n".join(tables)


def _alpha_pth(path: Path) -> Path:
    """PixArt-α's layout at tiny width: reference key names, a 120-row null caption, a training-grid PE."""
    torch.manual_seed(7)
    state = PixArtSigma(PRESETS["tiny"]).state_dict()
    state = {k: v for k, v in state.items() if k != "y_embedder.y_mask"}
    state["y_embedder.y_embedding"] = torch.randn(120, PRESETS["tiny"].caption_channels)
    state["pos_embed"] = torch.randn(1, 4, PRESETS["tiny"].hidden_size)
    torch.save({"state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def four_resolution_shards(tiny_models, tmp_path_factory) -> Path:
    return write_synthetic_shards(
        tmp_path_factory.mktemp("w2s_shards"), num_images=9, samples_per_shard=3, resolutions=(32, 64, 96, 128),
        t5=str(tiny_models / "t5"), vae=str(tiny_models / "vae"), vae_resolutions=(32, 64, 96, 128),
        max_tokens=MAX_TOKENS,
    )  # fmt: skip


def test_alpha_to_sigma_schedule_on_two_ranks_with_sigterm_and_resume(
    tiny_models, four_resolution_shards, tmp_path
):
    run_dir = tmp_path / "run"
    config = tmp_path / "w2s.toml"
    config.write_text(CONFIG.format(run=run_dir, init=_alpha_pth(tmp_path / "PixArt-alpha-tiny.pth"), models=tiny_models,
                                    shards=four_resolution_shards, sigterm_at=SIGTERM_AT, stages=_stages(tiny_models)))  # fmt: skip

    first = torchrun(["--config", str(config)])
    assert first.returncode != 0, first.stderr[-3000:]  # pre-empted: the workers exit with 143
    log = first.stderr
    assert "caption tokens 120 → 300 (PixArt-α → Σ)" in log and "null caption: upstream" in log
    assert "VAE swap" in log and "resolution 32→64 px" in log and "resolution 64→96 px" in log
    assert "blocks compiled (eager, dynamic shapes)" in log
    assert "SIGTERM: checkpoint at stage 128px step 1 saved" in log
    assert [p.name for p in sorted((run_dir / "checkpoints").iterdir())][-1] == "00000013-128px"
    assert sorted(p.name for p in (run_dir / "final").iterdir()) == [
        "32px-sd-vae",
        "32px-sdxl-vae",
        "64px",
        "96px",
    ]

    second = torchrun(["--config", str(config)])  # the same command resumes
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stderr and "00000013-128px (stage 128px, step 1)" in second.stderr
    assert "loading T5" not in second.stderr  # the null caption and prompts were saved by the first launch
    assert "KV compression R=2 on layers [1]" in second.stderr

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in rows] == list(range(1, STEPS * len(STAGES) + 1))
    assert [r["stage"] for r in rows][::STEPS] == [name for name, *_ in STAGES]
    for name, *_, kv, _ in STAGES:  # every stage exported (PixArtSigmaPipeline folders, training/pipeline.py)
        for folder in ("final", "final_ema"):
            info = json.loads((run_dir / folder / name / "pixsigma.json").read_text())
            assert (info["stage"], info["model"]["kv_compress_layers"]) == (name, kv), (folder, name)
    final = json.loads((run_dir / "final" / "pixsigma.json").read_text())["model"]
    assert final["kv_compress_layers"] == [1] and final["max_token_length"] == 300
    assert final["null_caption"] == "upstream" and (run_dir / "samples" / "128px-kv").is_dir()
    resolved = json.loads((run_dir / "run.json").read_text())
    assert [s["compile"] for s in resolved["stages"].values()] == [c for *_, c in STAGES]
