"""pHash and global dedup: banded index == all pairs, keeper rule, near and exact groups."""

from __future__ import annotations

import io
import itertools
import random

import numpy as np
import pytest
from PIL import Image

from curation.dedup import HASH_BITS, band_layout, keeper_order, mark_duplicates, near_pairs
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
        "b": ("rejected", "duplicate: sha256", "a"),
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
        "a": ("rejected", "duplicate: phash 3", "c"),  # each names the keeper it matches, and how close
        "b": ("rejected", "duplicate: phash 1", "c"),
        "c": KEPT,
        "d": ("rejected", "duplicate: phash 1", "c"),
        "e": KEPT,
    }
    assert outcome(mark_duplicates(rows, max_hamming=0)) == {k: KEPT for k in "abcde"}


def test_dedup_does_not_depend_on_row_order() -> None:
    rows = [row(f"k{i}", ph=i % 3, w=10 + i % 2, aes=float(i % 5)) for i in range(12)]
    first = outcome(mark_duplicates(rows, max_hamming=1))
    assert outcome(mark_duplicates(list(reversed(rows)), max_hamming=1)) == first


# ----------------------------------------------------------------------------------------------------
# The keep rule never chains: a row is rejected only for a direct match with a row that stays.


def flip(value: int, bits: list[int]) -> int:
    """``value`` (int64 bit pattern) with ``bits`` flipped."""
    return to_int64((value & (2**64 - 1)) ^ sum(1 << b for b in bits))


def chain_hashes(steps: list[int], seed: int = 0) -> list[int]:
    """A pHash morph chain: each hash ``steps[i]`` new bits away from the previous one (never the same bit
    twice, so the ends are ``sum(steps)`` bits apart)."""
    rnd = random.Random(seed)
    order = rnd.sample(range(64), sum(steps))
    hashes = [to_int64(rnd.getrandbits(64))]
    for step in steps:
        hashes.append(flip(hashes[-1], order[:step]))
        order = order[step:]
    return hashes


def test_phash_morph_chain_keeps_every_row_that_is_not_a_direct_match_of_a_kept_one() -> None:
    """The issue's chain: 10 pictures, neighbours 0–4 bits apart, ends 32 bits apart (1 kept before)."""
    hashes = chain_hashes([4, 4, 4, 4, 4, 4, 4, 4, 0])
    assert hamming(hashes[0], hashes[-1]) == 32
    rows = [row(f"c{i}", ph=h) for i, h in enumerate(hashes)]  # equal pixels, no score: key order
    assert outcome(mark_duplicates(rows, max_hamming=4)) == {
        "c0": KEPT, "c1": ("rejected", "duplicate: phash 4", "c0"),
        "c2": KEPT, "c3": ("rejected", "duplicate: phash 4", "c2"),
        "c4": KEPT, "c5": ("rejected", "duplicate: phash 4", "c4"),
        "c6": KEPT, "c7": ("rejected", "duplicate: phash 4", "c6"),
        "c8": KEPT, "c9": ("rejected", "duplicate: phash 0", "c8"),
    }  # fmt: skip


def test_star_whose_best_row_is_a_spoke_keeps_the_other_spokes() -> None:
    """Spokes 3 bits from the centre, 6 from each other: if a spoke is the keeper, the centre goes (a
    direct match) but the other spokes stay (a chain through the centre is not a match)."""
    centre = 0x0123_4567_89AB_CDEF
    spokes = [flip(centre, [3 * i, 3 * i + 1, 3 * i + 2]) for i in range(5)]
    rows = [row("centre", ph=centre, w=20)] + [row(f"s{i}", ph=h, w=10) for i, h in enumerate(spokes)]
    assert outcome(mark_duplicates(rows, max_hamming=4)) == {
        "centre": KEPT,
        **{f"s{i}": ("rejected", "duplicate: phash 3", "centre") for i in range(5)},
    }
    rows[1] = row("s0", ph=spokes[0], w=30)  # now the best row is a spoke
    assert outcome(mark_duplicates(rows, max_hamming=4)) == {
        "centre": ("rejected", "duplicate: phash 3", "s0"),
        **{f"s{i}": KEPT for i in range(5)},
    }


