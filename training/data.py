"""Training data: WebDataset shards → light sample references → aspect-ratio-bucketed batches → decoded batches.

Each rank draws shards with replacement from a seeded stream (``ResampledShards``), so every rank can
run exactly the same number of steps whatever the shard count, and DDP never waits on a rank that ran
out of data. The split between ranks is explicit: each gets its own seed, so no rank depends on another's
position. Every batch comes from one bucket (PixArt's multi-aspect training).

Per rank the pipeline is two halves. The *planner* (light, in the training process) reads each tar's
headers and its ``.json`` members only: a heavy member (cached T5 states, the latent posterior, the image)
becomes a ``MemberRef`` (file, offset, size) → ``select`` (choose the caption, keep only the members this
stage reads, pick the bucket) → a shuffle buffer bounded in samples and bytes → bucket buffers → one-bucket
*plans*. The *loader* (in DataLoader workers, or in-process) reads a plan's heavy members, validates them,
samples the latent posterior or decodes pixels, and collates. Only references wait in the buffers: cached
fp16 T5 states are ~8 KiB per token, so buffering them capped the bucket buffers at a few hundred samples,
fewer than one batch per active bucket at 256/512 px, and most batches were partial (issue 20). A bucket
yields when it holds ``batch_size`` samples; only when the buffers pass their budget does the SMALLEST
waiting bucket yield what it holds (fewest samples in short batches; PixArt's ``AspectRatioBatchSampler``
never drops either, and it buckets indices of a map-style dataset, which the planner's references mimic).
Shards that are not local plain tars (URLs, pipes, compressed tars) cannot be re-read by offset: their
members are held as bytes, and the byte budget then does its old job.

Resume: a rank's stream is a pure function of (seed, stage, rank): a plan's decoding randomness is seeded
by its index, not by the worker that decodes it, so the batches do not depend on ``num_workers``. The
trainer opens one stream per stage and keeps it across checkpoints (nothing waiting in a bucket is lost
at a checkpoint); a resumed run replays the planner for the batches already read (headers and JSON only,
nothing decoded) and continues exactly where the interrupted run stood, bucket buffers included.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
import re
import tarfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from manifests.buckets import BucketRule, nearest_bucket, resize_to_cover_and_crop
from manifests.features import SD_VAE_DOWNSAMPLE
from manifests.imageio import decode_rgb
from manifests.tars import FORMAT_EXTENSIONS

IMAGE_EXTENSIONS = tuple(sorted(set(FORMAT_EXTENSIONS.values())))  # every format a curated shard can hold
MIB = 2**20
log = logging.getLogger(__name__)
# Members this small (and every .json) are read while planning; larger ones are kept by reference.
INLINE_MEMBER_BYTES = 4096
REF_NBYTES = 96  # a MemberRef's Python objects (dataclass, path string shared, two ints)


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


@dataclass(frozen=True)
class MemberRef:
    """Where a tar member's bytes are (a local plain tar): read when its batch is complete, not while it waits."""

    path: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise ValueError(
                f"{self.path}: member at byte {self.offset} is truncated ({len(data)}/{self.size})"
            )
        return data


_KEY_AND_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # WebDataset's rule: the key ends at the first dot


def scan_tar(url: str) -> Iterator[dict]:
    """The samples of one shard as WebDataset dicts (``__key__``, ``__url__``, ext → payload).

    A local plain tar is read header by header (``local_members``): members above ``INLINE_MEMBER_BYTES``
    (but never .json) become ``MemberRef``s and their bytes are skipped. Anything else (a URL, a pipe, a
    compressed tar) is streamed through ``webdataset.gopen`` and every member is held as bytes.
    """
    if Path(url).is_file() and _plain_tar(url):
        with open(url, "rb") as f:

            def payload(ext: str, offset: int, size: int) -> bytes | MemberRef:
                if size > INLINE_MEMBER_BYTES and not ext.endswith("json"):
                    return MemberRef(url, offset, size)
                f.seek(offset)
                return f.read(size)

            yield from _group(
                ((name, offset, size) for name, offset, size in local_members(f, url)), url, payload
            )
        return
    with tarfile.open(fileobj=wds.gopen(url, "rb"), mode="r|*") as tar:
        members = ((m.name, m, m.size) for m in tar if m.isfile())
        yield from _group(members, url, lambda ext, member, size: tar.extractfile(member).read())


