"""A tiny offline open_clip model for the curation side's CLIP scorer (aesthetics, embeddings).

It is saved in open_clip's ``local-dir:`` layout (``open_clip_config.json`` + ``open_clip_model.safetensors``),
the same layout as an ``hf-hub:`` repo, so it loads through the calls real weights use, with no download
and no pickle (safetensors, strict state-dict match):

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{clip_dir}")    # SimpleTokenizer, bundled BPE

``embed_dim`` is 768 like ViT-L/14, so the LAION aesthetic predictor (a head over 768-d normalised image
embeddings) can sit on top. A real model is named the same way, e.g. ``"ViT-L-14"`` with
``pretrained="openai"`` or a local ``.safetensors`` path; only the model name string differs.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

CLIP_DIR = "clip"
CLIP_EMBED_DIM = 768  # ViT-L/14's, the input width of the LAION aesthetic head

TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": CLIP_EMBED_DIM,
    "quick_gelu": True,  # as OpenAI's ViT-L/14, which the aesthetic head was trained on
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def build_tiny_clip(out_dir: Path, *, seed: int = 0) -> Path:
    """Save a tiny open_clip CLIP (64 px ViT, 768-d embeddings) to ``out_dir/clip``; load it by ``local-dir:``."""
    clip_dir = Path(out_dir) / CLIP_DIR
    clip_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**TINY_CLIP_CONFIG)
    state = {key: tensor.contiguous() for key, tensor in model.state_dict().items()}
    save_file(state, str(clip_dir / "open_clip_model.safetensors"))
    config = {
        "model_cfg": TINY_CLIP_CONFIG,
        "preprocess_cfg": {
            "mean": list(open_clip.OPENAI_DATASET_MEAN),
            "std": list(open_clip.OPENAI_DATASET_STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }
    (clip_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    logger.info("tiny CLIP saved to %s", clip_dir)
    return clip_dir


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m curation.tiny --output DIR`` writes DIR/clip."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(f"clip: {build_tiny_clip(args.output)}")


if __name__ == "__main__":
    main()
