"""Training data: WebDataset shards → per-sample arrays → aspect-ratio-bucketed batches.

Each rank draws shards with replacement from a seeded stream (``ResampledShards``), so every rank can
run exactly the same number of steps whatever the shard count, and DDP never waits on a rank that ran
out of data. The split between ranks (and DataLoader workers) is explicit: each gets its own seed, so no
rank depends on another's position. Every batch comes from one bucket (PixArt's multi-aspect training).

Per worker the pipeline is: read a tar → ``select`` (choose the caption, keep only the members this stage
reads) → a shuffle buffer bounded in samples and bytes → ``decode`` (validate cached features, sample the
latent posterior or decode pixels) → bucket buffers → one-bucket batches. No sample is ever dropped:
a bucket yields when it holds ``batch_size`` samples, and when the bucket buffers exceed their budget the
bucket waiting longest yields what it holds as a smaller batch (PixArt's ``AspectRatioBatchSampler``
never drops either; it buckets indices of a map-style dataset, which a stream of tars cannot do).

Resume: a stream is a pure function of (seed, rank, worker). The trainer opens a new stream at every
checkpoint boundary with a seed that names the stage and the segment (``stream_seed``), and a checkpoint
taken inside a segment (pre-emption) records how many batches of the segment were read, which the
resumed run skips; an interrupted run reads exactly what an uninterrupted one did.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from manifests.buckets import nearest_bucket, resize_to_cover_and_crop
from manifests.imageio import decode_rgb
from manifests.tars import FORMAT_EXTENSIONS

IMAGE_EXTENSIONS = tuple(sorted(set(FORMAT_EXTENSIONS.values())))  # every format a curated shard can hold
VAE_DOWNSAMPLE = 8  # latent cells per pixel side, SD and SDXL VAEs
MIB = 2**20


@dataclass
class Sample:
    key: str
    bucket: tuple[int, int]  # (height, width) in pixels
    caption: str
    caption_features: np.ndarray | None  # (L, C) cached T5 states of `caption`, or None
    latent: np.ndarray | None  # (C, h, w) float32 sampled from the cached posterior, unscaled
    pixels: np.ndarray | None  # (H, W, 3) uint8 at the bucket size when no latent is cached
    null_caption: bool = False  # no caption at all: the trainer gives it the null caption

    @property
    def nbytes(self) -> int:
        arrays = (self.caption_features, self.latent, self.pixels)
        return 256 + sum(a.nbytes for a in arrays if a is not None)


def shard_urls(shards: str) -> list[str]:
    """The tar files of a training-shard folder (sorted), or the pattern itself."""
    path = Path(shards)
    if path.is_dir():
        urls = sorted(str(p) for p in path.glob("train-*.tar"))
        if not urls:
            raise ValueError(f"data.shards={shards}: no train-*.tar shards in this folder")
        return urls
    return [shards]


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def raw_nbytes(raw: dict) -> int:
    """Bytes a raw (selected) sample holds: its members' payloads."""
    return 256 + sum(len(v) for v in raw.values() if isinstance(v, bytes))


