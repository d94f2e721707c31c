"""Typed configuration of the curation job: one dataclass per component, nested in ``CurationConfig``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from curation.dedup import require_exact

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
    """CLIP image tower + LAION aesthetic predictor v2 head, run on Ray actors (``manifests.actors``).

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
    # Images per scorer call, and rows per item a scan task yields (256 suits a ViT-L/14 in bf16 on
    # one GPU). Part of the work-folder name: a chunk is always scored in the same batches.
    batch_size: int = 64
    num_actors: int = 1  # scorer actors, each holding one model copy
    num_gpus: float = 0.0  # per actor; > 0 moves the model to CUDA and enables bf16 autocast
    num_cpus: float = 1.0  # per actor
    # Write fp16 L2-normalised embeddings to manifests/clip_embeddings (what semantic dedup compares, and
    # what later selection can reuse): 768 × 2 B = 1,536 B per scored row; 1,466 B in Parquet with key and
    # model name (measured on a 4,096-row chunk of unit vectors), ≈ 48 GB at 33M images (README).
    save_embeddings: bool = True

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
    """Duplicates: exact (sha256), near (64-bit pHash within ``max_hamming`` bits) and semantic (CLIP).

    Defaults are calibrated on a labelled set of re-encodes, resizes, crops and borders vs distinct images
    (docs/benchmarks.md, "Dedup thresholds"; ``bench/calibrate_dedup.py``).
    """

    # The largest distance with no false pair in the labelled set and < 1e-3 expected false neighbours
    # per image at 33M images; it finds every resize and 99.8 % of re-encodes (a JPEG q50 can move 6 bits).
    max_hamming: int = 4
    # pHash search: None = exact for any max_hamming (bands narrower than 32 bits above 5: candidates grow
    # with N); k = 2k bands of 32 bits (near-linear; exact up to 5 bits, measured recall above).
    phash_splits: int | None = 1
    # SemDeDup (Abbas et al. 2023) on CLIP embeddings: None = on whenever aesthetic.save_embeddings keeps
    # them (the default). Turn it off with a random CLIP (tests, the demo): its embeddings all look alike.
    semantic: bool | None = None
    semantic_threshold: float = 0.95  # cosine similarity of L2-normalised CLIP image embeddings
    semantic_cluster_size: int = 10_000  # mean rows per k-means cluster (SemDeDup's in-cluster search)

    def __post_init__(self) -> None:
        if not 0 <= self.max_hamming <= 16:
            # Above 16 of 64 bits, unrelated pictures start to match (docs/benchmarks.md).
            raise ValueError(f"dedup.max_hamming must be in 0..16, got {self.max_hamming}")
        if self.phash_splits is not None and not 1 <= self.phash_splits <= 16:
            raise ValueError(f"dedup.phash_splits must be None or in 1..16, got {self.phash_splits}")
        require_exact(self.max_hamming, self.phash_splits)  # never a search that silently misses pairs
        if not 0 < self.semantic_threshold <= 1:
            raise ValueError(f"dedup.semantic_threshold must be in (0, 1], got {self.semantic_threshold}")
        if self.semantic_cluster_size < 1:
            raise ValueError(f"dedup.semantic_cluster_size must be ≥ 1, got {self.semantic_cluster_size}")


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
    chunk_size: int = 4096  # most rows per committed unit of scan + score work (what a rerun skips)
    manifest_rows_per_part: int = 100_000  # about: rows per partition of the later phases and per part
    report: bool = True  # write OUT/report/index.html at the end
    # auto: Ray when a cluster is named (RAY_ADDRESS, as under `ray job submit`) or the inputs hold more than
    # auto_local_max_inputs files; else every phase in this process (curation.auto). local: never Ray.
    executor: Literal["auto", "ray", "local"] = "auto"
    # Up to this many input files (sidecars count; 2,000 files is a 1k-image job with caption sidecars) a job
    # runs in-process. On one 2-core machine Ray hardly pays off: its fixed cost is 8–15 s more (start, workers,
    # scorer actor, task warm-up) and its per-image time is no better than in-process (equal within noise, or
    # slower: docs/benchmarks.md "Curation: small jobs"), so this is not a break-even: above it a job runs as it
    # will at scale, on Ray (per-image time divided across nodes, lost tasks retried, tasks scheduled by memory).
    auto_local_max_inputs: int = 2000
    # The local executor's scan (pass 1 + 2) runs in this many worker processes, started before the scorer loads
    # its model so that the two overlap (issue 18, item 8); 0: one per core this process may use; 1: no pool.
    local_scan_processes: int = 0

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("inputs must name at least one folder, glob or URI")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be ≥ 1, got {self.chunk_size}")
        if self.manifest_rows_per_part < 1:
            raise ValueError(f"manifest_rows_per_part must be ≥ 1, got {self.manifest_rows_per_part}")
        if self.executor not in ("auto", "ray", "local"):
            raise ValueError(f"executor must be 'auto', 'ray' or 'local', got {self.executor!r}")
        if self.auto_local_max_inputs < 0:
            raise ValueError(f"auto_local_max_inputs must be ≥ 0, got {self.auto_local_max_inputs}")
        if self.local_scan_processes < 0:
            raise ValueError(f"local_scan_processes must be ≥ 0 (0: one per core), got {self.local_scan_processes}")
        if self.dedup.semantic and not self.aesthetic.save_embeddings:
            raise ValueError(
                "dedup.semantic needs aesthetic.save_embeddings (the CLIP embeddings it compares)"
            )

    @property
    def semantic_dedup(self) -> bool:
        """Semantic dedup runs when asked for, or by default whenever embeddings are kept."""
        return self.aesthetic.save_embeddings if self.dedup.semantic is None else self.dedup.semantic

    @property
    def semantic_dedup_off_reason(self) -> str | None:
        """Why semantic dedup does not run (for the log), ``None`` when it does."""
        if self.semantic_dedup:
            return None
        if self.dedup.semantic is False:
            return "turned off (dedup.semantic = False, --no-semantic-dedup)"
        return "no CLIP embeddings kept (aesthetic.save_embeddings = False, --no-save-embeddings)"
