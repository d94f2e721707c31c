"""Scan + score results are committed by the workers that produce them (issue 18, item 4): the driver's stream
carries counts, never rows; every input lands in the manifest; the local executor runs the same functions."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

import manifests
from curation import pipeline
from curation.config import DecodeConfig, DownloadConfig, TierConfig
from curation.pipeline import COUNTS, ChunkPlan, ChunkWork, CommitTarget, ScanChunk, _unpack, run
from curation.sources import list_sources
from manifests.io import committed_parts
from tests.curation.conftest import CHUNK_SIZE, demo_config


def reference_keys(corpus: Path) -> set[str]:
    """The keys of every input, from the in-memory listing (no Ray, no chunks)."""
    return {r["key"] for r in list_sources([str(corpus)], download_dir=None, download=DownloadConfig())}


def manifest_keys(out: Path) -> set[str]:
    rows = manifests.connect(out).execute("SELECT key FROM images").fetchall()
    assert len(rows) == len({k for (k,) in rows}), "one manifest row per input"
    return {k for (k,) in rows}


def scored_chunks(out: Path) -> list[Path]:
    (folder,) = (out / pipeline.WORK_DIR).glob("scored-*")
    return committed_parts(folder)


def test_workers_commit_and_the_driver_sees_counts_only(
    demo_corpus, tmp_path, ray_cluster, aesthetic_cfg, monkeypatch
):
    seen: list[pa.Schema] = []
    iter_batches = ray.data.Dataset.iter_batches

    def counting(self, *args, **kwargs):  # every batch the driver takes from a dataset
        for batch in iter_batches(self, *args, **kwargs):
            seen.append(batch.schema)
            yield batch

    def not_on_the_driver(*args, **kwargs):
        raise AssertionError("the driver committed a chunk")

    monkeypatch.setattr(ray.data.Dataset, "iter_batches", counting)
    # Patched in this (driver) process only: the scorer actors and tasks import the module afresh.
    monkeypatch.setattr(pipeline, "commit_chunk", not_on_the_driver)
    monkeypatch.setattr(pipeline, "commit_batches", not_on_the_driver)
    cfg = demo_config(demo_corpus, tmp_path, aesthetic_cfg, report=False)
    cfg.aesthetic = type(aesthetic_cfg)(**{**aesthetic_cfg.__dict__, "save_embeddings": True})
    summary = run(cfg)

    assert seen and all(schema.equals(COUNTS) for schema in seen)  # counts, never a row
    assert manifest_keys(tmp_path) == reference_keys(demo_corpus)  # every input row lands
    chunks = scored_chunks(tmp_path)
    sizes = [pq.read_metadata(p).num_rows for p in chunks]
    assert sum(sizes) == summary["inputs"] and max(sizes) <= CHUNK_SIZE < summary["inputs"]
    embeddings = committed_parts(tmp_path / pipeline.EMBEDDINGS_DIR)
    assert [p.name for p in embeddings] == [p.name for p in chunks]
    assert not (tmp_path / pipeline.SCRATCH_DIR).exists()


def test_local_executor_commits_with_the_same_functions(demo_corpus, tmp_path, aesthetic_cfg, monkeypatch):
    commits = []
    commit_chunk = pipeline.commit_chunk
    monkeypatch.setattr(pipeline, "commit_chunk", lambda *a: commits.append(a[1].name) or commit_chunk(*a))
    summary = run(demo_config(demo_corpus, tmp_path, aesthetic_cfg, report=False, executor="local"))
    assert sorted(commits) == [p.stem for p in scored_chunks(tmp_path)]  # each chunk once
    assert manifest_keys(tmp_path) == reference_keys(demo_corpus)
    assert summary["executor"] == "local"


def test_chunks_no_worker_claimed_are_committed_at_the_end(demo_corpus, tmp_path, aesthetic_cfg, monkeypatch):
    monkeypatch.setattr(pipeline, "commit_if_whole", lambda work, target: False)
    run(demo_config(demo_corpus, tmp_path, aesthetic_cfg, report=False, executor="local"))
    assert manifest_keys(tmp_path) == reference_keys(demo_corpus)
    assert scored_chunks(tmp_path)


def plan_of(tmp_path: Path, num_rows: int, batch_size: int) -> tuple[ChunkPlan, pa.Table]:
    keys = [f"{i:04x}" for i in range(num_rows)]
    records = pa.table(
        {"key": keys, "source": [f"missing://{k}" for k in keys], "reason": ["gone"] * num_rows}
    )
    records = records.append_column("tar_offset", pa.nulls(num_rows, pa.int64()))
    records = records.append_column("tar_size", pa.nulls(num_rows, pa.int64()))
    records = records.append_column("data", pa.nulls(num_rows, pa.binary()))
    path = tmp_path / "chunk-r0.parquet"
    pq.write_table(records, path, row_group_size=batch_size)
    target = CommitTarget(
        scored=str(tmp_path / "scored"), embeddings=None, batches=str(tmp_path / "b"), batch_size=batch_size
    )
    return ChunkPlan(works=(ChunkWork("chunk-r0", str(path), num_rows, "d"),), target=target), records


def test_a_scan_task_takes_a_whole_chunk_and_packs_each_scoring_batch(tmp_path):
    plan, records = plan_of(tmp_path, num_rows=1100, batch_size=64)  # ≥ 1k images per read task
    packed = list(ScanChunk(TierConfig(), DecodeConfig(), clip_size=32, plan=plan)(pa.table({"id": [0]})))
    assert [p.num_rows for p in packed] == [1] * 18  # one row per scoring batch: never sliced apart
    batches = [_unpack(p["scanned"][0].as_py()) for p in packed]
    assert [b.num_rows for b in batches] == [64] * 17 + [1100 - 17 * 64]
    assert pa.concat_tables([b.select(["key"]) for b in batches])["key"] == records["key"]


def test_only_the_last_batch_of_a_chunk_commits_it_once(tmp_path):
    plan, records = plan_of(tmp_path, num_rows=5, batch_size=2)
    (work,), target = plan.works, plan.target
    scan = pipeline.ScanAndDecode(TierConfig(), DecodeConfig(), clip_size=32)
    rows = scan(records).drop_columns([pipeline.CLIP_INPUT])
    for field in pipeline.HOW_TO_READ:
        rows = rows.append_column(field, records[field.name])
    done = []
    for batch in (2, 0, 1):  # any order; the chunk is whole after the third
        pipeline.write_scored_batch(rows.slice(batch * 2, 2), work, batch, target)
        done.append(pipeline.commit_if_whole(work, target))
    assert done == [False, False, True]
    assert pipeline.commit_if_whole(work, target) is False  # claimed already: never committed twice
    (part,) = committed_parts(target.scored)
    assert pq.read_table(part)["key"] == records["key"]
