"""Scan + score on plain Ray actors (issue 18, item 9): a scorer killed mid-run is replaced and the run's manifest and
shards are an uninterrupted run's; the chunk plan never rides in a constructor, however large it grows."""

from __future__ import annotations

import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curation import pipeline
from curation.aesthetic import clip_image_size
from curation.config import CurationConfig
from curation.pipeline import ChunkPlan, ChunkWork, CommitTarget, run
from manifests.actors import INLINE_BYTES
from tests.conftest import dies_once
from tests.curation.conftest import demo_config
from tests.curation.test_worker_commits import manifest_rows


def test_a_scorer_killed_mid_run_is_replaced_and_the_run_equals_a_clean_one(
    curated, demo_corpus, tmp_path, aesthetic_cfg, monkeypatch
):
    """The first scoring call of the run SIGKILLs its actor (as the OOM killer would) before it writes anything:
    Ray restarts the actor and retries the call; manifest rows (scores, hashes, reasons, shards) and shard bytes
    equal the session's clean Ray run."""
    clean, summary = curated
    assert summary["executor"] == "ray"
    flag = str(tmp_path / "scorer-died")

    monkeypatch.setattr(pipeline, "ScoreAndCommit", dies_once(pipeline.ScoreAndCommit, flag))
    out = tmp_path / "run"
    assert run(demo_config(demo_corpus, out, aesthetic_cfg, executor="ray"))["executor"] == "ray"
    assert Path(flag).exists()  # not vacuous: a scorer did die
    assert manifest_rows(out) == manifest_rows(clean)
    shards = sorted((clean / "shards" / "curated").rglob("*.tar"))
    assert shards and [p.read_bytes() for p in shards] == [(out / p.relative_to(clean)).read_bytes() for p in shards]


def test_a_plan_too_large_to_inline_reaches_the_scorers_as_method_arguments(tmp_path, aesthetic_cfg, ray_cluster):
    """400 one-row chunks: a plan Ray could not inline (> 100 KiB pickled) if it rode in the scorers' constructor
    (as it did under Ray Data); every chunk is scored and committed by the actors."""
    num_chunks = 400
    records = pa.table(
        {"key": ["k0"], "source": ["missing://k0"], "reason": ["gone"], "tar_offset": pa.nulls(1, pa.int64()),
         "tar_size": pa.nulls(1, pa.int64()), "data": pa.nulls(1, pa.binary())}
    )  # fmt: skip
    folder = tmp_path / ("chunks-" + "x" * 150)  # a long path, as on a cluster's shared mount
    folder.mkdir()
    works = tuple(
        ChunkWork(f"chunk-{i:04d}", str(folder / f"chunk-{i:04d}.parquet"), 1, f"{i:064x}") for i in range(num_chunks)
    )
    for work in works:
        pq.write_table(records, work.records)
    target = CommitTarget(
        scored=str(tmp_path / "scored"), embeddings=None, batches=str(tmp_path / "batches"), batch_size=4
    )
    plan = ChunkPlan(works=works, target=target)
    assert len(pickle.dumps(plan)) > INLINE_BYTES  # not vacuous
    cfg = CurationConfig(inputs=["unused"], output=str(tmp_path), aesthetic=aesthetic_cfg)
    counts = list(pipeline._scan_on_ray(plan, cfg, clip_size=clip_image_size(aesthetic_cfg.clip_model)))
    assert sorted(c.chunk for c in counts) == [w.name for w in works]
    assert all(target.is_committed(w) for w in works)