class SampleDecoder:
    """Raw WebDataset sample → ``Sample``: picks a caption, reads and checks cached features or decodes pixels.

    ``cached_latents``/``cached_text`` say whether the shards' cached features are used (they must come
    from the encoders the stage names); when they are, every sample must carry them, with the right shape,
    a float dtype and finite values, or the error names the shard and the sample. When not, pixels are
    decoded and the trainer encodes them.
    """

    def __init__(
        self,
        *,
        resolution: int,
        real_prompt_ratio: float,
        seed: int,
        cached_latents: bool = False,
        cached_text: bool = False,
        caption_channels: int | None = None,
        latent_channels: int | None = None,
    ) -> None:
        self.resolution = resolution
        self.real_prompt_ratio = real_prompt_ratio
        self.cached_latents = cached_latents
        self.cached_text = cached_text
        self.caption_channels = caption_channels
        self.latent_channels = latent_channels
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, raw: dict) -> Sample:
        return self.decode(self.select(raw))

    def select(self, raw: dict) -> dict:
        """Choose the caption and keep only the members this stage reads (what the shuffle buffer holds)."""
        where = _where(raw)
        try:
            meta = json.loads(raw["json"])
        except (KeyError, ValueError) as err:
            raise ValueError(f"{where}: no readable .json member ({err!r})") from None
        if not isinstance(meta, dict) or not {"height", "width"} <= meta.keys():
            raise ValueError(f"{where}: its .json has no height and width (the bucket needs them)")
        which = self.choose_caption(meta)
        kept = {"__key__": raw.get("__key__"), "__url__": raw.get("__url__"), "meta": meta, "which": which}
        kept["json"] = raw["json"]  # counted in the buffer's bytes
        latent_member = f"vae{self.resolution}.npy"
        if self.cached_text and f"t5_{which}.npy" in raw:
            kept["t5.npy"] = raw[f"t5_{which}.npy"]
        if self.cached_latents:
            if latent_member not in raw:
                raise ValueError(
                    f"{where}: no {latent_member} although shards.json records latents at {self.resolution} px"
                )
            kept[latent_member] = raw[latent_member]
        else:
            image = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
            if image is None:
                raise ValueError(f"{where}: no image member (one of {', '.join(IMAGE_EXTENSIONS)})")
            kept["image"] = raw[image]
        return kept

    def decode(self, raw: dict) -> Sample:
        """A selected raw sample → ``Sample`` (posterior sampled, pixels at the bucket size)."""
        meta, which = raw["meta"], raw["which"]
        where = _where(raw)
        bucket = tuple(
            meta.get("buckets", {}).get(str(self.resolution))
            or nearest_bucket(meta["height"], meta["width"], self.resolution)
        )
        caption = meta.get(f"caption_{which}") or ""
        features = None
        if "t5.npy" in raw:
            features = self._checked(raw["t5.npy"], where, f"t5_{which}.npy", self._check_text)
        elif self.cached_text and caption:
            raise ValueError(f"{where}: caption_{which} has no cached t5_{which}.npy")
        latent = pixels = None
        latent_member = f"vae{self.resolution}.npy"
        if latent_member in raw:
            posterior = self._checked(raw[latent_member], where, latent_member, self._check_latent(bucket))
            mean, std = torch.from_numpy(posterior.astype(np.float32))  # (C, h, w) each
            # Resample each time the sample is seen, as training from the posterior (not its mean) does.
            latent = (mean + std * torch.randn(mean.shape, generator=self.generator)).numpy()
        else:
            image = decode_rgb(raw["image"], min_side=min(bucket))
            pixels = np.asarray(resize_to_cover_and_crop(image, bucket), dtype=np.uint8)  # (H, W, 3)
        return Sample(
            meta.get("key") or raw["__key__"], bucket, caption, features, latent, pixels, not caption
        )

    def choose_caption(self, meta: dict) -> str:
        """``orig`` with probability real_prompt_ratio, else ``vlm``; the other when one is missing."""
        first, second = ("orig", "vlm") if self.rng.random() < self.real_prompt_ratio else ("vlm", "orig")
        return first if meta.get(f"caption_{first}") else second

    def _checked(self, data: bytes, where: str, member: str, check) -> np.ndarray:
        try:
            array = _load_npy(data)
        except ValueError as err:
            raise ValueError(f"{where}: {member} is not a readable .npy ({err})") from None
        problem = check(array) or (
            None if np.issubdtype(array.dtype, np.floating) else f"has dtype {array.dtype}, expected a float"
        )
        if problem is None and not np.isfinite(array).all():
            problem = f"holds {int((~np.isfinite(array)).sum())} non-finite values"
        if problem:
            raise ValueError(f"{where}: {member} {problem}")
        return array

    def _check_text(self, array: np.ndarray) -> str | None:
        channels = self.caption_channels
        if array.ndim != 2 or array.shape[0] < 1 or (channels and array.shape[1] != channels):
            return f"has shape {array.shape}, expected (tokens ≥ 1, {channels or 'C'})"
        return None

    def _check_latent(self, bucket: tuple[int, int]):
        h, w = bucket[0] // VAE_DOWNSAMPLE, bucket[1] // VAE_DOWNSAMPLE
        channels = self.latent_channels

        def check(array: np.ndarray) -> str | None:
            if (
                array.ndim != 4
                or array.shape[0] != 2
                or array.shape[2:] != (h, w)
                or (channels and array.shape[1] != channels)
            ):
                return (
                    f"has shape {array.shape}, expected (2, {channels or 'C'}, {h}, {w}) for bucket {bucket}"
                )
            if np.isfinite(array[1]).all() and (array[1] < 0).any():
                return "has a negative posterior std"
            return None

        return check


