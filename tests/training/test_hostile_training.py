"""Hostile inputs to the trainer, each generated here: bad cached features, bad config values, a truncated
checkpoint, missing data. Each is a one-line error naming what to fix, or (the checkpoint) a fallback."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import training.main as trainer
from manifests.tars import npy_bytes, write_shard
from training.config import load_config

from .conftest import DEBUG_CONFIG, debug_config


def _shard_with(tmp_path: Path, shards: Path, member: str, value: np.ndarray) -> tuple[Path, str]:
    """A copy of the fixture's shard folder (one shard) whose first sample's ``member`` is ``value``."""
    import shutil
    import tarfile

    samples: dict[str, dict] = {}
    with tarfile.open(shards / "train-000000.tar") as tar:
        for info in tar.getmembers():
            key, ext = info.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(info).read()
    bad_key = sorted(samples)[0]
    samples[bad_key][member] = npy_bytes(value)
    out = tmp_path / "bad"
    out.mkdir()
    write_shard(out / "train-000000.tar", [samples[k] for k in sorted(samples)])
    for name in ("shards.json", "t5_null.npy"):  # the same cached encoders as the fixture
        shutil.copy(shards / name, out / name)
    return out, bad_key


def _train_on(tiny_models: Path, folder: Path, run_dir: Path) -> None:
    """The debug preset's cached 32 px stage (SDXL-like latents, cached T5) for 6 steps on ``folder``."""
    cfg = debug_config(tiny_models, folder, run_dir, "stages.1.steps=6", "stages.1.validation_prompts=[]")
    cfg.stages = cfg.stages[1:2]
    trainer.main(cfg)


def _latent(shards: Path) -> np.ndarray:
    """The first sample's cached 32 px posterior (2, 4, 4, 4)."""
    import tarfile

    with tarfile.open(shards / "train-000000.tar") as tar:
        name = sorted(n for n in tar.getnames() if n.endswith(".vae32.npy"))[0]
        return np.load(io.BytesIO(tar.extractfile(name).read()))


@pytest.mark.parametrize(
    ("member", "make", "problem"),
    [
        (
            "t5_orig.npy",
            lambda lat: np.zeros((5, 16), np.float16),
            r"shape \(5, 16\), expected \(tokens ≥ 1, 32\)",
        ),
        ("t5_orig.npy", lambda lat: np.zeros((5, 32), np.int32), "dtype int32"),
        ("t5_orig.npy", lambda lat: np.full((5, 32), np.nan, np.float16), "holds 160 non-finite values"),
        ("vae32.npy", lambda lat: lat[:, :, :2], r"expected \(2, 4, 4, 4\)"),
        ("vae32.npy", lambda lat: lat.astype(np.float32) * np.inf, "non-finite"),
    ],
    ids=["t5-shape", "t5-dtype", "t5-nan", "latent-shape", "latent-inf"],
)
def test_bad_cached_feature_names_shard_and_sample(
    tiny_models, shards, tmp_path, member, make, problem
) -> None:
    folder, key = _shard_with(tmp_path, shards, member, make(_latent(shards)))
    with pytest.raises(
        ValueError, match=rf"shard {folder}/train-000000.tar, sample {key}: {member} .*{problem}"
    ):
        _train_on(tiny_models, folder, tmp_path / "run")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ('stages.0.steps="4"', r"^stages\.0\.steps must be an integer, got '4' \(str\)$"),
        ("stages.1.batch_size=2.5", r"^stages\.1\.batch_size must be an integer, got 2\.5 \(float\)$"),
        (
            'stages.0.validation_prompts="a cat"',
            r"^stages\.0\.validation_prompts must be a list, got 'a cat'",
        ),
        ("optim.grad_clip=-1.0", r"^optim\.grad_clip must be > 0, got -1\.0$"),
        ("data.shuffle_buffer_mb=0", r"^data\.shuffle_buffer_mb must be > 0"),
        (
            "stages.9.lr=1",
            r"^--set stages\.9\.lr=1: stages has 4 entries, so the index after 'stages\.' must be 0–3",
        ),
        ("log.every=true", r"^log\.every must be an integer, got True \(bool\)$"),
    ],
)
def test_bad_config_value_is_one_line_naming_the_field(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        load_config(DEBUG_CONFIG, overrides=[override])
    assert "\n" not in str(err.value)


def test_cli_errors_are_one_line_and_come_before_any_model(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(trainer, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    base = ["--config", str(DEBUG_CONFIG), "--output", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as err:
        trainer.cli([*base, "--set", f"data.shards={tmp_path / 'nowhere'}"])
    assert err.value.code == f"error: data.shards = {tmp_path / 'nowhere'} does not exist: pass --set " + (
        "data.shards=<the train_shards/<name> folder written by manifests.materialize>"
    )
    with pytest.raises(SystemExit) as err:
        trainer.cli([*base, "--set", "stages.9.steps=1"])
    assert err.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("must be 0–3, got '9'")
    assert not (tmp_path / "run").exists()


def test_truncated_newest_checkpoint_falls_back_to_the_one_before(
    tiny_models, shards, tmp_path, caplog
) -> None:
    one_stage = ["stages.0.validation_prompts=[]", "checkpoint_every=2", "keep_checkpoints=3"]
    cfg = debug_config(tiny_models, shards, tmp_path / "run", "stages.0.steps=4", *one_stage)
    cfg.stages = cfg.stages[:1]
    trainer.main(cfg)
    newest = tmp_path / "run" / "checkpoints" / "00000004-32px-sd-vae" / "state.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a copy cut short, marker intact
    cfg = debug_config(tiny_models, shards, tmp_path / "run", "stages.0.steps=6", *one_stage)
    cfg.stages = cfg.stages[:1]
    with caplog.at_level(logging.INFO, logger="training"):
        trainer.main(cfg)
    assert "00000004-32px-sd-vae/state.pt does not load" in caplog.text
    assert (
        "resuming from" in caplog.text and "00000002-32px-sd-vae (stage 32px-sd-vae, step 2)" in caplog.text
    )
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["global_step"] for m in metrics] == [1, 2, 3, 4, 5, 6]  # steps 3-4 redone, not duplicated
    state = torch.load(
        tmp_path / "run" / "checkpoints" / "00000006-32px-sd-vae" / "state.pt", weights_only=True
    )
    assert state["position"]["step"] == 6
