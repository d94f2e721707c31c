"""Deterministic demo corpus: public-domain photos, rendered images and one of each kind of bad file.

``generate(out, n=24, seed=0)`` writes ``n`` good images plus the fixed bad set into ``out`` and returns
one record per image file saying what a correct curator does with it (kind, oriented size, expected
status / tier / reject reason, and which pass detects it). Each image ``<name>.<ext>`` has an alt-text
sidecar ``<name>.txt`` and a provenance sidecar ``<name>.json``; ``expected.jsonl`` (written last, so it
doubles as the completion marker) holds every record. The same ``seed`` gives byte-identical files on the
same library versions: encoder parameters are fixed and no encoder writes timestamps.

Expected outcomes assume the spine's tier rules (``4k``: at least 3840×2160 pixels in total, ``1k``:
short side ≥ 1024, else ``too_small``) and thresholds inside wide margins: a pixel cap between 21 M
(the panorama) and 2.5 G (the bomb), and a maximum aspect ratio between 2 (the widest good image) and
20 (the panorama); ``curation.config.TierConfig``'s 64 M and 4.5 both fit.

Choices: CMYK, 16-bit and EXIF-rotated files are ≥ 1K and *kept* (a curator converts / transposes them;
width and height are after EXIF orientation). The animated GIF is *rejected* (``animated``): shards hold
the original bytes without re-encoding, so keeping it would ship an animation and a 256-colour palette
to the trainer. The SVG is *rejected* (``unsupported_format``): by its name in a folder, by its content
when it arrives through a URL list. Of a duplicate group a curator keeps one file; records of the copies say ``duplicate``
with ``dup_of`` naming the original, but which member survives is the dedup pass's policy.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import struct
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import skimage
import skimage.data
from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

# Reject reasons a correct curator gives (the `reason` column of the images manifest).
REASON_TOO_SMALL = "too_small"
# A curator may append ": <detail>" (curation.stages does); compare on the part before the colon.
REASON_EMPTY_FILE = "empty_file"
REASON_UNREADABLE = "unreadable"  # not identifiable as an image from its header (HTML)
REASON_DECODE_ERROR = "decode_error"  # header fine, pixel data broken (truncated)
REASON_TOO_MANY_PIXELS = "too_many_pixels"
REASON_ASPECT_RATIO = "aspect_ratio"
REASON_ANIMATED = "animated"
REASON_DUPLICATE = "duplicate"
REASON_UNSUPPORTED_FORMAT = "unsupported_format"  # an image format the shards do not carry (SVG)

# Which pass of the curator can see the problem.
DETECTED_BY_HEADER = "header"  # width/height/format/frames without decoding
DETECTED_BY_DECODE = "decode"  # only a full decode fails
DETECTED_BY_DEDUP = "dedup"  # exact (sha256) or perceptual hash over kept rows

TIER_4K_MIN_PIXELS = 3840 * 2160
TIER_1K_MIN_SIDE = 1024

JPEG_QUALITY = 90
NEAR_DUPLICATE_JPEG_QUALITY = 75
WEBP_QUALITY = 90
WEBP_METHOD = 4
PNG_COMPRESS_LEVEL = 6
RENDER_MAX_SIDE = 512  # render small, then resize: keeps 4K generation fast
EXPECTED_FILE = "expected.jsonl"
URL_LIST_FILE = "urls.parquet"

# (width, height) per position in a cycle of 8 good images; one slot per cycle is 4K.
GOOD_SIZES: tuple[tuple[int, int], ...] = (
    (1024, 1536),
    (2048, 1024),
    (800, 600),
    (1536, 1024),
    (0, 0),  # 4K slot, filled from SIZES_4K
    (1024, 1024),
    (600, 800),
    (1280, 1920),
)
SIZES_4K: tuple[tuple[int, int], ...] = ((3840, 2160), (4096, 4096), (2160, 3840))
FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP")
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif"}


@dataclass(frozen=True)
class Photo:
    """A bundled ``skimage.data`` photograph with its licence as stated in the loader's docstring."""

    name: str
    caption: str
    licence: str
    credit: str


