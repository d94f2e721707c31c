"""Aesthetic scorer: the real LAION v2 head, collapsed at load, over the tiny offline CLIP."""

from __future__ import annotations

import numpy as np
import open_clip
import pyarrow as pa
import pytest
import torch
from PIL import Image
from torch import nn

from curation.aesthetic import (
    CLIP_INPUT,
    EMBEDDING,
    AestheticScorer,
    clip_image_size,
    load_aesthetic_head,
    load_head_state,
    resolve_head,
)
from curation.config import BUILTIN_HEAD, AestheticConfig
from curation.run import parse_min_aesthetic
from curation.stages import aesthetic_gate, clip_thumbnail
from manifests import IMAGES, Rejected
from tests.conftest import SHARED_LAION_HEAD


def plain_mlp() -> nn.Module:
    """The head as published: five Linear layers with Dropout between, no activations."""
    head = nn.Sequential(
        nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
    )  # fmt: skip
    state = load_head_state(resolve_head(BUILTIN_HEAD))
    head.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
    return head.eval()


def test_collapsed_head_equals_plain_mlp() -> None:
    embeddings = torch.nn.functional.normalize(
        torch.randn(32, 768, generator=torch.Generator().manual_seed(0))
    )
    with torch.no_grad():
        expected = plain_mlp()(embeddings)[:, 0].numpy()  # (B,)
    head = load_aesthetic_head(BUILTIN_HEAD)
    collapsed = embeddings.numpy() @ head.weight + head.bias  # (B,)
    assert head.weight.shape == (768,) and head.weight.dtype == np.float32
    np.testing.assert_allclose(collapsed, expected, rtol=0, atol=1e-4)
    assert head.model_id == "laion_aesthetic_v2.safetensors@sha256:88ad5c5b60b7"


def test_builtin_head_is_the_published_one(tmp_path) -> None:
    """The shipped safetensors is the published .pth tensor for tensor, and a .pth loads the same way."""
    builtin = load_head_state(resolve_head(BUILTIN_HEAD))
    assert AestheticConfig().head == BUILTIN_HEAD  # the default needs nothing beside the repository
    torch.save(builtin, tmp_path / "head.pth")
    from_pth = load_aesthetic_head(tmp_path / "head.pth")
    np.testing.assert_array_equal(from_pth.weight, load_aesthetic_head(BUILTIN_HEAD).weight)
    if not SHARED_LAION_HEAD.is_file():
        pytest.skip("the original .pth is only on the team's machines (../shared/models)")
    original = torch.load(SHARED_LAION_HEAD, map_location="cpu", weights_only=True)
    assert original.keys() == builtin.keys()
    assert all(torch.equal(original[k], builtin[k]) for k in original)


def test_head_file_is_checked(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="aesthetic head not found"):
        load_aesthetic_head(tmp_path / "missing.pth")
    torch.save({"layers.0.weight": torch.zeros(1, 768)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="expected keys"):
        load_aesthetic_head(tmp_path / "bad.pth")


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(300, 256), (256, 480), (333, 333)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def test_thumbnail_is_open_clips_geometric_preprocessing(tiny_clip) -> None:
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_clip}")
    size = clip_image_size(f"local-dir:{tiny_clip}")
    geometric = open_clip.transform.Compose(preprocess.transforms[:2])  # Resize + CenterCrop
    for image in images():
        assert np.array_equal(clip_thumbnail(image, size), np.asarray(geometric(image)))


def test_scorer_matches_plain_recomputation(aesthetic_cfg: AestheticConfig, tiny_clip) -> None:
    """Thumbnails from pass 2 + collapsed head == open_clip's own preprocess + encoder + plain MLP."""
    scorer = AestheticScorer(aesthetic_cfg)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_clip}")
    with torch.no_grad():
        features = model.eval().encode_image(torch.stack([preprocess(im) for im in images()]))  # (B, 768)
        expected = plain_mlp()(features / features.norm(dim=-1, keepdim=True))[:, 0].numpy()  # (B,)
    pixels = np.stack([clip_thumbnail(im, scorer.image_size) for im in images()])  # (B, S, S, 3)
    embeddings = scorer.embed(pixels)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(scorer.score(embeddings), expected, atol=1e-4)


def test_scorer_batch_fills_scored_rows_only(aesthetic_cfg: AestheticConfig) -> None:
    cfg = AestheticConfig(**{**aesthetic_cfg.__dict__, "save_embeddings": True})
    scorer = AestheticScorer(cfg)
    thumbnail = clip_thumbnail(images()[0], scorer.image_size).tobytes()
    rows = [
        {"key": "a", "source": "s", "status": "kept", CLIP_INPUT: thumbnail},
        {"key": "b", "source": "s", "status": "rejected", "reason": "too_small", CLIP_INPUT: None},
    ]
    batch = pa.Table.from_pylist(rows, schema=pa.schema([*IMAGES, pa.field(CLIP_INPUT, pa.binary())]))
    out = scorer(batch).to_pylist()
    assert [r["key"] for r in out] == ["a", "b"] and CLIP_INPUT not in out[0]
    assert isinstance(out[0]["aesthetic"], float) and out[1]["aesthetic"] is None
    assert out[0]["clip_model"] == aesthetic_cfg.clip_model and out[1]["clip_model"] is None
    assert out[0]["aesthetic_model"].startswith("laion_aesthetic_v2.safetensors@sha256:")
    assert len(out[0][EMBEDDING]) == 768 and out[1][EMBEDDING] is None


def test_clip_image_size_without_weights(tiny_clip) -> None:
    assert clip_image_size(f"local-dir:{tiny_clip}") == 64
    assert clip_image_size("ViT-L-14-quickgelu") == 224
    with pytest.raises(ValueError, match="unknown open_clip model"):
        clip_image_size("no-such-model")


@pytest.mark.parametrize(
    ("tier", "score", "expected"),
    [
        ("1k", 4.9, Rejected("low_aesthetic")),
        ("1k", 5.0, None),
        ("4k", 6.4, Rejected("low_aesthetic")),
        ("4k", 1.0, None),
    ],
)
def test_aesthetic_gate_per_tier(tier: str, score: float, expected) -> None:
    thresholds = {"1k": 5.0, "4k": 6.5} if score != 1.0 else {"1k": 5.0}
    assert aesthetic_gate(tier, score, thresholds) == expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (None, {"4k": 5.0, "1k": 5.0}),
        (["none"], {}),
        (["6"], {"4k": 6.0, "1k": 6.0}),
        (["4k=6.5", "1k=5"], {"4k": 6.5, "1k": 5.0}),
    ],
)
def test_min_aesthetic_flag(values, expected) -> None:
    assert parse_min_aesthetic(values) == expected


def test_min_aesthetic_rejects_unknown_tier() -> None:
    with pytest.raises(ValueError, match="tier must be one of"):
        parse_min_aesthetic(["8k=5"])
    with pytest.raises(ValueError, match="min_score tiers"):
        AestheticConfig(min_score={"8k": 5.0})
