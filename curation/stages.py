"""Pure per-record stages of curation. Each returns a dict of new fields or ``Rejected(reason)``.

No I/O here: callers pass bytes or file objects. Reasons are short snake_case words, optionally
followed by ``: <detail>``; the funnel groups on the part before the colon.
"""

from __future__ import annotations

import hashlib
import io
import struct
from typing import BinaryIO

import numpy as np
import scipy.fft
from PIL import Image

from curation.config import TierConfig
from manifests import Rejected
from manifests.imageio import decode_rgb, describe
from manifests.tars import FORMAT_EXTENSIONS

# Bombs: we check pixel counts against TierConfig.max_pixels on the header, before any decode. Pillow's
# own guard (left at its default, never changed process-wide) refuses headers over 2 × MAX_IMAGE_PIXELS
# (~179 MP) already at open; that is the same reason, `too_many_pixels`.

# EXIF orientations 5–8 rotate by 90°, so the displayed width/height are swapped.
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}
EXIF_ORIENTATION_TAG = 0x0112


def scan_header(fileobj: BinaryIO, *, num_bytes: int) -> dict | Rejected:
    """Format, oriented width/height and frame count from the header only (no pixel decode)."""
    if num_bytes == 0:
        return Rejected("empty_file")
    try:
        with Image.open(fileobj) as im:
            width, height = im.size
            fmt = im.format
            orientation = header_exif(im, fileobj).get(EXIF_ORIENTATION_TAG, 1)
            # MPO (cameras, phones) is a JPEG followed by preview/depth images: a still picture.
            num_frames = 1 if fmt == "MPO" else getattr(im, "n_frames", 1)
    except Image.DecompressionBombError:
        return Rejected("too_many_pixels")
    except Image.UnidentifiedImageError as err:
        return (
            Rejected("unsupported_format: svg")
            if _is_svg(fileobj)
            else Rejected(f"unreadable: {describe(err)}")
        )
    except (OSError, SyntaxError, ValueError) as err:  # Pillow's "cannot identify image file" etc.
        return Rejected(f"unreadable: {describe(err)}")
    if fmt not in FORMAT_EXTENSIONS:  # e.g. a PPM or ICO named .jpg: shards and trainer do not carry it
        return Rejected(f"unsupported_format: {fmt}")
    if orientation in _TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    if num_frames > 1:
        # An animation is not a still training image; keeping frame 0 silently would hide that.
        return Rejected(f"animated: {num_frames} frames")
    return {"format": fmt, "width": width, "height": height, "num_bytes": num_bytes}


SVG_SNIFF_BYTES = 512


def _is_svg(fileobj: BinaryIO) -> bool:
    """An SVG document (what an image URL often serves for a logo): an XML prolog or comment, then ``<svg``."""
    fileobj.seek(0)
    head = fileobj.read(SVG_SNIFF_BYTES).lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return head.startswith(b"<svg") or (head.startswith((b"<?xml", b"<!--")) and b"<svg" in head)


PNG_SIGNATURE_BYTES = 8
PNG_CHUNK_HEADER = struct.Struct(">I4s")  # length, type; then data and a 4-byte CRC


def header_exif(im: Image.Image, fileobj: BinaryIO) -> Image.Exif:
    """The image's EXIF without decoding pixels.

    Pillow's ``PngImageFile.getexif`` loads (inflates) the whole image when the eXIf chunk was not seen
    before IDAT, because PNG allows it after the pixel data: 0.55 s and +207 MB for a 62 MP zero-filled
    PNG of 182 KB. Instead we walk the chunk headers after IDAT (8 bytes read per chunk, data skipped),
    which finds the same eXIf chunk that ``ImageOps.exif_transpose`` honours in pass 2.
    """
    if im.format != "PNG" or "exif" in im.info:
        return im.getexif()  # every other format parses EXIF from its header at open
    exif = Image.Exif()
    fileobj.seek(PNG_SIGNATURE_BYTES)
    while len(head := fileobj.read(PNG_CHUNK_HEADER.size)) == PNG_CHUNK_HEADER.size:
        length, chunk_type = PNG_CHUNK_HEADER.unpack(head)
        if chunk_type == b"eXIf":
            exif.load(fileobj.read(length))
            break
        if chunk_type == b"IEND":
            break
        fileobj.seek(length + 4, io.SEEK_CUR)
    return exif