def _where(raw: dict) -> str:
    return f"shard {raw.get('__url__', '?')}, sample {raw.get('__key__', '?')}"


def bounded_shuffle(
    samples: Iterable[dict], *, max_samples: int, max_bytes: float, rng: random.Random
) -> Iterator[dict]:
    """A shuffle buffer holding at most ``max_samples`` raw samples and ``max_bytes`` of payload.

    It fills first (as webdataset's ``shuffle(initial=...)``), then yields a random held sample for each
    new one; on a finite input it empties itself at the end.
    """
    buffer: list[dict] = []
    held = 0
    for sample in samples:
        buffer.append(sample)
        held += raw_nbytes(sample)
        while len(buffer) > max_samples or (held > max_bytes and len(buffer) > 1):
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            out = buffer.pop()
            held -= raw_nbytes(out)
            yield out
    rng.shuffle(buffer)
    yield from buffer


def bucket_batches(
    samples: Iterable[Sample], batch_size: int, *, max_buffered: int, max_bytes: float = math.inf
) -> Iterator[list[Sample]]:
    """Group samples by bucket; yield a batch as soon as one bucket holds ``batch_size`` samples.

    Nothing is dropped. At most ``max_buffered`` samples and ``max_bytes`` wait; past either, the bucket
    that has waited longest yields what it holds as a smaller batch, so every sample leaves within a
    bounded delay however rare its aspect ratio. A finite input ends with each bucket's remainder.
    """
    buffers: OrderedDict[tuple[int, int], list[Sample]] = OrderedDict()  # oldest waiting bucket first
    num_buffered = held = 0
    for sample in samples:
        bucket = buffers.setdefault(sample.bucket, [])
        bucket.append(sample)
        num_buffered += 1
        held += sample.nbytes
        if len(bucket) == batch_size:
            del buffers[sample.bucket]
            num_buffered -= batch_size
            held -= sum(s.nbytes for s in bucket)
            yield bucket
        while buffers and (num_buffered > max_buffered or held > max_bytes):
            _, oldest = buffers.popitem(last=False)
            num_buffered -= len(oldest)
            held -= sum(s.nbytes for s in oldest)
            yield oldest
    yield from buffers.values()


def collate(batch: list[Sample], *, caption_channels: int | None = None) -> dict:
    """Stack one bucket's samples; caption features are zero-padded to the longest with a mask.

    ``null_caption`` (B,) marks samples with no caption at all; with cached features they get a one-token
    placeholder that the model replaces by its null caption (never T5 on the fly).
    """
    out: dict = {
        "keys": [s.key for s in batch],
        "captions": [s.caption for s in batch],
        "null_caption": torch.tensor([s.null_caption for s in batch], dtype=torch.bool),  # (B,)
    }
    if all(s.latent is not None for s in batch):
        out["latents"] = torch.from_numpy(np.stack([s.latent for s in batch]))  # (B, C, h, w), unscaled
    else:
        pixels = torch.from_numpy(np.stack([s.pixels for s in batch])).permute(0, 3, 1, 2)  # (B, 3, H, W)
        out["pixels"] = pixels.float().div(127.5).sub(1.0)  # [-1, 1], as manifests.features does
    cached = [s.caption_features for s in batch if s.caption_features is not None]
    complete = all(s.caption_features is not None or s.null_caption for s in batch)
    if complete and (cached or caption_channels):
        dim = cached[0].shape[1] if caption_channels is None else caption_channels
        length = max((len(c) for c in cached), default=1)
        # fp16 when cached so (as materialize writes them): half the host memory and copies; the trainer
        # casts on the device.
        dtype = torch.float16 if all(c.dtype == np.float16 for c in cached) else torch.float32
        features = torch.zeros(len(batch), length, dim, dtype=dtype)  # (B, L, C)
        mask = torch.zeros(len(batch), length, dtype=torch.bool)  # (B, L)
        for i, s in enumerate(batch):
            if s.caption_features is None:  # no caption: one placeholder token, swapped for the null caption
                mask[i, 0] = True
                continue
            features[i, : len(s.caption_features)] = torch.from_numpy(s.caption_features).to(dtype)
            mask[i, : len(s.caption_features)] = True
        out["caption_features"], out["caption_mask"] = features, mask
    return out


