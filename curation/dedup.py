"""Global deduplication over the manifest rows of a whole run (all blocks, all nodes).

Exact duplicates share a sha256; near duplicates have 64-bit pHashes within ``max_hamming`` bits. Near
pairs come from a banded index: the 64 bits are cut into ``max_hamming + 1`` bands, and two hashes that
differ in at most ``max_hamming`` bits agree exactly on at least one band (pigeonhole), so an equi-join
per band finds every candidate pair without comparing all pairs; each candidate is then checked on its
full Hamming distance. The join runs in DuckDB over the Arrow table of kept rows.

Pairs are merged into groups (connected components, so a chain a~b~c is one group). One keeper per
group by a fixed rule — more pixels, then higher aesthetic score, then the smaller key — so the result
does not depend on arrival order; the others are rejected as ``duplicate`` with ``dup_of`` = the keeper.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

from manifests.schema import KEPT, REJECTED

HASH_BITS = 64


def keeper_order(row: dict) -> tuple:
    """Sort key: the first row of a group in this order is its keeper."""
    aesthetic = row.get("aesthetic")
    return (
        -(row["width"] * row["height"]),
        -(aesthetic if aesthetic is not None else float("-inf")),
        row["key"],
    )


def bands(max_hamming: int) -> list[tuple[int, int]]:
    """``(shift, mask)`` of each of the ``max_hamming + 1`` bands that together cover all 64 bits."""
    num_bands = max_hamming + 1
    widths = [HASH_BITS // num_bands + (i < HASH_BITS % num_bands) for i in range(num_bands)]
    shifts = [sum(widths[:i]) for i in range(num_bands)]
    return [(shift, (1 << width) - 1) for shift, width in zip(shifts, widths, strict=True)]


def near_pairs(keys: list[str], hashes: list[int], max_hamming: int) -> list[tuple[str, str]]:
    """Pairs ``(a, b)``, ``a < b``, whose hashes differ in at most ``max_hamming`` bits (banded join)."""
    if len(keys) < 2:
        return []
    hashed = pa.table({"key": keys, "phash": pa.array(hashes, pa.int64())})
    band_table = pa.table(
        {
            "band": list(range(max_hamming + 1)),
            "shift": [s for s, _ in bands(max_hamming)],
            # As int64 bit patterns: a single 64-bit band (max_hamming = 0) has mask -1.
            "mask": pa.array(
                [m - (1 << 64) if m >= 1 << 63 else m for _, m in bands(max_hamming)], pa.int64()
            ),
        }
    )
    con = duckdb.connect()
    con.register("hashed", hashed)
    con.register("band_table", band_table)
    # `>>` on a signed BIGINT sign-extends; the mask keeps only the band's own bits.
    pairs = con.execute(
        """
        WITH banded AS (
            SELECT h.key, h.phash, b.band, (h.phash >> b.shift) & b.mask AS value
            FROM hashed h CROSS JOIN band_table b
        )
        SELECT DISTINCT x.key, y.key
        FROM banded x JOIN banded y ON x.band = y.band AND x.value = y.value AND x.key < y.key
        WHERE bit_count(xor(x.phash, y.phash)) <= ?
        ORDER BY 1, 2
        """,
        [max_hamming],
    ).fetchall()
    con.close()
    return pairs


def _groups(keys: list[str], pairs: list[tuple[str, str]]) -> list[list[str]]:
    """Connected components of the pair graph (union-find), singletons left out."""
    parent = {k: k for k in keys}

    def find(k: str) -> str:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    components: dict[str, list[str]] = {}
    for k in keys:
        components.setdefault(find(k), []).append(k)
    return [c for c in components.values() if len(c) > 1]


def mark_duplicates(rows: list[dict], *, max_hamming: int | None) -> list[dict]:
    """Rows with every kept row that repeats another (same sha256, or pHash within ``max_hamming``
    bits; ``None`` turns the near pass off) turned into a ``duplicate`` rejection naming its keeper."""
    kept = [r for r in rows if r["status"] == KEPT]
    by_key = {r["key"]: r for r in kept}
    first_with_sha: dict[str, str] = {}
    pairs = []
    for row in sorted(kept, key=lambda r: r["key"]):
        if row.get("sha256") is not None:
            other = first_with_sha.setdefault(row["sha256"], row["key"])
            if other != row["key"]:
                pairs.append((other, row["key"]))
    if max_hamming is not None:
        hashed = [r for r in kept if r.get("phash") is not None]
        pairs += near_pairs([r["key"] for r in hashed], [r["phash"] for r in hashed], max_hamming)
    dup_of: dict[str, str] = {}
    for group in _groups(list(by_key), pairs):
        keeper, *others = sorted((by_key[k] for k in group), key=keeper_order)
        dup_of.update({r["key"]: keeper["key"] for r in others})
    return [
        {**row, "status": REJECTED, "reason": "duplicate", "tier": None, "dup_of": dup_of[row["key"]]}
        if row["key"] in dup_of
        else row
        for row in rows
    ]


def mark_exact_duplicates(rows: list[dict]) -> list[dict]:
    """Exact duplicates only (same sha256)."""
    return mark_duplicates(rows, max_hamming=None)
