"""The toy world: coloured shapes at named grid positions, with a caption that *is* the ground truth.

A scene is one to three objects (colour × shape × position on a 3×3 grid, one object per cell) on a plain
or vertical-gradient grey background. ``caption(scene)`` writes it in a fixed grammar and
``parse_caption`` reads the objects back exactly, so the truth travels through curation, the manifests and
the eval set as the original caption (``caption_orig`` → ``prompts.jsonl``'s ``prompt``) with no extra
column; ``truth(scene)`` is the same content as JSON for the sidecar a corpus writes beside each image.

``render(scene, width, height)`` draws a scene at any size and aspect ratio: geometry is stored relative
to the grid cell, so one scene gives the same picture at 64 px and at 1024 px. Nothing here does I/O;
``curation.toy_world`` writes corpora, ``training.adherence`` scores images against parsed captions.

Why these choices: the six shape colours are 60° apart in hue at full saturation and the backgrounds are
grey (saturation 0), so a pixel's object colour survives blur, resizing and a lossy VAE round trip; shapes
differ in how much of their bounding box they fill (square 1, circle π/4, triangle 1/2), which a
segmenter reads without a learned model (GenEval scores with a detector; here the world is procedural,
so the check is exact).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Shape colours: pure hues 60° apart (HSV hue 0, 60, 120, 180, 240, 300), saturation ≥ 0.8.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "yellow": (225, 215, 25),
    "green": (30, 180, 40),
    "cyan": (25, 195, 205),
    "blue": (40, 50, 220),
    "magenta": (205, 35, 205),
}
# Backgrounds are grey (saturation 0): nothing of the background can be read as an object colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "light grey": (185, 185, 185),
    "grey": (128, 128, 128),
    "dark grey": (64, 64, 64),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
GRID = 3
# Row-major 3×3 grid: index = row * 3 + column.
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
MAX_OBJECTS = 3
# Object size as a fraction of the cell's shorter side: big enough to stay readable after resizing to a
# 64 px training image (0.5 × a 21 px cell is ≥ 10 px), small enough that neighbours never touch.
MIN_SIZE, MAX_SIZE = 0.5, 0.7
# An object's centre moves at most this fraction of its cell's free room off the cell centre: two objects in
# neighbouring cells stay ≥ (1 - JITTER) · 0.3 cell apart (3 px at 64 px), so the same colour never merges.
JITTER = 0.5


@dataclass(frozen=True)
class ToyObject:
    """One shape: what the caption names (colour, shape, position) and where inside its cell it sits."""

    colour: str
    shape: str
    position: str
    size: float = 0.6  # fraction of the cell's shorter side
    dx: float = 0.0  # centre offset in [-1, 1] × the free room in the cell, horizontally
    dy: float = 0.0

    def __post_init__(self) -> None:
        for field, value, allowed in (
            ("colour", self.colour, tuple(COLOURS)),
            ("shape", self.shape, SHAPES),
            ("position", self.position, POSITIONS),
        ):
            if value not in allowed:
                raise ValueError(f"ToyObject.{field} must be one of {allowed}, got {value!r}")
        if not MIN_SIZE <= self.size <= MAX_SIZE:
            raise ValueError(f"ToyObject.size must be in [{MIN_SIZE}, {MAX_SIZE}], got {self.size}")
        if not (-1 <= self.dx <= 1 and -1 <= self.dy <= 1):
            raise ValueError(f"ToyObject.dx/dy must be in [-1, 1], got {self.dx}, {self.dy}")

    def label(self) -> tuple[str, str, str]:
        """(colour, shape, position): the part of the object a caption states and the metric scores."""
        return (self.colour, self.shape, self.position)


@dataclass(frozen=True)
class Scene:
    """Objects in distinct grid cells on a background: plain (one grey) or a top → bottom gradient (two)."""

    objects: tuple[ToyObject, ...]
    background: tuple[str, ...] = ("white",)

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"Scene.objects must hold 1 to {MAX_OBJECTS} objects, got {len(self.objects)}")
        cells = [o.position for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"Scene.objects must be in distinct positions, got {cells}")
        if len(self.background) not in (1, 2) or any(b not in BACKGROUNDS for b in self.background):
            raise ValueError(
                f"Scene.background must be one or two of {tuple(BACKGROUNDS)}, got {self.background}"
            )


def sample_scene(rng: np.random.Generator) -> Scene:
    """A random scene: 1–3 objects uniformly, colours and shapes with replacement, distinct cells."""
    num_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = rng.choice(len(POSITIONS), size=num_objects, replace=False)
    objects = tuple(
        ToyObject(
            colour=str(rng.choice(list(COLOURS))),
            shape=str(rng.choice(SHAPES)),
            position=POSITIONS[int(cell)],
            size=float(rng.uniform(MIN_SIZE, MAX_SIZE)),
            dx=float(rng.uniform(-1, 1)),
            dy=float(rng.uniform(-1, 1)),
        )
        for cell in sorted(cells)
    )
    greys = list(BACKGROUNDS)
    if rng.random() < 0.5:
        background = (str(rng.choice(greys)),)
    else:
        first, second = rng.choice(len(greys), size=2, replace=False)
        background = (greys[int(first)], greys[int(second)])
    return Scene(objects=objects, background=background)


def scene_for(seed: int, index: int) -> Scene:
    """The ``index``-th scene of corpus ``seed``: independent of how many scenes come before or after."""
    return sample_scene(np.random.default_rng([seed, index]))


# -- captions: the truth, in words -------------------------------------------------------------------------


def _place(position: str) -> str:
    return "in the center" if position == "center" else f"at the {position}"


def caption(scene: Scene) -> str:
    """``a red circle at the top left, a blue square in the center and …, on a plain grey background``."""
    phrases = [f"a {o.colour} {o.shape} {_place(o.position)}" for o in scene.objects]
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    if len(scene.background) == 1:
        ground = f"on a plain {scene.background[0]} background"
    else:
        ground = f"on a {scene.background[0]} to {scene.background[1]} gradient background"
    return f"{listed}, {ground}"


_ALT = "|".join
_OBJECT = re.compile(
    rf"\ba ({_ALT(COLOURS)}) ({_ALT(SHAPES)}) "
    rf"(?:in the (center)|at the ({_ALT(sorted(POSITIONS, key=len, reverse=True))}))(?=,| and|$)"
)
_CAPTION = re.compile(rf"^(?:{_OBJECT.pattern}(?:, | and )?)+, on a .+ background$")


def parse_caption(text: str) -> tuple[tuple[str, str, str], ...] | None:
    """The (colour, shape, position) labels a toy-world caption states, in order; None if it is not one.

    Exact inverse of ``caption`` for the objects (the background is not scored, so not returned).
    """
    text = text.strip()
    if not _CAPTION.match(text):
        return None
    labels = tuple((m[1], m[2], m[3] or m[4]) for m in _OBJECT.finditer(text))
    if not 1 <= len(labels) <= MAX_OBJECTS or len({p for _, _, p in labels}) != len(labels):
        return None
    return labels


def truth(scene: Scene) -> dict:
    """The scene as JSON-ready data: the sidecar beside each corpus image, and what ``caption`` states."""
    return {
        "objects": [
            {"colour": o.colour, "shape": o.shape, "position": o.position, "size": round(o.size, 4),
             "dx": round(o.dx, 4), "dy": round(o.dy, 4)}
            for o in scene.objects
        ],
        "background": list(scene.background),
        "caption": caption(scene),
    }  # fmt: skip


# -- rendering ---------------------------------------------------------------------------------------------


def cell_box(position: str, width: int, height: int) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a named grid cell in pixels."""
    index = POSITIONS.index(position)
    row, column = divmod(index, GRID)
    return (
        column * width / GRID,
        row * height / GRID,
        (column + 1) * width / GRID,
        (row + 1) * height / GRID,
    )