# Licences are quoted from each skimage.data loader's docstring ("Notes"); skimage/data/README.txt
# itself states none. Only images bundled in the wheel are used: nothing is downloaded.
PHOTOS: tuple[Photo, ...] = (
    Photo(
        "astronaut",
        "Portrait of NASA astronaut Eileen Collins in an orange flight suit in front of an American flag.",
        "public-domain",
        "NASA Great Images database, https://flic.kr/p/r9qvLn",
    ),
    Photo(
        "coffee",
        "A cup of coffee on a saucer with a spoon, on a wooden table.",
        "CC0-1.0",
        "Rachel Michetti, courtesy of Pikolo Espresso Bar",
    ),
    Photo("chelsea", "A tabby cat named Chelsea looking to the side.", "CC0-1.0", "Stefan van der Walt"),
    Photo(
        "rocket",
        "A SpaceX Falcon 9 rocket lifting off from the launch pad at Cape Canaveral.",
        "public-domain",
        "SpaceX, https://www.flickr.com/photos/spacexphotos/16511594820/",
    ),
    Photo(
        "camera",
        "Black and white photograph of a person standing behind a camera on a tripod.",
        "CC0-1.0",
        "Lav Varshney",
    ),
    Photo(
        "retina",
        "Fundus photograph of a healthy human retina showing the optic disc and blood vessels.",
        "CC0-1.0",
        "Mikael Häggström, Wikimedia Commons",
    ),
    Photo(
        "hubble_deep_field",
        "The Hubble eXtreme Deep Field: hundreds of distant galaxies on black space.",
        "public-domain",
        "NASA, HubbleSite release 2012-37",
    ),
    Photo(
        "immunohistochemistry",
        "Microscope image of colon tissue with brown immunohistochemical stain and blue counterstain.",
        "no-known-copyright-restrictions",
        "Center for Microscopy And Molecular Imaging (CMMI)",
    ),
    Photo(
        "coins",
        "Greyscale photograph of ancient Greek coins from Pompeii laid out in rows.",
        "no-known-copyright-restrictions",
        "Brooklyn Museum Collection",
    ),
    Photo(
        "cell",
        "Greyscale phase image of a single round cell floating in saline.",
        "CC0-1.0",
        "Paul Müller et al.",
    ),
    Photo(
        "clock",
        "Motion-blurred black and white photograph of a wall clock.",
        "public-domain",
        "Stefan van der Walt",
    ),
)

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "orange": (255, 127, 14),
    "yellow": (240, 210, 40),
    "green": (44, 160, 44),
    "teal": (23, 190, 207),
    "blue": (31, 119, 180),
    "navy": (20, 30, 90),
    "purple": (148, 103, 189),
    "pink": (247, 129, 191),
    "brown": (140, 86, 75),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
WORDS: tuple[str, ...] = (
    "SIGMA",
    "PIXEL",
    "DELTA",
    "ORBIT",
    "LUMEN",
    "NOVA",
    "ECHO",
    "PRISM",
    "MOSAIC",
    "QUARTZ",
    "VERTEX",
    "ZENITH",
    "CANVAS",
    "FLUX",
    "HELIX",
    "EMBER",
)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "ring")
DIRECTIONS: tuple[str, ...] = ("horizontal", "vertical", "diagonal", "radial")
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five")


# --------------------------------------------------------------------------------------------------
# Pixels


