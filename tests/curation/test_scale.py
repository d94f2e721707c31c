"""Post-scoring phases at scale: 200k synthetic scored rows, checked against all pairs on a closed 20k subset."""

from __future__ import annotations

import itertools

import duckdb
import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from curation import dedup, keyspace, semdedup
from curation.executor import LocalExecutor
from curation.phases import PostConfig, post_scoring
from curation.synthetic import scored_table, write_chunks

MAX_HAMMING = 4


def plant_duplicates(table: pa.Table, subset: np.ndarray, rng: np.random.Generator) -> pa.Table:
    """Within ``subset`` only: byte copies (same sha256 and pHash) and pHash copies 1..6 bits away."""
    sha = np.array(table["sha256"].to_pylist(), object)
    phash = dedup.as_unsigned(table["phash"].fill_null(0).to_numpy()).copy()
    kept = subset[pc.equal(table["status"], "kept").to_numpy(zero_copy_only=False)[subset]]
    copies = rng.choice(kept, size=(len(kept) // 20, 2), replace=False)  # (copy, original)
    for i, (copy, original) in enumerate(copies):
        if i % 3 == 0:
            sha[copy], phash[copy] = sha[original], phash[original]
        else:
            bits = rng.choice(64, 1 + i % 6, replace=False)
            phash[copy] = phash[original] ^ np.uint64(sum(1 << int(b) for b in bits))
    columns = {"sha256": pa.array(sha, pa.string()), "phash": pa.array(phash.view(np.int64))}
    for name, column in columns.items():
        column = pc.if_else(pc.equal(table["status"], "kept"), column, pa.nulls(len(column), column.type))
        table = table.set_column(table.schema.get_field_index(name), name, column)
    return table


def brute_force_dups(rows: list[dict], max_hamming: int) -> dict[str, str]:
    """All pairs (same sha256 or pHash within range) → groups → keeper by the documented rule."""
    kept = [r for r in rows if r["status"] == "kept" and not (r["tier"] == "1k" and r["aesthetic"] < 5.0)]
    parent = list(range(len(kept)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    hashes = dedup.as_unsigned(np.array([r["phash"] for r in kept], np.int64))
    index = faiss.IndexBinaryFlat(64)  # exhaustive: every pair's Hamming distance
    codes = hashes.astype(">u8").view(np.uint8).reshape(-1, 8)
    index.add(codes)
    limits, _, neighbours = index.range_search(codes, max_hamming + 1)  # distance < radius
    for a in range(len(kept)):
        for b in neighbours[limits[a] : limits[a + 1]]:
            parent[find(a)] = find(int(b))
    by_sha: dict[str, int] = {}
    for i, r in enumerate(kept):
        parent[find(i)] = find(by_sha.setdefault(r["sha256"], i))
    groups: dict[int, list[dict]] = {}
    for i, r in enumerate(kept):
        groups.setdefault(find(i), []).append(r)
    dups = {}
    for group in groups.values():
        keeper, *others = sorted(group, key=dedup.keeper_order)
        dups.update({r["key"]: keeper["key"] for r in others})
    return dups


def manifest_dups(root) -> dict[str, str]:
    rows = duckdb.sql(
        f"SELECT key, dup_of FROM read_parquet('{root}/manifests/images/*.parquet') WHERE reason = 'duplicate'"
    ).fetchall()
    return dict(rows)


def post(tmp, table: pa.Table, *, chunk_rows: int, rows_per_partition: int, executor=None) -> dict[str, str]:
    parts = write_chunks(table, tmp / "scored", chunk_rows=chunk_rows)
    cfg = PostConfig(
        min_score={"1k": 5.0}, max_hamming=MAX_HAMMING, phash_splits=1, semantic_threshold=None,
        semantic_cluster_size=1000, samples_per_shard=1000, rows_per_partition=rows_per_partition,
        write_shards=False,
    )  # fmt: skip
    result = post_scoring(parts, cfg, root=tmp, scratch=tmp / "scratch", executor=executor or LocalExecutor())
    assert result.counts["inputs"] == table.num_rows
    return manifest_dups(tmp)


def test_200k_rows_find_exactly_the_all_pairs_duplicates_of_a_closed_20k_subset(tmp_path):
    rng = np.random.default_rng(7)
    table = scored_table(200_000, seed=7, exact_rate=0, near_rate=0)
    subset = np.sort(rng.choice(table.num_rows, 20_000, replace=False))
    table = plant_duplicates(table, subset, rng)
    expected = brute_force_dups(table.take(pa.array(subset)).to_pylist(), MAX_HAMMING)
    assert len(expected) > 200  # planted: a third byte copies, the rest 1..6 bits (5 and 6: not duplicates)

    found = post(tmp_path / "all", table, chunk_rows=50_000, rows_per_partition=100_000)
    assert found == expected  # nothing outside the subset, nothing missed or invented inside it

    # The subset alone, cut into other chunks and partitions: the same groups and keepers.
    alone = post(
        tmp_path / "subset", table.take(pa.array(subset)), chunk_rows=1_000, rows_per_partition=3_000
    )
    assert alone == expected


def test_same_manifest_on_ray_workers_as_in_one_process(tmp_path, ray_cluster):
    """The keeper rule and every phase are independent of who runs them: identical manifest bytes."""
    from curation.executor import RayExecutor

    table = scored_table(12_000, seed=3, exact_rate=0.02, near_rate=0.03)
    local = post(tmp_path / "local", table, chunk_rows=1_000, rows_per_partition=4_000)
    remote = post(tmp_path / "ray", table, chunk_rows=1_000, rows_per_partition=4_000, executor=RayExecutor())
    assert local == remote and len(local) > 150
    parts = sorted((tmp_path / "local" / "manifests" / "images").glob("*.parquet"))
    assert [p.read_bytes() for p in parts] == [
        (tmp_path / "ray" / "manifests" / "images" / p.name).read_bytes() for p in parts
    ]


def test_near_search_is_exact_to_5_bits_and_never_reports_a_far_pair():
    rng = np.random.default_rng(3)
    values = rng.integers(0, 2**64, 3000, dtype=np.uint64)
    partners = [v ^ np.uint64(sum(1 << int(b) for b in rng.choice(64, d, replace=False))) for v, d in
                zip(values[:600], itertools.cycle(range(1, 9)))]  # fmt: skip
    values = np.unique(np.concatenate([values, np.array(partners, np.uint64)]))
    distance = np.bitwise_count(values[:, None] ^ values[None, :])
    for max_hamming, splits in [(2, 1), (5, 1), (5, 4), (8, None), (6, 4)]:
        truth = {tuple(p) for p in np.argwhere(np.triu(distance <= max_hamming, 1)).tolist()}
        found = {
            tuple(p)
            for p in dedup.all_near_pairs(values, max_hamming=max_hamming, num_splits=splits).tolist()
        }
        partitioned = set()
        for task in dedup.near_tasks(max_hamming, splits, part_bits=3):
            partitioned |= {
                tuple(p) for p in dedup.near_value_pairs(values, max_hamming=max_hamming, **task)[0].tolist()
            }
        assert found == partitioned and found <= truth
        if dedup.is_exact(max_hamming, splits):
            assert found == truth, (max_hamming, splits)
        else:
            assert len(found) >= 0.9 * len(truth), (max_hamming, splits)


def test_semantic_pairs_are_the_in_cluster_pairs_above_the_threshold():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((400, 32)).astype(np.float32)
    copies = base[:40] + 0.05 * rng.standard_normal((40, 32)).astype(np.float32)
    embeddings = np.concatenate([base, copies])
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    keys = np.array([f"{i:04d}" for i in range(len(embeddings))])
    one_cluster = semdedup.semantic_edges(keys, embeddings, np.zeros(len(keys), np.int64), 0.95)
    cosine = embeddings.astype(np.float64) @ embeddings.T.astype(np.float64)
    truth = {(keys[a], keys[b]) for a, b in np.argwhere(np.triu(cosine >= 0.95, 1))}
    assert set(zip(one_cluster["a"].to_pylist(), one_cluster["b"].to_pylist(), strict=True)) == truth
    assert len(truth) >= 40
    centroids = semdedup.train_centroids(embeddings, 4)
    labels = semdedup.assign(embeddings, centroids)
    clustered = semdedup.semantic_edges(keys, embeddings, labels, 0.95)
    found = set(zip(clustered["a"].to_pylist(), clustered["b"].to_pylist(), strict=True))
    assert found <= truth and len(found) >= 0.9 * len(truth)
    assert np.array_equal(semdedup.train_centroids(embeddings, 4), centroids)  # reproducible


def test_key_bits_read_the_first_64_bits_of_hex_keys():
    keys = pa.array(["0123456789abcdef0123", "ffffffffffffffff0000", "00000000000000010000"])
    assert keyspace.key_bits(keys).tolist() == [0x0123456789ABCDEF, 2**64 - 1, 1]
    with pytest.raises(ValueError):
        keyspace.key_bits(pa.array(["not-a-hex-key-at-all"]))


@pytest.mark.parametrize("max_rows", [1, 3, 1000])
def test_key_ranges_depend_on_the_keys_only_and_move_only_where_keys_are_added(max_rows):
    rng = np.random.default_rng(max_rows)
    bits = np.sort(rng.integers(0, 2**64, 5000, dtype=np.uint64))

    def plan(bits: np.ndarray, depth: int) -> list[keyspace.KeyRange]:
        while True:
            try:
                return keyspace.plan_ranges(*keyspace.prefix_counts(bits, depth), depth, max_rows)
            except keyspace.DepthTooShallow:
                depth += 4

    leaves = plan(bits, keyspace.fine_depth(len(bits), max_rows))
    assert leaves == plan(bits, 48)  # the counting depth does not matter
    assert [leaf.start for leaf in leaves] == sorted(leaf.start for leaf in leaves)
    counts = np.bincount(keyspace.leaf_index(leaves, bits), minlength=len(leaves))
    assert counts.min() >= 1 and counts.max() <= max_rows and counts.sum() == len(bits)
    added = np.sort(np.concatenate([bits, rng.integers(0, 2**64, 20, dtype=np.uint64)]))
    after = plan(added, keyspace.fine_depth(len(added), max_rows))
    # Only the range each new key falls into changes (replaced by at most two when it must split).
    assert len(set(after) ^ set(leaves)) <= 3 * 20
