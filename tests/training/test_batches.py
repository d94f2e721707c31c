"""Full batches from the bucket sampler (issue 20): heavy cached features do not wait in the bucket buffers,
the smallest bucket is the one evicted, the stream runs on across checkpoints, and a resumed stream (or a
resumed trainer) yields exactly the batches of an uninterrupted one."""

from __future__ import annotations

import gzip
import itertools
import json
import logging

import numpy as np
import pytest
import torch
import webdataset as wds

import training.main as trainer
from manifests.buckets import nearest_bucket
from manifests.tars import json_bytes, npy_bytes, write_shard
from training.data import MemberRef, Sample, bucket_batches, fetch, local_members, make_stream, scan_tar

from .conftest import debug_config

RESOLUTION, CHANNELS = 64, 32
SIZES = ((64, 64), (48, 96), (96, 48), (40, 120), (120, 40))  # five buckets at 64 px


def heavy_shards(out, *, num_samples: int = 240, per_shard: int = 60, tokens: int = 512) -> str:
    """Shards whose cached T5 states outweigh everything else, as fp16 T5-XXL's ~8 KiB per token do for real:
    ``tokens`` × 32 channels × 2 bytes = 32 KiB per caption here, against a ~1 KiB JSON."""
    rng = np.random.default_rng(0)
    for first in range(0, num_samples, per_shard):
        samples = []
        for index in range(first, min(first + per_shard, num_samples)):
            height, width = SIZES[index % len(SIZES)]
            bucket = nearest_bucket(height, width, RESOLUTION)
            meta = {"key": f"{index:06d}", "height": height, "width": width, "caption_orig": f"photo {index}",
                    "caption_vlm": f"a detailed picture {index}", "buckets": {str(RESOLUTION): list(bucket)}}  # fmt: skip
            posterior = np.stack(
                [
                    rng.standard_normal((4, bucket[0] // 8, bucket[1] // 8)),
                    np.ones((4, bucket[0] // 8, bucket[1] // 8)),
                ]
            )
            samples.append({
                "__key__": meta["key"], "json": json_bytes(meta),
                "t5_orig.npy": npy_bytes(rng.standard_normal((tokens, CHANNELS)).astype(np.float16)),
                "t5_vlm.npy": npy_bytes(rng.standard_normal((tokens, CHANNELS)).astype(np.float16)),
                f"vae{RESOLUTION}.npy": npy_bytes(posterior.astype(np.float16)),
            })  # fmt: skip
        write_shard(out / f"train-{first // per_shard:06d}.tar", samples)
    return str(out)


def _stream(shards: str, **options):
    options = {"resolution": RESOLUTION, "batch_size": 8, "seed": 1, "rank": 0, "shuffle_buffer": 32,
               "caption_channels": CHANNELS, "latent_channels": 4, **options}  # fmt: skip
    return make_stream(shards, **options)


def test_batches_are_full_when_cached_features_outweigh_the_bucket_budget(tmp_path) -> None:
    """0.25 MiB holds 7 samples with their T5 states but ~200 references: every batch is full."""
    shards = heavy_shards(tmp_path)
    batches = list(itertools.islice(_stream(shards, bucket_buffer_mb=0.25, shuffle_buffer_mb=0.25), 60))
    assert [len(b["keys"]) for b in batches] == [8] * 60 and not any(b["partial"] for b in batches)
    buckets = {nearest_bucket(h, w, RESOLUTION) for h, w in SIZES}
    assert {tuple(b["latents"].shape[-2:]) for b in batches} == {(h // 8, w // 8) for h, w in buckets}
    assert all(b["caption_features"].shape[1:] == (512, CHANNELS) for b in batches)  # the features were read


def test_the_smallest_waiting_bucket_is_evicted_not_the_oldest() -> None:
    def sample(key: str, bucket: tuple[int, int]) -> Sample:
        return Sample(key, bucket, "c", None, np.zeros(1, np.float32), None)

    a, b, c = (32, 32), (16, 48), (48, 16)
    order = [sample("a1", a), sample("a2", a), sample("a3", a), sample("b1", b), sample("c1", c)]
    batches = list(bucket_batches(iter(order), 4, max_buffered=4))
    assert [[s.key for s in batch] for batch in batches][0] == ["b1"]  # a waited longest but holds 3
    assert sorted(s.key for batch in batches for s in batch) == sorted(s.key for s in order)  # none lost


def test_a_resumed_stream_continues_exactly_with_any_number_of_workers(tmp_path) -> None:
    shards = heavy_shards(tmp_path, tokens=8)
    whole = list(itertools.islice(_stream(shards), 14))
    resumed = list(
        itertools.islice(_stream(shards, skip=6), 8)
    )  # planned past 6 batches, loaded from the 7th
    with_workers = list(itertools.islice(_stream(shards, num_workers=2), 14))
    for expected, got in [*zip(whole[6:], resumed, strict=True), *zip(whole, with_workers, strict=True)]:
        assert got["keys"] == expected["keys"]
        assert torch.equal(got["latents"], expected["latents"])  # the same posterior samples
        assert torch.equal(got["caption_features"], expected["caption_features"])


def test_trainer_keeps_one_stream_across_checkpoints_and_resumes_it_exactly(
    tiny_models, shards, tmp_path, monkeypatch
) -> None:
    """checkpoint_every=2: the uninterrupted run reads one stream (nothing waiting is dropped at a checkpoint),
    and a run pre-empted at a checkpoint boundary reads, after its resume, exactly the same batches."""
    opened: list[dict] = []

    def recording_make_stream(*args, **kwargs):
        record = {"args": args, "kwargs": kwargs, "keys": []}
        opened.append(record)
        for batch in real_make_stream(*args, **kwargs):
            record["keys"].append(batch["keys"])
            yield batch

    real_make_stream = trainer.make_stream
    monkeypatch.setattr(trainer, "make_stream", recording_make_stream)
    base = [
        "stages.1.steps=6",
        "stages.1.validation_prompts=[]",
        "checkpoint_every=2",
        "stages.1.batch_size=2",
    ]

    def one_stage(run_dir, *extra):
        cfg = debug_config(tiny_models, shards, run_dir, *base, *extra)
        cfg.stages = cfg.stages[1:2]
        return cfg

    trainer.main(one_stage(tmp_path / "full"))
    (full,) = opened
    assert len(full["keys"]) == 6  # one stream for the six steps (three checkpoint segments)
    plain = real_make_stream(*full["args"], **full["kwargs"])
    assert full["keys"] == [b["keys"] for b in itertools.islice(plain, 6)]

    opened.clear()
    cfg = one_stage(
        tmp_path / "run", "faults.sigterm_at_step=3"
    )  # finishes step 4 (a boundary), saves, exits
    with pytest.raises(trainer.Preempted):
        trainer.main(cfg)
    trainer.main(cfg)  # resumes at step 4 of 6
    first, again = opened
    assert first["keys"] == full["keys"][:4] and again["kwargs"]["skip"] == 4
    assert again["keys"] == full["keys"][4:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in rows] == list(range(1, 7))
    assert all(r["samples"] == 2 and r["partial_batches"] == 0 for r in rows)  # full batches, logged


def test_shard_members_are_read_by_reference_only_from_local_plain_tars(tmp_path) -> None:
    """The planner's tar reader gives WebDataset's own samples (its tarfile_to_samples is the reference)."""
    shards = heavy_shards(tmp_path, num_samples=7, per_shard=7, tokens=300)
    tar = f"{shards}/train-000000.tar"
    samples = list(scan_tar(tar))
    reference = list(wds.DataPipeline(wds.SimpleShardList([tar]), wds.tarfile_to_samples()))
    assert (
        [s["__key__"] for s in samples] == [r["__key__"] for r in reference] == [f"{i:06d}" for i in range(7)]
    )
    assert all(isinstance(s["t5_orig.npy"], MemberRef) and isinstance(s["json"], bytes) for s in samples)
    for sample, expected in zip(samples, reference, strict=True):
        fetched = fetch(sample)
        assert {k: v for k, v in fetched.items() if k != "__url__"} == {
            k: v for k, v in expected.items() if k not in ("__url__", "__local_path__")
        }
    streamed = list(scan_tar(f"pipe:cat {tar}"))  # not seekable: every member held as bytes
    assert [fetch(s) | {"__url__": None} for s in samples] == [s | {"__url__": None} for s in streamed]


def test_shards_held_as_bytes_are_warned_about_once(tmp_path, caplog) -> None:
    """A pipe or a compressed tar cannot be read by offset: one warning names how many and what it costs."""
    shards = heavy_shards(tmp_path, num_samples=7, per_shard=7, tokens=300)
    tar = f"{shards}/train-000000.tar"
    with open(tar, "rb") as f, gzip.open(f"{tar}.gz", "wb") as out:
        out.write(f.read())
    with caplog.at_level(logging.WARNING, logger="training.data"):
        _stream(shards)  # local plain tars: read by reference, nothing to say
        _stream(f"{shards}/train-000000.{{tar,tar.gz}}")
        _stream(f"pipe:cat {tar}")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith(
        f"1 of 2 shards are not local plain tars (URL, pipe or compressed; e.g. {tar}.gz)"
    )
    assert messages[1].startswith(
        f"1 of 1 shards are not local plain tars (URL, pipe or compressed; e.g. pipe:cat {tar})"
    )
    assert all("short batches" in m and "re-reads every shard" in m for m in messages)


def test_a_corrupt_tar_header_is_named(tmp_path) -> None:
    heavy_shards(tmp_path, num_samples=3, per_shard=3, tokens=300)
    tar = tmp_path / "train-000000.tar"
    data = bytearray(tar.read_bytes())
    with open(tar, "rb") as f:
        first = next(local_members(f, str(tar)))  # the first member's (name, data offset, size)
    header = first[1] + -(-first[2] // 512) * 512  # the second member's header
    data[header + 5] ^= 0xFF
    tar.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{tar}: tar header at byte {header} has a bad checksum"):
        list(scan_tar(str(tar)))


@pytest.mark.parametrize(("rule", "expected"), [("upstream", (832, 1152)), ("exact", (832, 1216))])
def test_bucket_rule_picks_an_uncached_samples_bucket_and_cached_latents_keep_theirs(rule, expected) -> None:
    """703×1000: ratio 0.703 is nearest the key 0.72 (832×1152, h/w 0.722) but the h/w 0.684 of 832×1216."""
    from training.data import SampleDecoder

    meta = {"height": 703, "width": 1000, "buckets": {"1024": [1024, 1024]}}
    pixels = SampleDecoder(resolution=1024, real_prompt_ratio=1.0, seed=0, bucket_rule=rule)
    assert pixels.bucket(meta) == expected
    cached = SampleDecoder(
        resolution=1024, real_prompt_ratio=1.0, seed=0, bucket_rule=rule, cached_latents=True
    )
    assert cached.bucket(meta) == (1024, 1024)  # the size its cached latent was cropped to


def test_a_checkpoint_from_before_one_stream_per_stage_resumes_with_a_warning(
    tiny_models, tmp_path, caplog
) -> None:
    """Its data position names a segment (the stream it reopened per checkpoint interval, before issue 20):
    the stage's one stream is a different one, so resuming on it is said, not silent."""
    cfg = debug_config(tiny_models, tmp_path / "shards", tmp_path / "run", "checkpoint_every=2")
    env = trainer.Dist(0, 1, torch.device("cpu"))
    current = {"position": {"step": 5}, "data": [trainer.data_position(cfg, 0, 5)]}
    old = {"position": {"step": 5}, "data": [{"stage_index": 0, "segment": 2, "segment_seed": 7, "batches_read": 5,
                                              "segment_start_batch": 4}]}  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="training"):
        assert trainer.stage_batches_read(current, cfg, env) == 5
        assert not caplog.records
        assert trainer.stage_batches_read(old, cfg, env) == 5
    (record,) = caplog.records
    assert "segment 2" in record.getMessage() and "not the batches the interrupted run" in record.getMessage()
