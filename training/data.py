"""Training data: WebDataset shards → per-sample tensors → aspect-ratio-bucketed batches.

Each rank draws shards with replacement from a seeded stream (``ResampledShards``), so every rank can
run exactly the same number of steps whatever the shard count, and DDP never waits on a rank that ran
out of data. Every batch comes from one bucket (PixArt's multi-aspect training).
"""

from __future__ import annotations

import io
import json
import random
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from manifests.buckets import nearest_bucket, resize_to_cover_and_crop
from manifests.features import image_to_tensor
from manifests.imageio import decode_rgb

IMAGE_EXTENSIONS = ("jpg", "png", "webp")


@dataclass
class Sample:
    key: str
    bucket: tuple[int, int]  # (height, width) in pixels
    caption: str
    caption_features: np.ndarray | None  # (L, C) cached T5 states of `caption`, or None
    latent: torch.Tensor | None  # (C, h, w) sampled from the cached posterior, unscaled
    pixels: torch.Tensor | None  # (3, H, W) in [-1, 1] when no latent is cached


def shard_urls(shards: str) -> list[str]:
    """The tar files of a training-shard folder (sorted), or the pattern itself."""
    path = Path(shards)
    if path.is_dir():
        urls = sorted(str(p) for p in path.glob("train-*.tar"))
        if not urls:
            raise ValueError(f"no train-*.tar shards in {shards}")
        return urls
    return [shards]


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class SampleDecoder:
    """Raw WebDataset sample → ``Sample``: picks a caption, reads cached features or decodes pixels."""

    def __init__(self, *, resolution: int, real_prompt_ratio: float, seed: int) -> None:
        self.resolution = resolution
        self.real_prompt_ratio = real_prompt_ratio
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, raw: dict) -> Sample:
        meta = json.loads(raw["json"])
        bucket = tuple(
            meta.get("buckets", {}).get(str(self.resolution))
            or nearest_bucket(meta["height"], meta["width"], self.resolution)
        )
        which = self.choose_caption(meta)
        caption = meta.get(f"caption_{which}") or ""
        features = _load_npy(raw[f"t5_{which}.npy"]) if f"t5_{which}.npy" in raw else None
        latent = pixels = None
        cached = raw.get(f"vae{self.resolution}.npy")
        if cached is not None:
            posterior = torch.from_numpy(_load_npy(cached).astype(np.float32))  # (2, C, h, w): mean, std
            # Resample each time the sample is seen, as training from the posterior (not its mean) does.
            latent = posterior[0] + posterior[1] * torch.randn(posterior[0].shape, generator=self.generator)
        else:
            data = next(raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw)
            image = decode_rgb(data, min_side=min(bucket))
            pixels = image_to_tensor(resize_to_cover_and_crop(image, bucket))
        return Sample(meta["key"], bucket, caption, features, latent, pixels)

    def choose_caption(self, meta: dict) -> str:
        """``orig`` with probability real_prompt_ratio, else ``vlm``; the other when one is missing."""
        first, second = ("orig", "vlm") if self.rng.random() < self.real_prompt_ratio else ("vlm", "orig")
        return first if meta.get(f"caption_{first}") else second


def bucket_batches(
    samples: Iterator[Sample], batch_size: int, *, max_buffered: int
) -> Iterator[list[Sample]]:
    """Group samples by bucket; yield a batch as soon as one bucket holds ``batch_size`` samples.

    At most ``max_buffered`` samples wait; past that the oldest bucket's samples are dropped (rare
    buckets would otherwise grow without bound on a stream).
    """
    buffers: OrderedDict[tuple[int, int], list[Sample]] = OrderedDict()
    num_buffered = 0
    for sample in samples:
        bucket = buffers.setdefault(sample.bucket, [])
        bucket.append(sample)
        num_buffered += 1
        if len(bucket) == batch_size:
            yield bucket
            del buffers[sample.bucket]
            num_buffered -= batch_size
        elif num_buffered > max_buffered:
            _, dropped = buffers.popitem(last=False)
            num_buffered -= len(dropped)


def collate(batch: list[Sample]) -> dict:
    """Stack one bucket's samples; caption features are zero-padded to the longest with a mask."""
    out: dict = {"keys": [s.key for s in batch], "captions": [s.caption for s in batch]}
    if all(s.latent is not None for s in batch):
        out["latents"] = torch.stack([s.latent for s in batch])  # (B, C, h, w), unscaled
    else:
        out["pixels"] = torch.stack([s.pixels for s in batch])  # (B, 3, H, W)
    if all(s.caption_features is not None for s in batch):
        length = max(1, max(len(s.caption_features) for s in batch))
        dim = batch[0].caption_features.shape[1]
        features = torch.zeros(len(batch), length, dim)  # (B, L, C)
        mask = torch.zeros(len(batch), length, dtype=torch.bool)  # (B, L)
        for i, s in enumerate(batch):
            features[i, : len(s.caption_features)] = torch.from_numpy(s.caption_features.astype(np.float32))
            mask[i, : len(s.caption_features)] = True
        out["caption_features"], out["caption_mask"] = features, mask
    return out


def make_stream(
    shards: str,
    *,
    resolution: int,
    batch_size: int,
    real_prompt_ratio: float,
    seed: int,
    rank: int,
    shuffle_buffer: int = 64,
) -> Iterator[dict]:
    """An endless, deterministic stream of collated batches for one rank.

    The rank's seed decides which shards it draws (with replacement), the shuffle, caption choice and
    latent noise; the same (seed, rank) gives the same batches.
    """
    rank_seed = seed * 100_003 + rank
    pipeline = wds.DataPipeline(
        wds.ResampledShards(shard_urls(shards), seed=rank_seed, worker_seed=lambda: 0, deterministic=True),
        wds.tarfile_to_samples(),
        wds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=random.Random(rank_seed)),
        wds.map(SampleDecoder(resolution=resolution, real_prompt_ratio=real_prompt_ratio, seed=rank_seed)),
    )
    for batch in bucket_batches(iter(pipeline), batch_size, max_buffered=max(64, 16 * batch_size)):
        yield collate(batch)
