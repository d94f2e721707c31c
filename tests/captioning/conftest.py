"""Captioning fixtures: the tiny LLaVA, the tiny T5 tokenizer, and a tiny curated run built by hand."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

import manifests
from captioning.tiny import build_tiny_llava
from training.tiny import build_tiny_t5


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_t5(tmp_path_factory.mktemp("t5"))


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def make_image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# (key, tier, format, size): kept rows written to shards. Real tiers are ≥ 1K; pixels here stay tiny
# because only the manifest's tier label matters to captioning.
KEPT_ROWS = [
    ("k00", "1k", "JPEG", (96, 64)),
    ("k01", "1k", "PNG", (64, 80)),
    ("k02", "1k", "WEBP", (70, 70)),
    ("k03", "4k", "JPEG", (128, 72)),
    ("k04", "4k", "PNG", (80, 45)),
]
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
BROKEN_KEY = "k05"  # in the shard, but its bytes do not decode
MISSING_KEY = "k06"  # in the manifest, but not in its shard
REJECTED_KEY = "r00"  # rejected by curation: no shard


@pytest.fixture(scope="session")
def layout() -> dict:
    """The keys of the tiny curated run, by what captioning should do with them."""
    kept = sorted([k for k, *_ in KEPT_ROWS] + [BROKEN_KEY, MISSING_KEY])
    return {
        "kept": kept,  # every kept row gets one caption row (captioned, or rejected with a reason)
        "4k": sorted([k for k, tier, *_ in KEPT_ROWS if tier == "4k"] + [MISSING_KEY]),
        "broken": BROKEN_KEY,
        "missing": MISSING_KEY,
        "rejected": REJECTED_KEY,
    }


@pytest.fixture(scope="session")
def image_factory() -> Callable[[int, tuple[int, int]], Image.Image]:
    return make_image


@pytest.fixture
def curated_run(tmp_path: Path) -> Callable[[], Path]:
    """Build a curated run folder like curation/run.py writes it: shards per tier + images manifest."""

    def build(name: str = "run") -> Path:
        root = tmp_path / name
        rows, samples = [], {"1k": [], "4k": []}
        for i, (key, tier, fmt, size) in enumerate(KEPT_ROWS):
            data = encode(make_image(i, size), fmt)
            samples[tier].append(
                {"__key__": key, EXTENSIONS[fmt]: data, "json": json.dumps({"key": key}).encode()}
            )
            rows.append(_row(key, tier, fmt, size, caption=f"original caption {i}"))
        samples["1k"].append({"__key__": BROKEN_KEY, "jpg": b"\xff\xd8\xff not a jpeg", "json": b"{}"})
        rows.append(_row(BROKEN_KEY, "1k", "JPEG", (64, 64)))
        rows.append(_row(MISSING_KEY, "4k", "JPEG", (64, 64)))
        rows.append(
            {"key": REJECTED_KEY, "source": "file:///r00.jpg", "status": "rejected", "reason": "too_small"}
        )
        for tier, tier_samples in samples.items():
            path = root / "shards" / "curated" / tier / f"{tier}-000000.tar"
            path.parent.mkdir(parents=True, exist_ok=True)
            with wds.TarWriter(str(path)) as sink:
                for sample in tier_samples:
                    sink.write(sample)
        manifests.ManifestWriter(root / "manifests" / "images", "images").write(rows, "part-00000")
        return root

    return build


def _row(key: str, tier: str, fmt: str, size: tuple[int, int], caption: str | None = None) -> dict:
    return {
        "key": key,
        "source": f"file:///{key}",
        "status": "kept",
        "tier": tier,
        "format": fmt,
        "width": size[0],
        "height": size[1],
        "shard": f"shards/curated/{tier}/{tier}-000000.tar",
        "caption_orig": caption,
    }
