"""Pure curation stages: one or two hand-made records each, exact outcomes."""

from __future__ import annotations

import io

import pyarrow as pa
import pytest
from PIL import Image

from curation.config import TierConfig
from curation.stages import assign_tier, reduced_decode, scan_header
from manifests import Rejected


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def scan(data: bytes) -> dict | Rejected:
    return scan_header(io.BytesIO(data), num_bytes=len(data))


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((3840, 2160), "4k"),
        ((2160, 3840), "4k"),
        ((4096, 2025), "4k"),  # 8.29 MP in total counts, not the 3840 side
        ((3839, 2160), "1k"),
        ((1024, 1024), "1k"),
        ((1023, 4000), Rejected("too_small")),
        ((800, 600), Rejected("too_small")),
        ((4608, 1024), "1k"),  # ratio 4.5 is allowed …
        ((4609, 1024), Rejected("aspect_ratio")),  # … above is not
        ((50_000, 50_000), Rejected("too_many_pixels")),
    ],
)
def test_assign_tier(size, expected):
    assert assign_tier(*size, TierConfig()) == expected


def test_scan_reads_header_only_and_orients():
    image = Image.new("RGB", (1536, 1024), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: displayed portrait
    assert scan(encode(image, "JPEG", exif=exif)) == {
        "format": "JPEG",
        "width": 1024,
        "height": 1536,
        "num_bytes": len(encode(image, "JPEG", exif=exif)),
    }


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty_file"),
        (
            b"<html><body>not found</body></html>",
            "unreadable: UnidentifiedImageError: cannot identify image file",
        ),
        (  # a page with an inline icon is still a page
            b"<!DOCTYPE html><html><body><svg></svg></body></html>",
            "unreadable: UnidentifiedImageError: cannot identify image file",
        ),
        # SVG served for an image URL (logos): named, not "unreadable"
        (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "unsupported_format: svg"),
        (
            b'\xef\xbb\xbf<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>',
            "unsupported_format: svg",
        ),
    ],
)
def test_scan_rejects_unreadable(data, reason):
    assert scan(data) == Rejected(reason)


def test_scan_rejects_animation():
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    assert scan(buffer.getvalue()) == Rejected("animated: 2 frames")


def test_reduced_decode_uses_dct_scaling_and_keeps_min_side():
    data = encode(Image.new("RGB", (4096, 2048), "green"), "JPEG", quality=90)
    image = reduced_decode(data, min_side=256)
    assert image.mode == "RGB" and min(image.size) >= 256 and image.size == (512, 256)  # 1/8 scale


@pytest.mark.parametrize(
    ("image", "fmt", "pixel"),
    [
        (Image.new("CMYK", (300, 300), (0, 255, 255, 0)), "JPEG", (255, 0, 0)),  # CMYK red
        (Image.new("I;16", (300, 300), 65535), "PNG", (255, 255, 255)),  # 16-bit white, not clipped garbage
        (Image.new("RGBA", (300, 300), (0, 0, 0, 0)), "PNG", (255, 255, 255)),  # transparent → white
        (Image.new("P", (300, 300), 0), "PNG", (0, 0, 0)),
    ],
)
def test_reduced_decode_converts_modes_to_rgb(image, fmt, pixel):
    decoded = reduced_decode(encode(image, fmt), min_side=256)
    assert decoded.mode == "RGB"
    assert all(abs(a - b) <= 3 for a, b in zip(decoded.getpixel((10, 10)), pixel, strict=True))


def test_reduced_decode_applies_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = reduced_decode(encode(Image.new("RGB", (600, 300), "red"), "JPEG", exif=exif), min_side=256)
    assert decoded.size == (300, 600)


def test_reduced_decode_truncated_is_a_reason():
    data = encode(Image.effect_noise((512, 512), 64).convert("RGB"), "JPEG")
    result = reduced_decode(data[: len(data) // 2], min_side=256)
    assert isinstance(result, Rejected) and result.reason.startswith(
        "decode_error: OSError: image file is truncated"
    )


def test_unexpected_row_failure_becomes_a_reason_not_a_failed_block(tmp_path, monkeypatch):
    from curation import pipeline
    from curation.config import DecodeConfig

    good, odd = tmp_path / "good.jpg", tmp_path / "odd.jpg"
    for path in (good, odd):
        path.write_bytes(encode(Image.new("RGB", (1024, 1024), "red"), "JPEG"))
    real_scan = pipeline.stages.scan_header

    def flaky_scan(f, *, num_bytes):
        if getattr(f, "path", getattr(f, "name", "")).endswith("odd.jpg"):
            raise IndexError("decoder bug")
        return real_scan(f, num_bytes=num_bytes)

    monkeypatch.setattr(pipeline.stages, "scan_header", flaky_scan)
    stage = pipeline.ScanAndDecode(TierConfig(), DecodeConfig(), clip_size=224)
    records = [{"key": p.stem, "source": f"file://{p}"} for p in (good, odd)]
    rows = {r["key"]: r for r in stage(pa.Table.from_pylist(records)).to_pylist()}
    assert (rows["good"]["status"], rows["good"]["tier"]) == ("kept", "1k")
    assert (rows["odd"]["status"], rows["odd"]["reason"]) == (
        "rejected",
        "internal_error: IndexError: decoder bug",
    )
