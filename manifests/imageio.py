"""Image decoding shared by every stage: one reduced decode, EXIF orientation, RGB from any mode.

Importing this module registers the image formats pixsigma curates beyond Pillow's own: HEIC/HEIF
through ``pillow-heif`` (a declared dependency; phones write HEIC). AVIF is decoded by Pillow itself
(built in since Pillow 11.2); ``AVIF_SUPPORTED`` says whether this Pillow build has it. Every reader
of images (curation, captioning, training) imports this module, so a format that curation keeps is
one that the later stages can decode.
"""

from __future__ import annotations

import io
import re

import pillow_heif
from PIL import Image, ImageOps, features

# Pillow's registry of openers is process-wide by design; registering twice is harmless.
pillow_heif.register_heif_opener()
AVIF_SUPPORTED: bool = features.check("avif")

# Pillow formats whose decoder takes ``Image.draft`` (libjpeg DCT scaling). MPO is what cameras and phones
# write: a baseline JPEG followed by preview or depth images; its first image is the picture.
JPEG_FORMATS = ("JPEG", "MPO")


def decode_rgb(data: bytes, *, min_side: int | None = None) -> Image.Image:
    """Decode once at the smallest scale whose short side stays ≥ ``min_side`` (full size when None).

    For JPEG, ``Image.draft`` asks libjpeg for DCT scaling (1/2 … 1/8), so a 4K JPEG costs a fraction of a
    full decode. Other formats decode fully, then ``reduce`` by an integer factor. The result is
    EXIF-oriented RGB. Raises ``OSError``/``ValueError``/``SyntaxError`` for undecodable data, and Pillow's
    ``DecompressionBombError`` for headers over twice ``Image.MAX_IMAGE_PIXELS`` (curation rejects those
    earlier, on the header).
    """
    im = Image.open(io.BytesIO(data))
    width, height = im.size
    scale = max(1, min(width, height) // min_side) if min_side else 1
    if im.format in JPEG_FORMATS and scale > 1:
        im.draft("RGB", (max(width // scale, 1), max(height // scale, 1)))
    im.load()
    if im.format not in JPEG_FORMATS and scale > 1 and im.mode in ("RGB", "RGBA", "L", "LA"):
        im = im.reduce(min(scale, 8))
    im = ImageOps.exif_transpose(im)
    return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB from any mode: CMYK, 16-bit grey, palette and alpha (composited on white)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey: scale to 8 bits rather than clip (Pillow's convert("L") clips at 255).
        im = im.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im.convert("RGB")


def describe(err: Exception) -> str:
    """``Type: message`` with object reprs (``<... at 0x7f…>``, ``<_io.BufferedReader name=…>``) removed, so
    a rejection's reason is the same on every run (curation and captioning both write it)."""
    message = re.sub(r"\s*<(?:[^<>]* at 0x[0-9a-f]+|_io\.\w+ name=[^<>]*)>", "", str(err)).strip()
    return f"{type(err).__name__}: {message}" if message else type(err).__name__
