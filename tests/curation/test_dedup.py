"""pHash and global dedup: banded index == all pairs, keeper rule, near and exact groups."""

from __future__ import annotations

import io
import itertools
import random

import numpy as np
import pytest
from PIL import Image

from curation.dedup import HASH_BITS, band_layout, mark_duplicates, near_pairs
from curation.stages import hamming, phash


def photo(seed: int, size: tuple[int, int] = (512, 384)) -> Image.Image:
    """A smooth random picture (low frequencies dominate, as in photos)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def test_phash_is_robust_to_reencode_and_scale_but_not_to_content() -> None:
    original = photo(0)
    assert -(2**63) <= phash(original) < 2**63
    assert hamming(phash(original), phash(jpeg(original, 40))) <= 4
    assert hamming(phash(original), phash(original.resize((256, 192)))) <= 4
    assert hamming(phash(original), phash(photo(1))) > 10
    assert hamming(phash(original), phash(original.transpose(Image.Transpose.FLIP_LEFT_RIGHT))) > 10


@pytest.mark.parametrize("max_hamming", [0, 1, 4, 7, 16])
def test_bands_cover_all_bits_once(max_hamming: int) -> None:
    """Exact layout: max_hamming // 3 + 1 bands, each matched within 2 bits, so one holds every close pair."""
    covered = 0
    layout = band_layout(max_hamming, None)
    for band in layout:
        mask = (1 << band.width) - 1
        assert covered & (mask << band.shift) == 0
        covered |= mask << band.shift
    assert covered == (1 << HASH_BITS) - 1 and len(layout) == max_hamming // 3 + 1


def to_int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


@pytest.mark.parametrize("max_hamming", [0, 4, 8])
def test_banded_index_finds_exactly_the_all_pairs_answer(max_hamming: int) -> None:
    rnd = random.Random(max_hamming)
    hashes = [rnd.getrandbits(64) for _ in range(60)]
    for base in hashes[:20]:  # plant neighbours at every distance 0..max_hamming+2
        flips = rnd.sample(range(64), rnd.randint(0, max_hamming + 2))
        hashes.append(base ^ sum(1 << b for b in flips))
    hashes = [to_int64(h) for h in hashes]
    keys = [f"k{i:03d}" for i in range(len(hashes))]
    brute = [
        (keys[i], keys[j])
        for i, j in itertools.combinations(range(len(keys)), 2)
        if hamming(hashes[i], hashes[j]) <= max_hamming
    ]
    assert near_pairs(keys, hashes, max_hamming) == sorted(brute)
    assert brute, "the planted pairs must include some within range"


def row(
    key: str, *, w: int = 10, h: int = 10, sha: str | None = None, ph: int | None = None, aes=None
) -> dict:
    return {"key": key, "status": "kept", "reason": None, "tier": "1k", "sha256": sha or key, "phash": ph,
            "width": w, "height": h, "aesthetic": aes}  # fmt: skip


def outcome(rows: list[dict]) -> dict:
    return {r["key"]: (r["status"], r["reason"], r.get("dup_of")) for r in rows}


KEPT = ("kept", None, None)


def test_exact_duplicates_keep_more_pixels_then_smaller_key() -> None:
    rows = [
        row("b", sha="s"),
        row("a", sha="s"),
        row("c", sha="t"),
        {**row("d"), "status": "rejected", "reason": "too_small", "sha256": None},
    ]
    assert outcome(mark_duplicates(rows, max_hamming=4)) == {
        "a": KEPT,
        "b": ("rejected", "duplicate", "a"),
        "c": KEPT,
        "d": ("rejected", "too_small", None),
    }


def test_near_duplicates_keeper_rule_pixels_then_aesthetic_then_key() -> None:
    rows = [
        row("a", ph=0b0000, aes=9.0),  # fewer pixels loses even with the best score
        row("b", ph=0b0011, w=20, aes=5.0),
        row("c", ph=0b0111, w=20, aes=6.0),  # same pixels as b, higher score: keeper
        row("d", ph=0b1111, w=20, aes=6.0),  # same as c but a larger key
        row("e", ph=-1, w=20, aes=9.0),  # 60+ bits away from all: alone
    ]
    assert outcome(mark_duplicates(rows, max_hamming=4)) == {
        "a": ("rejected", "duplicate", "c"),
        "b": ("rejected", "duplicate", "c"),
        "c": KEPT,
        "d": ("rejected", "duplicate", "c"),
        "e": KEPT,
    }
    assert outcome(mark_duplicates(rows, max_hamming=0)) == {k: KEPT for k in "abcde"}


def test_dedup_does_not_depend_on_row_order() -> None:
    rows = [row(f"k{i}", ph=i % 3, w=10 + i % 2, aes=float(i % 5)) for i in range(12)]
    first = outcome(mark_duplicates(rows, max_hamming=1))
    assert outcome(mark_duplicates(list(reversed(rows)), max_hamming=1)) == first
