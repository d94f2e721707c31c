"""Post-scoring phases over partitioned Parquet: thresholds → dedup → shard plan → shards → manifest.

Input: the committed scored chunks (key ranges, in key order), grouped into partitions of about
``rows_per_partition`` rows. Each phase is a top-level function over one plan item (a partition, a hash
bucket, a band of the near search, a shard) run by an executor (``curation.executor``); it reads and
writes files under the run's scratch folder and returns counts. The driver holds plans and counts only.

    1 gate        per partition  aesthetic thresholds; kept rows hash-partitioned by sha256 and by pHash
    2 exact       per bucket     same sha256 → star edges
      phash       per bucket     same pHash → star edges; the bucket's distinct pHash values
      near        per band part  multi-index hashing over all distinct values (curation.dedup)
      semantic    coarse k-means (1 task), assignment to groups per partition; per group: its own k-means
                  into clusters, pairs within each cluster (curation.semdedup)
      resolve     1 task         rows that match another → components → greedy direct-match keep rule
                                 (curation.dedup.keepers) → dups.parquet (key, dup_of, reason)
    3 finalize    per partition  final status of every row; kept-row counts per (tier, ext, key prefix)
      (driver)                   shard plan: key-range trie leaves of ≤ samples_per_shard rows per group
    4 digest      per partition  content digest of each shard's rows (order-free sums of row hashes)
      (driver)                   shard names: <tier>-<ext>-<range>_<digest>
    5 stage       per partition  shard rows + the manifest part, staged in scratch
    6 shards      per shard      missing shards only (a name is its content: a committed one is done)
    7 publish     driver         manifest parts renamed into place; then stale shards/parts removed

A shard's name is its key range plus a digest of its content, so a rerun that sees added inputs writes
new shards for the ranges that changed and keeps the others, and the manifest names exactly the shard
each kept row is in. Shards are written before the manifest parts that name them, and shards no longer
named are removed only after the new manifest is in place.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation import dedup, keyspace, semdedup
from curation.chunks import sql_list
from curation.executor import TASK_BASE_BYTES, Executor, peak_rss_mib
from curation.sources import read_bytes
from curation.stages import sha256
from manifests import IMAGES, ManifestWriter
from manifests.io import is_committed, mark_committed, marker_info, unmark_committed
from manifests.schema import KEPT, REJECTED
from manifests.tars import FORMAT_EXTENSIONS, json_bytes, write_shard

log = logging.getLogger(__name__)

SHARDS_DIR = "shards/curated"
IMAGES_DIR = "manifests/images"
# How a row's bytes are read again at shard time (curation.sources.open_source), kept with its scores.
HOW_TO_READ = [
    pa.field("tar_offset", pa.int64()),
    pa.field("tar_size", pa.int64()),
    pa.field("data", pa.binary()),
]
SCORED = pa.schema([*IMAGES, *HOW_TO_READ])  # a committed scored chunk
SAMPLE_JSON_FIELDS = (
    "key", "width", "height", "format", "tier", "aesthetic", "caption_orig", "source", "url", "sha256",
)  # fmt: skip
KEY_SHA = pa.schema([("key", pa.string()), ("sha256", pa.string())])
KEY_PHASH = pa.schema([("key", pa.string()), ("phash", pa.int64())])
ROWS_PER_BUCKET = 1_000_000  # rows per hash bucket of the dedup shuffles
# Embeddings per semantic group (a coarse k-means cell): ~1.5 GiB of task memory at 768-d
# (EMBEDDING_BYTES_PER_VALUE); its clusters are found inside the group's task (curation.semdedup, two levels).
SEMANTIC_ROWS_PER_GROUP = 250_000
ENTRIES_PER_NEAR_TASK = 8_000_000  # index entries one near-search task sorts (~200 MB at its peak)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing of pHash values into buckets

# Task memory declared to Ray (``memory=``, bytes), from the plan: a worker's own footprint plus what the
# task holds per row it reads. Upper bounds of the worker peak RSS measured by bench/bench_curation_scale.py
# (docs/benchmarks.md), so that Ray never packs more tasks on a node than its memory holds.
ROW_BYTES = (
    2_048  # one scored row as Arrow and the copies a partition task makes of it (filters, joins, sorts)
)
DEDUP_ROW_BYTES = 256  # one (key, hash) row of a dedup bucket with DuckDB's window or group by
RESOLVE_ROW_BYTES = 1_024  # one row of keepers' walk (Arrow, NumPy and Python lists, its dicts)
EMBEDDING_BYTES_PER_VALUE = 2 + 2 + 4  # fp16 Arrow list (and its sorted copy, briefly), the float32 matrix
MAX_EMBEDDING_DIM = 1280  # bound before the first embedding is read (OpenCLIP ViT-bigG; ViT-L/14 is 768)


@dataclass(frozen=True)
class ScoredPart:
    """One committed scored chunk: a Parquet file of SCORED rows sorted by key, in ``[lo, hi)``."""

    path: str
    lo: str
    hi: str | None
    num_rows: int
    embeddings: str | None = None  # its clip_embeddings part, when the run keeps embeddings


@dataclass(frozen=True)
class Partition:
    """Consecutive scored chunks, processed by one task per phase; ``index`` names its manifest part."""

    index: int
    parts: tuple[ScoredPart, ...]

    @property
    def lo(self) -> str:
        return self.parts[0].lo

    @property
    def hi(self) -> str | None:
        return self.parts[-1].hi

    @property
    def num_rows(self) -> int:
        return sum(p.num_rows for p in self.parts)

    @property
    def name(self) -> str:
        return f"p-{self.index:05d}"


@dataclass(frozen=True)
class PostConfig:
    """What the post-scoring phases need from ``CurationConfig``."""

    min_score: dict[str, float]
    max_hamming: int | None  # None: no pHash near-duplicates
    phash_splits: int | None
    semantic_threshold: float | None  # None: no semantic dedup
    semantic_cluster_size: int
    samples_per_shard: int
    rows_per_partition: int
    write_shards: bool = True

    def __post_init__(self) -> None:
        if self.max_hamming is not None:
            dedup.require_exact(self.max_hamming, self.phash_splits)


@dataclass
class PostResult:
    """Counts and plans the driver keeps: no rows."""

    counts: dict = field(default_factory=dict)
    shards: list[dict] = field(default_factory=list)  # {"shard", "tier", "num_rows"}
    num_parts: int = 0
    shards_written: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # wall seconds per phase, on the driver
    task_seconds: dict[str, float] = field(default_factory=dict)  # summed inside tasks, per sub-step
    worker_peak_rss_mib: float = 0.0
    semantic_dim: int | None = None  # the embeddings' width (not a count: kept out of ``counts``)


def plan_partitions(parts: list[ScoredPart], rows_per_partition: int) -> list[Partition]:
    """Consecutive chunks grouped until a group holds ``rows_per_partition`` rows."""
    partitions, current, rows = [], [], 0
    for part in parts:
        if current and rows + part.num_rows > rows_per_partition:
            partitions.append(Partition(len(partitions), tuple(current)))
            current, rows = [], 0
        current.append(part)
        rows += part.num_rows
    if current:
        partitions.append(Partition(len(partitions), tuple(current)))
    return partitions


def _power_of_two_at_least(value: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1.0, value))))


def _read(paths: list[str], columns: list[str] | None = None, filters=None) -> pa.Table | None:
    """Parquet files as one table (read together, threaded; row order across files not guaranteed);
    ``None`` for no files."""
    if len(paths) == 1:
        return pq.read_table(paths[0], columns=columns, filters=filters)
    if not paths:
        return None
    return pq.ParquetDataset(paths, filters=filters, partitioning=None).read(columns=columns)


def _write(table: pa.Table, path: Path, **options) -> None:
    """A scratch file (read once or twice, then deleted): fast compression."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="lz4", **options)


