"""Offline stand-ins for evaluation, shared by the sampling/evaluation tests: an eval set, Inception, CLIP, runs."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import torch
from PIL import Image

from curation.tiny import build_tiny_clip
from manifests.tars import json_bytes, write_shard
from training.model import PRESETS, PixArtSigma
from training.pipeline import FrozenComponents, export_pipeline
from training.tiny import synthetic_image
from training.tiny_inception import build_tiny_inception

PROMPTS = ("a photo of a cat at sunset", "a red car in the rain", "a lighthouse by the sea",
           "an oil painting of a castle", "a bowl of fruit on a wooden table")  # fmt: skip
EVAL_SIZES = ((64, 64), (48, 96), (96, 48), (64, 80), (80, 64))  # (height, width) of the real images


def real_images() -> list[Image.Image]:
    return [synthetic_image(100 + i, size) for i, size in enumerate(EVAL_SIZES)]


def build_eval_set(out: Path, num: int = len(PROMPTS)) -> Path:
    """An eval set as manifests.evalset writes it: eval-*.tar (original bytes + JSON) and prompts.jsonl."""
    rows, samples = [], []
    for i, (prompt, image) in enumerate(zip(PROMPTS[:num], real_images(), strict=False)):
        key = f"k{i:03d}"
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        rows.append(
            {"key": key, "prompt": prompt, "width": image.width, "height": image.height, "tier": "1k"}
        )
        samples.append({"__key__": key, "png": buffer.getvalue(), "json": json_bytes(rows[-1])})
    write_shard(out / "eval-000000.tar", samples[:3])
    if samples[3:]:
        write_shard(out / "eval-000001.tar", samples[3:])
    (out / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def train_tiny_clip(out: Path, images: list[Image.Image], prompts: list[str], *, steps: int = 40) -> str:
    """curation's tiny open_clip model, trained a few contrastive steps on (image, prompt) pairs, saved back."""
    import open_clip
    import torch.nn.functional as F
    from safetensors.torch import save_file

    clip_dir = build_tiny_clip(out)
    name = f"local-dir:{clip_dir}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    pixels = torch.stack([preprocess(im) for im in images])
    tokens = open_clip.get_tokenizer(name)(prompts)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    labels = torch.arange(len(images))
    torch.manual_seed(0)
    model.train()
    for _ in range(steps):  # CLIP's symmetric InfoNCE loss
        image = F.normalize(model.encode_image(pixels), dim=-1)
        text = F.normalize(model.encode_text(tokens), dim=-1)
        logits = model.logit_scale.exp() * image @ text.T
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(clip_dir / "open_clip_model.safetensors"),
    )
    return name


def build_eval_models(out: Path) -> dict:
    """A random Inception-v3 in torch-fidelity's layout and a tiny CLIP trained on the eval set (built once)."""
    done = out / "models.json"
    if not done.exists():
        models = {
            "inception": str(build_tiny_inception(out)),
            "clip": train_tiny_clip(out, real_images(), list(PROMPTS)),
        }
        done.write_text(json.dumps(models))
    return json.loads(done.read_text())


def tiny_export(tiny_models: Path, folder: Path, seed: int, kv_layers: tuple[int, ...] = (1,)) -> Path:
    """A random tiny model (weights perturbed off their init) exported as a pipeline referencing tiny T5/VAE."""
    torch.manual_seed(seed)
    model = PixArtSigma(dataclasses.replace(PRESETS["tiny"], kv_compress_layers=kv_layers)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    components = FrozenComponents.from_paths(str(tiny_models / "t5"), str(tiny_models / "vae"), 0.13025)
    return export_pipeline(model, folder, components)
