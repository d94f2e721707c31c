"""Trainer fixtures: tiny offline encoders and training shards written directly (no Ray), shared per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.config import TrainConfig, load_config
from training.tiny import (
    SD_VAE_SCALING_FACTOR,
    SDXL_VAE_SCALING_FACTOR,
    build_tiny_t5,
    build_tiny_vae,
    write_synthetic_shards,
)

REPO = Path(__file__).resolve().parents[2]
DEBUG_CONFIG = REPO / "configs" / "debug.toml"
MAX_TOKENS = 16  # the tiny preset's caption budget


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """t5/, vae/ (SDXL-like) and vae_sd/ (SD-like), as `python -m training.tiny` writes them."""
    out = tmp_path_factory.mktemp("models")
    build_tiny_t5(out)
    build_tiny_vae(out, scaling_factor=SDXL_VAE_SCALING_FACTOR, name="vae")
    build_tiny_vae(out, scaling_factor=SD_VAE_SCALING_FACTOR, name="vae_sd")
    return out


@pytest.fixture(scope="session")
def shards(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """9 images in 3 shards (an odd count), with cached T5 features and SDXL-like latents at 32 and 64 px."""
    return write_synthetic_shards(
        tmp_path_factory.mktemp("shards"), num_images=9, samples_per_shard=3, t5=str(tiny_models / "t5"),
        vae=str(tiny_models / "vae"), vae_resolutions=(32, 64), max_tokens=MAX_TOKENS,
    )  # fmt: skip


def path_overrides(models: Path, shards: Path, num_stages: int = 4) -> list[str]:
    """--set overrides pointing the debug preset at the fixtures (as configs/demo.sh does for the demo)."""
    cfg = load_config(DEBUG_CONFIG)
    overrides = [f"data.shards={shards}", f"text.t5={models / 't5'}"]
    for i, stage in enumerate(cfg.stages[:num_stages]):
        overrides.append(f"stages.{i}.vae={models / Path(stage.vae).name}")
    return overrides


def debug_config(models: Path, shards: Path, run_dir: Path, *extra: str) -> TrainConfig:
    """The debug preset on the fixtures, quiet (no progress bar), with extra ``a.b=c`` overrides."""
    overrides = [*path_overrides(models, shards), "log.progress_bar=false", *extra]
    return load_config(DEBUG_CONFIG, overrides=overrides, output=str(run_dir))


def torchrun(
    args: list[str], *, nproc: int = 2, extra: list[str] = (), timeout: float = 240
) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N [extra] training/main.py ARGS`, from the repository root."""
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", *extra,
           "training/main.py", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}  # stacks on abort
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
