"""Scan + score results are committed by the workers that produce them (issue 18, item 4): the driver's stream
carries counts, never rows; every input lands in the manifest; the local executor runs the same functions."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

import manifests
from curation import chunks as chunking
from curation import pipeline
from curation.aesthetic import AestheticScorer
from curation.config import DecodeConfig, DownloadConfig, TierConfig
from curation.executor import TASK_BASE_BYTES, _drain
from curation.pipeline import BatchCount, ChunkPlan, ChunkWork, CommitTarget, ScanChunk, run
from curation.sources import list_sources
from manifests.io import committed_parts
from tests.conftest import REPO
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
    seen: list[type] = []
    run_on_actors = pipeline.run_on_actors

    def counting(*args, **kwargs):  # every result the driver takes from the actors
        for result in run_on_actors(*args, **kwargs):
            seen.append(type(result))
            yield result

    def not_on_the_driver(*args, **kwargs):
        raise AssertionError("the driver committed a chunk")

    monkeypatch.setattr(pipeline, "run_on_actors", counting)
    # Patched in this (driver) process only: the scorer actors and tasks import the module afresh.
    monkeypatch.setattr(pipeline, "commit_chunk", not_on_the_driver)
    monkeypatch.setattr(pipeline, "commit_batches", not_on_the_driver)
    cfg = demo_config(demo_corpus, tmp_path, aesthetic_cfg, report=False)
    cfg.aesthetic = type(aesthetic_cfg)(**{**aesthetic_cfg.__dict__, "save_embeddings": True})
    summary = run(cfg)

    assert seen and set(seen) == {BatchCount}  # counts, never a row
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
    scanned = list(ScanChunk(TierConfig(), DecodeConfig(), clip_size=32)(plan.works[0]))
    assert [s.batch for s in scanned] == list(range(18))  # one item per scoring batch: never sliced apart
    batches = [s.scanned for s in scanned]
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


def test_a_rescored_chunk_no_worker_claimed_is_committed_with_its_new_rows(
    demo_corpus, tmp_path, aesthetic_cfg, monkeypatch
):
    """A chunk whose records changed still has its old marker when its scan starts; if no worker claims it,
    the end of the run must commit it (not take the old marker for the new rows) or fail, never drop rows."""
    corpus = tmp_path / "corpus"
    shutil.copytree(demo_corpus, corpus)
    out = tmp_path / "run"
    # One chunk holds every input (the key-space trie keeps a leaf under chunk_size), so the extra input below
    # lands in the chunk the first run committed.
    cfg = dataclasses.replace(
        demo_config(corpus, out, aesthetic_cfg, report=False, executor="local"), chunk_size=1000
    )
    run(cfg)
    (before,) = scored_chunks(out)
    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(corpus / "extra-input.png")
    monkeypatch.setattr(pipeline, "commit_if_whole", lambda work, target: False)  # the claimer died
    run(cfg)
    (after,) = scored_chunks(out)
    assert after.name == before.name  # the same chunk, rescored
    assert manifest_keys(out) == reference_keys(corpus)  # the extra input included


def test_a_chunk_left_uncommitted_fails_the_run_naming_it(demo_corpus, tmp_path, aesthetic_cfg, monkeypatch):
    monkeypatch.setattr(pipeline, "commit_if_whole", lambda work, target: False)
    monkeypatch.setattr(pipeline, "commit_batches", lambda work, target: 0)  # its commit task lost it too
    with pytest.raises(RuntimeError, match=r"not committed.*chunk-"):
        run(demo_config(demo_corpus, tmp_path, aesthetic_cfg, report=False, executor="local"))


def test_batches_a_retried_task_sends_again_are_counted_once(
    demo_corpus, tmp_path, aesthetic_cfg, monkeypatch
):
    scan_local = pipeline._scan_local

    def sent_twice(*args):  # a re-executed task re-emits its batches' counts
        for counts in scan_local(*args):
            yield counts
            yield counts

    monkeypatch.setattr(pipeline, "_scan_local", sent_twice)
    run(demo_config(demo_corpus, tmp_path, aesthetic_cfg, report=False, executor="local"))
    assert manifest_keys(tmp_path) == reference_keys(demo_corpus)


def test_a_batch_that_never_comes_back_fails_the_run_naming_its_chunk(
    demo_corpus, tmp_path, aesthetic_cfg, monkeypatch
):
    scan_local = pipeline._scan_local

    def one_lost(*args):
        yield from list(scan_local(*args))[1:]

    monkeypatch.setattr(pipeline, "_scan_local", one_lost)
    with pytest.raises(RuntimeError, match=r"1 chunks did not come back whole: chunk-"):
        run(demo_config(demo_corpus, tmp_path, aesthetic_cfg, report=False, executor="local"))


def test_a_scored_batch_of_the_wrong_size_is_an_error(tmp_path, aesthetic_cfg):
    plan, _ = plan_of(tmp_path, num_rows=5, batch_size=2)
    scanned = list(ScanChunk(TierConfig(), DecodeConfig(), clip_size=32)(plan.works[0]))
    wrong = dataclasses.replace(scanned[0], batch=2)  # 2 rows as the last batch (1 row)
    with pytest.raises(RuntimeError, match="chunk-r0 batch 2: 2 rows, not 1"):
        pipeline.ScoreAndCommit(aesthetic_cfg, plan.target)(wrong)


def test_errors_of_tasks_drained_after_a_failure_are_logged_at_debug(ray_cluster, caplog):
    @ray.remote(max_retries=0)
    def fails() -> None:
        raise ValueError("a planted task error")

    with caplog.at_level(logging.DEBUG, logger="curation.executor"):
        _drain([fails.remote()])
    (record,) = [r for r in caplog.records if r.name == "curation.executor"]
    assert record.levelno == logging.DEBUG and "a planted task error" in record.getMessage()


def manifest_rows(out: Path) -> list[dict]:
    columns = ["key", "status", "reason", "tier", "sha256", "phash", "aesthetic", "shard"]
    return pq.read_table(out / "manifests" / "images", columns=columns).sort_by("key").to_pylist()


def test_the_local_scan_pool_gives_the_ray_runs_manifest_and_scans_outside_this_process(
    curated, demo_corpus, tmp_path, aesthetic_cfg, monkeypatch
):
    """Issue 18 item 8: the local executor's scan runs in a process pool (overlapping the scorer's load); its
    manifest — scores, hashes, reasons, shards — and shard bytes are the Ray executor's (the session's run)."""
    ray_out, ray_summary = curated
    assert ray_summary["executor"] == "ray"

    def not_here(self, record):  # patched in this process only: the pool's fresh processes scan unpatched
        raise AssertionError("scanned in the driver, not in the pool")

    monkeypatch.setattr(pipeline.ScanAndDecode, "process", not_here)
    cfg = demo_config(demo_corpus, tmp_path, aesthetic_cfg, executor="local", local_scan_processes=2)
    assert run(cfg)["executor"] == "local"
    assert manifest_rows(tmp_path) == manifest_rows(ray_out)
    shards = sorted((ray_out / "shards" / "curated").rglob("*.tar"))
    assert shards and [p.read_bytes() for p in shards] == [
        (tmp_path / p.relative_to(ray_out)).read_bytes() for p in shards
    ]


def test_the_local_scorer_loads_beside_the_listing_and_scores_in_the_scoring_thread(
    demo_corpus, tmp_path, aesthetic_cfg, monkeypatch
):
    """Issue 18 item 8: in-process, the scorer's imports and model load (a small job's longest step) overlap the
    listing: the model starts loading before the listing ends, in another thread, while every forward runs in the
    thread that scores (where the actor's torch threads are set); the manifest holds every input."""
    loading = threading.Event()
    threads: dict[str, set[threading.Thread]] = {"load": set(), "score": set()}

    class Recording(AestheticScorer):
        def __init__(self, cfg) -> None:
            threads["load"].add(threading.current_thread())
            loading.set()
            super().__init__(cfg)

        def __call__(self, batch: pa.Table) -> pa.Table:
            threads["score"].add(threading.current_thread())
            return super().__call__(batch)

    list_unit = chunking.write_listing_unit

    def waits_for_the_load(task: dict) -> int:
        assert loading.wait(timeout=30), "the listing ended before the scorer started loading"
        return list_unit(task)

    monkeypatch.setattr(pipeline, "AestheticScorer", Recording)
    monkeypatch.setattr(chunking, "write_listing_unit", waits_for_the_load)
    summary = run(demo_config(demo_corpus, tmp_path, aesthetic_cfg, report=False, executor="local"))
    assert summary["executor"] == "local"
    assert manifest_keys(tmp_path) == reference_keys(demo_corpus)
    assert len(threads["load"]) == 1 and threading.main_thread() not in threads["load"]
    assert threads["score"] == {threading.main_thread()}


def forkserver_children_niceness() -> list[int]:
    """The niceness of every child of this process's multiprocessing forkserver (the local scan pool's processes),
    from /proc: ``stat`` field 4 is the parent pid, field 19 the niceness."""
    stats = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            stats[int(proc.name)] = (int(fields[1]), int(fields[16]), (proc / "cmdline").read_bytes())
        except (OSError, IndexError):  # a process that ended meanwhile
            continue
    servers = {pid for pid, (ppid, _, cmd) in stats.items() if ppid == os.getpid() and b"forkserver" in cmd}
    return [nice for ppid, nice, _ in stats.values() if ppid in servers]


def test_the_local_scan_processes_yield_the_cores_to_the_scorers_load(
    demo_corpus, tmp_path, aesthetic_cfg, monkeypatch
):
    """Issue 18 item 8: every batch waits for the scorer's model, which loads in this process: the scan processes
    run LOCAL_SCAN_NICE steps nicer than it (as the OS reports them while the batches are scored)."""
    seen: list[int] = []
    score = pipeline.ScoreAndCommit.__call__

    def noting(self, scanned: pipeline.ScannedBatch) -> BatchCount:
        seen.extend(forkserver_children_niceness())
        return score(self, scanned)

    monkeypatch.setattr(pipeline.ScoreAndCommit, "__call__", noting)
    cfg = demo_config(demo_corpus, tmp_path, aesthetic_cfg, report=False, executor="local", local_scan_processes=2)
    run(cfg)
    assert manifest_keys(tmp_path) == reference_keys(demo_corpus)
    expected = min(19, os.getpriority(os.PRIO_PROCESS, 0) + pipeline.LOCAL_SCAN_NICE)
    assert seen and set(seen) == {expected}


def test_the_local_scorer_runs_on_its_actors_cpus_and_gives_the_threads_back():
    """Ray starts an actor with OMP_NUM_THREADS = its num_cpus; the local scorer does the same, then restores."""
    import torch

    from curation.aesthetic import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_the_local_scan_pool_scans_every_batch_of_a_chunk_once(demo_corpus, tmp_path, aesthetic_cfg):
    """Chunks of several scoring batches, scanned by the pool: one manifest row per input, each hashed from
    its own file's bytes (hashlib over the file: the reference)."""
    scorer = dataclasses.replace(aesthetic_cfg, batch_size=3)
    cfg = demo_config(demo_corpus, tmp_path, scorer, executor="local", local_scan_processes=2)
    run(dataclasses.replace(cfg, chunk_size=1000))
    assert manifest_keys(tmp_path) == reference_keys(demo_corpus)
    rows = pq.read_table(tmp_path / "manifests" / "images", columns=["source", "sha256"]).to_pylist()
    hashed = [(r["source"], r["sha256"]) for r in rows if r["sha256"] is not None]
    assert len(hashed) > 3 * 2  # more than two batches' worth
    files = {source: Path(source.removeprefix("file:")).read_bytes() for source, _ in hashed}
    assert all(hashlib.sha256(files[source]).hexdigest() == sha for source, sha in hashed)


def test_listing_chunk_and_commit_tasks_declare_memory_from_their_plan(
    demo_corpus, tmp_path, aesthetic_cfg, monkeypatch
):
    """Issue 18 item 3: every task the job maps declares ``memory=`` (the worker base plus its plan's share)."""
    from tests.curation.test_scale import RecordingExecutor

    executor = RecordingExecutor()
    monkeypatch.setattr(pipeline, "make_executor", lambda cfg, guard: executor)
    monkeypatch.setattr(pipeline, "commit_if_whole", lambda work, target: False)  # commits as tasks
    run(demo_config(demo_corpus, tmp_path, aesthetic_cfg, report=False, executor="local"))
    before_scoring = ("write_listing_unit", "sort_records", "count_keys", "split_chunks", "_commit_task")
    assert set(before_scoring) <= set(executor.declared)
    assert all((executor.declared[n] or 0) > TASK_BASE_BYTES for n in before_scoring), executor.declared
    assert all(m is not None for m in executor.declared.values()), executor.declared  # the later phases too


LOCAL_IMPORTS = """
import sys
from curation.config import AestheticConfig, CurationConfig, DedupConfig
from curation.pipeline import check_before_start, run

scorer = AestheticConfig(clip_model=sys.argv[3], pretrained=None, min_score={})
cfg = CurationConfig(inputs=[sys.argv[1]], output=sys.argv[2], aesthetic=scorer, dedup=DedupConfig(semantic=False),
                     report=False, executor="local")
check_before_start(cfg)
print("before:", sorted(m for m in ("ray", "torch", "open_clip", "matplotlib") if m in sys.modules))
run(cfg)
print("after:", sorted(m for m in ("ray", "matplotlib") if m in sys.modules))
"""


def test_a_local_run_never_imports_ray_and_loads_no_model_before_it_starts(
    demo_corpus, tmp_path, aesthetic_cfg
):
    """Issue 18 item 8: the small job's start-up is not Ray's, and torch (seconds to import) loads only inside the
    run, beside its listing, never on the way to it (config, pipeline, checks)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "-c", LOCAL_IMPORTS, str(demo_corpus), str(tmp_path / "run"), aesthetic_cfg.clip_model]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "before: []" in result.stdout and "after: []" in result.stdout, result.stdout
