"""PixArt's aspect-ratio bucket tables and the resize-to-cover + center-crop that fits an image to one.

Each table has 40 buckets keyed by the ratio h/w. The 256, 512 and 2048 tables in the PixArt-Σ repository
(`diffusion/data/datasets/utils.py`, ASPECT_RATIO_*) are the 1024 table scaled by 1/4, 1/2 and 2, so only
the 1024 table is written out here; the 2880 table (the 4K stage) has its own sizes, multiples of 64.
"""

from __future__ import annotations

from typing import Literal

from PIL import Image

# (height, width) per bucket of the 1024 table, ordered by ratio h/w from 0.25 to 4.0.
_BUCKETS_1024 = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1408, 704), (1472, 704), (1536, 640),
    (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
)  # fmt: skip
_BUCKETS_2880 = (
    (1408, 5760), (1408, 5568), (1408, 5376), (1408, 5184), (1600, 4992), (1600, 4800), (1600, 4672), (1792, 4480),
    (1792, 4288), (1920, 4096), (1920, 3904), (1920, 3776), (2112, 3840), (2112, 3584), (2304, 3392), (2304, 3200),
    (2496, 3200), (2496, 3008), (2688, 3008), (2688, 2880), (2880, 2880), (2880, 2688), (3008, 2688), (3008, 2496),
    (3200, 2496), (3200, 2304), (3392, 2304), (3584, 2112), (3840, 2112), (3904, 1920), (4096, 1920), (4288, 1792),
    (4480, 1792), (4672, 1600), (4800, 1600), (4992, 1600), (5184, 1408), (5376, 1408), (5568, 1408), (5760, 1408),
)  # fmt: skip
# The ratio keys of those tables, in the same order: PixArt-Σ's data loader picks the bucket whose KEY is nearest
# to h/w (`get_closest_ratio` in diffusion/data/datasets/InternalData_ms.py), not the bucket's exact h/w. The
# keys are h/w rounded to 2 decimals, except five of the 2880 table, which keep the 1024 table's keys.
_KEYS_1024 = (
    0.25, 0.26, 0.27, 0.28, 0.32, 0.33, 0.35, 0.4, 0.42, 0.48, 0.5, 0.52, 0.57, 0.6, 0.68, 0.72, 0.78, 0.82, 0.88,
    0.94, 1.0, 1.07, 1.13, 1.21, 1.29, 1.38, 1.46, 1.67, 1.75, 2.0, 2.09, 2.4, 2.5, 2.89, 3.0, 3.11, 3.62, 3.75,
    3.88, 4.0,
)  # fmt: skip
_KEYS_2880 = (
    0.25, 0.26, 0.27, 0.28, 0.32, 0.33, 0.34, 0.4, 0.42, 0.47, 0.49, 0.51, 0.55, 0.59, 0.68, 0.72, 0.78, 0.83, 0.89,
    0.93, 1.0, 1.07, 1.12, 1.21, 1.28, 1.39, 1.47, 1.7, 1.82, 2.03, 2.13, 2.39, 2.5, 2.92, 3.0, 3.12, 3.68, 3.82,
    3.95, 4.0,
)  # fmt: skip
BASE_RESOLUTIONS = (256, 512, 1024, 2048, 2880)
BucketRule = Literal["upstream", "exact"]
BUCKET_RULES = ("upstream", "exact")


def bucket_table(resolution: int) -> tuple[tuple[int, int], ...]:
    """The 40 (height, width) buckets for a base resolution.

    PixArt's tables cover 256…2880; any other multiple of 32 (tiny debug runs use 32 or 64) is the
    1024 table scaled and rounded to multiples of 16 pixels, i.e. of 2 latent patches at VAE factor 8.
    """
    if resolution == 2880:
        return _BUCKETS_2880
    if resolution <= 0 or resolution % 32:
        raise ValueError(
            f"resolution must be one of {BASE_RESOLUTIONS} or a positive multiple of 32, got {resolution}"
        )
    if resolution in BASE_RESOLUTIONS:
        return tuple((h * resolution // 1024, w * resolution // 1024) for h, w in _BUCKETS_1024)
    return tuple(
        (max(16, round(h * resolution / 1024 / 16) * 16), max(16, round(w * resolution / 1024 / 16) * 16))
        for h, w in _BUCKETS_1024
    )


def nearest_bucket(
    height: int, width: int, resolution: int, *, rule: BucketRule = "upstream"
) -> tuple[int, int]:
    """The bucket for an image of (height, width): first one on ties, as PixArt's ``min`` over its table.

    ``upstream`` (default): nearest by the table's rounded ratio key, as PixArt-Σ's data loader picks
    (``get_closest_ratio``); ``exact``: nearest by the bucket's own h/w. They differ for ~2 % of web sizes.
    """
    if rule not in BUCKET_RULES:
        raise ValueError(f"bucket rule must be one of {BUCKET_RULES}, got {rule!r}")
    ratio = height / width
    table = bucket_table(resolution)
    if rule == "exact":
        return min(table, key=lambda hw: abs(hw[0] / hw[1] - ratio))
    keys = ratio_keys(resolution)
    return table[min(range(len(table)), key=lambda i: abs(keys[i] - ratio))]


def ratio_keys(resolution: int) -> tuple[float, ...]:
    """The ratio key of each bucket: PixArt-Σ's for its tables; for a scaled debug table (whose rounded sizes
    no longer match the 1024 keys) each bucket's own h/w rounded to 2 decimals, as the upstream keys mostly are."""
    if resolution == 2880:
        return _KEYS_2880
    if resolution in BASE_RESOLUTIONS:
        return _KEYS_1024
    return tuple(round(h / w, 2) for h, w in bucket_table(resolution))


def resize_to_cover_and_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize so the image covers (height, width), then crop the centre to exactly that size."""
    target_h, target_w = size
    scale = max(target_h / image.height, target_w / image.width)
    resized_w, resized_h = (
        max(target_w, round(image.width * scale)),
        max(target_h, round(image.height * scale)),
    )
    image = image.resize((resized_w, resized_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (resized_w - target_w) // 2, (resized_h - target_h) // 2
    return image.crop((left, top, left + target_w, top + target_h))
