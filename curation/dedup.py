"""Duplicates: exact (sha256), near (pHash within ``max_hamming`` bits) and semantic (``curation.semdedup``).

Everything here works on Arrow tables and NumPy arrays of one partition or bucket; ``curation.phases``
runs it over hash-partitioned Parquet, and ``mark_duplicates`` over a small in-memory table (tests).

Edges. Rows with the same sha256 are joined to the smallest key of their group (a star: a group of k rows
costs k - 1 edges, never k²); so are rows with the same pHash. Distinct pHash values within
``max_hamming`` bits are found by multi-index hashing over wide bands (below). Semantic pairs come from
CLIP embeddings. Each edge says "same picture"; groups are the connected components of all edges.

Keeper. One row per group survives, by a fixed order: more pixels, then higher aesthetic score (null
last), then the smaller key. It depends only on the group, never on arrival order or partitioning; the
others become ``duplicate`` rejections with ``dup_of`` = the keeper.

Near pHash search (multi-index hashing, meet in the middle). The 64 bits are cut into bands; each distinct
value is indexed under its band value and the band values one bit away, so two values that share an
index entry differ by at most 2 bits in that band, and every such candidate is then checked on all 64
bits (precision is exact). Layouts (``band_layout``):

- ``num_splits`` k (the default, k = 1): k cuts of the bits into two 32-bit bands (cut 0: the high and
  low halves; the others after a fixed random permutation). A pair within ≤ 5 bits differs by ≤ 2 bits in
  one half of any cut, so the search is **exact** for ``max_hamming`` ≤ 5; above, a pair is missed when
  every cut divides its bits 3/3 or worse (recall per k measured in docs/benchmarks.md). Cost: 33 index
  entries per value per band, and a 32-bit band value is shared by N / 2³² random hashes (0.008 at
  33M), so the candidate pairs grow linearly with N.
- ``num_splits`` None: exact for any ``max_hamming``: ``max_hamming // 3 + 1`` bands, narrower than 32
  bits above 5, whose buckets (hence candidates per value) grow with N.

Each band's entries are partitioned by their top ``part_bits`` bits; a partition reads the values whose
top bits are equal or one bit away, so partitions are independent tasks with the same answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from manifests.schema import KEPT, REJECTED

HASH_BITS = 64
BAND_BITS = 32
BANDS_PER_SPLIT = HASH_BITS // BAND_BITS
EXACT_MAX_HAMMING = 5  # 2 bands × (2 bits each) + 1: beyond, some pairs split their bits 3/3
_PERMUTATION_SEED = 20240305
EDGES = pa.schema([("a", pa.string()), ("b", pa.string())])
DUPLICATES = pa.schema([("key", pa.string()), ("dup_of", pa.string())])


def keeper_order(row: dict) -> tuple:
    """Sort key of a row dict: the first row of a group in this order is its keeper (see ``keepers``)."""
    aesthetic = row.get("aesthetic")
    return (
        -(row["width"] * row["height"]),
        -(aesthetic if aesthetic is not None else float("-inf")),
        row["key"],
    )


# ----------------------------------------------------------------------------------------------------
# Near pHash search


@dataclass(frozen=True)
class Band:
    """Bits ``[shift, shift + width)`` of the hash after split ``split``'s bit permutation."""

    split: int
    shift: int
    width: int


