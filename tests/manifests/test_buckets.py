"""Bucket choice against PixArt-Σ's own data loader: its ``get_closest_ratio`` picks the bucket whose rounded
ratio KEY is nearest to h/w. The reference below re-implements it faithfully from PixArt-alpha/PixArt-sigma
(commit 1ce521a), ``diffusion/data/datasets/InternalData_ms.py`` (``get_closest_ratio``) over the tables of
``diffusion/data/datasets/utils.py`` (ASPECT_RATIO_1024 and ASPECT_RATIO_2880 copied as data; that file's
256, 512 and 2048 tables have the 1024 table's keys and its sizes × 1/4, 1/2 and 2)."""

from __future__ import annotations

import random

import pytest

from manifests.buckets import nearest_bucket

# fmt: off
ASPECT_RATIO_1024 = {
    '0.25': (512, 2048), '0.26': (512, 1984), '0.27': (512, 1920), '0.28': (512, 1856), '0.32': (576, 1792),
    '0.33': (576, 1728), '0.35': (576, 1664), '0.4': (640, 1600), '0.42': (640, 1536), '0.48': (704, 1472),
    '0.5': (704, 1408), '0.52': (704, 1344), '0.57': (768, 1344), '0.6': (768, 1280), '0.68': (832, 1216),
    '0.72': (832, 1152), '0.78': (896, 1152), '0.82': (896, 1088), '0.88': (960, 1088), '0.94': (960, 1024),
    '1.0': (1024, 1024), '1.07': (1024, 960), '1.13': (1088, 960), '1.21': (1088, 896), '1.29': (1152, 896),
    '1.38': (1152, 832), '1.46': (1216, 832), '1.67': (1280, 768), '1.75': (1344, 768), '2.0': (1408, 704),
    '2.09': (1472, 704), '2.4': (1536, 640), '2.5': (1600, 640), '2.89': (1664, 576), '3.0': (1728, 576),
    '3.11': (1792, 576), '3.62': (1856, 512), '3.75': (1920, 512), '3.88': (1984, 512), '4.0': (2048, 512),
}
ASPECT_RATIO_2880 = {
    '0.25': (1408, 5760), '0.26': (1408, 5568), '0.27': (1408, 5376), '0.28': (1408, 5184), '0.32': (1600, 4992),
    '0.33': (1600, 4800), '0.34': (1600, 4672), '0.4': (1792, 4480), '0.42': (1792, 4288), '0.47': (1920, 4096),
    '0.49': (1920, 3904), '0.51': (1920, 3776), '0.55': (2112, 3840), '0.59': (2112, 3584), '0.68': (2304, 3392),
    '0.72': (2304, 3200), '0.78': (2496, 3200), '0.83': (2496, 3008), '0.89': (2688, 3008), '0.93': (2688, 2880),
    '1.0': (2880, 2880), '1.07': (2880, 2688), '1.12': (3008, 2688), '1.21': (3008, 2496), '1.28': (3200, 2496),
    '1.39': (3200, 2304), '1.47': (3392, 2304), '1.7': (3584, 2112), '1.82': (3840, 2112), '2.03': (3904, 1920),
    '2.13': (4096, 1920), '2.39': (4288, 1792), '2.5': (4480, 1792), '2.92': (4672, 1600), '3.0': (4800, 1600),
    '3.12': (4992, 1600), '3.68': (5184, 1408), '3.82': (5376, 1408), '3.95': (5568, 1408), '4.0': (5760, 1408),
}
# fmt: on


def upstream_table(resolution: int) -> dict[str, tuple[int, int]]:
    if resolution == 2880:
        return ASPECT_RATIO_2880
    return {k: (h * resolution // 1024, w * resolution // 1024) for k, (h, w) in ASPECT_RATIO_1024.items()}


def get_closest_ratio(height: float, width: float, ratios: dict) -> tuple[tuple[int, int], float]:
    """PixArt-Σ's rule: the key nearest to h/w (first on ties, ``min`` over the dict's order)."""
    aspect_ratio = height / width
    closest_ratio = min(ratios.keys(), key=lambda ratio: abs(float(ratio) - aspect_ratio))
    return ratios[closest_ratio], float(closest_ratio)


def random_sizes(num: int = 20_000, seed: int = 0) -> list[tuple[int, int]]:
    """Web-like sizes: sides 64–4096 px, aspect ratios log-uniform over 1:5 … 5:1 (past the tables' range)."""
    rng = random.Random(seed)
    sizes = []
    for _ in range(num):
        side = rng.randint(64, 4096)
        ratio = 5 ** rng.uniform(-1, 1)
        sizes.append((max(1, round(side * ratio**0.5)), max(1, round(side / ratio**0.5))))
    return sizes


@pytest.mark.parametrize("resolution", [256, 512, 1024, 2048, 2880])
def test_default_bucket_is_pixart_sigmas_on_20k_random_sizes(resolution) -> None:
    ratios = upstream_table(resolution)
    sizes = random_sizes()
    ours = [nearest_bucket(h, w, resolution) for h, w in sizes]
    assert ours == [get_closest_ratio(h, w, ratios)[0] for h, w in sizes]
    exact = [nearest_bucket(h, w, resolution, rule="exact") for h, w in sizes]
    differ = sum(a != b for a, b in zip(ours, exact, strict=True))
    assert 0 < differ < len(sizes) // 10  # the option is the other rule, and the two mostly agree
    for (h, w), bucket in zip(sizes, exact, strict=True):  # "exact": no bucket's own h/w is nearer
        best = min(abs(bh / bw - h / w) for bh, bw in upstream_table(resolution).values())
        assert abs(bucket[0] / bucket[1] - h / w) == best


def test_unknown_rule_is_refused() -> None:
    with pytest.raises(ValueError, match=r"bucket rule must be one of \('upstream', 'exact'\), got 'round'"):
        nearest_bucket(100, 100, 256, rule="round")
