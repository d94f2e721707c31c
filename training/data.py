"""Training data: WebDataset shards → per-sample tensors → aspect-ratio-bucketed batches.

Each rank draws shards with replacement from a seeded stream (``ResampledShards``), so every rank can
run exactly the same number of steps whatever the shard count, and DDP never waits on a rank that ran
out of data. The split between ranks (and DataLoader workers) is explicit: each gets its own seed, so no
rank depends on another's position. Every batch comes from one bucket (PixArt's multi-aspect training).

Resume: a stream is a pure function of (seed, rank, worker). The trainer opens a new stream at every
checkpoint boundary with a seed that names the stage and the segment (``stream_seed``), so a checkpoint's
data position is just (stage, step) and an interrupted run reads exactly what an uninterrupted one did,
without replaying the stream.
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
from manifests.tars import FORMAT_EXTENSIONS

IMAGE_EXTENSIONS = tuple(sorted(set(FORMAT_EXTENSIONS.values())))  # every format a curated shard can hold


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
    """Raw WebDataset sample → ``Sample``: picks a caption, reads cached features or decodes pixels.

    ``cached_latents``/``cached_text`` say whether the shards' cached features may be used (they must come
    from the encoders the stage names); when not, pixels are decoded and the trainer encodes them.
    """

    def __init__(
        self,
        *,
        resolution: int,
        real_prompt_ratio: float,
        seed: int,
        cached_latents: bool = True,
        cached_text: bool = True,
    ) -> None:
        self.resolution = resolution
        self.real_prompt_ratio = real_prompt_ratio
        self.cached_latents = cached_latents
        self.cached_text = cached_text
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
        features = None
        if self.cached_text and f"t5_{which}.npy" in raw:
            features = _load_npy(raw[f"t5_{which}.npy"])
        latent = pixels = None
        cached = raw.get(f"vae{self.resolution}.npy") if self.cached_latents else None
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


def stream_seed(seed: int, stage_index: int, segment: int) -> int:
    """The data seed of one checkpoint segment of one stage (ranks and workers mix in their own ids)."""
    return (seed * 1_000_003 + stage_index) * 1_000_003 + segment


class BatchStream(torch.utils.data.IterableDataset):
    """An endless stream of collated one-bucket batches for one rank (one worker's share when in a DataLoader)."""

    def __init__(
        self,
        shards: str,
        *,
        resolution: int,
        batch_size: int,
        real_prompt_ratio: float,
        seed: int,
        rank: int,
        shuffle_buffer: int = 64,
        cached_latents: bool = True,
        cached_text: bool = True,
    ) -> None:
        super().__init__()
        self.urls = shard_urls(shards)
        self.resolution, self.batch_size = resolution, batch_size
        self.real_prompt_ratio = real_prompt_ratio
        self.seed, self.rank = seed, rank
        self.shuffle_buffer = shuffle_buffer
        self.cached_latents, self.cached_text = cached_latents, cached_text

    def __iter__(self) -> Iterator[dict]:
        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker is not None else 0
        own_seed = (self.seed * 100_003 + self.rank) * 1_009 + worker_id  # explicit rank/worker split
        decoder = SampleDecoder(
            resolution=self.resolution, real_prompt_ratio=self.real_prompt_ratio, seed=own_seed,
            cached_latents=self.cached_latents, cached_text=self.cached_text,
        )  # fmt: skip
        pipeline = wds.DataPipeline(
            wds.ResampledShards(self.urls, seed=own_seed, worker_seed=lambda: 0, deterministic=True),
            wds.tarfile_to_samples(),
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=random.Random(own_seed)),
            wds.map(decoder),
        )
        max_buffered = max(64, 16 * self.batch_size)
        for batch in bucket_batches(iter(pipeline), self.batch_size, max_buffered=max_buffered):
            yield collate(batch)


def make_stream(
    shards: str,
    *,
    resolution: int,
    batch_size: int,
    real_prompt_ratio: float,
    seed: int,
    rank: int,
    shuffle_buffer: int = 64,
    cached_latents: bool = True,
    cached_text: bool = True,
    num_workers: int = 0,
) -> Iterator[dict]:
    """An endless, deterministic stream of collated batches for one rank.

    The rank's seed decides which shards it draws (with replacement), the shuffle, caption choice and
    latent noise; the same (seed, rank, num_workers) gives the same batches. With workers, a DataLoader
    takes batches from them in turn (deterministic order), each worker with its own seed.
    """
    dataset = BatchStream(
        shards, resolution=resolution, batch_size=batch_size, real_prompt_ratio=real_prompt_ratio,
        seed=seed, rank=rank, shuffle_buffer=shuffle_buffer, cached_latents=cached_latents,
        cached_text=cached_text,
    )  # fmt: skip
    if num_workers == 0:
        return iter(dataset)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        prefetch_factor=4,
        pin_memory=torch.cuda.is_available(),
    )
    return iter(loader)