def render_procedural(
    size: tuple[int, int], rng: np.random.Generator, *, max_side: int = RENDER_MAX_SIDE
) -> tuple[Image.Image, str, dict[str, Any]]:
    """Render a gradient with shapes and a word at ``size``; return (RGB image, caption, params)."""
    width, height = size
    scale = min(1.0, max_side / max(width, height))
    render_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    names = list(PALETTE)
    start, end = (str(c) for c in rng.choice(names, size=2, replace=False))
    direction = str(rng.choice(DIRECTIONS))
    image = Image.fromarray(_gradient(render_size, PALETTE[start], PALETTE[end], direction, rng))
    draw = ImageDraw.Draw(image)
    shapes = []
    for _ in range(int(rng.integers(1, 5))):
        shape, colour = str(rng.choice(SHAPES)), str(rng.choice(names))
        _draw_shape(draw, shape, PALETTE[colour], render_size, rng)
        shapes.append((colour, shape))
    word, text_colour = str(rng.choice(WORDS)), str(rng.choice(names))
    font_size = max(8, min(render_size) // 6)
    font = ImageFont.load_default(size=font_size)
    x = int(rng.integers(0, max(1, render_size[0] - font_size * len(word) * 6 // 10)))
    y = int(rng.integers(0, max(1, render_size[1] - font_size)))
    draw.text((x, y), word, fill=PALETTE[text_colour], font=font)
    image = image.resize(size, Image.Resampling.BICUBIC) if render_size != size else image
    caption = (
        f"A {direction} gradient from {start} to {end} with {_describe_shapes(shapes)}, "
        f'and the word "{word}" in {text_colour} letters.'
    )
    params = {
        "kind": "procedural",
        "render_size": list(render_size),
        "gradient": [direction, start, end],
        "shapes": [list(s) for s in shapes],
        "word": word,
        "text_colour": text_colour,
    }
    return image, caption, params


def _gradient(
    size: tuple[int, int],
    start: tuple[int, int, int],
    end: tuple[int, int, int],
    direction: str,
    rng: np.random.Generator,
) -> np.ndarray:
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)  # (H, W) each
    xs, ys = xs / max(1, width - 1), ys / max(1, height - 1)
    if direction == "horizontal":
        t = xs
    elif direction == "vertical":
        t = ys
    elif direction == "diagonal":
        t = (xs + ys) / 2
    else:
        cx, cy = rng.uniform(0.2, 0.8, size=2)
        t = np.clip(np.hypot(xs - cx, ys - cy) / 0.9, 0.0, 1.0)
    t = t[..., None]  # (H, W, 1)
    pixels = (1 - t) * np.asarray(start, np.float32) + t * np.asarray(end, np.float32)  # (H, W, 3)
    return np.round(pixels).astype(np.uint8)


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    colour: tuple[int, int, int],
    size: tuple[int, int],
    rng: np.random.Generator,
) -> None:
    width, height = size
    radius = int(rng.integers(max(2, min(size) // 12), max(3, min(size) // 4)))
    cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    else:
        draw.ellipse(box, outline=colour, width=max(1, radius // 4))


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _describe_shapes(shapes: list[tuple[str, str]]) -> str:
    counts = Counter(shapes)
    parts = [
        f"{NUMBER_WORDS[k] if k < len(NUMBER_WORDS) else k} {colour} {shape}{'s' if k > 1 else ''}"
        for (colour, shape), k in sorted(counts.items())
    ]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def render_photo(photo: Photo, size: tuple[int, int], rng: np.random.Generator) -> tuple[Image.Image, dict]:
    """Crop a bundled skimage photo to the aspect of ``size`` (random offset) and resize it to ``size``."""
    pixels = getattr(skimage.data, photo.name)()
    image = Image.fromarray(pixels).convert("RGB")
    src_w, src_h = image.size
    aspect = size[0] / size[1]
    crop_w, crop_h = (
        (src_w, round(src_w / aspect)) if src_w / src_h < aspect else (round(src_h * aspect), src_h)
    )
    left = int(rng.integers(0, src_w - crop_w + 1))
    top = int(rng.integers(0, src_h - crop_h + 1))
    box = (left, top, left + crop_w, top + crop_h)
    image = image.resize(size, Image.Resampling.BICUBIC, box=box)
    return image, {"kind": "photo", "photo": photo.name, "crop": list(box)}


# --------------------------------------------------------------------------------------------------
# Encoding


def encode(image: Image.Image, image_format: str, *, quality: int = JPEG_QUALITY, exif: bytes = b"") -> bytes:
    """Encode with fixed parameters and no metadata but ``exif``, so equal pixels give equal bytes."""
    buffer = io.BytesIO()
    if image_format == "JPEG":
        image.save(
            buffer, "JPEG", quality=quality, subsampling="4:2:0", optimize=False, progressive=False, exif=exif
        )
    elif image_format == "PNG":
        image.save(buffer, "PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    elif image_format == "WEBP":
        image.save(buffer, "WEBP", quality=WEBP_QUALITY, method=WEBP_METHOD, lossless=False, exact=False)
    else:
        raise ValueError(f"image_format must be one of {FORMATS}, got {image_format!r}")
    return buffer.getvalue()


def decompression_bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny PNG whose IHDR claims ``width`` × ``height`` RGB pixels; IDAT holds a single zero row."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # 8-bit RGB, deflate, adaptive filtering, no interlace
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + 3 * width), 9)  # filter byte + one black row
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def expected_tier(width: int, height: int) -> str | None:
    """The spine's tier rule: ``4k`` by total pixels, ``1k`` by short side, else ``None`` (too small)."""
    if width * height >= TIER_4K_MIN_PIXELS:
        return "4k"
    if min(width, height) >= TIER_1K_MIN_SIDE:
        return "1k"
    return None


# --------------------------------------------------------------------------------------------------
# Records and files


@dataclass(frozen=True)
class Expected:
    """What a correct curator does with one file of the corpus."""

    kind: str  # "good" or the bad kind ("truncated", "cmyk", ...)
    format: str | None  # Pillow format name; None when not an image
    width: int | None  # after EXIF orientation; header values for the bomb
    height: int | None
    expected_status: str  # "kept" | "rejected"
    expected_tier: str | None  # "4k" | "1k" | None
    expected_reason: str | None
    detected_by: str | None  # "header" | "decode" | "dedup" | None when kept
    dup_of: str | None = None  # path of the original for duplicates


def _size_outcome(kind: str, image_format: str, width: int, height: int) -> Expected:
    tier = expected_tier(width, height)
    if tier is None:
        return Expected(
            kind, image_format, width, height, "rejected", None, REASON_TOO_SMALL, DETECTED_BY_HEADER
        )
    return Expected(kind, image_format, width, height, "kept", tier, None, None)


def _rejected(
    kind: str,
    image_format: str | None,
    size: tuple[int, int] | None,
    reason: str,
    by: str,
    dup_of: str | None = None,
) -> Expected:
    width, height = size if size else (None, None)
    return Expected(kind, image_format, width, height, "rejected", None, reason, by, dup_of)


def _write_item(
    out: Path, name: str, data: bytes, caption: str, meta: dict[str, Any], expected: Expected
) -> dict[str, Any]:
    """Write ``name`` with its ``.txt`` caption and ``.json`` provenance sidecars; return its record."""
    stem = name.rsplit(".", 1)[0]
    (out / name).write_bytes(data)
    (out / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
    sidecar = {"caption": caption, **meta}
    (out / f"{stem}.json").write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return {
        "path": name,
        "caption": caption,
        **asdict(expected),
        "num_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def _generator_meta(seed: int, params: dict[str, Any]) -> dict[str, Any]:
    return {"generator": {"module": "curation.demo_corpus", "seed": seed, **params}}


def _procedural_meta(seed: int, params: dict[str, Any]) -> dict[str, Any]:
    return {
        "licence": "CC0-1.0",
        "source": "procedural",
        "provenance": "rendered by curation.demo_corpus",
        **_generator_meta(seed, params),
    }


def _photo_meta(photo: Photo, seed: int, params: dict[str, Any]) -> dict[str, Any]:
    return {
        "licence": photo.licence,
        "source": f"skimage.data.{photo.name}",
        "provenance": f"{photo.credit}; bundled with scikit-image {skimage.__version__}",
        **_generator_meta(seed, params),
    }


def _good_size(index: int) -> tuple[int, int]:
    size = GOOD_SIZES[index % len(GOOD_SIZES)]
    return SIZES_4K[(index // len(GOOD_SIZES)) % len(SIZES_4K)] if size == (0, 0) else size


def _write_good(out: Path, index: int, *, seed: int, photo: Photo | None) -> dict[str, Any]:
    """Write good image ``index``; 4K images are always JPEG (fast to encode, like real 4K sources)."""
    rng = np.random.default_rng([seed, index])
    size = _good_size(index)
    image_format = "JPEG" if expected_tier(*size) == "4k" else FORMATS[index % len(FORMATS)]
    if photo is None:
        image, caption, params = render_procedural(size, rng)
        label = "proc"
    else:
        image, params = render_photo(photo, size, rng)
        caption, label = photo.caption, f"photo-{photo.name}"
    params = {"index": index, "size": list(size), "format": image_format, **params}
    meta = _procedural_meta(seed, params) if photo is None else _photo_meta(photo, seed, params)
    name = f"good_{index:03d}_{label}_{size[0]}x{size[1]}.{EXTENSIONS[image_format]}"
    expected = _size_outcome("good", image_format, *size)
    return _write_item(out, name, encode(image, image_format), caption, meta, expected)


def _photo_order(seed: int) -> list[Photo]:
    return [PHOTOS[i] for i in np.random.default_rng(seed).permutation(len(PHOTOS))]


def write_good(out: Path, *, n: int, seed: int) -> list[dict[str, Any]]:
    """Write ``n`` good images: even indices are photos while unused ones remain, the rest procedural."""
    photos = _photo_order(seed)
    records = []
    for index in range(n):
        photo = photos[index // 2] if index % 2 == 0 and index // 2 < len(photos) else None
        record = _write_good(out, index, seed=seed, photo=photo)
        records.append(record)
        logger.debug("wrote %s", record["path"])
    return records


def _bad_rng(seed: int, kind: str) -> np.random.Generator:
    return np.random.default_rng([seed, 1_000_000, *kind.encode()])


def _render_bad(
    kind: str, size: tuple[int, int], *, seed: int, max_side: int = RENDER_MAX_SIDE
) -> tuple[Image.Image, str, dict[str, Any]]:
    image, caption, params = render_procedural(size, _bad_rng(seed, kind), max_side=max_side)
    return image, caption, _procedural_meta(seed, {**params, "kind": kind, "size": list(size)})


def write_truncated(out: Path, *, seed: int) -> dict[str, Any]:
    """A 1024² JPEG cut in half: the header reads fine, decoding fails."""
    image, caption, meta = _render_bad("truncated", (1024, 1024), seed=seed)
    data = encode(image, "JPEG")
    expected = _rejected("truncated", "JPEG", image.size, REASON_DECODE_ERROR, DETECTED_BY_DECODE)
    return _write_item(out, "bad_truncated.jpg", data[: len(data) // 2], caption, meta, expected)


def write_empty(out: Path, *, seed: int) -> dict[str, Any]:
    """A zero-byte ``.jpg``."""
    expected = _rejected("empty", None, None, REASON_EMPTY_FILE, DETECTED_BY_HEADER)
    return _write_item(
        out, "bad_empty.jpg", b"", "An empty file.", _generator_meta(seed, {"kind": "empty"}), expected
    )


def write_html(out: Path, *, seed: int) -> dict[str, Any]:
    """An HTML error page saved as ``.jpg``, as scrapers often get."""
    html = (
        "<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
        "<body><h1>Not Found</h1><p>The requested image was not found on this server.</p></body></html>\n"
    )
    expected = _rejected("html", None, None, REASON_UNREADABLE, DETECTED_BY_HEADER)
    meta = _generator_meta(seed, {"kind": "html"})
    return _write_item(
        out, "bad_html.jpg", html.encode(), "A photo of a sunset over the sea.", meta, expected
    )


def write_bomb(out: Path, *, seed: int) -> dict[str, Any]:
    """A PNG of a few hundred bytes whose header claims 50000×50000 pixels (2.5 G)."""
    expected = _rejected("bomb", "PNG", (50_000, 50_000), REASON_TOO_MANY_PIXELS, DETECTED_BY_HEADER)
    meta = _generator_meta(seed, {"kind": "bomb", "claimed_size": [50_000, 50_000]})
    return _write_item(out, "bad_bomb.png", decompression_bomb_png(), "A black square.", meta, expected)


def write_cmyk(out: Path, *, seed: int) -> dict[str, Any]:
    """A CMYK JPEG (print workflows); keepable after conversion to RGB."""
    image, caption, meta = _render_bad("cmyk", (1024, 1280), seed=seed)
    expected = _size_outcome("cmyk", "JPEG", *image.size)
    return _write_item(out, "bad_cmyk.jpg", encode(image.convert("CMYK"), "JPEG"), caption, meta, expected)


def write_16bit(out: Path, *, seed: int) -> dict[str, Any]:
    """A 16-bit greyscale PNG (Pillow mode ``I;16``): a smooth ramp with a bright disc; keepable."""
    width, height = 1280, 1024
    rng = _bad_rng(seed, "16bit")
    cx, cy = rng.uniform(0.2, 0.8, size=2)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)  # (H, W) each
    ramp = 0.15 + 0.6 * xs / (width - 1)  # (H, W)
    disc = np.hypot(xs - cx * width, ys - cy * height) < 0.15 * height  # (H, W)
    pixels = np.round(np.where(disc, 0.95, ramp) * 65535).astype(np.uint16)  # (H, W)
    caption = "A smooth grey ramp from dark on the left to light on the right with a bright white disc."
    meta = _procedural_meta(
        seed, {"kind": "16bit", "size": [width, height], "disc_centre": [float(cx), float(cy)]}
    )
    expected = _size_outcome("16bit", "PNG", width, height)
    return _write_item(out, "bad_16bit.png", encode(Image.fromarray(pixels), "PNG"), caption, meta, expected)


def write_exif_rotated(out: Path, *, seed: int) -> dict[str, Any]:
    """A portrait 1024×1536 picture stored landscape with EXIF orientation 6 (rotate 90° clockwise)."""
    upright, caption, meta = _render_bad("exif_rotated", (1024, 1536), seed=seed)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # exif_transpose applies ROTATE_270 for 6
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    meta["generator"]["exif_orientation"] = 6
    expected = _size_outcome("exif_rotated", "JPEG", *upright.size)
    data = encode(stored, "JPEG", exif=exif.tobytes())
    return _write_item(out, "bad_exif_rotated.jpg", data, caption, meta, expected)


def write_panorama(out: Path, *, seed: int) -> dict[str, Any]:
    """A 20:1 panorama, 20480×1024: big enough for any tier, too wide for any aspect bucket."""
    image, caption, meta = _render_bad("panorama", (20480, 1024), seed=seed, max_side=2048)
    expected = _rejected("panorama", "JPEG", image.size, REASON_ASPECT_RATIO, DETECTED_BY_HEADER)
    return _write_item(out, "bad_panorama.jpg", encode(image, "JPEG"), caption, meta, expected)


def write_animated(out: Path, *, seed: int, num_frames: int = 4) -> dict[str, Any]:
    """A 1024² animated GIF of a ball crossing a plain background."""
    rng = _bad_rng(seed, "animated")
    background, ball = (str(c) for c in rng.choice(list(PALETTE), size=2, replace=False))
    frames = []
    for i in range(num_frames):
        frame = Image.new("P", (1024, 1024), 0)
        frame.putpalette([*PALETTE[background], *PALETTE[ball]])
        x = 128 + i * (768 // max(1, num_frames - 1))
        ImageDraw.Draw(frame).ellipse((x - 100, 412, x + 100, 612), fill=1)
        frames.append(frame)
    buffer = io.BytesIO()
    frames[0].save(
        buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0, optimize=False
    )
    caption = (
        f"An animation of {_a(ball)} {ball} ball moving across {_a(background)} {background} background."
    )
    meta = _procedural_meta(seed, {"kind": "animated", "size": [1024, 1024], "num_frames": num_frames})
    expected = _rejected("animated", "GIF", (1024, 1024), REASON_ANIMATED, DETECTED_BY_HEADER)
    return _write_item(out, "bad_animated.gif", buffer.getvalue(), caption, meta, expected)


def write_svg(out: Path, *, seed: int) -> dict[str, Any]:
    """A vector drawing (``.svg``): no pixels to score or train on; named in the manifest, never dropped."""
    rng = _bad_rng(seed, "svg")
    background, disc = (str(c) for c in rng.choice(list(PALETTE), size=2, replace=False))
    svg = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<svg xmlns="http://www.w3.org/2000/svg" width="1024" height="1024" viewBox="0 0 1024 1024">\n'
        f'  <rect width="1024" height="1024" fill="rgb{PALETTE[background]}"/>\n'
        f'  <circle cx="512" cy="512" r="300" fill="rgb{PALETTE[disc]}"/>\n'
        "</svg>\n"
    )
    caption = f"{_a(disc).capitalize()} {disc} disc on {_a(background)} {background} background."
    meta = _generator_meta(seed, {"kind": "svg", "size": [1024, 1024]})
    expected = _rejected("svg", None, None, REASON_UNSUPPORTED_FORMAT, DETECTED_BY_HEADER)
    return _write_item(out, "bad_vector.svg", svg.encode(), caption, meta, expected)


def write_duplicates(out: Path, original: dict[str, Any], *, seed: int) -> list[dict[str, Any]]:
    """A byte-identical copy of ``original`` and a re-encode of it at another JPEG quality."""
    data = (out / original["path"]).read_bytes()
    sidecar = json.loads((out / original["path"]).with_suffix(".json").read_text(encoding="utf-8"))
    licence = {key: sidecar[key] for key in ("licence", "source", "provenance")}
    size, dup_of = (original["width"], original["height"]), original["path"]
    with Image.open(io.BytesIO(data)) as image:
        reencoded = encode(image.convert("RGB"), "JPEG", quality=NEAR_DUPLICATE_JPEG_QUALITY)
    exact_name = "bad_duplicate_exact." + original["path"].rsplit(".", 1)[1]
    exact_meta = {**licence, **_generator_meta(seed, {"kind": "duplicate_exact", "copy_of": dup_of})}
    near_params = {"kind": "duplicate_near", "reencode_of": dup_of, "quality": NEAR_DUPLICATE_JPEG_QUALITY}
    near_meta = {**licence, **_generator_meta(seed, near_params)}
    by = DETECTED_BY_DEDUP
    exact = _rejected("duplicate_exact", original["format"], size, REASON_DUPLICATE, by, dup_of=dup_of)
    near = _rejected("duplicate_near", "JPEG", size, REASON_DUPLICATE, by, dup_of=dup_of)
    return [
        _write_item(out, exact_name, data, original["caption"], exact_meta, exact),
        _write_item(out, "bad_duplicate_near.jpg", reencoded, original["caption"], near_meta, near),
    ]


BAD_WRITERS = (
    write_truncated,
    write_empty,
    write_html,
    write_bomb,
    write_cmyk,
    write_16bit,
    write_exif_rotated,
    write_panorama,
    write_animated,
    write_svg,
)
BAD_KINDS: tuple[str, ...] = (
    "truncated",
    "empty",
    "html",
    "bomb",
    "cmyk",
    "16bit",
    "exif_rotated",
    "panorama",
    "animated",
    "svg",
    "duplicate_exact",
    "duplicate_near",
)


def generate(out: Path, *, n: int, seed: int) -> list[dict[str, Any]]:
    """Write ``n`` good images and the bad set into ``out``; return one record per image file."""
    if n < 1:
        raise ValueError(f"n must be >= 1 (the duplicates copy good image 0), got {n}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    good = write_good(out, n=n, seed=seed)
    bad = [write(out, seed=seed) for write in BAD_WRITERS]
    bad += write_duplicates(out, good[0], seed=seed)
    records = sorted(good + bad, key=lambda r: r["path"])
    lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    (out / EXPECTED_FILE).write_text(lines, encoding="utf-8")
    logger.info("wrote %d good and %d bad files to %s", len(good), len(bad), out)
    return records


def read_expected(corpus_dir: Path) -> list[dict[str, Any]]:
    """The records ``generate`` wrote to ``corpus_dir/expected.jsonl``."""
    path = Path(corpus_dir) / EXPECTED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a finished demo corpus")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def write_url_list(corpus_dir: Path, base_url: str, *, out: Path | None = None) -> Path:
    """Write an img2dataset-style URL list (``url``, ``caption``) of every corpus file under ``base_url``."""
    records = read_expected(corpus_dir)
    base = base_url.rstrip("/")
    table = pa.table(
        {"url": [f"{base}/{r['path']}" for r in records], "caption": [r["caption"] for r in records]}
    )
    path = Path(out) if out is not None else Path(corpus_dir) / URL_LIST_FILE
    pq.write_table(table, path)
    return path


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m curation.demo_corpus --output DIR --num-images N --seed S [--base-url URL]``."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--num-images", type=int, default=24, help="number of good images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-url", help="also write urls.parquet with URLs under this base")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    records = generate(args.output, n=args.num_images, seed=args.seed)
    if args.base_url:
        print(f"url list: {write_url_list(args.output, args.base_url)}")
    outcomes = Counter((r["expected_status"], r["expected_tier"] or r["expected_reason"]) for r in records)
    print(f"{len(records)} files in {args.output}")
    for (status, detail), count in sorted(outcomes.items()):
        print(f"  {status:8s} {detail:16s} {count}")


if __name__ == "__main__":
    main()
