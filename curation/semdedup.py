"""Semantic near-duplicates from the CLIP embeddings the aesthetic stage already computes (SemDeDup).

pHash misses crops, borders, rescaled screenshots and heavy recompression; their CLIP image embeddings
stay close. As in SemDeDup (Abbas et al. 2023) and NeMo Curator's ``semantic_dedup``: spherical k-means
over the L2-normalised embeddings (faiss), then, within each cluster, every pair whose cosine similarity
is at least ``threshold`` is a match, kept with its cosine (the keep rule, ``curation.dedup.keepers``,
rejects a row only for a direct match with a kept row, as SemDeDup does: never a chain).

Cost, in two levels so that no term grows faster than N × a constant at the sizes curation runs
(docs/benchmarks.md, "Curation at scale"): a coarse k-means splits the rows into groups of
~``phases.SEMANTIC_ROWS_PER_GROUP`` (trained on a sample, ``SAMPLE_PER_CLUSTER`` rows per centroid;
assignment N × groups), then each group's own k-means (``cluster_labels``) cuts it into clusters of
~``cluster_size`` (group rows × clusters per group). One flat k-means of N / cluster_size centroids would
cost N × N / cluster_size to assign (measured single-threaded at 64-d: 1.0, 4.7, 7.6, 24.7 s for 0.5, 1, 2,
4M embeddings), at 33M rows (23M kept, 2,300 clusters) about as much as the in-cluster search itself; two levels
cost N × (N / 250k + 25). The in-cluster search is ``sum(cluster_size²)`` dot products, linear in N for a
fixed mean cluster size (k-means clusters of the synthetic benchmark rows measure sum(size²) = 1.00 × N ×
mean size at 0.5–4M embeddings: balanced), done in ``BLOCK_ROWS``² tiles so its memory is constant whatever a
cluster's size.

Approximate: a pair whose two images fall in different clusters is never compared (recall on planted
pairs is measured in docs/benchmarks.md). Deterministic: the sample is the first rows in key order (keys
are hashes, so a uniform sample), k-means runs single-threaded with a fixed seed, and every pair above the
threshold is confirmed in float64, so the same embeddings give the same pairs on any partitioning.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

SAMPLE_PER_CLUSTER = 64  # k-means training rows per centroid (faiss warns below 39)
KMEANS_ITERATIONS = 20
KMEANS_SEED = 1234
_SCREEN_MARGIN = 1e-3  # float32 screen below the threshold; float64 decides
# Candidate pairs confirmed in float64 at a time: 2 × 8192 × d × 8 bytes (96 MiB at 768-d).
CONFIRM_PAIRS = 8192
# In-cluster similarity tiles of BLOCK_ROWS² float32 (4 MiB), whatever the cluster size. 1024, not 4096: a
# 4096² tile (64 MiB) is a fresh allocation that leaves the cache and, on ~10k-row clusters, computes the full
# square instead of the triangle; one thread on a 10k-row cluster, 4096 → 1024: 1.5 → 0.5 s at 64-d,
# 2.5 → 1.6 s at 768-d (measured here, 2 shared cores).
BLOCK_ROWS = 1024


def num_clusters(num_rows: int, cluster_size: int) -> int:
    """How many k-means clusters for ``num_rows`` embeddings at a mean of ``cluster_size`` per cluster."""
    return max(1, math.ceil(num_rows / cluster_size))


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A list<float16> column as a float32 ``(N, D)`` matrix, rows L2-normalised."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if len(column) == 0:
        return np.zeros((0, 0), np.float32)
    dim = len(column[0])
    matrix = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(column), dim)
    matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)  # in place: one float32 copy
    return matrix


def train_centroids(sample: np.ndarray, clusters: int) -> np.ndarray:
    """Spherical k-means centroids ``(K, D)`` of ``sample`` (single-threaded, fixed seed: reproducible)."""
    import faiss

    clusters = min(clusters, len(sample))
    if clusters <= 1:
        centroid = sample.mean(axis=0, keepdims=True)
        return centroid / max(float(np.linalg.norm(centroid)), 1e-12)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        kmeans = faiss.Kmeans(
            sample.shape[1],
            clusters,
            niter=KMEANS_ITERATIONS,
            seed=KMEANS_SEED,
            spherical=True,
            max_points_per_centroid=SAMPLE_PER_CLUSTER,
            verbose=False,
        )
        kmeans.train(np.ascontiguousarray(sample, np.float32))
    finally:
        faiss.omp_set_num_threads(threads)
    return kmeans.centroids.copy()


def assign(embeddings: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest centroid (highest cosine) of each row, int64 ``(N,)``."""
    labels = np.empty(len(embeddings), np.int64)
    for start in range(0, len(embeddings), BLOCK_ROWS):
        block = embeddings[start : start + BLOCK_ROWS]
        labels[start : start + len(block)] = np.argmax(block @ centroids.T, axis=1)
    return labels


