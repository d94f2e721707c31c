"""Typed configuration of the curation job: one dataclass per component, nested in ``CurationConfig``."""

from __future__ import annotations

from dataclasses import dataclass, field

TIERS = ("4k", "1k")

# The published LAION aesthetic predictor v2 head, shipped inside this package (curation/assets/):
# `builtin` resolves through importlib.resources in an editable install, a wheel, a Docker image and
# a Ray job's working directory alike.
BUILTIN_HEAD = "builtin"


@dataclass
class TierConfig:
    """Resolution tiers and hard limits (PixArt-Σ §3.2: ≥1K images for training, a 4K subset)."""

    min_pixels_4k: int = 3840 * 2160  # 8.29 MP in total, whatever the aspect ratio
    min_short_side_1k: int = 1024
    max_aspect_ratio: float = 4.5  # PixArt-Σ keeps long/short ≤ 4.5
    max_pixels: int = 64_000_000  # decompression-bomb guard, checked on the header before any decode

    def __post_init__(self) -> None:
        if self.max_aspect_ratio < 1:
            raise ValueError(f"tiers.max_aspect_ratio must be ≥ 1, got {self.max_aspect_ratio}")
        if self.min_pixels_4k > self.max_pixels:
            raise ValueError("tiers.min_pixels_4k must not exceed tiers.max_pixels")


@dataclass
class ShardConfig:
    samples_per_shard: int = 1000

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError(f"shards.samples_per_shard must be ≥ 1, got {self.samples_per_shard}")


@dataclass
class DecodeConfig:
    """Pass 2: one reduced decode per surviving image."""

    min_side: int = 256  # JPEG DCT scaling stops while the short side is still ≥ this

    def __post_init__(self) -> None:
        if self.min_side < 32:
            raise ValueError(
                f"decode.min_side must be ≥ 32 (pHash and CLIP need pixels), got {self.min_side}"
            )


@dataclass
class AestheticConfig:
    """CLIP image tower + LAION aesthetic predictor v2 head, run as a Ray actor pool.

    ``ViT-L-14-quickgelu``/``openai`` is the encoder the head was trained on (plain ``ViT-L-14`` builds
    GELU, the wrong activation for OpenAI's weights). ``pretrained`` is a tag or a checkpoint path; it is
    ignored for ``local-dir:``/``hf-hub:`` names, which carry their own weights.
    """

    clip_model: str = "ViT-L-14-quickgelu"
    pretrained: str | None = "openai"
    head: str = BUILTIN_HEAD  # 'builtin' or a local .safetensors/.pth file
    # Per-tier minimum score; a tier missing here is not filtered. LAION-Aesthetics V2 published
    # subsets at ≥ 5, ≥ 6 and ≥ 6.5; 5.0 is the loosest of them.
    min_score: dict[str, float] = field(default_factory=lambda: {"4k": 5.0, "1k": 5.0})
    # Images per scorer call, and rows per Ray Data block of the scan (256 suits a ViT-L/14 in bf16 on
    # one GPU). Part of the work-folder name: a chunk is always scored in the same batches.
    batch_size: int = 64
    num_actors: int = 1  # scorer actors, each holding one model copy
    num_gpus: float = 0.0  # per actor; > 0 moves the model to CUDA and enables bf16 autocast
    num_cpus: float = 1.0  # per actor
    save_embeddings: bool = False  # also write fp16 L2-normalised embeddings to manifests/clip_embeddings

    def __post_init__(self) -> None:
        unknown = set(self.min_score) - set(TIERS)
        if unknown:
            raise ValueError(f"aesthetic.min_score tiers must be in {TIERS}, got {sorted(unknown)}")
        if self.batch_size < 1 or self.num_actors < 1:
            raise ValueError("aesthetic.batch_size and aesthetic.num_actors must be ≥ 1")
        if self.num_gpus < 0 or self.num_cpus < 0:
            raise ValueError("aesthetic.num_gpus and aesthetic.num_cpus must be ≥ 0")


@dataclass
class DedupConfig:
    """Near-duplicates: 64-bit pHash within ``max_hamming`` bits (exact duplicates share a sha256)."""

    max_hamming: int = 4

    def __post_init__(self) -> None:
        if not 0 <= self.max_hamming <= 16:
            # The banded index splits 64 bits into max_hamming + 1 bands; above 16 a band is < 4 bits
            # wide and every band matches nearly every other hash.
            raise ValueError(f"dedup.max_hamming must be in 0..16, got {self.max_hamming}")


@dataclass
class DownloadConfig:
    """URL lists (``.parquet``/``.csv`` with ``url`` and optional ``caption``) go through img2dataset."""

    timeout: int = 10  # seconds in all per URL (connect, redirects, headers, body), not per socket read
    # Bodies over this are stopped (`download_too_large`). 64 MiB admits an 8K PNG photo; a web image
    # larger than that is an archive, a video or a trap, and 32 threads × this bounds download memory.
    max_bytes: int = 64 * 2**20
    retries: int = 0
    processes_count: int = 1
    thread_count: int = 32
    samples_per_shard: int = 10_000

    def __post_init__(self) -> None:
        if self.timeout < 1 or self.processes_count < 1 or self.thread_count < 1:
            raise ValueError("download.timeout, processes_count and thread_count must be ≥ 1")
        if self.max_bytes < 1:
            raise ValueError(f"download.max_bytes must be ≥ 1, got {self.max_bytes}")


@dataclass
class CurationConfig:
    inputs: list[str]
    output: str
    tiers: TierConfig = field(default_factory=TierConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    aesthetic: AestheticConfig = field(default_factory=AestheticConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    chunk_size: int = 4096  # rows per committed unit of scan + score work (what a rerun skips)
    manifest_rows_per_part: int = 100_000
    report: bool = True  # write OUT/report/index.html at the end

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("inputs must name at least one folder, glob or URI")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be ≥ 1, got {self.chunk_size}")
