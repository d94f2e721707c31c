"""Write a toy-world corpus (``manifests.toy``) as a curation input folder: image, caption and truth per scene.

``python -m curation.toy_world --output DIR --num N --seed S`` writes ``toy-<index>.png`` with the caption
sidecar ``toy-<index>.txt`` (read by ``curation.sources`` as ``caption_orig``: the caption states the
truth exactly, ``manifests.toy.parse_caption`` reads it back) and ``toy-<index>.json`` (the full truth,
geometry included; folder listing skips ``.json`` sidecars, so it is for people and tests). ``truth.jsonl``
(written last: the completion marker) holds one line per image.

Images are generated at ≥ 1K so the corpus passes curation's real tier rule (PixArt-Σ §3.2: ≥ 1K training
images; ``TierConfig.min_short_side_1k``) without a toy-only config; ``manifests.materialize`` resizes
them to the training resolutions. On 2 cores this costs ~0.1 s per image to render and encode (measured under load), and PNG
keeps the flat colours exact (a JPEG would ring at every edge); the sizes cycle through aspect ratios
that the training buckets hold exactly. The same ``seed`` gives byte-identical files (PNG has no timestamps).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from manifests.toy import caption, render, scene_for, truth

log = logging.getLogger(__name__)

TRUTH_FILE = "truth.jsonl"
PNG_COMPRESS_LEVEL = 6
# (width, height), cycled: every short side ≥ 1024 (the 1k tier), and every aspect ratio (1, 5:3, 3:5, 2, 1/2)
# one that the bucket tables at 64, 128 and 256 px all hold (``manifests.buckets``), so materialize's
# cover-and-crop cuts nothing: a crop would move objects across grid lines and falsify the caption.
SQUARE_SIZE = (1024, 1024)
CORPUS_SIZES: tuple[tuple[int, int], ...] = (
    SQUARE_SIZE,
    (1920, 1152),
    (1152, 1920),
    (2048, 1024),
    (1024, 2048),
)


def generate(
    out: Path, *, num: int, seed: int = 0, sizes: tuple[tuple[int, int], ...] = CORPUS_SIZES
) -> list[dict]:
    """Write ``num`` scenes into ``out``; return one record per image (name, width, height, truth)."""
    if num < 1:
        raise ValueError(f"num must be ≥ 1, got {num}")
    if not sizes:
        raise ValueError("sizes must not be empty")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / TRUTH_FILE).exists():
        (out / TRUTH_FILE).unlink()  # a rerun rewrites the marker last
    records = []
    for index in range(num):
        scene = scene_for(seed, index)
        width, height = sizes[index % len(sizes)]
        name = f"toy-{index:06d}"
        render(scene, width, height).save(out / f"{name}.png", compress_level=PNG_COMPRESS_LEVEL)
        (out / f"{name}.txt").write_text(caption(scene) + "\n", encoding="utf-8")
        record = {
            "name": name,
            "width": width,
            "height": height,
            "seed": seed,
            "index": index,
            **truth(scene),
        }
        (out / f"{name}.json").write_text(json.dumps(record, sort_keys=True) + "\n", encoding="utf-8")
        records.append(record)
    lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    (out / TRUTH_FILE).write_text(lines, encoding="utf-8")
    log.info("toy world: %d images (seed %d) written to %s", num, seed, out)
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--output", required=True, type=Path, help="corpus folder (a curation --input)")
    parser.add_argument("--num", type=int, default=64, help="number of images")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed: same seed, same bytes")
    parser.add_argument("--square", action="store_true",
                        help="every image 1024×1024: with a few scenes per aspect ratio, the training bucket alone "
                        "would tell the scenes apart, and a model could draw them while ignoring the caption")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    generate(args.output, num=args.num, seed=args.seed, sizes=(SQUARE_SIZE,) if args.square else CORPUS_SIZES)


if __name__ == "__main__":
    main()