def cluster_labels(embeddings: np.ndarray, cluster_size: int) -> np.ndarray:
    """k-means cluster of each row of one group (rows in key order), about ``cluster_size`` rows a cluster.

    The sample is the group's first rows (keys are hashes: a uniform sample), so the labels depend on the
    group's rows only, not on how the run was partitioned."""
    clusters = num_clusters(len(embeddings), cluster_size)
    centroids = train_centroids(embeddings[: clusters * SAMPLE_PER_CLUSTER], clusters)
    return assign(embeddings, centroids)


def _exact_cosines(embeddings: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """float64 dot products of the candidate pairs ``(i, j)``, ``CONFIRM_PAIRS`` at a time: a tile of near
    copies (thousands of reposts of one picture) can hold millions of candidates, and two float64 copies of
    their rows at once would not be bounded by the tile."""
    exact = np.empty(len(i), np.float64)
    for lo in range(0, len(i), CONFIRM_PAIRS):
        a, b = i[lo : lo + CONFIRM_PAIRS], j[lo : lo + CONFIRM_PAIRS]
        exact[lo : lo + len(a)] = np.einsum(
            "nd,nd->n", embeddings[a].astype(np.float64), embeddings[b].astype(np.float64)
        )
    return exact


def cluster_pairs(
    embeddings: np.ndarray, threshold: float, *, block_rows: int = BLOCK_ROWS
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Row pairs ``(i, j)``, ``i < j``, of one cluster with cosine ≥ ``threshold``, their cosine (float64);
    and the dot products done.

    The upper triangle in ``block_rows`` × ``block_rows`` tiles: a tile's products take 4·block_rows² bytes
    (4 MiB at 1024) whatever the cluster size, so a task's memory is its input plus a constant.
    """
    firsts, seconds, sims_out = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.float64)]
    for start in range(0, len(embeddings), block_rows):
        block = embeddings[start : start + block_rows]
        for column in range(start, len(embeddings), block_rows):
            sims = block @ embeddings[column : column + block_rows].T  # (B, B): one tile of the triangle
            i, j = np.nonzero(sims >= threshold - _SCREEN_MARGIN)
            i, j = i + start, j + column
            keep = i < j
            i, j = i[keep], j[keep]
            exact = _exact_cosines(embeddings, i, j)
            confirmed = exact >= threshold
            firsts.append(i[confirmed])
            seconds.append(j[confirmed])
            sims_out.append(exact[confirmed])
    num_products = len(embeddings) * (len(embeddings) + 1) // 2
    return np.concatenate(firsts), np.concatenate(seconds), np.concatenate(sims_out), num_products


def semantic_edges(
    keys: pa.Array | list[str], embeddings: np.ndarray, labels: np.ndarray, threshold: float
) -> pa.Table:
    """Edges ``(a, b, similarity)`` between keys of the same cluster whose cosine is ≥ ``threshold``."""
    keys = np.asarray(keys.to_pylist() if isinstance(keys, pa.Array | pa.ChunkedArray) else keys, object)
    order = np.lexsort((keys.astype(str), labels))  # by cluster, then key: a fixed order per cluster
    if not np.array_equal(order, np.arange(len(order))):  # already in order (the phases sort): no copy
        labels, keys, embeddings = labels[order], keys[order], embeddings[order]
    bounds = np.flatnonzero(np.concatenate([[True], labels[1:] != labels[:-1], [True]]))
    a, b, similarity = [], [], []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        i, j, sims, _ = cluster_pairs(embeddings[start:end], threshold)
        a.extend(keys[start + i].tolist())
        b.extend(keys[start + j].tolist())
        similarity.extend(sims.tolist())
    return pa.table(
        {
            "a": pa.array(a, pa.string()),
            "b": pa.array(b, pa.string()),
            "similarity": pa.array(similarity, pa.float64()),
        }
    )
