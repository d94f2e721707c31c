"""Typed configuration of the curation job."""

from __future__ import annotations

from dataclasses import dataclass, field


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


@dataclass
class CurationConfig:
    inputs: list[str]
    output: str
    tiers: TierConfig = field(default_factory=TierConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    batch_size: int = 64  # rows per Ray Data batch in the scan and decode passes
    manifest_rows_per_part: int = 100_000

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("inputs must name at least one folder, glob or URI")