def _group(members: Iterator[tuple[str, Any, int]], url: str, payload: Callable) -> Iterator[dict]:
    """Consecutive members with the same key → one sample (WebDataset's grouping)."""
    sample: dict = {}
    for name, where, size in members:
        match = _KEY_AND_EXT.match(name)
        if match is None:
            continue
        key, ext = match.groups()
        if sample and sample["__key__"] != key:
            yield sample
            sample = {}
        sample = sample or {"__key__": key, "__url__": url}
        sample[ext] = payload(ext, where, size)
    if sample:
        yield sample


_BLOCK = 512


def local_members(f: io.BufferedReader, where: str) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each regular file of a plain tar, from its headers alone.

    Python's ``tarfile`` parses each header (and its pax record) in ~0.3 ms; planning reads only headers and
    JSON, and a resumed run replays a stage's plans (training/data.py docstring), so this reads the POSIX
    ustar/pax and GNU long-name headers directly: ~20× faster. Checksums are verified.
    """
    offset, pending = 0, {}
    while True:
        f.seek(offset)
        header = f.read(_BLOCK)
        if len(header) < _BLOCK or header.count(0) == _BLOCK:
            return
        stored = int(header[148:156].strip(b"\0 ") or b"0", 8)
        if sum(header[:148]) + 8 * 32 + sum(header[156:]) != stored:
            raise ValueError(f"{where}: tar header at byte {offset} has a bad checksum (a corrupt shard)")
        size = _tar_number(header[124:136])
        kind = header[156:157]
        data = offset + _BLOCK
        if kind in (b"x", b"L"):
            f.seek(data)
            extended = f.read(size)
            if kind == b"L":
                pending["path"] = extended.rstrip(b"\0").decode()
            else:
                pending.update(_pax_records(extended))
        elif kind in (b"0", b"\0", b"7"):
            name = pending.get("path")
            if name is None:
                name = header[0:100].split(b"\0", 1)[0].decode()
                prefix = (
                    header[345:500].split(b"\0", 1)[0].decode() if header[257:263] == b"ustar\x00" else ""
                )
                name = f"{prefix}/{name}" if prefix else name
            size = int(pending.get("size", size))
            yield name, data, size
            pending = {}
        else:  # directories, links, global pax headers: nothing to read
            pending = {} if kind != b"g" else pending
        offset = data + -(-size // _BLOCK) * _BLOCK


def _tar_number(field: bytes) -> int:
    """A tar size field: octal ASCII, or base-256 (GNU) when the high bit of its first byte is set."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    return int(field.strip(b"\0 ") or b"0", 8)


def _pax_records(data: bytes) -> dict[str, str]:
    """'<len> key=value\\n' records of a pax extended header."""
    records, at = {}, 0
    while at < len(data) and data[at] != 0:
        space = data.index(b" ", at)
        length = int(data[at:space])
        key, _, value = data[space + 1 : at + length - 1].partition(b"=")
        records[key.decode()] = value.decode()
        at += length
    return records


def _plain_tar(path: str) -> bool:
    """An uncompressed tar (offsets into the file are offsets into the archive)."""
    with open(path, "rb") as f:
        magic = f.read(6)
    return not magic.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd"))


def fetch(raw: dict) -> dict:
    """The same sample with every ``MemberRef`` read into bytes."""
    return {k: v.read() if isinstance(v, MemberRef) else v for k, v in raw.items()}


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def raw_nbytes(raw: dict) -> int:
    """Bytes a raw (selected) sample holds: its members' payloads held as bytes, references, parsed JSON."""
    held = sum(len(v) for v in raw.values() if isinstance(v, bytes))
    refs = sum(isinstance(v, MemberRef) for v in raw.values())
    return 256 + held + len(raw.get("json", b"")) + REF_NBYTES * refs  # the parsed .json ≈ its bytes again


