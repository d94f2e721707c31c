"""Reads images for captioning from curated WebDataset shards, with one reduced decode per image.

A shard member is ``<key>.<ext>`` (original bytes) beside ``<key>.json``. The decode goes straight to
about the processor's input size: JPEG asks libjpeg for DCT scaling (``Image.draft``), other formats are
``reduce``d by an integer factor, then a final resize brings the short side to ``min_side``. Pixels leave
as raw RGB bytes so they cross Ray's object store as a plain binary column.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

from PIL import Image

from manifests import Rejected
from manifests.imageio import decode_rgb, describe
from manifests.tars import FORMAT_EXTENSIONS

# Every member extension a curated shard can hold (HEIC and AVIF included), plus the common aliases.
IMAGE_EXTENSIONS = frozenset({*FORMAT_EXTENSIONS.values(), "jpeg", "tiff"})
SHARD_ERROR = "shard_error"  # the shard could not be opened or read: every key of the read task gets it
MISSING_IN_SHARD = "missing_in_shard"  # the manifest names a shard that does not (or no longer) hold the key
DECODE_ERROR = "decode_error"


def read_members(shard: str | os.PathLike, keys: list[str]) -> dict[str, bytes]:
    """The image bytes of ``keys`` from one shard; keys absent from the shard are absent from the result."""
    wanted = set(keys)
    found: dict[str, bytes] = {}
    with tarfile.open(Path(shard), "r:") as tar:  # random access: headers only, data read for wanted keys
        for member in tar:
            key, _, ext = member.name.rpartition(".")
            if key in wanted and ext.lower() in IMAGE_EXTENSIONS and member.isfile():
                found[key] = tar.extractfile(member).read()
    return found


def available_keys(shard: str | os.PathLike) -> set[str] | None:
    """Keys with an image member in ``shard`` (tar headers only), or None if it cannot be opened or read.

    A rerun asks this before captioning again a row that failed for its shard: only a shard that came back
    is worth a retry.
    """
    keys = set()
    try:
        with tarfile.open(Path(shard), "r:") as tar:
            for member in tar:
                key, _, ext = member.name.rpartition(".")
                if ext.lower() in IMAGE_EXTENSIONS and member.isfile():
                    keys.add(key)
    except (OSError, EOFError, tarfile.TarError):
        return None
    return keys


def reduced_decode(data: bytes, *, min_side: int) -> Image.Image | Rejected:
    """Decode once to an RGB image whose short side is ``min_side`` (never upscaled), EXIF-oriented."""
    try:
        im = decode_rgb(data, min_side=min_side)  # DCT-scaled / reduced, oriented, RGB
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return Rejected(f"{DECODE_ERROR}: {describe(err)}")
    short = min(im.size)
    if short > min_side:
        ratio = min_side / short
        im = im.resize((max(1, round(im.width * ratio)), max(1, round(im.height * ratio))), Image.BICUBIC)
    return im


def pixels_row(key: str, image: Image.Image | Rejected) -> dict:
    """The row a read task emits: raw RGB bytes + size, or a reason."""
    if isinstance(image, Rejected):
        return {"key": key, "pixels": None, "width": None, "height": None, "reason": image.reason}
    return {
        "key": key,
        "pixels": image.tobytes(),
        "width": image.width,
        "height": image.height,
        "reason": None,
    }


def image_from_row(row: dict) -> Image.Image:
    return Image.frombytes("RGB", (row["width"], row["height"]), row["pixels"])


class ReadImages:
    """Read task over one plan ``{"shard": path, "keys": [...]}``: one row per key, pixels or a reason."""

    def __init__(self, *, min_side: int) -> None:
        self.min_side = min_side

    def __call__(self, plan: dict) -> list[dict]:
        keys = list(plan["keys"])
        try:
            members = read_members(plan["shard"], keys)
        except (OSError, tarfile.TarError) as err:  # a missing or broken shard: every key gets the reason
            return [pixels_row(k, Rejected(f"{SHARD_ERROR}: {type(err).__name__}: {err}")) for k in keys]
        return [
            pixels_row(
                k,
                reduced_decode(members[k], min_side=self.min_side)
                if k in members
                else Rejected(MISSING_IN_SHARD),
            )
            for k in keys
        ]
