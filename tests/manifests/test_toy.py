"""The toy world: captions state the truth exactly, renders draw it (checked pixel by pixel against the
geometry), any size, deterministic."""

from __future__ import annotations

import colorsys
import math
from collections import Counter

import numpy as np
import pytest

from manifests.toy import (
    BACKGROUNDS,
    COLOURS,
    MAX_OBJECTS,
    POSITIONS,
    SHAPES,
    Scene,
    ToyObject,
    caption,
    cell_box,
    object_box,
    parse_caption,
    render,
    scene_for,
    truth,
)


def test_caption_round_trips_for_every_scene() -> None:
    for index in range(2000):
        scene = scene_for(3, index)
        assert parse_caption(caption(scene)) == tuple(o.label() for o in scene.objects)


def test_caption_reads_as_written_by_hand() -> None:
    scene = Scene(
        objects=(ToyObject("red", "circle", "top left"), ToyObject("blue", "square", "center"),
                 ToyObject("green", "triangle", "top")),
        background=("grey", "white"),
    )  # fmt: skip
    text = "a red circle at the top left, a blue square in the center and a green triangle at the top, "
    assert caption(scene) == text + "on a grey to white gradient background"
    assert parse_caption(text + "on a plain black background") == (
        ("red", "circle", "top left"), ("blue", "square", "center"), ("green", "triangle", "top"),
    )  # fmt: skip


@pytest.mark.parametrize(
    "text",
    [
        "a photo of a cat at sunset",
        "a red circle at the top left",  # no background clause
        "a pink circle at the top left, on a plain grey background",  # colour not in the palette
        "a red hexagon at the top left, on a plain grey background",
        "a red circle at the middle, on a plain grey background",
        "a red circle at the top left and a blue square at the top left, on a plain grey background",  # same cell
        "",
    ],
)
def test_parse_refuses_what_is_not_a_toy_caption(text: str) -> None:
    assert parse_caption(text) is None


def test_scene_checks_its_fields() -> None:
    with pytest.raises(ValueError, match="colour"):
        ToyObject("pink", "circle", "top")
    with pytest.raises(ValueError, match="distinct positions"):
        Scene(objects=(ToyObject("red", "circle", "top"), ToyObject("blue", "square", "top")))
    with pytest.raises(ValueError, match="1 to 3"):
        Scene(objects=())
    with pytest.raises(ValueError, match="background"):
        Scene(objects=(ToyObject("red", "circle", "top"),), background=("pink",))


def test_scene_distribution_is_uniform_over_what_captions_name() -> None:
    scenes = [scene_for(0, i) for i in range(3000)]
    counts = Counter(len(s.objects) for s in scenes)
    assert set(counts) == set(range(1, MAX_OBJECTS + 1))
    assert all(abs(c / 3000 - 1 / 3) < 0.04 for c in counts.values())
    objects = [o for s in scenes for o in s.objects]
    for values, attr in ((COLOURS, "colour"), (SHAPES, "shape"), (POSITIONS, "position")):
        share = Counter(getattr(o, attr) for o in objects)
        assert set(share) == set(values)
        assert max(share.values()) / min(share.values()) < 1.3, attr
    assert {len(s.background) for s in scenes} == {1, 2}


def _inside(shape: str, box: tuple[float, float, float, float], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Brute-force membership of pixel centres in the shape drawn in ``box`` (the reference geometry)."""
    left, top, right, bottom = box
    cx, cy, half = (left + right) / 2, (top + bottom) / 2, (right - left) / 2
    if shape == "square":
        return (abs(x - cx) <= half) & (abs(y - cy) <= half)
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    # triangle apex (cx, top), base from (left, bottom) to (right, bottom)
    return (y <= bottom) & (abs(x - cx) <= (y - top) / 2)


@pytest.mark.parametrize("size", [(1024, 512), (384, 640), (96, 64), (64, 64)])
def test_render_draws_each_object_where_the_truth_says(size: tuple[int, int]) -> None:
    width, height = size
    for index in range(8):
        scene = scene_for(1, index)
        pixels = np.asarray(render(scene, width, height)).astype(int)  # (H, W, 3)
        assert pixels.shape == (height, width, 3)
        y, x = np.mgrid[0:height, 0:width] + 0.5
        drawn = np.zeros((height, width), bool)
        for obj in scene.objects:
            box = object_box(obj, width, height)
            cell = cell_box(obj.position, width, height)
            assert cell[0] <= box[0] and box[2] <= cell[2] and cell[1] <= box[1] and box[3] <= cell[3]
            painted = np.all(pixels == COLOURS[obj.colour], axis=-1) & (
                (x >= cell[0]) & (x < cell[2]) & (y >= cell[1]) & (y < cell[3])
            )
            expected = _inside(obj.shape, box, x, y)
            # Rasterisation differs from the ideal shape only along its outline (about one pixel wide).
            outline = 2 * (box[2] - box[0]) * (4 if obj.shape != "circle" else math.pi) + 8
            assert (painted ^ expected).sum() <= outline, (index, obj)
            assert painted.sum() >= 0.9 * expected.sum()
            drawn |= painted
        background = pixels[~drawn]
        assert np.all(background.max(axis=-1) == background.min(axis=-1)), "background must be grey"
        assert {tuple(p) for p in background[:: max(1, background.shape[0] // 50)]} <= {
            (v, v, v) for v in range(256)
        }


def test_palette_is_saturated_and_backgrounds_are_grey() -> None:
    hues = sorted(colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360 for rgb in COLOURS.values())
    assert all(abs(b - a - 60) < 8 for a, b in zip(hues, hues[1:], strict=False))
    assert all(colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[1] >= 0.8 for rgb in COLOURS.values())
    assert all(len(set(rgb)) == 1 for rgb in BACKGROUNDS.values())


def test_gradient_runs_top_to_bottom() -> None:
    scene = Scene(objects=(ToyObject("red", "circle", "center"),), background=("black", "white"))
    pixels = np.asarray(render(scene, 90, 120)).astype(int)
    assert tuple(pixels[0, 0]) == BACKGROUNDS["black"] and tuple(pixels[-1, 0]) == BACKGROUNDS["white"]
    assert np.all(np.diff(pixels[:, 0, 0]) >= 0)


def test_truth_is_the_scene_and_the_caption() -> None:
    scene = scene_for(0, 5)
    record = truth(scene)
    assert record["caption"] == caption(scene)
    assert [(o["colour"], o["shape"], o["position"]) for o in record["objects"]] == [
        o.label() for o in scene.objects
    ]


def test_scenes_are_deterministic_per_seed_and_index() -> None:
    assert scene_for(4, 9) == scene_for(4, 9)
    assert render(scene_for(4, 9), 64, 48).tobytes() == render(scene_for(4, 9), 64, 48).tobytes()
    assert len({caption(scene_for(s, 0)) for s in range(20)}) > 15
