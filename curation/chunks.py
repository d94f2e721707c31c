"""Listing → records → work chunks, as partitioned tasks over Parquet (no row ever on the driver).

1. Each listing unit (``curation.sources.plan_listing``) is listed by one task into
   ``listing/unit-NNNNNN.parquet``, streamed in batches.
2. One DuckDB task keeps one record per key (the last input wins, as ``list_sources``) and sorts them by
   key into ``records.parquet``; another counts keys per key prefix.
3. The driver cuts the key space into chunks of ≤ ``chunk_size`` keys (``curation.keyspace``): the units
   of scan + score work that a rerun skips once committed.
4. Split tasks write each chunk's records to its own file (row groups of one scoring batch) and say which
   chunks are pending: not committed, or committed from other records (a digest of the chunk's records
   is kept in its commit marker).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation import keyspace
from curation.executor import TASK_BASE_BYTES
from curation.sources import ListingUnit, list_unit
from manifests.io import is_committed, marker_info

# A source record (see curation.sources): what scan tasks read.
RECORDS = pa.schema(
    [
        ("key", pa.string()), ("source", pa.string()), ("caption_orig", pa.string()), ("url", pa.string()),
        ("source_key", pa.string()), ("source_meta", pa.string()), ("download_status", pa.string()),
        ("reason", pa.string()), ("tar_offset", pa.int64()), ("tar_size", pa.int64()), ("data", pa.binary()),
    ]
)  # fmt: skip
LISTED = pa.schema([*RECORDS, pa.field("unit", pa.int32()), pa.field("position", pa.int64())])
LISTING_BATCH = 4096
RECORDS_ROW_GROUP = 65_536
# Declared task memory (``memory=``), the worker's base plus what each task holds:
# a listing task, one batch of listed records (paths, caption, JSON meta: ≤ 16 KiB each as a dict and as Arrow);
LISTING_TASK_BYTES = TASK_BASE_BYTES + LISTING_BATCH * (16 << 10)
# the sort task, DuckDB held to SORT_DUCKDB_BYTES (it spills to its temp_directory beyond);
SORT_DUCKDB_BYTES = 1 << 30
SORT_TASK_BYTES = TASK_BASE_BYTES + SORT_DUCKDB_BYTES + (128 << 20)  # + DuckDB's own buffers outside its limit
RECORD_BYTES = 2_048  # a split task: one record as Arrow, the slice and the Parquet write buffer of it
PREFIX_BYTES = 64  # count_keys: one prefix's (prefix, count) in DuckDB's hash table and the NumPy result


@dataclass(frozen=True)
class Chunk:
    """A range of keys scanned and scored as one committed unit."""

    range: keyspace.KeyRange
    num_rows: int
    digest: str  # of the chunk's records: a committed chunk from other records is redone
    pending: bool

    @property
    def name(self) -> str:
        return f"chunk-{self.range.name}"


def write_listing_unit(task: dict) -> int:
    """List one unit into ``task["out"]`` (Parquet, streamed); returns how many records."""
    unit: ListingUnit = task["unit"]
    out = Path(task["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    count, batch = 0, []
    with pq.ParquetWriter(out, LISTED, compression="lz4") as writer:
        for record in list_unit(unit, task["excluded"]):
            batch.append({**record, "unit": task["index"], "position": count})
            count += 1
            if len(batch) == LISTING_BATCH:
                writer.write_table(pa.Table.from_pylist(batch, schema=LISTED))
                batch = []
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=LISTED))
    return count


def sql_string(value: str) -> str:
    """A SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def sql_list(values: list[str]) -> str:
    return "[" + ", ".join(sql_string(v) for v in values) + "]"


def sort_records(task: dict) -> int:
    """One record per key, sorted by key, into ``records.parquet``: the last unit (then position) wins, but a
    failed download never wins over a record of the same URL that has bytes (a URL listed twice)."""
    con = duckdb.connect()
    try:
        con.execute(f"SET temp_directory = {sql_string(task['temp'])}")
        con.execute(f"SET memory_limit = '{SORT_DUCKDB_BYTES >> 20}MiB'")  # what the task declares
        con.execute(
            f"""
            COPY (SELECT * EXCLUDE (unit, position) FROM read_parquet({sql_list(task["listing"])})
                  QUALIFY row_number() OVER (
                      PARTITION BY key ORDER BY (download_status IS NOT NULL AND reason IS NOT NULL),
                                                unit DESC, position DESC) = 1
                  ORDER BY key)
            TO {sql_string(task["out"])} (FORMAT parquet, COMPRESSION lz4, ROW_GROUP_SIZE {RECORDS_ROW_GROUP})
            """
        )
        return con.execute(f"SELECT count(*) FROM read_parquet({sql_string(task['out'])})").fetchone()[0]
    finally:
        con.close()


