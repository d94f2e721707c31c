"""Exact prompt adherence in the toy world (``manifests.toy``): segment an image by the palette, score it
against the objects its caption states.

GenEval (Ghosh et al. 2023) checks a generated image against its prompt's objects, counts, colours and
positions with a detector. The toy world is procedural, so the detector is exact: object pixels are the
saturated ones (backgrounds are grey), each gets the palette colour nearest in hue, connected pixels of one
colour form an object, its shape comes from how it fills its bounding box (a triangle, apex up, has a
quarter of its area in the top half; a square fills its box, a circle π/4 of it) and its position is the
3×3 grid cell of its box centre.

Per image, against the caption's objects T and the detected objects D:

- ``count``: 1 if |D| = |T|;
- ``colour`` / ``shape`` / ``position``: |multiset(attr of T) ∩ multiset(attr of D)| / max(|T|, |D|);
- ``overall``: 1 if the (colour, shape, position) multisets are equal — every object right, bound to the
  right colour and place, nothing extra (GenEval's image-level "correct").

``chance_levels`` gives the same scores for a perfect detector on shuffled image–prompt pairs of the
generator's distribution (the floor a model that ignores its prompt sits on); ``shifted_prompts`` gives the
floor of a given set of images: each scored against another image's prompt. Pure numpy/scipy/PIL.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from manifests.toy import COLOURS, GRID, MIN_SIZE, POSITIONS, parse_caption, scene_for

Label = tuple[str, str, str]  # (colour, shape, position)
ATTRIBUTES = ("colour", "shape", "position")
SCORES = ("overall", "count", *ATTRIBUTES)

# A pixel belongs to an object when its HSV saturation and value are at least these: backgrounds are grey
# (saturation 0) and palette colours have saturation ≥ 0.8, so the cut sits in the middle and takes half
# of a blurred edge.
MIN_SATURATION = 0.45
MIN_VALUE = 0.3
# Components smaller than this fraction of the smallest object (a triangle of MIN_SIZE) are noise.
MIN_AREA_FRACTION = 0.25
# Shape cuts: the top half of an apex-up triangle's box holds 1/4 of its area, of a circle's or square's 1/2;
# a square fills its box (1), a circle π/4 (0.785).
TRIANGLE_MAX_TOP_SHARE = 0.375
SQUARE_MIN_FILL = 0.89


def _hue(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in degrees [0, 360) of (..., 3) RGB floats."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.degrees(np.arctan2(math.sqrt(3) * (g - b), 2 * r - g - b)) % 360  # the hexagon's hue, smoothly


PALETTE_NAMES = tuple(COLOURS)
PALETTE_HUES = _hue(np.array([COLOURS[c] for c in PALETTE_NAMES], np.float64) / 255.0)  # (6,)


@dataclass(frozen=True)
class Detection:
    """One segmented object: its label and the measurements it was read from."""

    colour: str
    shape: str
    position: str
    area: int
    fill: float  # area / bounding-box area
    top_share: float  # share of the area in the top half of the box

    def label(self) -> Label:
        return (self.colour, self.shape, self.position)


def colour_map(pixels: np.ndarray) -> np.ndarray:
    """(H, W) palette index per pixel (-1 where the pixel is background) of an (H, W, 3) uint8 image."""
    rgb = pixels.astype(np.float64) / 255.0
    value = rgb.max(axis=-1)
    saturation = (value - rgb.min(axis=-1)) / np.maximum(value, 1e-6)
    distance = np.abs(_hue(rgb)[..., None] - PALETTE_HUES)  # (H, W, 6)
    nearest = np.minimum(distance, 360 - distance).argmin(axis=-1)
    return np.where((saturation >= MIN_SATURATION) & (value >= MIN_VALUE), nearest, -1)


def classify_shape(fill: float, top_share: float) -> str:
    """circle, square or triangle from the box fill and the top-half share of a component."""
    if top_share < TRIANGLE_MAX_TOP_SHARE:
        return "triangle"
    return "square" if fill >= SQUARE_MIN_FILL else "circle"


def cell_of(cx: float, cy: float, width: int, height: int) -> str:
    """The named 3×3 grid cell holding the point (cx, cy)."""
    column = min(GRID - 1, max(0, int(cx * GRID / width)))
    row = min(GRID - 1, max(0, int(cy * GRID / height)))
    return POSITIONS[row * GRID + column]


def min_area(width: int, height: int) -> float:
    """Pixels below which a component is noise: a fraction of the smallest object this size can hold."""
    side = MIN_SIZE * min(width, height) / GRID
    return MIN_AREA_FRACTION * 0.5 * side * side


def detect(image: Image.Image | np.ndarray) -> list[Detection]:
    """The objects of a toy-world image, in reading order of their box centres."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"detect needs an (H, W, 3) uint8 image, got {pixels.shape} {pixels.dtype}")
    height, width = pixels.shape[:2]
    colours = colour_map(pixels)
    threshold = min_area(width, height)
    found = []
    for index, name in enumerate(PALETTE_NAMES):
        components, num = ndimage.label(colours == index)  # 4-connected
        for number, box in enumerate(ndimage.find_objects(components), start=1):
            mask = components[box] == number  # (h, w)
            area = int(mask.sum())
            if area < threshold:
                continue
            h, w = mask.shape
            fill = area / (h * w)
            top_share = float(mask[: h // 2].sum() + (mask[h // 2].sum() / 2 if h % 2 else 0)) / area
            cx, cy = (box[1].start + box[1].stop) / 2, (box[0].start + box[0].stop) / 2
            found.append(
                (
                    cy,
                    cx,
                    Detection(
                        name,
                        classify_shape(fill, top_share),
                        cell_of(cx, cy, width, height),
                        area,
                        fill,
                        top_share,
                    ),
                )  # fmt: skip
            )
    return [d for _, _, d in sorted(found, key=lambda f: (f[0], f[1]))]


def _overlap(a: Iterable, b: Iterable) -> int:
    return sum((Counter(a) & Counter(b)).values())


def score_labels(detected: Sequence[Label], truth: Sequence[Label]) -> dict[str, float]:
    """Per-attribute, count and overall scores of detected labels against the caption's (see module doc)."""
    if not truth:
        raise ValueError("truth must hold at least one object")
    denominator = max(len(truth), len(detected))
    scores = {
        "overall": float(Counter(detected) == Counter(truth)),
        "count": float(len(detected) == len(truth)),
    }
    for i, attribute in enumerate(ATTRIBUTES):
        scores[attribute] = _overlap((d[i] for d in detected), (t[i] for t in truth)) / denominator
    return scores


def score_image(image: Image.Image | np.ndarray, prompt: str) -> dict[str, float]:
    """Scores of one image against a toy-world prompt; ValueError when the prompt is not one."""
    return score_against(image, [prompt])[0]


def score_against(image: Image.Image | np.ndarray, prompts: Sequence[str]) -> list[dict[str, float]]:
    """Scores of one image against each toy-world prompt, segmenting it once; ValueError when one is not one."""
    truths = [parse_caption(prompt) for prompt in prompts]
    for prompt, truth in zip(prompts, truths, strict=True):
        if truth is None:
            raise ValueError(f"not a toy-world caption: {prompt!r}")
    detected = [d.label() for d in detect(image)]
    return [score_labels(detected, truth) for truth in truths]


def is_toy_prompt(prompt: str) -> bool:
    """Whether a prompt is a toy-world caption (so its truth can be read from it)."""
    return parse_caption(prompt) is not None


def shifted_prompts(prompts: Sequence[str]) -> list[str]:
    """Each prompt replaced by the one n/2 + 1 places on (of two, the other one): no image keeps its own prompt,
    so scoring images against these gives the chance level of those very images (a model that ignores its
    caption scores there in expectation)."""
    n = len(prompts)
    if n < 2:
        raise ValueError(f"shifted prompts need at least two prompts, got {n}")
    step = n // 2 + 1 if n > 2 else 1  # n // 2 + 1 is n itself for n = 2: every prompt would stay in place
    return [prompts[(i + step) % n] for i in range(n)]


def mean_scores(rows: Iterable[dict[str, float]]) -> dict[str, float]:
    """The mean of each score over images (``overall`` is then the share of images fully right)."""
    rows = list(rows)
    if not rows:
        raise ValueError("mean_scores needs at least one row")
    return {name: float(np.mean([r[name] for r in rows])) for name in SCORES}


def chance_levels(*, num_pairs: int = 20_000, seed: int = 0) -> dict[str, float]:
    """Expected scores of a perfect detector on shuffled pairs: truth of scene i scored against scene j ≠ i.

    Estimated over ``num_pairs`` independent scene pairs of the generator's distribution (standard error
    ≤ 0.5 / √num_pairs). Analytically, ``count`` is 1/3 (1–3 objects, uniform).
    """
    rows = []
    for pair in range(num_pairs):
        a, b = scene_for(seed, 2 * pair), scene_for(seed, 2 * pair + 1)
        rows.append(score_labels([o.label() for o in a.objects], [o.label() for o in b.objects]))
    return mean_scores(rows)


def adherence_metrics(image_rows: list[dict]) -> dict:
    """``metrics.json`` entries of an evaluation whose prompts are toy-world captions: the mean scores of the
    generated images (``adherence``), of the same images against shifted prompts (``adherence_shifted``, their
    chance level; with two prompts or more) and of the real eval images (``adherence_real``, the ceiling, one
    per prompt); empty when the rows carry no scores (prompts without toy-world truth)."""
    if not image_rows or any("adherence" not in r for r in image_rows):
        return {}
    real = {r["real_key"]: r["real_adherence"] for r in image_rows}
    metrics = {"adherence": mean_scores(r["adherence"] for r in image_rows)}
    if all("shifted_adherence" in r for r in image_rows):
        metrics["adherence_shifted"] = mean_scores(r["shifted_adherence"] for r in image_rows)
    metrics["adherence_real"] = mean_scores(real.values())
    return metrics
