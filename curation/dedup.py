"""Duplicates: exact (sha256), near (pHash within ``max_hamming`` bits) and semantic (``curation.semdedup``).

Everything here works on Arrow tables and NumPy arrays of one partition or bucket; ``curation.phases``
runs it over hash-partitioned Parquet, and ``mark_duplicates`` over a small in-memory table (tests).

Matches. Two rows match directly when they share a sha256 (``duplicate: sha256``), their pHashes are within
``max_hamming`` bits (``duplicate: phash <bits>``, 0 for equal hashes) or their CLIP embeddings are within
the cosine threshold (``duplicate: semantic <cosine>``, ``curation.semdedup``). Equality is stored as
classes (the phases write star edges: k - 1 per class of k rows, never k²), distinct pHash values within
range as value pairs, semantic matches as key pairs with their similarity.

Keeper (``keepers``). The connected components of the matches are the unit of work; within one, rows are
walked in a fixed order (more pixels, then higher aesthetic score, null last, then the smaller key) and a
row is rejected only when it matches a row already kept directly: never by a chain (SemDeDup, NeMo
Curator). ``dup_of`` names that kept row (the first in the order, when several match) and ``reason`` the
test and its value. The outcome depends only on the rows, never on arrival order or partitioning.

Near pHash search (multi-index hashing, meet in the middle). The 64 bits are cut into bands; each distinct
value is indexed under its band value and the band values one bit away, so two values that share an
index entry differ by at most 2 bits in that band, and every such candidate is then checked on all 64
bits (precision is exact). Layouts (``band_layout``):

- ``num_splits`` k (the default, k = 1): k cuts of the bits into two 32-bit bands (cut 0: the high and
  low halves; the others after a fixed random permutation). A pair within ≤ 5 bits differs by ≤ 2 bits in
  one half of any cut, so the search is **exact** for ``max_hamming`` ≤ 5; above, a pair is missed when
  every cut divides its bits 3/3 or worse (recall per k measured in docs/benchmarks.md), so configs refuse
  it (``require_exact``). Cost: 33 index
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
import pyarrow.compute as pc
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from curation import semdedup
from manifests.schema import KEPT, REJECTED

HASH_BITS = 64
BAND_BITS = 32
BANDS_PER_SPLIT = HASH_BITS // BAND_BITS
EXACT_MAX_HAMMING = 5  # 2 bands × (2 bits each) + 1: beyond, some pairs split their bits 3/3
_PERMUTATION_SEED = 20240305
EDGES = pa.schema([("a", pa.string()), ("b", pa.string())])
DUPLICATES = pa.schema([("key", pa.string()), ("dup_of", pa.string()), ("reason", pa.string())])
NEAR = pa.schema([("u", pa.int64()), ("v", pa.int64())])  # distinct pHash value pairs
SEMANTIC = pa.schema([("a", pa.string()), ("b", pa.string()), ("similarity", pa.float64())])


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


def require_exact(max_hamming: int, num_splits: int | None) -> None:
    """Refuse a layout that would miss pairs: ``ValueError`` unless ``is_exact`` (the dedup never trades
    recall for speed silently; ``bench/calibrate_dedup.py`` measures the inexact layouts on purpose)."""
    if not is_exact(max_hamming, num_splits):
        raise ValueError(
            f"dedup.max_hamming {max_hamming} with phash_splits {num_splits}: 32-bit bands find every pair only "
            f"up to {EXACT_MAX_HAMMING} bits (a pair whose bits split 3/3 in every cut is missed); use "
            f"phash_splits None (CLI: --phash-splits exact, bands narrower than 32 bits) or max_hamming ≤ "
            f"{EXACT_MAX_HAMMING}"
        )


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


def _chain(classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges joining the members of each class (consecutive in a sort: k - 1 edges for k members);
    ``classes``: a class id per node, -1 for none."""
    order = np.argsort(classes, kind="stable")
    ordered = classes[order]
    same = (ordered[1:] == ordered[:-1]) & (ordered[1:] >= 0)
    return order[:-1][same], order[1:][same]


