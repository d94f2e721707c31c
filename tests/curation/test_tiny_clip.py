"""Tiny offline open_clip model: built, loaded by ``local-dir:`` with its weights, 768-d embeddings."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from curation.aesthetic import load_head_state, resolve_head
from curation.config import BUILTIN_HEAD
from curation.tiny import CLIP_EMBED_DIM, build_tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def image_embeddings(clip_dir: Path) -> torch.Tensor:
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    images = [Image.new("RGB", (120 + 40 * i, 90), (60 * i, 100, 200)) for i in range(3)]
    with torch.no_grad():
        return model.eval().encode_image(torch.stack([preprocess(im) for im in images]))  # (B, 768)


def test_loads_saved_weights(clip_dir: Path) -> None:
    model = open_clip.create_model(f"local-dir:{clip_dir}")
    saved = load_file(str(clip_dir / "open_clip_model.safetensors"))
    loaded = model.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_embeds_images_and_text(clip_dir: Path, image_embeddings: torch.Tensor) -> None:
    assert image_embeddings.shape == (3, CLIP_EMBED_DIM) and torch.isfinite(image_embeddings).all()
    model = open_clip.create_model(f"local-dir:{clip_dir}").eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{clip_dir}")
    with torch.no_grad():
        text = model.encode_text(tokenizer(["a cat", "a red square"]))  # (B, 768)
    assert text.shape == (2, CLIP_EMBED_DIM)


def test_laion_aesthetic_head_fits_on_top(image_embeddings: torch.Tensor) -> None:
    head = nn.Sequential(
        nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
    )  # fmt: skip
    head.load_state_dict(
        {k.removeprefix("layers."): v for k, v in load_head_state(resolve_head(BUILTIN_HEAD)).items()}
    )
    normalised = image_embeddings / image_embeddings.norm(dim=-1, keepdim=True)  # (B, 768)
    with torch.no_grad():
        scores = head.eval()(normalised)  # (B, 1)
    assert scores.shape == (3, 1)