def _glob(folder: Path, pattern: str = "*.parquet") -> list[str]:
    return sorted(str(p) for p in folder.glob(pattern))


def _rss(result: dict) -> dict:
    return {**result, "peak_rss_mib": peak_rss_mib()}


def task_memory(rows: int, bytes_per_row: int, *, extra: int = 0) -> int:
    """Bytes a task declares: the worker's base, ``rows`` × ``bytes_per_row``, and ``extra``."""
    return TASK_BASE_BYTES + int(rows) * bytes_per_row + extra


# ----------------------------------------------------------------------------------------------------
# 1 gate


def apply_gate(table: pa.Table, min_score: dict[str, float]) -> pa.Table:
    """Kept rows below their tier's aesthetic threshold become ``low_aesthetic`` rejections."""
    if not min_score or table.num_rows == 0:
        return table
    kept = pc.equal(table["status"], KEPT)
    unscored = pc.and_(kept, pc.is_null(table["aesthetic"]))
    assert not pc.any(unscored).as_py(), "every kept row must have been scored"
    threshold = pa.nulls(table.num_rows, pa.float32())
    for tier, score in min_score.items():
        threshold = pc.if_else(pc.equal(table["tier"], tier), pa.scalar(score, pa.float32()), threshold)
    low = pc.fill_null(pc.and_(kept, pc.less(table["aesthetic"], threshold)), False)
    return _reject(table, low, "low_aesthetic")


def _reject(table: pa.Table, mask: pa.Array, reason: str | pa.Array) -> pa.Table:
    for name, value in (("status", REJECTED), ("reason", reason), ("tier", None)):
        column = table[name]
        replacement = (
            value if isinstance(value, pa.Array | pa.ChunkedArray) else pa.scalar(value, column.type)
        )
        table = table.set_column(
            table.schema.get_field_index(name), name, pc.if_else(mask, replacement, column)
        )
    return table


def extensions(formats: pa.ChunkedArray | pa.Array) -> pa.Array:
    """The shard member extension of each kept row's image format (``manifests.tars.extension_for``)."""
    names = list(FORMAT_EXTENSIONS)
    index = pc.index_in(formats, value_set=pa.array(names))
    if index.null_count:
        unknown = set(pc.filter(formats, pc.is_null(index)).to_pylist())
        raise ValueError(f"no shard extension for image formats {sorted(map(str, unknown))}")
    return pc.take(pa.array(list(FORMAT_EXTENSIONS.values())), index)


def _hash_bucket(values: np.ndarray, num_buckets: int) -> np.ndarray:
    if num_buckets == 1:
        return np.zeros(len(values), np.int64)
    return ((values * _GOLDEN) >> np.uint64(64 - int(math.log2(num_buckets)))).astype(np.int64)