def count_keys(task: dict) -> tuple[np.ndarray, np.ndarray]:
    """Keys of ``records.parquet`` per ``depth``-bit prefix (DuckDB streams the key column)."""
    depth = task["depth"]
    con = duckdb.connect()
    try:
        counts = con.execute(
            f"SELECT ('0x' || key[1:16])::UBIGINT >> {keyspace.KEY_BITS - depth} AS prefix, count(*) AS n "
            f"FROM read_parquet({sql_string(task['records'])}) GROUP BY prefix ORDER BY prefix"
        ).fetchnumpy()
    finally:
        con.close()
    return counts["prefix"].astype(np.uint64), counts["n"].astype(np.int64)


def plan_chunks(records: str, num_records: int, chunk_size: int, executor) -> list[keyspace.KeyRange]:
    """Chunk ranges of ≤ ``chunk_size`` keys over the sorted records (driver: counts only)."""
    if num_records == 0:
        return []
    depth = keyspace.fine_depth(num_records, chunk_size)
    while True:
        task = {"records": records, "depth": depth}
        memory = TASK_BASE_BYTES + min(1 << depth, num_records) * PREFIX_BYTES  # prefixes that occur
        prefixes, counts = executor.map(count_keys, [task], memory=memory)[0]
        try:
            return keyspace.plan_ranges(prefixes, counts, depth, chunk_size)
        except keyspace.DepthTooShallow:
            depth += 4


def records_digest(table: pa.Table) -> str:
    """A digest of a chunk's records (sorted by key): every field, inline bytes by their hash."""
    digest = hashlib.blake2b(digest_size=12)
    for row in table.to_pylist():
        data = row.pop("data")
        row["data"] = hashlib.sha256(data).hexdigest() if data is not None else None
        digest.update(json.dumps(row, sort_keys=True).encode())
    return digest.hexdigest()


def committed_digest(folder: Path, name: str) -> str | None:
    """The records digest in a committed chunk's marker, ``None`` when not committed."""
    info = marker_info(folder, name)
    return None if info is None else info.get("records_digest")


def split_chunks(task: dict) -> list[dict]:
    """For each chunk range of one task: count, records digest, pending flag; pending ones get a records file
    (row groups of ``batch_size``, so scoring batch ``j`` is row group ``j``)."""
    ranges: list[keyspace.KeyRange] = task["ranges"]
    lo, hi = ranges[0].lo, ranges[-1].hi
    filters = [("key", ">=", lo)] + ([("key", "<", hi)] if hi else [])
    table = pq.read_table(task["records"], filters=filters)
    bits = keyspace.key_bits(table["key"])
    starts = np.searchsorted(bits, np.array([r.start for r in ranges], np.uint64))
    ends = np.append(starts[1:], len(bits))
    scored, embeddings = Path(task["scored"]), task["embeddings"]
    out = []
    for key_range, start, end in zip(ranges, starts, ends, strict=True):
        rows = table.slice(start, end - start)
        chunk_name = f"chunk-{key_range.name}"
        digest = records_digest(rows)
        pending = committed_digest(scored, chunk_name) != digest or (
            embeddings is not None and not is_committed(embeddings, chunk_name)
        )
        if pending:
            path = Path(task["chunks"]) / f"{chunk_name}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(rows, path, compression="lz4", row_group_size=task["batch_size"])
        out.append({"range": key_range, "num_rows": int(end - start), "digest": digest, "pending": pending})
    return out


def chunk_tasks(ranges: list[keyspace.KeyRange], rows_per_task: int, common: dict) -> list[dict]:
    """Consecutive chunk ranges grouped into split tasks of about ``rows_per_task`` keys (by expectation)."""
    groups, current = [], []
    for key_range in ranges:
        current.append(key_range)
        if len(current) * common["chunk_size"] >= rows_per_task:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return [{**common, "ranges": group} for group in groups]