def test_clique_keeps_one_and_names_it_with_each_distance() -> None:
    base = 0x7EDC_BA98_7654_3210
    hashes = [base, flip(base, [0]), flip(base, [0, 1]), flip(base, [5, 6]), flip(base, [0, 5])]
    rows = [row(f"q{i}", ph=h, aes=float(i)) for i, h in enumerate(hashes)]  # q4: best score
    assert outcome(mark_duplicates(rows, max_hamming=4)) == {
        "q0": ("rejected", "duplicate: phash 2", "q4"),
        "q1": ("rejected", "duplicate: phash 1", "q4"),
        "q2": ("rejected", "duplicate: phash 2", "q4"),
        "q3": ("rejected", "duplicate: phash 2", "q4"),
        "q4": KEPT,
    }


def test_byte_copy_says_sha256_even_when_its_phash_matches_too() -> None:
    rows = [row("a", sha="s", ph=5), row("b", sha="s", ph=5), row("c", sha="t", ph=5)]
    assert outcome(mark_duplicates(rows, max_hamming=4)) == {
        "a": KEPT, "b": ("rejected", "duplicate: sha256", "a"), "c": ("rejected", "duplicate: phash 0", "a"),
    }  # fmt: skip
    assert outcome(mark_duplicates(rows, max_hamming=None)) == {
        "a": KEPT, "b": ("rejected", "duplicate: sha256", "a"), "c": KEPT,
    }  # fmt: skip


def rotated(steps_degrees: list[float], dim: int = 16, seed: int = 0) -> list[list[float]]:
    """Unit vectors along a great circle: each ``steps_degrees[i]`` from the previous one."""
    rng = np.random.default_rng(seed)
    plane, _ = np.linalg.qr(rng.standard_normal((dim, 2)))
    angles = np.radians(np.concatenate([[0.0], np.cumsum(steps_degrees)]))
    return [(np.cos(a) * plane[:, 0] + np.sin(a) * plane[:, 1]).tolist() for a in angles]


def test_embedding_morph_chain_keeps_every_other_picture() -> None:
    """Neighbours 15° apart (cosine 0.966 ≥ 0.95), two steps 30° (0.866): a chain, not a group."""
    vectors = rotated([15.0] * 9)
    rows = [{**row(f"e{i}"), "embedding": v} for i, v in enumerate(vectors)]
    got = outcome(mark_duplicates(rows, max_hamming=None, semantic_threshold=0.95))
    assert got == {
        f"e{i}": KEPT if i % 2 == 0 else ("rejected", "duplicate: semantic 0.966", f"e{i - 1}")
        for i in range(10)
    }
    assert outcome(mark_duplicates(rows, max_hamming=None, semantic_threshold=None)) == {
        f"e{i}": KEPT for i in range(10)
    }


def direct_match(
    a: dict, b: dict, max_hamming: int | None, threshold: float | None
) -> tuple[int, float] | None:
    """The brute-force reference: how ``a`` and ``b`` match directly, as (strength, value), or None."""
    if a["sha256"] is not None and a["sha256"] == b["sha256"]:
        return (0, 0.0)
    if max_hamming is not None and a["phash"] is not None and b["phash"] is not None:
        bits = hamming(a["phash"], b["phash"])
        if bits <= max_hamming:
            return (1, float(bits))
    if threshold is not None and a.get("embedding") is not None and b.get("embedding") is not None:
        x, y = (np.asarray(r["embedding"], np.float32) for r in (a, b))
        x, y = x / np.linalg.norm(x), y / np.linalg.norm(y)
        cosine = float(x.astype(np.float64) @ y.astype(np.float64))
        if cosine >= threshold:
            return (2, cosine)
    return None


