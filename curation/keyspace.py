"""Key-space partitions: work chunks and shards as key-prefix ranges that stay put when inputs change.

Keys are hex digests (``curation.sources.key_for``), so their leading bits are uniform. A *range* is every
key whose first ``depth`` bits equal ``prefix``. ``plan_ranges`` cuts the key space like a binary trie:
a range is split in two while it holds more than ``max_rows`` keys, and its leaves are the plan. The plan
is a function of the key set alone (not of arrival order, partitioning or the counting depth), and adding
keys changes only the leaves they fall into (or splits them): a rerun that sees new inputs redoes those
ranges and keeps every other committed chunk and shard.

The plan is built on the driver from counts per fine prefix (a few per range), never from the keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

KEY_BITS = 64  # the first 16 hex digits of a key; enough to split any realistic corpus
_HEX_DIGITS = KEY_BITS // 4
_NIBBLE = np.full(256, 255, np.uint8)
_NIBBLE[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_NIBBLE[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)


@dataclass(frozen=True, order=True)
class KeyRange:
    """Keys whose first ``depth`` bits are ``prefix``: the half-open string range ``[lo, hi)``."""

    depth: int
    prefix: int

    def __post_init__(self) -> None:
        if not 0 <= self.depth <= KEY_BITS or not 0 <= self.prefix < (1 << self.depth):
            raise ValueError(f"bad key range: depth {self.depth}, prefix {self.prefix}")

    @property
    def start(self) -> int:
        return self.prefix << (KEY_BITS - self.depth)

    @property
    def lo(self) -> str:
        return f"{self.start:0{_HEX_DIGITS}x}"

    @property
    def hi(self) -> str | None:
        """The first key above the range (a 16-digit hex string), ``None`` at the top of the key space."""
        end = (self.prefix + 1) << (KEY_BITS - self.depth)
        return None if end >= 1 << KEY_BITS else f"{end:0{_HEX_DIGITS}x}"

    @property
    def name(self) -> str:
        """``r<depth, 2 digits><prefix in hex>``: stable, sortable within a depth, no dashes or dots."""
        return f"r{self.depth:02d}{self.prefix:0{math.ceil(self.depth / 4)}x}" if self.depth else "r00"

    def contains(self, key: str) -> bool:
        return key >= self.lo and (self.hi is None or key < self.hi)

    def overlaps(self, lo: str, hi: str | None) -> bool:
        """Whether this range meets the string range ``[lo, hi)`` (``hi`` ``None``: unbounded)."""
        return (hi is None or self.lo < hi) and (self.hi is None or lo < self.hi)


def key_bits(keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The first 64 bits of each hex key as ``uint64`` (vectorised; every key must be ≥ 16 hex digits)."""
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks() if keys.num_chunks != 1 else keys.chunk(0)
    if len(keys) == 0:
        return np.zeros(0, np.uint64)
    keys = keys.cast(pa.string())
    offsets = np.frombuffer(keys.buffers()[1], np.int32)[keys.offset : keys.offset + len(keys) + 1]
    data = np.frombuffer(keys.buffers()[2], np.uint8)
    lengths = np.diff(offsets)
    if keys.null_count or lengths.min() < _HEX_DIGITS:
        raise ValueError("keys must be non-null hex digests of at least 16 digits")
    digits = data[offsets[:-1, None] + np.arange(_HEX_DIGITS)]  # (N, 16) ASCII
    nibbles = _NIBBLE[digits]
    if (nibbles == 255).any():
        raise ValueError("keys must be lower-case hex digests")
    weights = np.uint64(1) << (np.arange(_HEX_DIGITS - 1, -1, -1, dtype=np.uint64) * np.uint64(4))
    return (nibbles.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)  # (N,)


def fine_depth(num_keys: int, max_rows: int) -> int:
    """A counting depth at which a leaf of ``plan_ranges`` rarely needs more bits (8 fine buckets per leaf)."""
    return min(KEY_BITS, max(1, math.ceil(math.log2(max(1.0, num_keys / max_rows)))) + 3)


def prefix_counts(bits: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """``(prefixes, counts)`` of the keys' first ``depth`` bits, sorted by prefix."""
    prefixes = bits >> np.uint64(KEY_BITS - depth) if depth else np.zeros(len(bits), np.uint64)
    return np.unique(prefixes, return_counts=True)


def merge_counts(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Sum prefix counts that partitions computed separately (same depth)."""
    if not parts:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    prefixes = np.concatenate([np.asarray(p, np.uint64) for p, _ in parts])
    counts = np.concatenate([np.asarray(c, np.int64) for _, c in parts])
    unique, inverse = np.unique(prefixes, return_inverse=True)
    return unique, np.bincount(inverse, weights=counts, minlength=len(unique)).astype(np.int64)


class DepthTooShallow(Exception):
    """A fine bucket alone holds more than ``max_rows`` keys: count again at a deeper depth."""


def plan_ranges(prefixes: np.ndarray, counts: np.ndarray, depth: int, max_rows: int) -> list[KeyRange]:
    """The trie leaves over keys counted per ``depth``-bit prefix, each holding 1..``max_rows`` keys, in key order.

    Raises ``DepthTooShallow`` when a leaf would need more than ``depth`` bits.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be ≥ 1, got {max_rows}")
    order = np.argsort(prefixes, kind="stable")
    prefixes = np.asarray(prefixes, np.uint64)[order]
    cumulative = np.concatenate([[0], np.cumsum(np.asarray(counts, np.int64)[order])])
    leaves: list[KeyRange] = []
    stack = [KeyRange(0, 0)]
    while stack:
        node = stack.pop()
        shift = depth - node.depth
        first = np.searchsorted(prefixes, np.uint64(node.prefix << shift), side="left")
        last = np.searchsorted(prefixes, np.uint64(((node.prefix + 1) << shift) - 1), side="right")
        total = int(cumulative[last] - cumulative[first])
        if total == 0:
            continue
        if total <= max_rows:
            leaves.append(node)
        elif node.depth == depth:
            raise DepthTooShallow(f"prefix {node.name} holds {total} > {max_rows} keys")
        else:  # right child first, so the left one is popped (and emitted) first
            stack.append(KeyRange(node.depth + 1, 2 * node.prefix + 1))
            stack.append(KeyRange(node.depth + 1, 2 * node.prefix))
    return leaves


def leaf_index(leaves: list[KeyRange], bits: np.ndarray) -> np.ndarray:
    """For each key (as ``key_bits``), the index of the leaf that holds it (leaves sorted, non-empty)."""
    starts = np.array([leaf.start for leaf in leaves], np.uint64)
    return np.searchsorted(starts, bits, side="right") - 1
