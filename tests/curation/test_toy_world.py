"""The toy-world corpus writer: a curation input folder whose caption sidecars state the truth."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from curation.toy_world import CORPUS_SIZES, TRUTH_FILE, generate, main
from manifests.buckets import nearest_bucket
from manifests.toy import parse_caption


def test_corpus_folder_holds_image_caption_and_truth(tmp_path: Path) -> None:
    records = generate(tmp_path, num=7, seed=2)
    lines = [json.loads(line) for line in (tmp_path / TRUTH_FILE).read_text().splitlines()]
    assert lines == records and len(records) == 7
    for record in records:
        with Image.open(tmp_path / f"{record['name']}.png") as image:
            assert image.size == (record["width"], record["height"]) and image.mode == "RGB"
            assert min(image.size) >= 1024  # the 1k tier: curation keeps it without a toy-only config
        caption = (tmp_path / f"{record['name']}.txt").read_text().strip()
        labels = [(o["colour"], o["shape"], o["position"]) for o in record["objects"]]
        assert list(parse_caption(caption)) == labels
        assert json.loads((tmp_path / f"{record['name']}.json").read_text()) == record


def test_corpus_sizes_fit_a_bucket_exactly_at_training_resolutions() -> None:
    # materialize covers and centre-crops to the nearest bucket: an exact fit crops nothing, so no object
    # moves across a grid line and the caption stays true.
    for width, height in CORPUS_SIZES:
        for resolution in (64, 128, 256):
            bucket_h, bucket_w = nearest_bucket(height, width, resolution)
            assert bucket_w * height == bucket_h * width, (width, height, resolution)


def test_same_seed_same_bytes_other_seed_other_corpus(tmp_path: Path) -> None:
    main(["--output", str(tmp_path / "a"), "--num", "3", "--seed", "5"])
    main(["--output", str(tmp_path / "b"), "--num", "3", "--seed", "5"])
    main(["--output", str(tmp_path / "c"), "--num", "3", "--seed", "6"])
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert (tmp_path / "a" / TRUTH_FILE).read_bytes() != (tmp_path / "c" / TRUTH_FILE).read_bytes()


def test_square_corpus_is_the_same_scenes_at_1024_square(tmp_path: Path) -> None:
    main(["--output", str(tmp_path / "square"), "--num", "6", "--square"])
    main(["--output", str(tmp_path / "mixed"), "--num", "6"])
    square, mixed = ([json.loads(line) for line in (tmp_path / name / TRUTH_FILE).read_text().splitlines()]
                     for name in ("square", "mixed"))  # fmt: skip
    assert {(r["width"], r["height"]) for r in square} == {(1024, 1024)}
    assert len({(r["width"], r["height"]) for r in mixed}) == 5  # every aspect ratio of CORPUS_SIZES
    assert [r["caption"] for r in square] == [r["caption"] for r in mixed]  # same scenes, same truth
    for r in square:
        with Image.open(tmp_path / "square" / f"{r['name']}.png") as image:
            assert image.size == (1024, 1024)