def object_box(obj: ToyObject, width: int, height: int) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the object's square bounding box, inside its cell."""
    left, top, right, bottom = cell_box(obj.position, width, height)
    side = obj.size * min(right - left, bottom - top)
    cx = (left + right) / 2 + obj.dx * (right - left - side) / 2 * JITTER
    cy = (top + bottom) / 2 + obj.dy * (bottom - top - side) / 2 * JITTER
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


def _background(scene: Scene, width: int, height: int) -> Image.Image:
    top = np.array(BACKGROUNDS[scene.background[0]], np.float32)
    bottom = np.array(BACKGROUNDS[scene.background[-1]], np.float32)
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]  # (H, 1)
    rows = np.rint(top * (1 - t) + bottom * t).astype(np.uint8)  # (H, 3)
    return Image.fromarray(np.broadcast_to(rows[:, None, :], (height, width, 3)).copy(), "RGB")


def render(scene: Scene, width: int, height: int) -> Image.Image:
    """The scene as an RGB image of ``width`` × ``height`` pixels (hard edges, no anti-aliasing)."""
    if width < GRID * 8 or height < GRID * 8:
        raise ValueError(f"render needs at least {GRID * 8} px a side, got {width}×{height}")
    image = _background(scene, width, height)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        left, top, right, bottom = object_box(obj, width, height)
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((left, top, right, bottom), fill=fill)
        else:  # triangle, apex up: half its bounding box
            draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)
    return image
