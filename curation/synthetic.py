"""Synthetic scored chunks: what the scan and score stages would have committed, without any images.

For the scale test and ``bench/bench_curation_scale.py``: ``num_rows`` rows with random keys, a share
rejected earlier (``too_small``), and among the kept rows planted duplicates whose answer is known:
``exact_rate`` byte copies (same sha256 and pHash) and ``near_rate`` near copies (pHash 1..``max_flip``
bits away, new sha256). Generation is vectorised (8M rows in seconds) and seeded.
"""

from __future__ import annotations

import binascii
import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation import keyspace
from curation.phases import SCORED, ScoredPart
from manifests.schema import KEPT, REJECTED


def _hex_strings(rng: np.random.Generator, num: int, num_bytes: int) -> pa.Array:
    digits = binascii.hexlify(rng.bytes(num * num_bytes))
    offsets = np.arange(0, 2 * num_bytes * num + 1, 2 * num_bytes, dtype=np.int32)
    return pa.StringArray.from_buffers(num, pa.py_buffer(offsets.tobytes()), pa.py_buffer(digits))


def scored_table(
    num_rows: int,
    *,
    seed: int = 0,
    kept_rate: float = 0.7,
    exact_rate: float = 0.01,
    near_rate: float = 0.01,
    max_flip: int = 4,
) -> pa.Table:
    """SCORED rows sorted by key; duplicates are copies of earlier rows, placed anywhere in key order."""
    return scored_rows(num_rows, seed=seed, kept_rate=kept_rate, exact_rate=exact_rate, near_rate=near_rate,
                       max_flip=max_flip)[0]  # fmt: skip


def scored_rows(
    num_rows: int,
    *,
    seed: int = 0,
    kept_rate: float = 0.7,
    exact_rate: float = 0.01,
    near_rate: float = 0.01,
    semantic_rate: float = 0.0,
    max_flip: int = 4,
    data_bytes: int = 0,
) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """``scored_table`` and, per row in key order, the row whose picture it shows (``origin``: itself, or
    the original of a copy) and whether it is a byte copy; ``semantic_rate`` more kept rows are semantic
    copies (new bytes and pHash, an embedding close to their original's: ``write_embeddings``).
    ``data_bytes`` > 0: each row carries that many inline image bytes (``data``; sha256 is theirs), so
    shards can be written."""
    rng = np.random.default_rng(seed)
    keys = _hex_strings(rng, num_rows, 10)
    sha_arrow = _hex_strings(rng, num_rows, 32)
    phash = rng.integers(0, 2**64, num_rows, dtype=np.uint64)
    kept = rng.random(num_rows) < kept_rate
    kind = rng.random(num_rows)
    copy_of = rng.integers(0, num_rows, num_rows)
    exact = kept & kept[copy_of] & (kind < exact_rate) & (copy_of != np.arange(num_rows))
    near = kept & kept[copy_of] & (kind >= exact_rate) & (kind < exact_rate + near_rate)
    near &= copy_of != np.arange(num_rows)
    sha_index = np.where(exact, copy_of, np.arange(num_rows))
    flips = np.zeros(num_rows, np.uint64)
    for _ in range(max_flip):  # up to max_flip distinct-or-repeated bits; at least one differs
        bit = rng.integers(0, 64, num_rows).astype(np.uint64)
        flips ^= np.where(rng.random(num_rows) < 0.6, np.uint64(1) << bit, np.uint64(0))
    flips = np.where(flips == 0, np.uint64(1) << rng.integers(0, 64, num_rows).astype(np.uint64), flips)
    phash = np.where(exact, phash[copy_of], np.where(near, phash[copy_of] ^ flips, phash))
    semantic = kept & kept[copy_of] & (copy_of != np.arange(num_rows)) & ~exact & ~near
    semantic &= rng.random(num_rows) < semantic_rate / max(kept_rate * kept_rate, 1e-9)
    origin = np.where(exact | near | semantic, copy_of, np.arange(num_rows))
    width = rng.integers(1024, 4096, num_rows).astype(np.int32)
    height = rng.integers(1024, 4096, num_rows).astype(np.int32)
    width = np.where(exact | near, width[copy_of], width)
    height = np.where(exact | near, height[copy_of], height)
    tier = np.where(width.astype(np.int64) * height >= 3840 * 2160, "4k", "1k")
    fmt = np.array(["JPEG", "PNG", "WEBP"])[np.searchsorted([0.7, 0.9], rng.random(num_rows), side="right")]
    mask = pa.array(~kept)
    null_str = pa.nulls(num_rows, pa.string())
    sources = pc.binary_join_element_wise("file:///synthetic/", keys, ".jpg", "")
    table = pa.table(
        {
            "key": keys,
            "source": sources,
            "status": pa.array(np.where(kept, KEPT, REJECTED)),
            "reason": pc.if_else(mask, "too_small", null_str),
            "width": width,
            "height": height,
            "format": pa.array(fmt),
            "num_bytes": pa.array(rng.integers(10_000, 5_000_000, num_rows)),
            "sha256": pc.if_else(mask, null_str, sha_arrow.take(pa.array(sha_index))),
            "tier": pc.if_else(mask, null_str, pa.array(tier)),
            "aesthetic": pc.if_else(
                mask,
                pa.nulls(num_rows, pa.float32()),
                pa.array(rng.normal(5.5, 1, num_rows).astype(np.float32)),
            ),
            "phash": pc.if_else(mask, pa.nulls(num_rows, pa.int64()), pa.array(phash.view(np.int64))),
        }
    )
    if data_bytes:
        data = rng.integers(0, 256, (num_rows, data_bytes), dtype=np.uint8)
        data[exact] = data[copy_of[exact]]
        offsets = np.arange(0, data_bytes * num_rows + 1, data_bytes, dtype=np.int32)
        table = table.append_column(
            "data", pa.BinaryArray.from_buffers(pa.binary(), num_rows, [None, pa.py_buffer(offsets),
                                                                         pa.py_buffer(data.tobytes())])
        )  # fmt: skip
        digests = [hashlib.sha256(row.tobytes()).hexdigest() for row in data]
        table = table.set_column(
            table.schema.get_field_index("sha256"), "sha256", pc.if_else(mask, null_str, pa.array(digests))
        )
    columns = [table[f.name] if f.name in table.column_names else pa.nulls(num_rows, f.type) for f in SCORED]
    order = pc.sort_indices(table, [("key", "ascending")]).to_numpy()
    position = np.empty(num_rows, np.int64)
    position[order] = np.arange(num_rows)
    sorted_table = pa.Table.from_arrays(columns, schema=SCORED).take(pa.array(order))
    return sorted_table, position[origin[order]], exact[order]


