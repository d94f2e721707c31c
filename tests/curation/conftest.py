"""Curation fixtures: the tiny offline CLIP (built once per session) and a scorer config over it."""

from __future__ import annotations

from pathlib import Path

import pytest

from curation.config import AestheticConfig, CurationConfig, DedupConfig, ShardConfig
from curation.demo_corpus import generate
from curation.pipeline import run
from curation.tiny import build_tiny_clip

SAMPLES_PER_SHARD = 3
CHUNK_SIZE = 5  # several committed work chunks, so the resume test can kill between them
# The tiny CLIP is random: its embeddings of distinct pictures are alike (most pairs of the demo corpus at
# cosine ≥ 0.95), so semantic dedup on them would keep one picture of the corpus. Runs on it turn semantic
# dedup off, explicitly; semantic dedup itself is tested on planted embeddings.
TINY_CLIP_DEDUP = DedupConfig(semantic=False)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def aesthetic_cfg(tiny_clip: Path) -> AestheticConfig:
    """The real LAION head on the tiny random CLIP; no thresholds (its scores mean nothing)."""
    return AestheticConfig(clip_model=f"local-dir:{tiny_clip}", pretrained=None, min_score={})


def clip_flags(cfg: AestheticConfig) -> list[str]:
    """The CLI flags that select the same scorer as ``cfg`` (and, like ``TINY_CLIP_DEDUP``, no semantic dedup)."""
    return [
        "--clip-model", cfg.clip_model, "--aesthetic-head", cfg.head, "--min-aesthetic", "none",
        "--no-semantic-dedup",
    ]  # fmt: skip


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo corpus (8 good images + one of each bad kind), seed 0."""
    out = tmp_path_factory.mktemp("corpus")
    generate(out, n=8, seed=0)
    return out


def demo_config(corpus: Path, out: Path, aesthetic_cfg: AestheticConfig, **overrides) -> CurationConfig:
    """The config of the clean demo run; ``demo_flags`` is the same as CLI flags."""
    return CurationConfig(
        inputs=[str(corpus)],
        output=str(out),
        shards=ShardConfig(samples_per_shard=SAMPLES_PER_SHARD),
        aesthetic=aesthetic_cfg,
        chunk_size=CHUNK_SIZE,
        **{"dedup": TINY_CLIP_DEDUP, **overrides},
    )


def demo_flags(corpus: Path, out: Path, aesthetic_cfg: AestheticConfig) -> list[str]:
    return [
        "--input", str(corpus), "--output", str(out), "--samples-per-shard", str(SAMPLES_PER_SHARD),
        "--chunk-size", str(CHUNK_SIZE), *clip_flags(aesthetic_cfg),
    ]  # fmt: skip


@pytest.fixture(scope="session")
def curated(demo_corpus, tmp_path_factory, ray_cluster, aesthetic_cfg):
    """A clean run of the demo corpus: (run folder, summary). Tests must not modify it."""
    out = tmp_path_factory.mktemp("run")
    return out, run(demo_config(demo_corpus, out, aesthetic_cfg))