def gate_partition(task: dict) -> dict:
    """Apply thresholds to one partition; write its kept rows into the sha256 and pHash hash buckets."""
    partition, scratch, buckets = task["partition"], Path(task["scratch"]), task["num_buckets"]
    columns = ["key", "status", "reason", "tier", "aesthetic", "width", "height", "sha256", "phash"]
    table = apply_gate(_read([p.path for p in partition.parts], columns), task["min_score"])
    kept = table.filter(pc.equal(table["status"], KEPT))
    pixels = pc.multiply(kept["width"].cast(pa.int64()), kept["height"].cast(pa.int64()))
    attributes = {"key": kept["key"], "pixels": pixels, "aesthetic": kept["aesthetic"], "sha256": kept["sha256"],
                  "phash": kept["phash"]}  # fmt: skip
    _write(pa.table(attributes), scratch / "attributes" / f"{partition.name}.parquet")
    sha = kept.filter(pc.is_valid(kept["sha256"])).select(["key", "sha256"])
    by_sha = _hash_bucket(keyspace.key_bits(sha["sha256"]), buckets)
    hashed = kept.filter(pc.is_valid(kept["phash"])).select(["key", "phash"])
    by_phash = _hash_bucket(dedup.as_unsigned(hashed["phash"].to_numpy()), buckets)
    for name, rows, bucket_of in (("by_sha", sha, by_sha), ("by_phash", hashed, by_phash)):
        for bucket in np.unique(bucket_of):
            _write(
                rows.filter(pa.array(bucket_of == bucket)),
                scratch / name / f"b={bucket:04d}" / f"{partition.name}.parquet",
            )
    low = pc.sum(pc.equal(table["reason"], "low_aesthetic")).as_py() or 0
    return _rss({"rows": table.num_rows, "kept": kept.num_rows, "low_aesthetic": low})


# ----------------------------------------------------------------------------------------------------
# 2 dedup


def exact_bucket(task: dict) -> dict:
    """Star edges of the rows of one sha256 bucket that share a hash."""
    scratch, bucket = Path(task["scratch"]), task["bucket"]
    rows = _read(_glob(scratch / "by_sha" / f"b={bucket:04d}"))
    rows = KEY_SHA.empty_table() if rows is None else rows
    edges = dedup.exact_edges(rows)
    _write(edges, scratch / "edges" / f"sha-{bucket:04d}.parquet")
    return _rss({"exact_edges": edges.num_rows})


def phash_bucket(task: dict) -> dict:
    """Star edges of identical pHashes in one bucket, and the bucket's distinct values."""
    scratch, bucket = Path(task["scratch"]), task["bucket"]
    rows = _read(_glob(scratch / "by_phash" / f"b={bucket:04d}"))
    rows = KEY_PHASH.empty_table() if rows is None else rows
    unique, star = dedup.unique_hashes(rows)
    _write(unique, scratch / "unique" / f"{bucket:04d}.parquet")
    _write(star, scratch / "edges" / f"phash-{bucket:04d}.parquet")
    return _rss({"same_phash_edges": star.num_rows, "distinct_phash": unique.num_rows})


def distinct_phashes(scratch: Path) -> np.ndarray:
    """Every distinct pHash value of the kept rows, sorted (uint64)."""
    paths = _glob(scratch / "unique")
    if not paths:
        return np.zeros(0, np.uint64)
    return np.sort(dedup.as_unsigned(_read(paths, ["phash"])["phash"].to_numpy()))


def near_band(task: dict) -> dict:
    """Near pHash value pairs found in one partition of one band (multi-index hashing)."""
    scratch = Path(task["scratch"])
    values = distinct_phashes(scratch)
    band, part = task["band"], task["part"]
    pairs, candidates = dedup.near_value_pairs(
        values, max_hamming=task["max_hamming"], band=band, part=part, part_bits=task["part_bits"]
    )
    name = f"near-{band.split:02d}-{band.shift:02d}-{part:04d}.parquet"
    _write(dedup.value_pair_table(values, pairs), scratch / "near" / name)
    return _rss({"near_candidates": candidates, "near_pairs": len(pairs)})


def semantic_train(task: dict) -> dict:
    """Coarse k-means centroids (one per group) from the first ``sample_rows`` kept rows in key order (a
    uniform sample)."""
    started = time.perf_counter()
    scratch, need = Path(task["scratch"]), task["sample_rows"]
    samples, have = [], 0
    for partition in task["partitions"]:
        if have >= need:
            break
        keys = _read([str(scratch / "attributes" / f"{partition.name}.parquet")], ["key"])["key"]
        embedded = _kept_embeddings(partition, keys)
        samples.append(semdedup.embedding_matrix(embedded["embedding"])[: need - have])
        have += len(samples[-1])
    sample = np.concatenate([s for s in samples if len(s)]) if have else np.zeros((0, 0), np.float32)
    centroids = semdedup.train_centroids(sample, task["groups"]) if len(sample) else sample
    np.save(scratch / "centroids.npy", centroids)
    return _rss({"semantic_sample": len(sample), "semantic_groups": len(centroids),
                 "dim": sample.shape[1] if len(sample) else 0, "seconds": time.perf_counter() - started})  # fmt: skip


def _kept_embeddings(partition: Partition, keys: pa.ChunkedArray) -> pa.Table:
    paths = [p.embeddings for p in partition.parts if p.embeddings]
    table = _read(paths, ["key", "embedding"])
    if table is None or table.num_rows == 0:
        return pa.table({"key": pa.array([], pa.string()), "embedding": pa.array([], pa.list_(pa.float16()))})
    return table.filter(pc.is_in(table["key"], value_set=keys.combine_chunks())).sort_by("key")


