"""PixArt's aspect-ratio bucket tables and the resize-to-cover + center-crop that fits an image to one.

Each table has 40 buckets keyed by the ratio h/w. The 256, 512 and 2048 tables in the PixArt-Σ repository
(`diffusion/data/datasets/utils.py`, ASPECT_RATIO_*) are the 1024 table scaled by 1/4, 1/2 and 2, so only
the 1024 table is written out here; the 2880 table (the 4K stage) has its own sizes, multiples of 64.
"""

from __future__ import annotations

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
BASE_RESOLUTIONS = (256, 512, 1024, 2048, 2880)


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


def nearest_bucket(height: int, width: int, resolution: int) -> tuple[int, int]:
    """The bucket whose ratio h/w is nearest to the image's (first one on ties, as PixArt's argmin)."""
    ratio = height / width
    return min(bucket_table(resolution), key=lambda hw: abs(hw[0] / hw[1] - ratio))


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