def write_embeddings(
    parts: list[ScoredPart], table: pa.Table, origin: np.ndarray, copy: np.ndarray, folder: Path, *, dim: int
) -> list[ScoredPart]:
    """A clip_embeddings file per scored chunk (kept rows, fp16, L2-normalised) and the parts naming it.

    Each picture's embedding is the normalised sum of 4 of ``_BASIS_ROWS`` fixed random unit vectors chosen
    by hashing its ``origin`` (unrelated pictures: cosine ~0.1); a near or semantic copy adds a 0.2 × unit
    vector of its own (cosine ~0.98 to its original), a byte copy is identical."""
    basis = np.random.default_rng(dim).standard_normal((_BASIS_ROWS, dim)).astype(np.float32)
    basis /= np.linalg.norm(basis, axis=1, keepdims=True)
    folder.mkdir(parents=True, exist_ok=True)
    kept = pc.equal(table["status"], KEPT).to_numpy(zero_copy_only=False)
    out, start = [], 0
    for part in parts:
        rows = np.arange(start, start + part.num_rows)[kept[start : start + part.num_rows]]
        start += part.num_rows
        vectors = sum(basis[_mix(origin[rows], salt)] for salt in range(1, 5))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        noisy = (origin[rows] != rows) & ~copy[rows]
        vectors[noisy] += 0.2 * basis[_mix(rows[noisy], 5)]
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        values = pa.array(vectors.astype(np.float16).ravel())
        offsets = pa.array(np.arange(0, dim * len(rows) + 1, dim, dtype=np.int32))
        path = folder / f"{Path(part.path).stem}.parquet"
        pq.write_table(
            pa.table({"key": table["key"].take(pa.array(rows)), "clip_model": pa.nulls(len(rows), pa.string()).fill_null("synthetic"),
                      "embedding": pa.ListArray.from_arrays(offsets, values)}),
            path,
        )  # fmt: skip
        out.append(dataclasses.replace(part, embeddings=str(path)))
    return out


_BASIS_ROWS = 1 << 16


def _mix(rows: np.ndarray, salt: int) -> np.ndarray:
    """A fixed pseudo-random basis row per (row, salt) (splitmix-style multiply and shift)."""
    mixed = (rows.astype(np.uint64) + np.uint64(salt)) * np.uint64(0x9E3779B97F4A7C15)
    return ((mixed ^ (mixed >> np.uint64(29))) * np.uint64(0xBF58476D1CE4E5B9) >> np.uint64(48)).astype(
        np.int64
    )


def write_chunks(table: pa.Table, folder: Path, *, chunk_rows: int) -> list[ScoredPart]:
    """``table`` (sorted by key) as scored chunk files over key-range trie leaves of ≤ ``chunk_rows`` rows."""
    folder.mkdir(parents=True, exist_ok=True)
    bits = keyspace.key_bits(table["key"])
    depth = keyspace.fine_depth(len(bits), chunk_rows)
    while True:
        try:
            leaves = keyspace.plan_ranges(*keyspace.prefix_counts(bits, depth), depth, chunk_rows)
            break
        except keyspace.DepthTooShallow:
            depth += 4
    starts = np.searchsorted(bits, np.array([leaf.start for leaf in leaves], np.uint64))
    ends = np.append(starts[1:], len(bits))
    parts = []
    for leaf, start, end in zip(leaves, starts, ends, strict=True):
        path = folder / f"chunk-{leaf.name}.parquet"
        pq.write_table(table.slice(start, end - start), path, compression="zstd")
        parts.append(ScoredPart(str(path), leaf.lo, leaf.hi, int(end - start)))
    return parts
