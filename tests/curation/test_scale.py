"""Post-scoring phases at scale: 200k synthetic scored rows, checked against all pairs on a closed 20k subset."""

from __future__ import annotations

import itertools
from pathlib import Path

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
    """Within ``subset`` only: byte copies (same sha256 and pHash), pHash copies 1..6 bits away, and morph
    chains of 6 rows 3 bits apart (ends 15 bits apart: a chain, never one group)."""
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
    free = np.setdiff1d(kept, copies.ravel())
    for chain in rng.choice(
        free, size=(len(kept) // 300, 6), replace=False
    ):  # morph chains, 3 new bits a step
        bits = rng.choice(64, 3 * (len(chain) - 1), replace=False).reshape(len(chain) - 1, 3)
        for i, step in enumerate(bits, start=1):
            phash[chain[i]] = phash[chain[i - 1]] ^ np.uint64(sum(1 << int(b) for b in step))
    columns = {"sha256": pa.array(sha, pa.string()), "phash": pa.array(phash.view(np.int64))}
    for name, column in columns.items():
        column = pc.if_else(pc.equal(table["status"], "kept"), column, pa.nulls(len(column), column.type))
        table = table.set_column(table.schema.get_field_index(name), name, column)
    return table


def brute_force_dups(rows: list[dict], max_hamming: int) -> dict[str, tuple[str, str]]:
    """All pairs (same sha256 or pHash within range, by exhaustive search) → rows walked in keeper order,
    each rejected for the first earlier kept row it matches directly: ``{key: (dup_of, reason)}``."""
    kept = [r for r in rows if r["status"] == "kept" and not (r["tier"] == "1k" and r["aesthetic"] < 5.0)]
    kept.sort(key=dedup.keeper_order)
    hashes = dedup.as_unsigned(np.array([r["phash"] for r in kept], np.int64))
    index = faiss.IndexBinaryFlat(64)  # exhaustive: every pair's Hamming distance
    codes = hashes.astype(">u8").view(np.uint8).reshape(-1, 8)
    index.add(codes)
    limits, distances, neighbours = index.range_search(codes, max_hamming + 1)  # distance < radius
    by_sha: dict[str, list[int]] = {}
    for i, r in enumerate(kept):
        by_sha.setdefault(r["sha256"], []).append(i)
    is_kept = [False] * len(kept)
    dups = {}
    for i, r in enumerate(kept):  # i: position in keeper order
        matches = [(j, 0, "duplicate: sha256") for j in by_sha[r["sha256"]] if j < i and is_kept[j]]
        matches += [
            (int(j), 1 + int(d), f"duplicate: phash {int(d)}")
            for j, d in zip(
                neighbours[limits[i] : limits[i + 1]], distances[limits[i] : limits[i + 1]], strict=True
            )
            if j < i and is_kept[j]
        ]
        if matches:
            j, _, reason = min(matches)
            dups[r["key"]] = (kept[j]["key"], reason)
        else:
            is_kept[i] = True
    return dups


def manifest_dups(root) -> dict[str, tuple[str, str]]:
    rows = duckdb.sql(
        f"SELECT key, dup_of, reason FROM read_parquet('{root}/manifests/images/*.parquet') "
        "WHERE split_part(reason, ':', 1) = 'duplicate'"
    ).fetchall()
    return {key: (dup_of, reason) for key, dup_of, reason in rows}


def post(
    tmp, table: pa.Table, *, chunk_rows: int, rows_per_partition: int, executor=None
) -> dict[str, tuple[str, str]]:
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


def plant_embeddings(
    table: pa.Table, parts, folder, rng: np.random.Generator
) -> tuple[list, dict[str, np.ndarray]]:
    """Random 32-d embeddings of the kept rows (cosines near 0) with planted semantic duplicates: chains of
    5 rows 15° apart (neighbours cosine 0.966, two steps 0.866), stars (spokes 12° from a centre, 24° from
    each other: cosine 0.978 / 0.914) and cliques (three rows 5° around one: ≥ 0.99); written as the parts'
    clip_embeddings files (fp16)."""
    import dataclasses

    import pyarrow.parquet as pq

    kept = np.flatnonzero(pc.equal(table["status"], "kept").to_numpy(zero_copy_only=False))
    vectors = rng.standard_normal((table.num_rows, 32))
    groups = rng.choice(kept, size=(30, 5), replace=False)
    for g, rows in enumerate(groups):
        plane, _ = np.linalg.qr(rng.standard_normal((32, 2)))
        u, w = plane[:, 0], plane[:, 1]
        if g % 3 == 0:  # chain
            angles = np.radians(15.0 * np.arange(5))
            vectors[rows] = np.cos(angles)[:, None] * u + np.sin(angles)[:, None] * w
        elif g % 3 == 1:  # star: centre, 4 spokes 12° away in 4 directions of a 3-d subspace
            q, _ = np.linalg.qr(rng.standard_normal((32, 3)))
            spokes = [q[:, 1], -q[:, 1], q[:, 2], -q[:, 2]]
            c, s = np.cos(np.radians(12.0)), np.sin(np.radians(12.0))
            vectors[rows] = [q[:, 0]] + [c * q[:, 0] + s * d for d in spokes]
        else:  # clique
            vectors[rows] = u + 0.03 * rng.standard_normal((5, 32))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    keys = table["key"].to_pylist()
    out, start = [], 0
    for part in parts:
        rows = kept[(kept >= start) & (kept < start + part.num_rows)]
        start += part.num_rows
        path = folder / f"{Path(part.path).stem}.parquet"
        folder.mkdir(parents=True, exist_ok=True)
        embedding = pa.array(vectors[rows].astype(np.float16).tolist(), pa.list_(pa.float16()))
        pq.write_table(pa.table({"key": [keys[r] for r in rows], "embedding": embedding}), path)
        out.append(dataclasses.replace(part, embeddings=str(path)))
    return out, {keys[r]: vectors[r].astype(np.float16).astype(np.float64) for r in kept}


@pytest.mark.parametrize("cluster_size,rows_per_group", [(100_000, None), (300, None), (300, 500)])
def test_semantic_dedup_through_the_phases_names_a_direct_match_for_every_duplicate(
    tmp_path, monkeypatch, cluster_size, rows_per_group
):
    """Planted embeddings (chains, stars, cliques) + pHash/byte copies, through every post-scoring phase.
    One k-means cluster: the manifest is exactly the brute-force greedy walk over all pairs. Several
    clusters (pairs across clusters are never compared), in one group or in several coarse groups with
    their own k-means: every rejected row still matches the kept row its ``dup_of`` names within the
    threshold."""
    from curation import phases

    if rows_per_group:
        monkeypatch.setattr(phases, "SEMANTIC_ROWS_PER_GROUP", rows_per_group)
    rng = np.random.default_rng(5)
    table = scored_table(3_000, seed=5, exact_rate=0.02, near_rate=0.02)
    parts = write_chunks(table, tmp_path / "scored", chunk_rows=400)
    parts, vectors = plant_embeddings(table, parts, tmp_path / "embeddings", rng)
    cfg = PostConfig(
        min_score={}, max_hamming=MAX_HAMMING, phash_splits=1, semantic_threshold=0.95,
        semantic_cluster_size=cluster_size, samples_per_shard=1000, rows_per_partition=1_000, write_shards=False,
    )  # fmt: skip
    post_scoring(parts, cfg, root=tmp_path, scratch=tmp_path / "scratch", executor=LocalExecutor())
    rows = duckdb.sql(
        f"SELECT key, status, reason, dup_of, sha256, phash, width * height AS pixels, aesthetic "
        f"FROM read_parquet('{tmp_path}/manifests/images/*.parquet') WHERE reason IS NULL OR reason LIKE 'duplicate%'"
    ).fetchall()
    by_key = {r[0]: r for r in rows}

    def match(a, b) -> tuple[int, float] | None:
        if a[4] == b[4]:
            return (0, 0.0)
        if (bits := int(np.bitwise_count(dedup.as_unsigned(np.array([a[5] ^ b[5]]))[0]))) <= MAX_HAMMING:
            return (1, float(bits))
        cosine = float(
            vectors[a[0]] @ vectors[b[0]] / np.linalg.norm(vectors[a[0]]) / np.linalg.norm(vectors[b[0]])
        )
        return (2, cosine) if cosine >= 0.95 else None

    semantic = [r for r in rows if (r[2] or "").startswith("duplicate: semantic")]
    assert len(semantic) >= 10 if cluster_size > 3_000 else semantic
    for key, status, reason, dup_of, *_ in rows:  # every duplicate: a direct match with a kept row
        if status == "rejected":
            assert by_key[dup_of][1] == "kept"
            assert match(by_key[key], by_key[dup_of]), (reason, by_key[key], by_key[dup_of])
            strength, value = match(by_key[key], by_key[dup_of])
            test, _, detail = reason.removeprefix("duplicate: ").partition(" ")
            assert test == ["sha256", "phash", "semantic"][strength]
            assert strength == 0 or abs(float(detail) - value) < 2e-3
    if cluster_size < 3_000:
        return
    order = sorted(rows, key=lambda r: (-r[6], -(r[7] if r[7] is not None else -np.inf), r[0]))
    kept: list[tuple] = []
    for r in order:  # brute force: the greedy walk over all pairs
        first = next((k for k in kept if match(r, k)), None)
        if first is None:
            kept.append(r)
            assert r[1] == "kept", r[0]
        else:
            assert (r[1], r[3]) == ("rejected", first[0]), r[0]


def _semantic_pairs(scratch: Path) -> set[tuple[str, str, float]]:
    table = duckdb.sql(f"SELECT a, b, similarity FROM read_parquet('{scratch}/semantic_pairs/*.parquet')")
    return {(a, b, round(s, 12)) for a, b, s in table.fetchall()}


def test_two_level_semantic_pairs_are_true_pairs_found_alike_on_any_partitioning(tmp_path, monkeypatch):
    """Coarse groups (each with its own k-means) instead of one flat k-means: every pair found is a pair
    above the threshold by brute force (float64, all kept rows), most planted pairs are found, and the
    pairs do not depend on how the rows were partitioned (each group's k-means sample is its first rows in
    key order)."""
    from curation import phases

    monkeypatch.setattr(phases, "SEMANTIC_ROWS_PER_GROUP", 400)  # ~2,100 kept rows: 6 groups
    table = scored_table(3_000, seed=7, exact_rate=0.0, near_rate=0.0)
    parts = write_chunks(table, tmp_path / "scored", chunk_rows=200)
    parts, vectors = plant_embeddings(table, parts, tmp_path / "embeddings", np.random.default_rng(7))
    found, counts = {}, {}
    for rows_per_partition in (1_000, 300):
        cfg = PostConfig(
            min_score={}, max_hamming=None, phash_splits=None, semantic_threshold=0.95, semantic_cluster_size=150,
            samples_per_shard=1000, rows_per_partition=rows_per_partition, write_shards=False,
        )  # fmt: skip
        run = tmp_path / f"run-{rows_per_partition}"
        result = post_scoring(parts, cfg, root=run, scratch=run / "scratch", executor=LocalExecutor())
        found[rows_per_partition], counts[rows_per_partition] = (
            _semantic_pairs(run / "scratch"),
            result.counts,
        )
    assert found[1_000] == found[300]
    dedup_counts = counts[300]["dedup"]
    assert dedup_counts["semantic_groups"] == 6 and dedup_counts["semantic_clusters"] >= 12, dedup_counts
    assert "semantic_dim" not in dedup_counts and "dim" not in dedup_counts  # a width, not a count
    assert result.semantic_dim == 32  # plant_embeddings' width, beside the counts
    keys = sorted(vectors)
    matrix = np.stack([vectors[k] for k in keys])
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    cosine = matrix @ matrix.T  # float64, all pairs
    truth = {(keys[a], keys[b]): cosine[a, b] for a, b in np.argwhere(np.triu(cosine >= 0.95, 1))}
    pairs = {(a, b): s for a, b, s in found[300]}
    assert pairs.keys() <= truth.keys()
    assert all(abs(pairs[p] - truth[p]) < 1e-6 for p in pairs)  # float32-normalised rows, float64 dot
    assert len(pairs) >= 0.8 * len(truth) and len(truth) >= 100, (len(pairs), len(truth))


def test_in_cluster_search_is_tiled_exact_and_its_memory_does_not_grow_with_the_cluster():
    """Brute force (float64, all pairs) == the tiled search with tiles much smaller than the cluster; and
    the search's own allocations (beyond its input) stay about one tile whatever the cluster size."""
    import tracemalloc

    rng = np.random.default_rng(1)
    peaks = {}
    for num in (1_000, 8_000):
        embeddings = rng.standard_normal((num, 24)).astype(np.float32)
        embeddings[1::7] = embeddings[::7][: len(embeddings[1::7])] + 0.1 * rng.standard_normal(
            (len(embeddings[1::7]), 24)
        )
        embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
        tracemalloc.start()
        i, j, similarity, _ = semdedup.cluster_pairs(embeddings, 0.95, block_rows=256)
        peaks[num] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        if num == 1_000:
            exact = embeddings.astype(np.float64) @ embeddings.T.astype(np.float64)
            truth = {tuple(p) for p in np.argwhere(np.triu(exact >= 0.95, 1)).tolist()}
            assert set(zip(i.tolist(), j.tolist(), strict=True)) == truth and len(truth) > 100
            np.testing.assert_allclose(similarity, exact[i, j], atol=1e-12)
    tile = 256 * 256 * 4
    assert peaks[8_000] < 4 * tile + 64 * len(i), peaks  # a (256, 8000) strip would be 8 MB


class RecordingExecutor(LocalExecutor):
    """The local executor, noting the memory each phase's tasks declare."""

    def __init__(self) -> None:
        self.declared: dict[str, int | None] = {}

    def map(self, fn, items, *, num_cpus: float = 1.0, memory: int | None = None):
        if items:
            self.declared[fn.__name__] = memory
        return super().map(fn, items, num_cpus=num_cpus, memory=memory)


def test_every_phase_task_declares_memory_from_its_plan_and_semantic_memory_ignores_cluster_size(tmp_path):
    """Each phase's declared memory is the worker base + its rows × bytes per row: the semantic pair search
    declares the same whatever the cluster size (tiles), and a partition task grows with its partition."""
    from curation import phases
    from curation.synthetic import scored_rows

    table = scored_rows(3_000, seed=5, exact_rate=0.02, near_rate=0.02, data_bytes=64)[0]  # shards written
    parts = write_chunks(table, tmp_path / "scored", chunk_rows=400)
    parts, _ = plant_embeddings(table, parts, tmp_path / "embeddings", np.random.default_rng(5))
    declared = {}
    for cluster_size, rows_per_partition in [(100_000, 1_000), (300, 1_000), (300, 2_000)]:
        executor = RecordingExecutor()
        cfg = PostConfig(
            min_score={}, max_hamming=MAX_HAMMING, phash_splits=1, semantic_threshold=0.95,
            semantic_cluster_size=cluster_size, samples_per_shard=1000, rows_per_partition=rows_per_partition,
        )  # fmt: skip
        run = tmp_path / f"run-{cluster_size}-{rows_per_partition}"
        post_scoring(parts, cfg, root=run, scratch=run / "scratch", executor=executor)
        declared[cluster_size, rows_per_partition] = executor.declared
    first = declared[100_000, 1_000]
    assert set(first) == {
        "gate_partition", "exact_bucket", "phash_bucket", "near_band", "semantic_train", "semantic_assign",
        "semantic_group", "resolve_duplicates", "finalize_partition", "digest_partition", "stage_partition",
        "write_shard_task",
    }  # fmt: skip
    assert all(m is not None and m > phases.TASK_BASE_BYTES for m in first.values()), first
    assert declared[300, 1_000]["semantic_group"] == first["semantic_group"]  # 1 cluster or 10: same bound
    kept = pc.sum(pc.equal(table["status"], "kept")).as_py()
    tile = 8 * semdedup.BLOCK_ROWS**2
    assert (
        first["semantic_group"]
        <= phases.TASK_BASE_BYTES + kept * (32 * phases.EMBEDDING_BYTES_PER_VALUE + 64) + tile
    )
    for name in ("gate_partition", "finalize_partition", "digest_partition", "stage_partition"):
        assert declared[300, 2_000][name] > declared[300, 1_000][name], name


def test_ray_executor_refuses_a_task_larger_than_any_node(ray_cluster):
    """Ray would wait forever for a node with that much memory: a clear error instead."""
    from curation.executor import RayExecutor

    row = {"width": 2, "height": 3, "key": "k"}
    with pytest.raises(ValueError, match="largest node"):
        RayExecutor().map(dedup.keeper_order, [row], memory=1 << 50)
    assert RayExecutor().map(dedup.keeper_order, [row], memory=64 << 20) == [(-6, np.inf, "k")]  # scheduled


def test_confirming_a_tile_of_near_copies_is_bounded_by_confirm_pairs(monkeypatch):
    """A tile of near copies (reposts of one picture) makes every pair a candidate: the float64 confirmation
    runs ``CONFIRM_PAIRS`` at a time, so its copies stay small however many candidates the tile holds."""
    import tracemalloc

    rng = np.random.default_rng(2)
    base = rng.standard_normal(64)
    embeddings = (base + 1e-3 * rng.standard_normal((512, 64))).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    monkeypatch.setattr(semdedup, "CONFIRM_PAIRS", 1024)
    tracemalloc.start()
    i, j, similarity, _ = semdedup.cluster_pairs(embeddings, 0.95, block_rows=512)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(i) == 512 * 511 // 2  # every pair is a copy
    exact = embeddings.astype(np.float64) @ embeddings.T.astype(np.float64)
    np.testing.assert_allclose(similarity, exact[i, j], atol=1e-12)
    # candidates, outputs and one tile: ~16 MB; two float64 copies of 130k candidate rows would be 134 MB
    assert peak < 40 * 2**20, peak