class SampleDecoder:
    """Raw WebDataset sample → ``Sample``: picks a caption, reads and checks cached features or decodes pixels.

    ``cached_latents``/``cached_text`` say whether the shards' cached features are used (they must come
    from the encoders the stage names); when they are, every sample must carry them, with the right shape,
    a float dtype and finite values, or the error names the shard and the sample. When not, pixels are
    decoded and the trainer encodes them. ``select`` runs in the planner (caption choice, bucket), ``decode``
    where the batch is loaded; ``reseed`` makes the posterior noise a function of the batch's index.
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
        bucket_rule: BucketRule = "upstream",
        vae_downsample: int = SD_VAE_DOWNSAMPLE,
    ) -> None:
        self.resolution = resolution
        self.vae_downsample = vae_downsample  # cached latents are (bucket H / it, bucket W / it)
        self.bucket_rule = bucket_rule
        self.real_prompt_ratio = real_prompt_ratio
        self.cached_latents = cached_latents
        self.cached_text = cached_text
        self.caption_channels = caption_channels
        self.latent_channels = latent_channels
        self.seed = seed
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, raw: dict) -> Sample:
        return self.decode(fetch(self.select(raw)))

    def reseed(self, index: int) -> None:
        """Posterior noise for batch ``index`` of the stream, whichever process decodes it."""
        self.generator.manual_seed(self.seed * 1_000_003 + index)

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
        kept = {"__key__": raw.get("__key__"), "__url__": raw.get("__url__"), "meta": meta, "which": which,
                "bucket": self.bucket(meta)}  # fmt: skip
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

    def bucket(self, meta: dict) -> tuple[int, int]:
        """The sample's bucket: the one its cached latent was cropped to (recorded by manifests.materialize),
        else ``bucket_rule``'s choice from its size (PixArt-Σ's rounded ratio key by default)."""
        recorded = meta.get("buckets", {}).get(str(self.resolution)) if self.cached_latents else None
        return tuple(
            recorded or nearest_bucket(meta["height"], meta["width"], self.resolution, rule=self.bucket_rule)
        )

    def decode(self, raw: dict) -> Sample:
        """A selected, fetched raw sample → ``Sample`` (posterior sampled, pixels at the bucket size)."""
        meta, which, bucket = raw["meta"], raw["which"], raw["bucket"]
        where = _where(raw)
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
        h, w = bucket[0] // self.vae_downsample, bucket[1] // self.vae_downsample
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
    samples: Iterable[Any],
    batch_size: int,
    *,
    max_buffered: int,
    max_bytes: float = math.inf,
    bucket_of: Callable[[Any], tuple[int, int]] = lambda s: s.bucket,
    nbytes_of: Callable[[Any], int] = lambda s: s.nbytes,
) -> Iterator[list[Any]]:
    """Group samples by bucket; yield a batch as soon as one bucket holds ``batch_size`` samples.

    Nothing is dropped. At most ``max_buffered`` samples and ``max_bytes`` wait; past either, the bucket
    holding the FEWEST samples (the one waiting longest among equals) yields what it holds as a smaller
    batch: the fewest samples land in short batches, and the buckets closest to full keep filling. A rare
    bucket's samples still leave within a bounded delay. A finite input ends with each bucket's remainder.
    Works on ``Sample``s and (with ``bucket_of``/``nbytes_of``) on the planner's raw references.
    """
    buffers: OrderedDict[tuple[int, int], list] = OrderedDict()  # oldest waiting bucket first
    num_buffered = held = 0
    for sample in samples:
        key = bucket_of(sample)
        bucket = buffers.setdefault(key, [])
        bucket.append(sample)
        num_buffered += 1
        held += nbytes_of(sample)
        if len(bucket) == batch_size:
            del buffers[key]
            num_buffered -= batch_size
            held -= sum(map(nbytes_of, bucket))
            yield bucket
        while buffers and (num_buffered > max_buffered or held > max_bytes):
            smallest = min(buffers, key=lambda k: len(buffers[k]))  # first (oldest) among equals
            evicted = buffers.pop(smallest)
            num_buffered -= len(evicted)
            held -= sum(map(nbytes_of, evicted))
            yield evicted
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


def stream_seed(seed: int, stage_index: int) -> int:
    """The data seed of one stage (ranks mix in their own ids); one stream per stage, kept across checkpoints."""
    return seed * 1_000_003 + stage_index


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
    bucket_rule: BucketRule = "upstream"
    vae_downsample: int = SD_VAE_DOWNSAMPLE  # pixels per latent cell of the stage's VAE (8: SD, SDXL)


def _decoder(c: StreamConfig, seed: int) -> SampleDecoder:
    return SampleDecoder(
        resolution=c.resolution, real_prompt_ratio=c.real_prompt_ratio, seed=seed, cached_latents=c.cached_latents,
        cached_text=c.cached_text, caption_channels=c.caption_channels, latent_channels=c.latent_channels,
        bucket_rule=c.bucket_rule, vae_downsample=c.vae_downsample,
    )  # fmt: skip


def max_waiting_samples(batch_size: int) -> int:
    """The bucket buffers' sample cap: batch_size - 1 may wait in each of up to 64 buckets (the 40 of
    manifests/buckets.py's tables fit), so the cap never binds before a bucket fills a batch."""
    return 64 * max(1, batch_size - 1)


