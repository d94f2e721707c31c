"""Global deduplication over the manifest rows of a whole run (all blocks, all nodes).

Exact duplicates share a sha256. One keeper per group by a fixed rule — more pixels, then higher
aesthetic score, then the smaller key — so the result does not depend on arrival order; the others are
rejected as ``duplicate`` with ``dup_of`` naming the keeper.
"""

from __future__ import annotations

from manifests.schema import KEPT, REJECTED


def keeper_order(row: dict) -> tuple:
    """Sort key: the first row of a group in this order is its keeper."""
    aesthetic = row.get("aesthetic")
    return (
        -(row["width"] * row["height"]),
        -(aesthetic if aesthetic is not None else float("-inf")),
        row["key"],
    )


def mark_exact_duplicates(rows: list[dict]) -> list[dict]:
    """Rows with every kept row that repeats another's sha256 turned into a ``duplicate`` rejection."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row["status"] == KEPT:
            groups.setdefault(row["sha256"], []).append(row)
    dup_of: dict[str, str] = {}
    for group in groups.values():
        keeper, *others = sorted(group, key=keeper_order)
        dup_of.update({r["key"]: keeper["key"] for r in others})
    return [
        {**row, "status": REJECTED, "reason": "duplicate", "tier": None, "dup_of": dup_of[row["key"]]}
        if row["key"] in dup_of
        else row
        for row in rows
    ]
