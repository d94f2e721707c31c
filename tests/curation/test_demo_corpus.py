"""The demo corpus: every bad kind is present and is what it claims; same seed, same bytes."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps, UnidentifiedImageError

from curation import demo_corpus
from curation.demo_corpus import BAD_KINDS, generate, write_url_list

PILLOW_MAX_IMAGE_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)  # Pillow's default
NUM_GOOD = 8  # one full size cycle: one 4K, two below 1K, all three formats


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    out = tmp_path_factory.mktemp("corpus")
    records = generate(out, n=NUM_GOOD, seed=0)
    return out, {r["kind"] if r["kind"] != "good" else r["path"]: r for r in records}


def bad(corpus: tuple[Path, dict[str, dict]], kind: str) -> tuple[Path, dict]:
    out, by_kind = corpus
    return out / by_kind[kind]["path"], by_kind[kind]


OUTCOME_FIELDS = ("expected_status", "expected_tier", "expected_reason", "detected_by")
# kind -> OUTCOME_FIELDS: what a correct curator does.
EXPECTED_BAD = {
    "truncated": ("rejected", None, "decode_error", "decode"),
    "empty": ("rejected", None, "empty_file", "header"),
    "html": ("rejected", None, "unreadable", "header"),
    "bomb": ("rejected", None, "too_many_pixels", "header"),
    "cmyk": ("kept", "1k", None, None),
    "16bit": ("kept", "1k", None, None),
    "exif_rotated": ("kept", "1k", None, None),
    "panorama": ("rejected", None, "aspect_ratio", "header"),
    "animated": ("rejected", None, "animated", "header"),
    "svg": ("rejected", None, "unsupported_format", "header"),
    "duplicate_exact": ("rejected", None, "duplicate", "dedup"),
    "duplicate_near": ("rejected", None, "duplicate", "dedup"),
}


def test_every_bad_kind_present_with_expected_outcome(corpus: tuple[Path, dict[str, dict]]) -> None:
    out, by_kind = corpus
    assert set(EXPECTED_BAD) == set(BAD_KINDS)
    for kind, outcome in EXPECTED_BAD.items():
        record = by_kind[kind]
        assert record["path"].startswith("bad_")
        assert tuple(record[field] for field in OUTCOME_FIELDS) == outcome, kind
        stem = out / Path(record["path"]).stem
        assert Path(f"{stem}.txt").read_text(encoding="utf-8").strip() == record["caption"]
        assert json.loads(Path(f"{stem}.json").read_text(encoding="utf-8"))["generator"]["kind"] == kind


def test_expected_jsonl_lists_every_image_file(corpus: tuple[Path, dict[str, dict]]) -> None:
    out, by_kind = corpus
    listed = {r["path"] for r in demo_corpus.read_expected(out)}
    images = {p.name for p in out.iterdir() if p.suffix not in {".txt", ".json", ".jsonl"}}
    assert listed == images == {r["path"] for r in by_kind.values()}
    assert len(listed) == NUM_GOOD + len(BAD_KINDS)


def test_good_images_spread_and_match_their_records(corpus: tuple[Path, dict[str, dict]]) -> None:
    out, by_kind = corpus
    good = [r for r in by_kind.values() if r["kind"] == "good"]
    assert {r["format"] for r in good} == {"JPEG", "PNG", "WEBP"}
    assert {r["expected_tier"] for r in good} == {"4k", "1k", None}
    assert sum(r["expected_tier"] == "4k" for r in good) == 1
    for record in good:
        with Image.open(out / record["path"]) as image:
            assert (image.format, image.size, image.mode) == (
                record["format"],
                (record["width"], record["height"]),
                "RGB",
            )
        if record["expected_tier"] is None:
            assert record["expected_reason"] == "too_small"
        sidecar = json.loads((out / record["path"]).with_suffix(".json").read_text(encoding="utf-8"))
        assert sidecar["licence"] in {"CC0-1.0", "public-domain", "no-known-copyright-restrictions"}
        assert sidecar["source"] == "procedural" or sidecar["source"].startswith("skimage.data.")
    assert any(r["path"].startswith("good_000_photo-") for r in good)


def test_truncated_jpeg_header_reads_but_decode_fails(corpus: tuple[Path, dict[str, dict]]) -> None:
    path, record = bad(corpus, "truncated")
    with Image.open(path) as image:
        assert (image.format, image.size) == ("JPEG", (1024, 1024))
        with pytest.raises(OSError, match="truncated"):
            image.load()


@pytest.mark.parametrize("kind", ["empty", "html"])
def test_unreadable_files_are_not_images(corpus: tuple[Path, dict[str, dict]], kind: str) -> None:
    path, _ = bad(corpus, kind)
    data = path.read_bytes()
    assert (data == b"") if kind == "empty" else data.startswith(b"<!DOCTYPE html>")
    assert path.suffix == ".jpg"
    with pytest.raises(UnidentifiedImageError):
        Image.open(path)


def test_bomb_header_claims_50000_squared(
    corpus: tuple[Path, dict[str, dict]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, record = bad(corpus, "bomb")
    data = path.read_bytes()
    assert len(data) < 1024
    ihdr = data[12:29]  # type + 13 data bytes
    assert ihdr[:4] == b"IHDR" and int.from_bytes(data[29:33], "big") == zlib.crc32(ihdr)
    assert Image.MAX_IMAGE_PIXELS == PILLOW_MAX_IMAGE_PIXELS  # no pixsigma module changes it process-wide
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)  # Pillow's own guard trips on the header alone
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with Image.open(path) as image:  # lazy: reads the header only
        assert (image.format, image.size) == ("PNG", (50_000, 50_000))
    assert (record["width"], record["height"]) == (50_000, 50_000)


@pytest.mark.parametrize(("kind", "mode"), [("cmyk", "CMYK"), ("16bit", "I;16")])
def test_keepable_modes(corpus: tuple[Path, dict[str, dict]], kind: str, mode: str) -> None:
    path, record = bad(corpus, kind)
    with Image.open(path) as image:
        assert image.mode == mode
        assert image.size == (record["width"], record["height"])
        assert min(image.size) >= 1024
        image.load()


def test_exif_rotated_is_portrait_after_orientation(corpus: tuple[Path, dict[str, dict]]) -> None:
    path, record = bad(corpus, "exif_rotated")
    with Image.open(path) as image:
        assert image.getexif()[0x0112] == 6
        assert image.size == (1536, 1024)  # stored landscape
        oriented = ImageOps.exif_transpose(image)
    assert oriented.size == (record["width"], record["height"]) == (1024, 1536)


def test_panorama_is_20_to_1_and_large(corpus: tuple[Path, dict[str, dict]]) -> None:
    path, _ = bad(corpus, "panorama")
    with Image.open(path) as image:
        width, height = image.size
    assert width / height == 20 and height >= 1024


def test_gif_is_animated(corpus: tuple[Path, dict[str, dict]]) -> None:
    path, _ = bad(corpus, "animated")
    with Image.open(path) as image:
        assert image.format == "GIF" and image.is_animated and image.n_frames > 1


def test_duplicates(corpus: tuple[Path, dict[str, dict]]) -> None:
    out, by_kind = corpus
    exact_path, exact = bad(corpus, "duplicate_exact")
    near_path, near = bad(corpus, "duplicate_near")
    original = out / exact["dup_of"]
    assert near["dup_of"] == exact["dup_of"] == by_kind[exact["dup_of"]]["path"]
    assert exact_path.read_bytes() == original.read_bytes()
    assert near_path.read_bytes() != original.read_bytes()
    with Image.open(original) as a, Image.open(near_path) as b:
        assert a.size == b.size
        diff = np.abs(np.asarray(a.convert("RGB"), np.int16) - np.asarray(b.convert("RGB"), np.int16))
    assert diff.mean() < 3  # same picture, another JPEG quality


def test_same_seed_same_bytes(corpus: tuple[Path, dict[str, dict]], tmp_path: Path) -> None:
    out, _ = corpus
    generate(tmp_path, n=NUM_GOOD, seed=0)
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    second = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []


def test_cli_other_seed_and_url_list(corpus: tuple[Path, dict[str, dict]], tmp_path: Path) -> None:
    out, _ = corpus
    demo_corpus.main(
        [
            "--output",
            str(tmp_path),
            "--num-images",
            "1",
            "--seed",
            "1",
            "--base-url",
            "http://127.0.0.1:8000/",
        ]
    )
    assert (tmp_path / "bad_cmyk.jpg").read_bytes() != (out / "bad_cmyk.jpg").read_bytes()
    table = pq.read_table(tmp_path / "urls.parquet")
    assert table.column_names == ["url", "caption"]
    assert table.num_rows == 1 + len(BAD_KINDS)
    assert "http://127.0.0.1:8000/bad_panorama.jpg" in table.column("url").to_pylist()
    assert write_url_list(tmp_path, "http://x", out=tmp_path / "u.parquet") == tmp_path / "u.parquet"


def test_n_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n must be"):
        generate(tmp_path, n=0, seed=0)