def random_rows(rnd: random.Random) -> list[dict]:
    """A small random corpus with byte copies, pHash neighbourhoods and embedding clusters."""
    num = rnd.randint(1, 24)
    shas = [f"s{rnd.randint(0, num)}" for _ in range(num)]
    centres = [rnd.getrandbits(64) for _ in range(3)]
    directions = [np.array([rnd.gauss(0, 1) for _ in range(6)]) for _ in range(3)]
    rows = []
    for i in range(num):
        ph = (
            flip(rnd.choice(centres), rnd.sample(range(12), rnd.randint(0, 6)))
            if rnd.random() < 0.9
            else None
        )
        vector = rnd.choice(directions) + np.array([rnd.gauss(0, 0.25) for _ in range(6)])
        rows.append(
            {**row(f"r{i:02d}", w=rnd.choice([10, 20]), h=10, sha=shas[i], ph=ph, aes=rnd.choice([None, 1.0, 2.0])),
             "embedding": vector.tolist() if rnd.random() < 0.9 else None}
        )  # fmt: skip
        if rnd.random() < 0.1:
            rows[-1] = {
                **rows[-1],
                "status": "rejected",
                "reason": "too_small",
                "sha256": None,
                "phash": None,
            }
    return rows


@pytest.mark.parametrize("seed", range(40))
def test_keep_rule_against_brute_force_on_random_corpora(seed: int) -> None:
    """Invariants over all pairs: every rejected duplicate matches directly (within its threshold) the kept
    row its ``dup_of`` names, by the test and value its reason says; no kept row matches another kept row;
    and walking the rows in keeper order, a row is rejected exactly when an earlier kept row matches it,
    ``dup_of`` being the first of them."""
    rnd = random.Random(seed)
    rows = random_rows(rnd)
    max_hamming = rnd.choice([None, 0, 2, 4, 6])
    threshold = rnd.choice([None, 0.9, 0.97])
    out = {r["key"]: r for r in mark_duplicates(rows, max_hamming=max_hamming, num_splits=None,
                                                semantic_threshold=threshold)}  # fmt: skip
    candidates = sorted((r for r in rows if r["status"] == "kept"), key=keeper_order)
    kept_so_far: list[dict] = []
    for r in candidates:
        matches = [(k, m) for k in kept_so_far if (m := direct_match(r, k, max_hamming, threshold))]
        got = out[r["key"]]
        if not matches:
            assert got["status"] == "kept", r["key"]
            kept_so_far.append(r)
            continue
        keeper, (strength, value) = matches[0]
        assert (got["status"], got["dup_of"]) == ("rejected", keeper["key"]), r["key"]
        assert out[keeper["key"]]["status"] == "kept"
        test, _, detail = got["reason"].partition(" ")[2].partition(" ")
        assert got["reason"].startswith("duplicate: ")
        assert test == ["sha256", "phash", "semantic"][strength]
        if strength == 1:
            assert int(detail) == value
        if strength == 2:
            assert abs(float(detail) - value) <= 5e-4 and float(detail) >= threshold
    for a, b in itertools.combinations(kept_so_far, 2):
        assert direct_match(a, b, max_hamming, threshold) is None
    for r in rows:
        if r["status"] != "kept":
            assert out[r["key"]] == r  # rows rejected earlier are untouched