def band_layout(max_hamming: int, num_splits: int | None) -> list[Band]:
    """The bands of the near search.

    ``num_splits`` None: exact for any ``max_hamming``: ``max_hamming // 3 + 1`` contiguous bands, so that
    a pair within range differs by ≤ 2 bits in one of them (pigeonhole); above 5 bits these bands are
    narrower than 32 bits and their buckets, hence the candidates per row, grow with N.
    ``num_splits`` k: 2k bands of 32 bits (near-linear), exact for ``max_hamming`` ≤ 5.
    """
    if num_splits is None:
        num_bands = max_hamming // 3 + 1
        widths = [HASH_BITS // num_bands + (i < HASH_BITS % num_bands) for i in range(num_bands)]
        return [Band(0, sum(widths[:i]), w) for i, w in enumerate(widths)]
    if num_splits < 1:
        raise ValueError(f"num_splits must be ≥ 1 or None, got {num_splits}")
    return [Band(s, b * BAND_BITS, BAND_BITS) for s in range(num_splits) for b in range(BANDS_PER_SPLIT)]


def is_exact(max_hamming: int, num_splits: int | None) -> bool:
    """Whether the search finds every pair within ``max_hamming`` bits."""
    return num_splits is None or max_hamming <= EXACT_MAX_HAMMING


def as_unsigned(phashes: np.ndarray) -> np.ndarray:
    """The manifest's signed int64 bit patterns as ``uint64`` (same bits)."""
    return np.asarray(phashes, np.int64).view(np.uint64)


def split_permutation(split: int) -> np.ndarray:
    """Source bit of each of the 64 output bits for ``split`` (identity for split 0)."""
    if split == 0:
        return np.arange(HASH_BITS)
    return np.random.default_rng([_PERMUTATION_SEED, split]).permutation(HASH_BITS)


def permute_bits(values: np.ndarray, permutation: np.ndarray) -> np.ndarray:
    """``values`` (uint64) with output bit ``i`` taken from input bit ``permutation[i]`` (8 byte tables)."""
    if np.array_equal(permutation, np.arange(HASH_BITS)):
        return values
    out = np.zeros(len(values), np.uint64)
    byte_values = np.arange(256, dtype=np.uint64)
    for byte in range(8):
        table = np.zeros(256, np.uint64)
        for dst in range(HASH_BITS):
            src = int(permutation[dst])
            if src // 8 == byte:
                table |= ((byte_values >> np.uint64(src % 8)) & np.uint64(1)) << np.uint64(dst)
        out |= table[(values >> np.uint64(8 * byte)) & np.uint64(0xFF)]
    return out


def band_values(values: np.ndarray, band: Band) -> np.ndarray:
    """Each value's bits of ``band`` (uint64 holding ``band.width`` bits)."""
    permuted = permute_bits(values, split_permutation(band.split))
    mask = np.uint64((1 << band.width) - 1) if band.width < HASH_BITS else np.uint64(2**64 - 1)
    return (permuted >> np.uint64(band.shift)) & mask


def _index_entries(bands: np.ndarray, width: int, part: int, part_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(entry value, row) of every band value 0 or 1 bit away whose top ``part_bits`` bits are ``part``."""
    low_bits = width - part_bits
    top = bands >> np.uint64(low_bits) if part_bits else np.zeros(len(bands), np.uint64)
    diff = top ^ np.uint64(part)
    same = np.flatnonzero(diff == 0)
    flips = np.concatenate([[0], np.uint64(1) << np.arange(low_bits, dtype=np.uint64)]).astype(np.uint64)
    values = [(bands[same, None] ^ flips[None, :]).ravel()]
    rows = [np.repeat(same, len(flips))]
    if part_bits:
        adjacent = np.flatnonzero(np.bitwise_count(diff) == 1)  # one flip of a top bit lands in `part`
        values.append(bands[adjacent] ^ (diff[adjacent] << np.uint64(low_bits)))
        rows.append(adjacent)
    return np.concatenate(values), np.concatenate(rows)


def _packed_entries(bands: np.ndarray, width: int, part: int, part_bits: int) -> np.ndarray | None:
    """The entries of ``_index_entries`` as one sorted uint64 array ``value << 32 | row`` (half the memory
    and one sort); ``None`` when values or rows need more than 32 bits (the 64-bit band of ≤ 2 bits)."""
    if width > 32 or len(bands) >= 1 << 32:
        return None
    low_bits = width - part_bits
    top = bands >> np.uint64(low_bits) if part_bits else np.zeros(len(bands), np.uint64)
    diff = top ^ np.uint64(part)
    same = np.flatnonzero(diff == 0).astype(np.uint64)
    flips = np.concatenate([[0], np.uint64(1) << np.arange(low_bits, dtype=np.uint64)]).astype(np.uint64)
    packed = [((bands[same, None] ^ flips[None, :]) << np.uint64(32) | same[:, None]).ravel()]
    if part_bits:
        adjacent = np.flatnonzero(np.bitwise_count(diff) == 1).astype(np.uint64)
        flipped = bands[adjacent] ^ (diff[adjacent] << np.uint64(low_bits))
        packed.append(flipped << np.uint64(32) | adjacent)
    packed = np.concatenate(packed) if len(packed) > 1 else packed[0]
    packed.sort()
    return packed


def _pairs_in_runs(entries: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All row pairs that share an entry value (each run of equal entries gives every pair of its rows);
    ``entries`` sorted, ``rows`` an array or a function from positions to rows (read lazily)."""
    row_at = rows if callable(rows) else rows.__getitem__
    if len(entries) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    boundary = np.flatnonzero(entries[1:] != entries[:-1]) + 1
    starts = np.concatenate([[0], boundary])
    lengths = np.diff(np.concatenate([starts, [len(entries)]]))
    long = lengths >= 2
    starts, lengths = starts[long], lengths[long]
    position = np.repeat(starts, lengths) + (
        np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    )
    end = np.repeat(starts + lengths, lengths)
    firsts, seconds = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    offset = 1
    while position.size:  # total work = the number of pairs
        ok = position + offset < end
        position, end = position[ok], end[ok]
        firsts.append(row_at(position))
        seconds.append(row_at(position + offset))
        offset += 1
    return np.concatenate(firsts).astype(np.int64), np.concatenate(seconds).astype(np.int64)


def near_value_pairs(
    values: np.ndarray, *, max_hamming: int, band: Band, part: int = 0, part_bits: int = 0
) -> tuple[np.ndarray, int]:
    """Index pairs ``(i, j)``, ``i < j``, of unique ``values`` (uint64) within ``max_hamming`` bits that share
    an index entry in one partition of one band; and how many candidate pairs were checked."""
    bands = band_values(values, band)
    packed = _packed_entries(bands, band.width, part, part_bits)
    if packed is not None:
        entries = packed >> np.uint64(32)

        def rows(positions: np.ndarray) -> np.ndarray:
            return (packed[positions] & np.uint64(0xFFFFFFFF)).astype(np.int64)

    else:
        entries, rows = _index_entries(bands, band.width, part, part_bits)
        order = np.lexsort((rows, entries))
        entries, rows = entries[order], rows[order]
    first, second = _pairs_in_runs(entries, rows)
    close = np.bitwise_count(values[first] ^ values[second]) <= max_hamming
    low, high = np.minimum(first, second)[close], np.maximum(first, second)[close]
    pairs = np.unique(np.stack([low, high], axis=1), axis=0) if len(low) else np.zeros((0, 2), np.int64)
    return pairs, len(first)


def near_tasks(max_hamming: int, num_splits: int | None, part_bits: int) -> list[dict]:
    """The (band, part) items of one full near search; none when ``max_hamming`` is 0."""
    if max_hamming == 0:
        return []
    return [
        {"band": band, "part": p, "part_bits": min(part_bits, band.width - 1)}
        for band in band_layout(max_hamming, num_splits)
        for p in range(1 << min(part_bits, band.width - 1))
    ]


def all_near_pairs(values: np.ndarray, *, max_hamming: int, num_splits: int | None) -> np.ndarray:
    """Every index pair the search finds over unique ``values`` in one process, ``(K, 2)`` sorted."""
    found = [np.zeros((0, 2), np.int64)] + [
        near_value_pairs(values, max_hamming=max_hamming, **task)[0]
        for task in near_tasks(max_hamming, num_splits, part_bits=0)
    ]
    return np.unique(np.concatenate(found), axis=0)


def value_pair_table(values: np.ndarray, pairs: np.ndarray) -> pa.Table:
    """Index pairs as a table of the two pHash values (signed int64, like the manifest)."""
    return pa.table({"u": values[pairs[:, 0]].view(np.int64), "v": values[pairs[:, 1]].view(np.int64)})


def near_pairs(
    keys: list[str], hashes: list[int], max_hamming: int, *, num_splits: int | None = None
) -> list[tuple[str, str]]:
    """Key pairs ``(a, b)``, ``a < b``, whose hashes differ in at most ``max_hamming`` bits (small inputs)."""
    table = pa.table({"key": pa.array(keys, pa.string()), "phash": pa.array(hashes, pa.int64())})
    unique, _ = unique_hashes(table)
    values = as_unsigned(unique.column("phash").to_numpy())
    pairs = value_pair_table(values, all_near_pairs(values, max_hamming=max_hamming, num_splits=num_splits))
    same = pa.table({"u": unique.column("phash"), "v": unique.column("phash")})
    found = _query(
        """
        SELECT DISTINCT least(x.key, y.key) AS a, greatest(x.key, y.key) AS b
        FROM pairs p JOIN hashed x ON x.phash = p.u JOIN hashed y ON y.phash = p.v
        WHERE x.key <> y.key ORDER BY a, b
        """,
        pairs=pa.concat_tables([pairs, same]),
        hashed=table,
    )
    return list(zip(found.column("a").to_pylist(), found.column("b").to_pylist(), strict=True))


# ----------------------------------------------------------------------------------------------------
# Edges and groups


def _query(sql: str, **tables: pa.Table) -> pa.Table:
    con = duckdb.connect()
    try:
        for name, table in tables.items():
            con.register(name, table)
        return con.sql(sql).to_arrow_table()
    finally:
        con.close()


def exact_edges(table: pa.Table) -> pa.Table:
    """Star edges (smallest key → each other key) of rows that share a sha256; ``table``: key, sha256."""
    return _query(
        """
        SELECT a, key AS b FROM (SELECT key, min(key) OVER (PARTITION BY sha256) AS a FROM rows
                                 WHERE sha256 IS NOT NULL)
        WHERE key <> a ORDER BY a, b
        """,
        rows=table,
    ).cast(EDGES)


def unique_hashes(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """``(unique, star)``: each distinct pHash with its smallest key (``phash``, ``rep``), and star edges
    from that key to the other rows with the same hash; ``table``: key, phash."""
    unique = _query(
        "SELECT phash, min(key) AS rep FROM rows WHERE phash IS NOT NULL GROUP BY phash ORDER BY phash",
        rows=table,
    )
    star = _query(
        "SELECT u.rep AS a, r.key AS b FROM rows r JOIN unique_ u USING (phash) WHERE r.key <> u.rep "
        "ORDER BY a, b",
        rows=table,
        unique_=unique,
    ).cast(EDGES)
    return unique, star


def value_edges(value_pairs: pa.Table, unique: pa.Table) -> pa.Table:
    """Edges between the representative keys of near pHash value pairs (``u``, ``v``)."""
    return _query(
        "SELECT x.rep AS a, y.rep AS b FROM pairs p JOIN unique_ x ON x.phash = p.u "
        "JOIN unique_ y ON y.phash = p.v ORDER BY a, b",
        pairs=value_pairs,
        unique_=unique,
    ).cast(EDGES)


def keepers(edges: pa.Table, attributes: pa.Table) -> pa.Table:
    """``(key, dup_of)`` of every non-keeper of each connected component of ``edges``, sorted by key.

    ``attributes``: key, pixels, aesthetic of (at least) every key in ``edges``.
    """
    if edges.num_rows == 0:
        return DUPLICATES.empty_table()
    con = duckdb.connect()
    try:
        con.register("edges", edges)
        nodes = con.sql(
            "SELECT key FROM (SELECT a AS key FROM edges UNION SELECT b FROM edges) ORDER BY key"
        ).to_arrow_table()
        con.register("nodes", nodes.append_column("id", pa.array(np.arange(nodes.num_rows), pa.int64())))
        ids = con.execute(
            "SELECT x.id, y.id FROM edges e JOIN nodes x ON x.key = e.a JOIN nodes y ON y.key = e.b"
        ).fetchnumpy()
        first, second = ids["id"], ids["id_1"]
        graph = coo_matrix((np.ones(len(first), np.int8), (first, second)), shape=(nodes.num_rows,) * 2)
        _, labels = connected_components(graph, directed=False)
        con.register("labelled", nodes.append_column("label", pa.array(labels, pa.int64())))
        con.register("attributes", attributes)
        return (
            con.sql(
                """
            WITH ranked AS (
                SELECT l.key, l.label, first(l.key ORDER BY a.pixels DESC, a.aesthetic DESC NULLS LAST, l.key)
                       OVER (PARTITION BY l.label) AS keeper
                FROM labelled l JOIN attributes a USING (key)
            )
            SELECT key, keeper AS dup_of FROM ranked WHERE key <> keeper ORDER BY key
            """
            )
            .to_arrow_table()
            .cast(DUPLICATES)
        )
    finally:
        con.close()


def mark_duplicates(
    rows: list[dict], *, max_hamming: int | None, num_splits: int | None = None
) -> list[dict]:
    """Rows with every kept row that repeats another (same sha256, or pHash within ``max_hamming`` bits;
    ``None`` turns the near pass off) turned into a ``duplicate`` rejection naming its keeper.

    The in-memory composition of the functions the partitioned phases run (small inputs and tests).
    """
    kept = [r for r in rows if r["status"] == KEPT]
    table = pa.table(
        {
            "key": pa.array([r["key"] for r in kept], pa.string()),
            "sha256": pa.array([r.get("sha256") for r in kept], pa.string()),
            "phash": pa.array([r.get("phash") for r in kept], pa.int64()),
            "pixels": pa.array([r["width"] * r["height"] for r in kept], pa.int64()),
            "aesthetic": pa.array([r.get("aesthetic") for r in kept], pa.float32()),
        }
    )
    edges = [exact_edges(table.select(["key", "sha256"]))]
    if max_hamming is not None:
        unique, star = unique_hashes(table.select(["key", "phash"]))
        values = as_unsigned(unique.column("phash").to_numpy())
        pairs = all_near_pairs(values, max_hamming=max_hamming, num_splits=num_splits)
        edges += [star, value_edges(value_pair_table(values, pairs), unique)]
    dups = keepers(pa.concat_tables(edges), table.select(["key", "pixels", "aesthetic"]))
    dup_of = dict(zip(dups.column("key").to_pylist(), dups.column("dup_of").to_pylist(), strict=True))
    return [
        {**row, "status": REJECTED, "reason": "duplicate", "tier": None, "dup_of": dup_of[row["key"]]}
        if row["key"] in dup_of
        else row
        for row in rows
    ]