def assign_tier(width: int, height: int, cfg: TierConfig) -> str | Rejected:
    """``4k``, ``1k`` or a rejection (pixel cap first, so bombs are named as such)."""
    pixels = width * height
    if pixels > cfg.max_pixels:
        return Rejected("too_many_pixels")
    if min(width, height) == 0 or max(width, height) / min(width, height) > cfg.max_aspect_ratio:
        return Rejected("aspect_ratio")
    if pixels >= cfg.min_pixels_4k:
        return "4k"
    if min(width, height) >= cfg.min_short_side_1k:
        return "1k"
    return Rejected("too_small")


def reduced_decode(data: bytes, *, min_side: int) -> Image.Image | Rejected:
    """Pass 2: one reduced decode (see ``manifests.imageio.decode_rgb``), or the decode error as a reason."""
    try:
        return decode_rgb(data, min_side=min_side)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return Rejected(f"decode_error: {describe(err)}")


def sha256(data: bytes) -> str:
    """Hex sha256 of the original bytes (exact-duplicate key)."""
    return hashlib.sha256(data).hexdigest()


# pHash as in Zauner (2010) and the ``imagehash`` package: grey 32×32, 2-D DCT-II, the 8×8 lowest
# frequencies (DC included), one bit per coefficient above their median; 64 bits, row-major, MSB first.
PHASH_SIZE = 32
PHASH_LOW_FREQ = 8


def phash(image: Image.Image) -> int:
    """64-bit perceptual hash of ``image`` as a signed int64 bit pattern (the manifest's ``phash``)."""
    grey = np.asarray(
        image.convert("L").resize((PHASH_SIZE, PHASH_SIZE), Image.Resampling.LANCZOS), np.float64
    )
    dct = scipy.fft.dct(scipy.fft.dct(grey, axis=0), axis=1)  # (32, 32)
    low = dct[:PHASH_LOW_FREQ, :PHASH_LOW_FREQ]  # (8, 8)
    bits = (low > np.median(low)).flatten()  # (64,)
    value = int.from_bytes(np.packbits(bits).tobytes(), "big")
    return value - (1 << 64) if value >= 1 << 63 else value


def hamming(a: int, b: int) -> int:
    """Bits that differ between two int64 bit patterns."""
    return ((a ^ b) & 0xFFFF_FFFF_FFFF_FFFF).bit_count()


def clip_thumbnail(image: Image.Image, size: int) -> np.ndarray:
    """CLIP's geometric preprocessing on the reduced decode: bicubic resize of the short side to ``size``,
    then a centre crop. Returns ``(size, size, 3)`` uint8; the scorer normalises on its device.

    Same arithmetic as open_clip's default transform (torchvision ``Resize(size)`` + ``CenterCrop``), so
    the 150 KB that travel to the scorer are exactly what open_clip would have fed the model.
    """
    width, height = image.size
    if width <= height:
        new_size = (size, int(size * height / width))
    else:
        new_size = (int(size * width / height), size)
    resized = image.resize(new_size, Image.Resampling.BICUBIC) if new_size != image.size else image
    left = int(round((new_size[0] - size) / 2.0))
    top = int(round((new_size[1] - size) / 2.0))
    return np.asarray(
        resized.crop((left, top, left + size, top + size)).convert("RGB"), np.uint8
    )  # (S, S, 3)


def aesthetic_gate(tier: str, score: float, min_score: dict[str, float]) -> None | Rejected:
    """``low_aesthetic`` when ``score`` is below the tier's threshold; tiers without one pass."""
    threshold = min_score.get(tier)
    if threshold is not None and score < threshold:
        return Rejected("low_aesthetic")
    return None