def semantic_assign(task: dict) -> dict:
    """Each kept row of one partition to its nearest coarse centroid: written into that group's folder."""
    started = time.perf_counter()
    scratch, partition = Path(task["scratch"]), task["partition"]
    keys = _read([str(scratch / "attributes" / f"{partition.name}.parquet")], ["key"])["key"]
    embedded = _kept_embeddings(partition, keys)
    matrix = semdedup.embedding_matrix(embedded["embedding"])
    if len(matrix) == 0:
        return _rss({"semantic_assigned": 0, "group_rows": {}, "seconds": time.perf_counter() - started})
    group_of = semdedup.assign(matrix, np.load(scratch / "centroids.npy"))
    group_rows = {int(g): int(n) for g, n in zip(*np.unique(group_of, return_counts=True), strict=True)}
    for group in group_rows:
        _write(
            embedded.filter(pa.array(group_of == group)),
            scratch / "semantic" / f"g={group:04d}" / f"{partition.name}.parquet",
        )
    return _rss({"semantic_assigned": len(matrix), "group_rows": group_rows,
                 "seconds": time.perf_counter() - started})  # fmt: skip


def semantic_group(task: dict) -> dict:
    """One group: its own k-means into clusters of ~``cluster_size``, then pairs above the cosine threshold
    within each cluster."""
    started = time.perf_counter()
    scratch, group = Path(task["scratch"]), task["group"]
    table = _read(_glob(scratch / "semantic" / f"g={group:04d}"))
    if table is None or table.num_rows == 0:
        return _rss({"semantic_pairs": 0, "kmeans_seconds": 0.0, "search_seconds": 0.0})
    table = table.sort_by("key")  # key order: the group's k-means sample and labels ignore the partitioning
    keys, matrix = table["key"], semdedup.embedding_matrix(table["embedding"])
    del table  # the fp16 column: the matrix and its reordered copy below fit EMBEDDING_BYTES_PER_VALUE
    labels = semdedup.cluster_labels(matrix, task["cluster_size"])
    order = np.argsort(labels, kind="stable")  # by cluster, then key: semantic_edges' order, so no copy there
    keys, matrix, labels = keys.take(pa.array(order)), matrix[order], labels[order]
    clustered = time.perf_counter()
    edges = semdedup.semantic_edges(keys, matrix, labels, task["threshold"])
    _write(edges, scratch / "semantic_pairs" / f"{group:04d}.parquet")
    sizes = np.bincount(labels).astype(np.int64)
    return _rss({"semantic_pairs": edges.num_rows, "semantic_clusters": int(np.count_nonzero(sizes)),
                 "semantic_compared": int(np.sum(sizes * (sizes + 1) // 2)),  # in-cluster pairs: Σ size²/2
                 "kmeans_seconds": clustered - started,
                 "search_seconds": time.perf_counter() - clustered})  # fmt: skip


def resolve_duplicates(task: dict) -> dict:
    """Every row that may match another (a shared sha256 or pHash, a near pHash value, a semantic pair) →
    ``dedup.keepers`` (greedy in keeper order, direct matches only) → ``dups.parquet`` (key, dup_of, reason)."""
    scratch = Path(task["scratch"])
    con = duckdb.connect()
    try:
        star_files, near_files = _glob(scratch / "edges"), _glob(scratch / "near")
        semantic_files = _glob(scratch / "semantic_pairs")
        near = (
            con.sql(f"SELECT DISTINCT u, v FROM read_parquet({sql_list(near_files)})").to_arrow_table()
            if near_files
            else dedup.NEAR.empty_table()
        )
        semantic = (
            con.sql(f"SELECT a, b, similarity FROM read_parquet({sql_list(semantic_files)})").to_arrow_table()
            if semantic_files
            else dedup.SEMANTIC.empty_table()
        )
        con.register("near", near)
        con.register("semantic", semantic)
        matched = [f"SELECT a AS key FROM read_parquet({sql_list(star_files)})",
                   f"SELECT b FROM read_parquet({sql_list(star_files)})"] if star_files else []  # fmt: skip
        matched += ["SELECT a FROM semantic", "SELECT b FROM semantic"]
        attributes = _glob(scratch / "attributes")
        # pHash off: equal hashes are no match either (the phash column is read as null).
        phash = "phash" if task["max_hamming"] is not None else "NULL::BIGINT AS phash"
        nodes = (
            con.sql(
                f"SELECT key, pixels, aesthetic, sha256, {phash} FROM read_parquet({sql_list(attributes)}) "
                f"WHERE key IN ({' UNION '.join(matched)}) OR phash IN (SELECT u FROM near UNION SELECT v FROM near)"
            ).to_arrow_table()
            if attributes
            else None
        )
    finally:
        con.close()
    if nodes is None:
        dups = dedup.DUPLICATES.empty_table()
    else:
        dups = dedup.keepers(nodes, near.cast(dedup.NEAR), semantic.cast(dedup.SEMANTIC))
    _write(dups, scratch / "dups.parquet", row_group_size=65_536)
    tests = Counter(
        reason.split(" ")[1] for reason in dups["reason"].to_pylist()
    )  # duplicate: <test> <value>
    return _rss(
        {
            "resolve_rows": 0 if nodes is None else nodes.num_rows,
            "near_value_pairs": near.num_rows,
            "duplicates": dups.num_rows,
            **{f"duplicates_{test}": n for test, n in tests.items()},
        }
    )


# ----------------------------------------------------------------------------------------------------
# 3 finalize, 4 digest, 5 stage


def final_rows(partition: Partition, scratch: Path, min_score: dict[str, float]) -> pa.Table:
    """Every row of one partition with its final status (thresholds, then duplicates) and its shard
    extension (kept rows); recomputed where needed rather than stored."""
    table = apply_gate(_read([p.path for p in partition.parts]).sort_by("key"), min_score)
    filters = [("key", ">=", partition.lo)] + ([("key", "<", partition.hi)] if partition.hi else [])
    dups = pq.read_table(scratch / "dups.parquet", filters=filters)
    if dups.num_rows:
        dups = dups.rename_columns(["key", "dup_of", "dup_reason"])
        table = table.drop_columns(["dup_of"]).join(dups, "key", join_type="left outer").sort_by("key")
        table = _reject(table, pc.is_valid(table["dup_of"]), table["dup_reason"]).select(SCORED.names)
    kept = pc.equal(table["status"], KEPT)
    ext = np.full(table.num_rows, None, object)
    ext[np.flatnonzero(kept.to_numpy(zero_copy_only=False))] = extensions(
        table.filter(kept)["format"]
    ).to_pylist()
    return table.append_column("ext", pa.array(ext, pa.string()))


def finalize_partition(task: dict) -> dict:
    """Final rows of one partition (kept in scratch for phases 4 and 5); kept-row counts per (tier, ext,
    key prefix), for the shard plan."""
    partition, scratch = task["partition"], Path(task["scratch"])
    table = final_rows(partition, scratch, task["min_score"])
    _write(table, scratch / "final" / f"{partition.name}.parquet")
    return _rss(
        {"prefix_counts": _prefix_counts(table.filter(pc.equal(table["status"], KEPT)), task["depth"])}
    )


def _prefix_counts(kept: pa.Table, depth: int) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    bits = keyspace.key_bits(kept["key"])
    groups = pc.binary_join_element_wise(kept["tier"], kept["ext"], "/").to_numpy(zero_copy_only=False)
    return {
        tuple(group.split("/")): keyspace.prefix_counts(bits[groups == group], depth)
        for group in sorted(set(groups.tolist()))
    }


@dataclass(frozen=True)
class ShardPlan:
    """The shard ranges of every (tier, ext) group: ``leaves[g]`` sorted, ``ids[g]`` their plan indices."""

    leaves: dict[tuple[str, str], list[keyspace.KeyRange]]
    ids: dict[tuple[str, str], list[int]]

    def assign(self, kept: pa.Table) -> np.ndarray:
        """The plan index of each kept row's shard."""
        bits = keyspace.key_bits(kept["key"])
        groups = pc.binary_join_element_wise(kept["tier"], kept["ext"], "/").to_numpy(zero_copy_only=False)
        out = np.full(kept.num_rows, -1, np.int64)
        for group in sorted(set(groups.tolist())):
            rows = np.flatnonzero(groups == group)
            tier, ext = group.split("/")
            leaf = keyspace.leaf_index(self.leaves[(tier, ext)], bits[rows])
            out[rows] = np.asarray(self.ids[(tier, ext)], np.int64)[leaf]
        assert (out >= 0).all(), "every kept row lies in a shard of the plan"
        return out


def digest_partition(task: dict) -> dict:
    """Per shard of the plan met in this partition: row count and order-free sums of row hashes."""
    table = pq.read_table(Path(task["scratch"]) / "final" / f"{task['partition'].name}.parquet")
    kept = table.filter(pc.equal(table["status"], KEPT))
    if kept.num_rows == 0:
        return _rss({"digests": {}, "shard_bytes": {}})
    fields = kept.select([*SAMPLE_JSON_FIELDS, "num_bytes"]).append_column(
        "shard", pa.array(task["plan"].assign(kept))
    )
    con = duckdb.connect()
    try:
        con.register("rows", fields)
        # One string per row from every field its JSON sidecar holds; DuckDB's float text is exact enough
        # to change whenever the float changes.
        rows = con.execute(
            """
            WITH h AS (SELECT shard, num_bytes, concat_ws(chr(31), key, width, height, format, tier, aesthetic::VARCHAR,
                                           coalesce(caption_orig, chr(0)), source, coalesce(url, chr(0)), sha256) AS s
                       FROM rows)
            SELECT shard, count(*), sum(md5_number_lower(s))::VARCHAR, sum(num_bytes) FROM h GROUP BY shard
            """
        ).fetchall()
    finally:
        con.close()
    return _rss(
        {
            "digests": {shard: (n, int(total)) for shard, n, total, _ in rows},
            "shard_bytes": {shard: int(size or 0) for shard, _, _, size in rows},
        }
    )


def shard_names(plan: ShardPlan, digests: list[dict[int, tuple[int, int]]]) -> list[dict]:
    """``{"shard", "tier", "num_rows"}`` per plan index: range name + digest of its content (row count and
    the sum of its rows' 64-bit md5s: independent of row order and of how partitions cut the range)."""
    totals: dict[int, tuple[int, int]] = {}
    for partial in digests:
        for shard, (n, total) in partial.items():
            count, hashes = totals.get(shard, (0, 0))
            totals[shard] = (count + n, (hashes + total) % 2**64)
    out = [None] * len(totals)
    for (tier, ext), leaves in plan.leaves.items():
        for leaf, shard in zip(leaves, plan.ids[(tier, ext)], strict=True):
            n, hashes = totals[shard]
            digest = hashlib.blake2b(f"{n}:{hashes}".encode(), digest_size=5).hexdigest()
            out[shard] = {"shard": f"{SHARDS_DIR}/{tier}/{tier}-{ext}-{leaf.name}_{digest}.tar", "tier": tier,
                          "num_rows": n}  # fmt: skip
    return out


def stage_partition(task: dict) -> dict:
    """The partition's manifest part and its kept rows' shard rows, staged in scratch."""
    partition, scratch = task["partition"], Path(task["scratch"])
    table = pq.read_table(scratch / "final" / f"{partition.name}.parquet")
    kept = pc.equal(table["status"], KEPT)
    names = pa.array([s["shard"] for s in task["shards"]], pa.string())
    shard = pa.nulls(table.num_rows, pa.string())
    if pc.any(kept).as_py():
        index = np.full(table.num_rows, -1, np.int64)
        index[np.flatnonzero(kept.to_numpy(zero_copy_only=False))] = task["plan"].assign(table.filter(kept))
        shard = pc.if_else(kept, pc.take(names, pa.array(np.maximum(index, 0))), shard)
    table = table.set_column(table.schema.get_field_index("shard"), "shard", shard)
    ManifestWriter(scratch / "manifest", "images").write(
        table.select(IMAGES.names), f"part-{partition.index:05d}"
    )
    if task["write_shards"]:
        to_shard = table.filter(kept).select(
            ["shard", *SAMPLE_JSON_FIELDS, "ext", *[f.name for f in HOW_TO_READ]]
        )
        _write(
            to_shard.sort_by([("shard", "ascending"), ("key", "ascending")]),
            scratch / "to_shard" / f"{partition.name}.parquet",
            row_group_size=1024,  # about a shard: each shard task reads its own row groups, not the partition
        )
    reasons = pc.list_element(
        pc.split_pattern(pc.filter(table["reason"], pc.invert(kept)), ":", max_splits=1), 0
    )
    return _rss(
        {
            "rows": table.num_rows,
            "rejected_per_reason": dict(Counter(reasons.to_pylist())),
            "kept_per_tier": dict(Counter(pc.filter(table["tier"], kept).to_pylist())),
        }
    )


# ----------------------------------------------------------------------------------------------------
# 6 shards


def write_shard_task(task: dict) -> dict:
    """Write one shard from its staged rows (original bytes, checked against the scanned sha256)."""
    path = Path(task["root"]) / task["shard"]
    if is_committed(path.parent, path.name):
        return _rss({"written": 0})
    rows = _read(task["to_shard"], filters=[("shard", "=", task["shard"])]).sort_by("key").to_pylist()
    samples = []
    for row in rows:
        data = read_bytes(row)
        if sha256(data) != row["sha256"]:
            raise ValueError(f"source changed between scan and shard write: {row['source']}")
        sidecar = json_bytes({f: row[f] for f in SAMPLE_JSON_FIELDS})
        samples.append({"__key__": row["key"], row["ext"]: data, "json": sidecar})
    return _rss({"written": int(write_shard(path, samples))})


# ----------------------------------------------------------------------------------------------------
# The wiring


_NOT_COUNTS = frozenset({"peak_rss_mib", "dim"})  # ints tasks return that are not counts


def _fold(results: list[dict], into: Counter) -> float:
    for result in results:
        into.update({k: v for k, v in result.items() if isinstance(v, int) and k not in _NOT_COUNTS})
    return max([r["peak_rss_mib"] for r in results], default=0.0)


def _timed(result: PostResult, name: str, started: float) -> float:
    now = time.perf_counter()
    result.seconds[name] = round(now - started, 3)
    return now


def _add_task_seconds(result: PostResult, name: str, results: list[dict], key: str = "seconds") -> None:
    result.task_seconds[name] = round(sum(r[key] for r in results), 3)


def find_duplicates(
    partitions: list[Partition], cfg: PostConfig, scratch: Path, executor: Executor, result: PostResult
) -> Counter:
    """Phases 1–2: thresholds, then every duplicate edge, then ``scratch/dups.parquet``."""
    counts: Counter = Counter()
    started = time.perf_counter()
    largest = max((p.num_rows for p in partitions), default=0)
    buckets = _power_of_two_at_least(sum(p.num_rows for p in partitions) / ROWS_PER_BUCKET)
    common = {"scratch": str(scratch), "min_score": cfg.min_score, "num_buckets": buckets}
    gate = [{**common, "partition": p} for p in partitions]
    rss = [_fold(executor.map(gate_partition, gate, memory=task_memory(largest, ROW_BYTES)), counts)]
    started = _timed(result, "gate", started)
    rss += _hash_dedup(cfg, scratch, executor, buckets, counts)
    started = _timed(result, "dedup_phash", started)
    if cfg.semantic_threshold is not None and any(p.embeddings for q in partitions for p in q.parts):
        rss += _semantic_dedup(partitions, cfg, scratch, executor, counts, result)
        started = _timed(result, "dedup_semantic", started)

    resolve = {"scratch": str(scratch), "max_hamming": cfg.max_hamming}
    matched = 2 * (
        counts["exact_edges"] + counts["same_phash_edges"] + counts["near_pairs"] + counts["semantic_pairs"]
    )
    resolved = executor.map(resolve_duplicates, [resolve], memory=task_memory(matched, RESOLVE_ROW_BYTES))
    rss.append(_fold(resolved, counts))
    _timed(result, "dedup_resolve", started)
    result.worker_peak_rss_mib = max([result.worker_peak_rss_mib, *rss])
    return counts


def _hash_dedup(
    cfg: PostConfig, scratch: Path, executor: Executor, buckets: int, counts: Counter
) -> list[float]:
    """Exact (sha256) and pHash edges per hash bucket, then the near pHash search; returns peak RSS."""
    bucket_tasks = [{"scratch": str(scratch), "bucket": b} for b in range(buckets)]
    # Hash buckets of uniform hashes: a bucket holds kept / buckets rows, twice that bounds its spread.
    bucket_memory = task_memory(2 * counts["kept"] / buckets, DEDUP_ROW_BYTES)
    rss = [_fold(executor.map(exact_bucket, bucket_tasks, memory=bucket_memory), counts)]
    if cfg.max_hamming is None:
        return rss
    rss.append(_fold(executor.map(phash_bucket, bucket_tasks, memory=bucket_memory), counts))
    part_bits = int(math.log2(_power_of_two_at_least(33 * counts["distinct_phash"] / ENTRIES_PER_NEAR_TASK)))
    near = [
        {"scratch": str(scratch), "max_hamming": cfg.max_hamming, **t}
        for t in dedup.near_tasks(cfg.max_hamming, cfg.phash_splits, part_bits)
    ]
    # Every distinct value (8 bytes, ~4 arrays of it) + at most ENTRIES_PER_NEAR_TASK sorted entries
    # (8 bytes packed, ~3 arrays: entries, pairs, their check).
    near_memory = task_memory(counts["distinct_phash"], 32, extra=24 * ENTRIES_PER_NEAR_TASK)
    rss.append(_fold(executor.map(near_band, near, memory=near_memory), counts))
    return rss


def _semantic_dedup(
    partitions: list[Partition],
    cfg: PostConfig,
    scratch: Path,
    executor: Executor,
    counts: Counter,
    result: PostResult,
) -> list[float]:
    """SemDeDup in two levels (curation.semdedup): coarse k-means into groups, assignment per partition,
    then per group its own k-means and the in-cluster pairs; returns peak RSS."""
    groups = semdedup.num_clusters(counts["kept"], SEMANTIC_ROWS_PER_GROUP)
    train = {"scratch": str(scratch), "partitions": partitions, "groups": groups,
             "sample_rows": groups * semdedup.SAMPLE_PER_CLUSTER}  # fmt: skip
    largest = max((p.num_rows for p in partitions), default=0)
    bound = EMBEDDING_BYTES_PER_VALUE * MAX_EMBEDDING_DIM
    trained = executor.map(semantic_train, [train], memory=task_memory(train["sample_rows"] + largest, bound))
    rss = [_fold(trained, counts)]
    result.semantic_dim = trained[0]["dim"] or None
    per_row = EMBEDDING_BYTES_PER_VALUE * (result.semantic_dim or MAX_EMBEDDING_DIM)
    assign = [{"scratch": str(scratch), "partition": p} for p in partitions]
    assigned = executor.map(semantic_assign, assign, memory=task_memory(largest, ROW_BYTES + per_row))
    rss.append(_fold(assigned, counts))
    group_rows = Counter()
    for r in assigned:
        group_rows.update(r["group_rows"])
    pairs = [
        {"scratch": str(scratch), "group": g, "threshold": cfg.semantic_threshold,
         "cluster_size": cfg.semantic_cluster_size}
        for g in sorted(group_rows)
    ]  # fmt: skip
    # A group's embeddings (with its labels and order) + one similarity tile (semdedup.cluster_pairs),
    # whatever its cluster sizes; coarse cells are unequal, so the largest group measured sets it.
    tile = 8 * semdedup.BLOCK_ROWS**2
    group_memory = task_memory(max(group_rows.values(), default=0), per_row + 64, extra=tile)
    searched = executor.map(semantic_group, pairs, memory=group_memory)
    rss.append(_fold(searched, counts))
    _add_task_seconds(result, "semantic_train", trained)
    _add_task_seconds(result, "semantic_assign", assigned)
    _add_task_seconds(result, "semantic_kmeans", searched, "kmeans_seconds")
    _add_task_seconds(result, "semantic_search", searched, "search_seconds")
    return rss


def plan_shards(
    partitions: list[Partition],
    cfg: PostConfig,
    scratch: Path,
    executor: Executor,
    num_kept: int,
    result: PostResult,
) -> ShardPlan:
    """Phase 3: final statuses, then the shard plan from kept-row counts (deeper counts if ever needed)."""
    depth = keyspace.fine_depth(num_kept, cfg.samples_per_shard)
    common = {"scratch": str(scratch), "min_score": cfg.min_score}
    while True:
        results = executor.map(
            finalize_partition,
            [{**common, "partition": p, "depth": depth} for p in partitions],
            memory=task_memory(max(p.num_rows for p in partitions), ROW_BYTES),
        )
        result.worker_peak_rss_mib = max([result.worker_peak_rss_mib, *(r["peak_rss_mib"] for r in results)])
        groups = sorted({g for r in results for g in r["prefix_counts"]})
        try:
            leaves = {
                g: keyspace.plan_ranges(
                    *keyspace.merge_counts(
                        [r["prefix_counts"][g] for r in results if g in r["prefix_counts"]]
                    ),
                    depth,
                    cfg.samples_per_shard,
                )
                for g in groups
            }
            break
        except keyspace.DepthTooShallow:
            depth += 4
    ids, next_id = {}, 0
    for group in groups:
        ids[group] = list(range(next_id, next_id + len(leaves[group])))
        next_id += len(leaves[group])
    return ShardPlan(leaves, ids)


def post_scoring(
    parts: list[ScoredPart], cfg: PostConfig, *, root: Path, scratch: Path, executor: Executor
) -> PostResult:
    """Run phases 1–7 over the committed scored chunks ``parts`` (in key order)."""
    result = PostResult()
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    partitions = plan_partitions(parts, cfg.rows_per_partition)
    counts = find_duplicates(partitions, cfg, scratch, executor, result)
    started = time.perf_counter()
    plan = plan_shards(partitions, cfg, scratch, executor, counts["kept"] - counts["duplicates"], result)
    started = _timed(result, "finalize_plan", started)

    with_plan = [
        {"scratch": str(scratch), "partition": p, "plan": plan, "min_score": cfg.min_score}
        for p in partitions
    ]
    partition_memory = task_memory(max((p.num_rows for p in partitions), default=0), ROW_BYTES)
    digests = executor.map(digest_partition, with_plan, memory=partition_memory)
    shards = shard_names(plan, [d["digests"] for d in digests])
    staged = executor.map(
        stage_partition,
        [{**t, "shards": shards, "write_shards": cfg.write_shards} for t in with_plan],
        memory=partition_memory,
    )
    started = _timed(result, "digest_stage", started)
    result.worker_peak_rss_mib = max(
        [result.worker_peak_rss_mib, *(r["peak_rss_mib"] for r in digests + staged)]
    )

    if cfg.write_shards:
        where = {
            s: [p for p, d in zip(partitions, digests, strict=True) if s in d["digests"]]
            for s in range(len(shards))
        }
        shard_bytes = Counter()
        for d in digests:
            shard_bytes.update(d["shard_bytes"])
        # A shard task holds its samples' bytes twice (read, then the tar being written) and its staged rows.
        memory = task_memory(cfg.samples_per_shard, ROW_BYTES, extra=2 * max(shard_bytes.values(), default=0))
        result.shards_written = write_shards(
            shards, where, root=root, scratch=scratch, executor=executor, memory=memory
        )
        started = _timed(result, "shards", started)
    result.num_parts = publish_manifest(partitions, root=root, scratch=scratch)
    _timed(result, "manifest", started)
    result.shards = shards
    rejected = Counter()
    kept = Counter()
    for s in staged:
        rejected.update(s["rejected_per_reason"])
        kept.update(s["kept_per_tier"])
    result.counts = {
        "inputs": sum(s["rows"] for s in staged),
        "kept": sum(kept.values()),
        "kept_per_tier": dict(sorted(kept.items())),
        "rejected_per_reason": dict(sorted(rejected.items())),
        "dedup": {k: counts[k] for k in sorted(counts) if k not in ("rows", "kept", "low_aesthetic")},
    }
    return result


def write_shards(
    shards: list[dict],
    where: dict[int, list[Partition]],
    *,
    root: Path,
    scratch: Path,
    executor: Executor,
    memory: int | None = None,
) -> int:
    """Phase 6: every shard of the plan that is not committed yet, one task each, reading the staged rows
    of the partitions it spans."""
    todo = [
        {
            "root": str(root),
            "shard": shard["shard"],
            "to_shard": [str(scratch / "to_shard" / f"{p.name}.parquet") for p in where[index]],
        }
        for index, shard in enumerate(shards)
        if not is_committed((root / shard["shard"]).parent, Path(shard["shard"]).name)
    ]
    return sum(r["written"] for r in executor.map(write_shard_task, todo, memory=memory))


def publish_manifest(partitions: list[Partition], *, root: Path, scratch: Path) -> int:
    """Phase 7: rename the staged manifest parts into ``manifests/images`` and drop parts of a larger run."""
    staged = scratch / "manifest"
    final = root / IMAGES_DIR
    final.mkdir(parents=True, exist_ok=True)
    names = [f"part-{p.index:05d}" for p in partitions]
    for name in names:
        os.replace(staged / f"{name}.parquet", final / f"{name}.parquet")
        mark_committed(final, name, marker_info(staged, name))
    for stale in sorted(final.glob("part-*.parquet")):
        if stale.stem not in names:
            unmark_committed(final, stale.stem)
            stale.unlink()
    return len(names)


def remove_stale_shards(root: Path, shards: list[dict]) -> int:
    """Delete shards (and markers) the manifest no longer names; call after ``publish_manifest``."""
    named = {s["shard"] for s in shards}
    removed = 0
    for path in sorted((root / SHARDS_DIR).glob("*/*.tar")):
        if path.relative_to(root).as_posix() not in named:
            unmark_committed(path.parent, path.name)
            path.unlink()
            removed += 1
    return removed
