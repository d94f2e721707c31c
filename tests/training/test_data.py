"""The data path: no sample is ever dropped by bucketing, buffers stay within their byte budgets, a sample
without a caption trains on the null caption without T5."""

from __future__ import annotations

import itertools
import json
import random
import shutil
import tarfile
from collections import Counter

import numpy as np
import pytest

import training.main as trainer
from manifests.buckets import nearest_bucket
from manifests.tars import json_bytes, write_shard
from training.data import MIB, Sample, bounded_shuffle, bucket_batches, collate, raw_nbytes

from .conftest import debug_config

# A web-like mix of aspect ratios (h/w): mostly landscape photos, some square and portrait, a long tail.
COMMON = {3 / 4: 0.30, 2 / 3: 0.20, 1.0: 0.15, 9 / 16: 0.12, 4 / 3: 0.08, 3 / 2: 0.05}


def web_like_samples(num: int, resolution: int, seed: int = 0) -> list[Sample]:
    rng = random.Random(seed)
    samples = []
    for i in range(num):
        if rng.random() < sum(COMMON.values()):
            ratio = rng.choices(list(COMMON), weights=list(COMMON.values()))[0]
        else:  # the tail: log-uniform over PixArt's 1:4 … 4:1 range
            ratio = 4 ** rng.uniform(-1, 1)
        bucket = nearest_bucket(round(1000 * ratio), 1000, resolution)
        latent = np.zeros((4, bucket[0] // 8, bucket[1] // 8), np.float32)
        samples.append(Sample(f"{i:06d}", bucket, "c", None, latent, None))
    return samples


@pytest.mark.parametrize(("resolution", "batch_size"), [(256, 64), (1024, 12)])
@pytest.mark.parametrize("pressure", ["stream-defaults", "tight"])
def test_bucketing_never_drops_a_sample_and_every_bucket_yields(resolution, batch_size, pressure) -> None:
    """An epoch-equivalent of a skewed mix: every sample comes out exactly once, every bucket yields.

    ``tight`` keeps the old eviction threshold (max(64, 16·batch) samples) and a small byte budget: the
    smallest buckets flush as smaller batches instead of being dropped. With the stream's own limits
    (plan_batches) there is no pressure at these sizes: the batches are full ones.
    """
    samples = web_like_samples(6000, resolution)
    if pressure == "tight":
        max_buffered, budget = max(64, 16 * batch_size), 8 * MIB
    else:
        max_buffered, budget = 64 * (batch_size - 1), 256 * MIB
    fed = out = 0
    biggest = max(s.nbytes for s in samples)

    def feed():
        nonlocal fed
        for s in samples:
            fed += s.nbytes
            yield s

    batches = []
    for batch in bucket_batches(feed(), batch_size, max_buffered=max_buffered, max_bytes=budget):
        out += sum(s.nbytes for s in batch)
        assert fed - out <= budget + biggest  # what waits stays within the budget
        assert len({s.bucket for s in batch}) == 1 and 1 <= len(batch) <= batch_size
        batches.append(batch)
    keys = [s.key for b in batches for s in b]
    assert sorted(keys) == [s.key for s in samples]  # none lost, none repeated
    assert {b[0].bucket for b in batches} == {s.bucket for s in samples}
    if pressure == "stream-defaults":  # partial batches only for the remainders at the end of the input
        assert sum(len(b) < batch_size for b in batches) <= len({s.bucket for s in samples})


def test_bucketing_without_pressure_yields_only_full_batches_until_the_end() -> None:
    samples = web_like_samples(3000, 256)
    batches = list(bucket_batches(iter(samples), 8, max_buffered=10_000))
    sizes = [len(b) for b in batches]
    num_full = sizes.index(next(s for s in sizes if s < 8))
    assert set(sizes[:num_full]) == {8}  # full batches while the stream runs …
    tail = batches[num_full:]  # … then, at its end, each bucket's remainder once
    assert all(len(b) < 8 for b in tail) and len({b[0].bucket for b in tail}) == len(tail)
    assert sum(sizes) == len(samples)


def test_shuffle_buffer_is_bounded_in_bytes_and_loses_nothing() -> None:
    raw = [{"__key__": f"{i}", "json": b"{}", "vae.npy": bytes(1000 * (1 + i % 7))} for i in range(500)]
    fed = out = 0

    def feed():
        nonlocal fed
        for r in raw:
            fed += raw_nbytes(r)
            yield r

    keys = []
    for r in bounded_shuffle(feed(), max_samples=1000, max_bytes=20_000, rng=random.Random(0)):
        out += raw_nbytes(r)
        assert fed - out <= 20_000 + 8_000
        keys.append(r["__key__"])
    assert sorted(keys) == sorted(r["__key__"] for r in raw) and keys != [r["__key__"] for r in raw]


def test_collate_gives_a_caption_less_sample_a_null_placeholder() -> None:
    with_caption = Sample(
        "a", (32, 32), "x", np.ones((3, 8), np.float16), np.zeros((4, 4, 4), np.float32), None
    )
    without = Sample("b", (32, 32), "", None, np.zeros((4, 4, 4), np.float32), None, null_caption=True)
    batch = collate([with_caption, without], caption_channels=8)
    assert batch["null_caption"].tolist() == [False, True]
    assert batch["caption_features"].shape == (2, 3, 8) and batch["caption_mask"].tolist() == [
        [True, True, True],
        [True, False, False],
    ]


def test_a_sample_without_captions_trains_on_the_null_caption_not_t5(
    tiny_models, shards, tmp_path, monkeypatch
):
    """Cached T5 features and a row with no caption: the trainer must not load T5 to encode ""."""
    out = tmp_path / "shards"
    out.mkdir()
    for name in ("shards.json", "t5_null.npy"):
        shutil.copy(shards / name, out / name)
    samples: dict[str, dict] = {}
    with tarfile.open(shards / "train-000000.tar") as tar:
        for info in tar.getmembers():
            key, ext = info.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(info).read()
    for sample in samples.values():  # every caption gone: each sample is a null-caption sample
        meta = {**json.loads(sample["json"]), "caption_orig": None, "caption_vlm": None}
        sample["json"] = json_bytes(meta)
        sample.pop("t5_orig.npy"), sample.pop("t5_vlm.npy")
    write_shard(out / "train-000000.tar", list(samples.values()))

    def no_t5(*args, **kwargs):
        raise AssertionError("T5 loaded")

    monkeypatch.setattr("training.encoders.T5Features", no_t5)
    monkeypatch.setattr("manifests.features.T5Features", no_t5)
    cfg = debug_config(
        tiny_models, out, tmp_path / "run", "stages.1.steps=3", "stages.1.validation_prompts=[]"
    )
    cfg.stages = cfg.stages[1:2]
    trainer.main(cfg)
    assert (tmp_path / "run" / "final" / "model_index.json").exists()


def test_stream_batches_are_one_bucket_and_buckets_all_appear(shards) -> None:
    from training.data import make_stream

    stream = make_stream(str(shards), resolution=64, batch_size=2, seed=0, rank=0, shuffle_buffer=4,
                         caption_channels=32, latent_channels=4)  # fmt: skip
    seen = Counter()
    for batch in itertools.islice(stream, 30):
        h, w = batch["latents"].shape[-2:]
        seen[(h, w)] += len(batch["keys"])
    assert len(seen) == 3, seen  # the fixture's three aspect ratios, each in its own batches
