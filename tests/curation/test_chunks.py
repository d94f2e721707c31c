"""Listing → records → chunks: one record per key, and which chunks a rerun redoes."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from curation import chunks
from curation.executor import LocalExecutor
from curation.sources import key_for


def listed(unit: int, rows: list[dict]) -> pa.Table:
    full = [
        {**{f: None for f in chunks.RECORDS.names}, **row, "unit": unit, "position": i}
        for i, row in enumerate(rows)
    ]
    return pa.Table.from_pylist(full, schema=chunks.LISTED)


def test_one_record_per_key_last_input_wins_but_never_a_failed_download(tmp_path):
    url = "http://example.test/a.jpg"
    a, b, c = key_for("file:///x/a.jpg"), key_for(url), key_for("file:///x/c.jpg")
    first = listed(0, [
        {"key": a, "source": "file:///x/a.jpg", "caption_orig": "old"},
        {"key": b, "source": "file:///shard0.tar#0.jpg", "url": url, "download_status": "success"},
        {"key": c, "source": "file:///x/c.jpg"},
    ])  # fmt: skip
    second = listed(1, [
        {"key": a, "source": "file:///x/a.jpg", "caption_orig": "new"},
        {"key": b, "source": url, "url": url, "download_status": "failed_to_download", "reason": "download_error: 404"},
    ])  # fmt: skip
    paths = [str(tmp_path / "u0.parquet"), str(tmp_path / "u1.parquet")]
    pq.write_table(first, paths[0])
    pq.write_table(second, paths[1])
    out = tmp_path / "records.parquet"
    assert chunks.sort_records({"listing": paths, "out": str(out), "temp": str(tmp_path / "tmp")}) == 3
    records = pq.read_table(out).to_pylist()
    assert [r["key"] for r in records] == sorted([a, b, c])
    by_key = {r["key"]: r for r in records}
    assert by_key[a]["caption_orig"] == "new"  # the later input wins
    assert by_key[b]["reason"] is None and by_key[b]["download_status"] == "success"


def test_a_chunk_is_pending_until_committed_with_the_same_records(tmp_path):
    keys = sorted(key_for(f"file:///x/{i}.jpg") for i in range(40))
    records = pa.Table.from_pylist([{**{f: None for f in chunks.RECORDS.names}, "key": k, "source": k} for k in keys],
                                   schema=chunks.RECORDS)  # fmt: skip
    path = tmp_path / "records.parquet"
    pq.write_table(records, path)
    ranges = chunks.plan_chunks(str(path), len(keys), 8, LocalExecutor())
    common = {"records": str(path), "scored": str(tmp_path / "scored"), "embeddings": None,
              "chunks": str(tmp_path / "chunks"), "batch_size": 4, "chunk_size": 8}  # fmt: skip
    tasks = chunks.chunk_tasks(ranges, 16, common)
    first = [c for t in tasks for c in chunks.split_chunks(t)]
    assert sum(c["num_rows"] for c in first) == 40 and all(c["pending"] for c in first)
    assert all(1 <= c["num_rows"] <= 8 for c in first)
    done = first[0]
    from manifests.io import mark_committed

    mark_committed(tmp_path / "scored", f"chunk-{done['range'].name}", {"records_digest": done["digest"]})
    again = [c for t in tasks for c in chunks.split_chunks(t)]
    assert [c["pending"] for c in again] == [False] + [True] * (len(again) - 1)
    # A changed record (a new caption) makes its chunk pending again.
    changed = records.set_column(2, "caption_orig", pa.array(["x"] + [None] * 39, pa.string()))
    pq.write_table(changed, path)
    assert [c for t in tasks for c in chunks.split_chunks(t)][0]["pending"]
    # Row group j of a pending chunk's records file is scoring batch j.
    chunk_file = pq.ParquetFile(tmp_path / "chunks" / f"chunk-{first[1]['range'].name}.parquet")
    assert (
        chunk_file.metadata.num_rows == first[1]["num_rows"]
        and chunk_file.metadata.row_group(0).num_rows <= 4
    )