def stream_seed(seed: int, stage_index: int, segment: int) -> int:
    """The data seed of one checkpoint segment of one stage (ranks and workers mix in their own ids)."""
    return (seed * 1_000_003 + stage_index) * 1_000_003 + segment


@dataclass(frozen=True)
class StreamConfig:
    """What a rank's stream needs to know about the stage, the data budget and the model."""

    resolution: int
    batch_size: int
    real_prompt_ratio: float = 0.5
    shuffle_buffer: int = 64
    shuffle_buffer_mb: float = 256.0
    bucket_buffer_mb: float = 256.0
    cached_latents: bool = True
    cached_text: bool = True
    caption_channels: int | None = None
    latent_channels: int | None = None


class BatchStream(torch.utils.data.IterableDataset):
    """An endless stream of collated one-bucket batches for one rank (one worker's share when in a DataLoader)."""

    def __init__(self, shards: str, config: StreamConfig, *, seed: int, rank: int) -> None:
        super().__init__()
        self.urls = shard_urls(shards)
        self.config = config
        self.seed, self.rank = seed, rank

    def __iter__(self) -> Iterator[dict]:
        c = self.config
        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker is not None else 0
        own_seed = (self.seed * 100_003 + self.rank) * 1_009 + worker_id  # explicit rank/worker split
        decoder = SampleDecoder(
            resolution=c.resolution, real_prompt_ratio=c.real_prompt_ratio, seed=own_seed,
            cached_latents=c.cached_latents, cached_text=c.cached_text, caption_channels=c.caption_channels,
            latent_channels=c.latent_channels,
        )  # fmt: skip
        raw = wds.DataPipeline(
            wds.ResampledShards(self.urls, seed=own_seed, worker_seed=lambda: 0, deterministic=True),
            wds.tarfile_to_samples(),
        )
        selected = map(decoder.select, raw)
        shuffled = bounded_shuffle(
            selected,
            max_samples=c.shuffle_buffer,
            max_bytes=c.shuffle_buffer_mb * MIB,
            rng=random.Random(own_seed),
        )
        decoded = map(decoder.decode, shuffled)
        # Up to batch_size - 1 samples can wait in each of the ~40 buckets; the byte budget bounds the rest.
        max_buffered = 64 * max(1, c.batch_size - 1)
        for batch in bucket_batches(
            decoded, c.batch_size, max_buffered=max_buffered, max_bytes=c.bucket_buffer_mb * MIB
        ):
            yield collate(batch, caption_channels=c.caption_channels)


def make_stream(
    shards: str,
    *,
    resolution: int,
    batch_size: int,
    seed: int,
    rank: int,
    num_workers: int = 0,
    **options,
) -> Iterator[dict]:
    """An endless, deterministic stream of collated batches for one rank.

    The rank's seed decides which shards it draws (with replacement), the shuffle, caption choice and
    latent noise; the same (seed, rank, num_workers) gives the same batches. With workers, a DataLoader
    takes batches from them in turn (deterministic order), each worker with its own seed. ``options`` are
    the other fields of ``StreamConfig``.
    """
    config = StreamConfig(resolution=resolution, batch_size=batch_size, **options)
    dataset = BatchStream(shards, config, seed=seed, rank=rank)
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