@pytest.mark.parametrize("max_hamming", [6, 8, 16])
def test_a_max_hamming_beyond_the_exact_bound_of_32_bit_bands_is_refused(max_hamming: int) -> None:
    """Above 5 bits, 32-bit bands miss pairs whose bits split 3/3 in every cut: refused at config time;
    the exact layout (phash_splits None) is accepted and finds every such pair."""
    from curation.config import DedupConfig
    from curation.phases import PostConfig

    with pytest.raises(ValueError, match="phash_splits None"):
        DedupConfig(max_hamming=max_hamming, phash_splits=1)
    with pytest.raises(ValueError, match="exact"):
        PostConfig(min_score={}, max_hamming=max_hamming, phash_splits=4, semantic_threshold=None,
                   semantic_cluster_size=1, samples_per_shard=1, rows_per_partition=1)  # fmt: skip
    base = 0x0F0F_0F0F_0F0F_0F0F
    split = flip(base, [*range(max_hamming // 2), *range(32, 32 + max_hamming - max_hamming // 2)])
    rows = [row("a", ph=base, w=20), row("b", ph=split)]  # its bits split between the two 32-bit halves
    with pytest.raises(ValueError):
        mark_duplicates(rows, max_hamming=max_hamming, num_splits=1)
    assert DedupConfig(max_hamming=max_hamming, phash_splits=None).phash_splits is None
    assert outcome(mark_duplicates(rows, max_hamming=max_hamming, num_splits=None))["b"] == (
        "rejected",
        f"duplicate: phash {max_hamming}",
        "a",
    )
    DedupConfig(max_hamming=5, phash_splits=1)  # the bound itself is exact


MORPH_STEPS = [0.0, 0.145, 0.43, 0.535, 0.655, 0.72, 0.74, 0.885, 0.955, 1.0]  # neighbours 2–4 bits apart


def test_morph_chain_of_real_images_through_the_pipeline_keeps_what_is_not_a_direct_duplicate(
    tmp_path, aesthetic_cfg
) -> None:
    """The issue's example end to end: 10 PNGs morphing one picture into another, each 2–4 pHash bits from
    the next and the ends 32 bits apart (after the job's own reduced decode). Before, one was kept."""
    from curation.config import CurationConfig, DedupConfig
    from curation.pipeline import run
    from manifests import connect

    start, end = (
        np.random.default_rng(s).integers(0, 256, (6, 8, 3), np.uint8).astype(np.float64) for s in (0, 1)
    )
    corpus = tmp_path / "morph"
    corpus.mkdir()
    for i, t in enumerate(MORPH_STEPS):
        small = ((1 - t) * start + t * end).round().astype(np.uint8)
        Image.fromarray(small).resize((1024, 1024), Image.Resampling.BICUBIC).save(corpus / f"m{i}.png")
    cfg = CurationConfig(inputs=[str(corpus)], output=str(tmp_path / "out"), aesthetic=aesthetic_cfg,
                         dedup=DedupConfig(semantic=False), executor="local")  # fmt: skip
    run(cfg)
    con = connect(tmp_path / "out")
    got = {
        src.rsplit("/", 1)[1]: (key, status, reason, dup_of, ph, pixels, aes)
        for src, key, status, reason, dup_of, ph, pixels, aes in con.execute(
            "SELECT source, key, status, reason, dup_of, phash, width * height, aesthetic FROM images"
        ).fetchall()
    }
    chain = [got[f"m{i}.png"] for i in range(len(MORPH_STEPS))]
    steps = [hamming(a[4], b[4]) for a, b in itertools.pairwise(chain)]
    assert max(steps) <= 4 and hamming(chain[0][4], chain[-1][4]) >= 30, steps  # it is the chain
    # Brute force over all pairs: walk in keeper order, reject only a direct match of an earlier kept one.
    kept: list[tuple] = []
    for r in sorted(chain, key=lambda r: (-r[5], -(r[6] if r[6] is not None else -np.inf), r[0])):
        first = next((k for k in kept if hamming(r[4], k[4]) <= 4), None)
        if first is None:
            kept.append(r)
            assert r[1] == "kept", r
        else:
            assert (r[1], r[2], r[3]) == ("rejected", f"duplicate: phash {hamming(r[4], first[4])}", first[0])
    assert len(kept) >= 3  # the transitive rule kept 1
