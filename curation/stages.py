"""Pure per-record stages of curation. Each returns a dict of new fields or ``Rejected(reason)``.

No I/O here: callers pass bytes or file objects. Reasons are short snake_case words, optionally
followed by ``: <detail>``; the funnel groups on the part before the colon.
"""

from __future__ import annotations

import hashlib
import re
from typing import BinaryIO

from PIL import Image

from curation.config import TierConfig
from manifests import Rejected
from manifests.imageio import decode_rgb

# Pillow's own bomb guard is off (manifests.imageio): we check pixel counts against
# TierConfig.max_pixels on the header, before any decode, so the reason names the real cause.

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
            orientation = im.getexif().get(EXIF_ORIENTATION_TAG, 1)
            num_frames = getattr(im, "n_frames", 1)
    except (OSError, SyntaxError, ValueError) as err:  # Pillow's "cannot identify image file" etc.
        return Rejected(f"unreadable: {describe(err)}")
    if orientation in _TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    if num_frames > 1:
        # An animation is not a still training image; keeping frame 0 silently would hide that.
        return Rejected(f"animated: {num_frames} frames")
    return {"format": fmt, "width": width, "height": height, "num_bytes": num_bytes}


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
    except (OSError, SyntaxError, ValueError) as err:
        return Rejected(f"decode_error: {describe(err)}")


def describe(err: Exception) -> str:
    """``Type: message`` with object reprs (``<... at 0x7f…>``) removed, so reasons are reproducible."""
    message = re.sub(r"\s*<[^<>]* at 0x[0-9a-f]+>", "", str(err)).strip()
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