def _class_ids(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A dense id per distinct non-null value (-1 for null)."""
    encoded = pc.dictionary_encode(values)
    encoded = encoded.combine_chunks() if isinstance(encoded, pa.ChunkedArray) else encoded
    return encoded.indices.fill_null(-1).to_numpy().astype(np.int64)


@dataclass(frozen=True)
class _Matches:
    """Who matches whom among ``keepers``' nodes: equality classes and pairs, with their values."""

    sha_class: list[int]  # per node; -1: none
    phash_class: list[int]  # per node; -1: none (or the pHash test off)
    near: dict[int, list[tuple[int, int]]]  # pHash class → (class within range, bits apart)
    semantic: dict[int, list[tuple[int, float]]]  # node → (node, cosine)
    component: np.ndarray  # (N,) connected component of each node


def _matches(nodes: pa.Table, near: pa.Table, semantic: pa.Table) -> _Matches:
    """The match structure of ``nodes`` (sorted by key) and its connected components."""
    size = nodes.num_rows
    sha_class, phash_class = _class_ids(nodes["sha256"]), _class_ids(nodes["phash"])
    hashes = pc.fill_null(nodes["phash"], 0).to_numpy()
    classes, first_node = np.unique(phash_class, return_index=True)
    first_node = first_node[classes >= 0]  # one node per class: its hash, its place in the graph
    class_of = dict(zip(hashes[first_node].tolist(), phash_class[first_node].tolist(), strict=True))
    u = np.asarray([class_of[h] for h in near["u"].to_pylist()], np.int64)
    v = np.asarray([class_of[h] for h in near["v"].to_pylist()], np.int64)
    bits = np.bitwise_count(as_unsigned(near["u"].to_numpy()) ^ as_unsigned(near["v"].to_numpy()))
    near_of: dict[int, list[tuple[int, int]]] = {}
    for x, y, d in zip(u.tolist(), v.tolist(), bits.tolist(), strict=True):
        near_of.setdefault(x, []).append((y, d))
        near_of.setdefault(y, []).append((x, d))
    index = {key: i for i, key in enumerate(nodes["key"].to_pylist())}
    a = np.asarray([index[k] for k in semantic["a"].to_pylist()], np.int64)
    b = np.asarray([index[k] for k in semantic["b"].to_pylist()], np.int64)
    semantic_of: dict[int, list[tuple[int, float]]] = {}
    for x, y, cosine in zip(a.tolist(), b.tolist(), semantic["similarity"].to_pylist(), strict=True):
        semantic_of.setdefault(x, []).append((y, cosine))
        semantic_of.setdefault(y, []).append((x, cosine))
    node_of_class = np.full(max(int(phash_class.max()) + 1, 0), -1, np.int64)
    node_of_class[phash_class[first_node]] = first_node
    edges = [_chain(sha_class), _chain(phash_class), (a, b), (node_of_class[u], node_of_class[v])]
    first, second = np.concatenate([e[0] for e in edges]), np.concatenate([e[1] for e in edges])
    graph = coo_matrix((np.ones(len(first), np.int8), (first, second)), shape=(size, size))
    _, component = connected_components(graph, directed=False)
    return _Matches(sha_class.tolist(), phash_class.tolist(), near_of, semantic_of, component)


def _walk(order: list[int], matches: _Matches) -> list[tuple[int, int, str]]:
    """``(node, kept node, reason)`` of each rejected node, walking ``order``: a node is rejected when it
    matches a node already kept directly; the kept node is the first such in ``order``, the reason its
    strongest test (sha256, then the fewest pHash bits, then semantic)."""
    rank = {node: position for position, node in enumerate(order)}
    kept_sha: dict[int, int] = {}  # class → its kept node (at most one: a second would match it)
    kept_phash: dict[int, int] = {}
    kept: set[int] = set()
    rejected = []
    for node in order:
        found = []  # (rank of the kept node, strength, kept node, reason)
        sha, cls = matches.sha_class[node], matches.phash_class[node]
        if sha in kept_sha:
            found.append((rank[kept_sha[sha]], 0, kept_sha[sha], "duplicate: sha256"))
        if cls in kept_phash:
            found.append((rank[kept_phash[cls]], 1, kept_phash[cls], "duplicate: phash 0"))
        for other_cls, bits in matches.near.get(cls, ()):
            if other_cls in kept_phash:
                other = kept_phash[other_cls]
                found.append((rank[other], 1 + bits, other, f"duplicate: phash {bits}"))
        for other, cosine in matches.semantic.get(node, ()):
            if other in kept:
                found.append((rank[other], 2 + HASH_BITS, other, f"duplicate: semantic {cosine:.3f}"))
        if found:
            _, _, other, reason = min(found)
            rejected.append((node, other, reason))
            continue
        kept.add(node)
        if sha >= 0:
            kept_sha[sha] = node
        if cls >= 0:
            kept_phash[cls] = node
    return rejected


def keepers(nodes: pa.Table, near: pa.Table, semantic: pa.Table) -> pa.Table:
    """``(key, dup_of, reason)`` of every rejected duplicate among ``nodes``, sorted by key.

    ``nodes``: key, pixels, aesthetic, sha256, phash of every row that may match another (a sha256 or
    pHash shared with another row, a pHash in ``near``, a key in ``semantic``); ``near``: distinct pHash
    value pairs ``(u, v)`` within ``max_hamming`` bits; ``semantic``: key pairs ``(a, b, similarity)``.

    The rule never chains (SemDeDup, NeMo Curator): rows are walked in keeper order (``keeper_order``)
    within each connected component of the matches, and a row is rejected only when it matches a row
    already kept *directly*: the same sha256, a pHash within ``max_hamming`` bits (0 for equal), or a
    semantic pair. ``dup_of`` is the first such kept row in keeper order; when it matches by several
    tests, the reason names the strongest: ``duplicate: sha256``, then ``duplicate: phash <bits>``, then
    ``duplicate: semantic <cosine>``. So no kept row matches another kept row, and every rejected row
    is within a threshold of the row its ``dup_of`` names; a morph chain keeps every row that is not a
    direct match of a kept one. Components are independent: walking them one by one (here, in one task)
    or in separate tasks gives the same answer.
    """
    nodes = nodes.sort_by("key")
    if nodes.num_rows == 0:
        return DUPLICATES.empty_table()
    matches = _matches(nodes, near, semantic)
    aesthetic = nodes["aesthetic"].cast(pa.float64()).fill_null(-np.inf).to_numpy()
    pixels = nodes["pixels"].to_numpy()
    order = np.lexsort((np.arange(nodes.num_rows), -aesthetic, -pixels, matches.component)).tolist()
    rejected = _walk(order, matches)
    keys = nodes["key"].to_pylist()
    table = pa.table(
        {
            "key": [keys[node] for node, _, _ in rejected],
            "dup_of": [keys[other] for _, other, _ in rejected],
            "reason": [reason for _, _, reason in rejected],
        },
        schema=DUPLICATES,
    )
    return table.sort_by("key")


def mark_duplicates(
    rows: list[dict],
    *,
    max_hamming: int | None,
    num_splits: int | None = None,
    semantic_threshold: float | None = None,
) -> list[dict]:
    """Rows with every kept row that directly repeats a kept one (same sha256, pHash within ``max_hamming``
    bits, or ``embedding`` cosine ≥ ``semantic_threshold``; ``None`` turns that test off) turned into a
    ``duplicate: <test> <value>`` rejection naming that kept row (``keepers``).

    The in-memory composition of the functions the partitioned phases run (small inputs and tests); the
    semantic pairs are searched over all kept rows as one cluster.
    """
    kept = [r for r in rows if r["status"] == KEPT]
    phashes = [r.get("phash") if max_hamming is not None else None for r in kept]
    nodes = pa.table(
        {
            "key": pa.array([r["key"] for r in kept], pa.string()),
            "pixels": pa.array([r["width"] * r["height"] for r in kept], pa.int64()),
            "aesthetic": pa.array([r.get("aesthetic") for r in kept], pa.float32()),
            "sha256": pa.array([r.get("sha256") for r in kept], pa.string()),
            "phash": pa.array(phashes, pa.int64()),
        }
    )
    near = NEAR.empty_table()
    if max_hamming is not None:
        require_exact(max_hamming, num_splits)
        unique, _ = unique_hashes(nodes.select(["key", "phash"]))
        values = as_unsigned(unique.column("phash").to_numpy())
        near = value_pair_table(
            values, all_near_pairs(values, max_hamming=max_hamming, num_splits=num_splits)
        )
    semantic = SEMANTIC.empty_table()
    if semantic_threshold is not None:
        embedded = [r for r in kept if r.get("embedding") is not None]
        matrix = semdedup.embedding_matrix(
            pa.array([r["embedding"] for r in embedded], pa.list_(pa.float32()))
        )
        labels = np.zeros(len(embedded), np.int64)
        semantic = semdedup.semantic_edges([r["key"] for r in embedded], matrix, labels, semantic_threshold)
    dups = keepers(nodes, near, semantic)
    found = {
        k: (d, r) for k, d, r in zip(*(dups.column(c).to_pylist() for c in DUPLICATES.names), strict=True)
    }
    return [
        {
            **row,
            "status": REJECTED,
            "reason": found[row["key"]][1],
            "tier": None,
            "dup_of": found[row["key"]][0],
        }
        if row["key"] in found
        else row
        for row in rows
    ]