def plan_batches(urls: list[str], c: StreamConfig, *, seed: int) -> Iterator[list[dict]]:
    """The planner: endless one-bucket lists of selected raw samples whose heavy members are references.

    Up to batch_size - 1 samples can wait in each of the 40 buckets, so the sample cap (64 × (batch_size - 1))
    never binds; the byte budget holds references (~1–4 KiB a sample: the JSON with both captions), so
    256 MiB holds ~60k samples and only shards held as bytes (URLs) meet it.
    """
    selector = _decoder(c, seed)
    shards = wds.ResampledShards(urls, seed=seed, worker_seed=lambda: 0, deterministic=True)
    raw = (sample for shard in shards for sample in scan_tar(shard["url"]))
    shuffled = bounded_shuffle(
        map(selector.select, raw),
        max_samples=c.shuffle_buffer,
        max_bytes=c.shuffle_buffer_mb * MIB,
        rng=random.Random(seed),
    )
    yield from bucket_batches(
        shuffled, c.batch_size, max_buffered=max_waiting_samples(c.batch_size), max_bytes=c.bucket_buffer_mb * MIB,
        bucket_of=lambda r: r["bucket"], nbytes_of=raw_nbytes,
    )  # fmt: skip


class BatchLoader(torch.utils.data.Dataset):
    """The loader: (index, plan) → a collated batch; reads the plan's members, decodes, collates.

    Map-style, so DataLoader workers share one planner per rank (the plans travel to them as indices)
    and the batches come back in plan order whatever ``num_workers``.
    """

    def __init__(self, config: StreamConfig, *, seed: int) -> None:
        self.config = config
        self.decoder = _decoder(config, seed)

    def __getitem__(self, item: tuple[int, list[dict]]) -> dict:
        index, plan = item
        self.decoder.reseed(index)
        batch = collate(
            [self.decoder.decode(fetch(raw)) for raw in plan], caption_channels=self.config.caption_channels
        )
        batch["partial"] = len(plan) < self.config.batch_size  # logged by the trainer (issue 20)
        return batch


def warn_held_as_bytes(urls: list[str], config: StreamConfig) -> None:
    """One warning when some shards are not local plain tars: their members wait in the buffers as bytes."""
    expanded = [u for url in urls for u in wds.shardlists.expand_urls(url)]
    held = [u for u in expanded if not (Path(u).is_file() and _plain_tar(u))]
    if held:
        log.warning(
            "%d of %d shards are not local plain tars (URL, pipe or compressed; e.g. %s): their members are "
            "held as bytes in the bucket buffers, so once those pass bucket_buffer_mb=%g short batches come "
            "back, and a resumed run re-reads every shard its stage read so far",
            len(held), len(expanded), held[0], config.bucket_buffer_mb,
        )  # fmt: skip


def make_stream(
    shards: str,
    *,
    resolution: int,
    batch_size: int,
    seed: int,
    rank: int,
    num_workers: int = 0,
    skip: int = 0,
    **options,
) -> Iterator[dict]:
    """An endless, deterministic stream of collated batches for one rank, from its ``skip``-th batch on.

    The rank's seed decides which shards it draws (with replacement), the shuffle, caption choice and
    latent noise; the same (seed, rank) gives the same batches with any ``num_workers``. Skipped batches
    are planned (tar headers and JSON read) but not loaded: that is how a resumed run gets back to its
    position with the bucket buffers as they were. ``options`` are the other fields of ``StreamConfig``.
    """
    config = StreamConfig(resolution=resolution, batch_size=batch_size, **options)
    own_seed = seed * 100_003 + rank  # explicit rank split
    urls = shard_urls(shards)
    warn_held_as_bytes(urls, config)
    plans = plan_batches(urls, config, seed=own_seed)
    if skip:
        started = time.perf_counter()
        for _ in range(skip):
            next(plans)
        log.info("rank %d: replaying %d batches (%.1f s)", rank, skip, time.perf_counter() - started)
    indexed = enumerate(plans, start=skip)
    loader = BatchLoader(config, seed=own_seed)
    if num_workers == 0:
        return map(loader.__getitem__, indexed)
    return iter(
        torch.utils.data.DataLoader(
            loader,
            sampler=indexed,
            batch_size=None,
            num_workers=num_workers,
            prefetch_factor=4,
            pin_memory=torch.cuda.is_available(),
        )
    )
