"""Checkpoint import/export: original PixArt-α/Σ ``.pth``, diffusers ``PixArtTransformer2DModel``, our folder.

Our parameter names are the reference's, so an original ``.pth`` loads after dropping ``pos_embed``.
diffusers splits the fused projections (``attn.qkv`` → ``attn1.to_q/k/v``, ``cross_attn.kv_linear`` →
``attn2.to_k/v``) and renames the rest; the table below is the whole mapping. diffusers has no KV
compression: a compressed model becomes a ``training.kv_processor.PixArtKVTransformer2DModel`` (the plain
diffusers model plus a KV-compression attention processor whose weights are ``attn1.processor.sr|norm``),
or goes to our own folder (safetensors + config json).

The formats only: ``training.pipeline`` assembles pipelines from them, ``training.sample`` loads any source
through them, and ``training.export`` (``pixsigma-export``) is the command line; none is imported here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from manifests.features import LEGACY_PROMPT_CASE
from training.model import ModelConfig, PixArtSigma

if TYPE_CHECKING:
    from diffusers import PixArtTransformer2DModel

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_NAME = "pixsigma.PixArtSigma"
# Beside a diffusers transformer's weights (diffusers ignores it): the null caption and how it is attended.
NULL_CAPTION_FILE = "null_caption.safetensors"
# How the released PixArt-α/Σ weights attend a dropped caption (their training code, scripts/inference.py).
ORIGINAL_NULL_CAPTION = "upstream"
# How the released weights' captions were cased: as written (PixArt-Σ tools/extract_features.py keeps
# ``caption.strip()``; scripts/inference.py encodes ``prompt.strip()``).
ORIGINAL_PROMPT_CASE = "as_written"

# ours → diffusers, outside the blocks
_TOP_LEVEL = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
    "t_block.1": "adaln_single.linear",
    "y_embedder.y_proj.fc1": "caption_projection.linear_1",
    "y_embedder.y_proj.fc2": "caption_projection.linear_2",
    "final_layer.linear": "proj_out",
}
# ours → diffusers, inside block i (prefixes "blocks.{i}." / "transformer_blocks.{i}.")
_PER_BLOCK = {
    "attn.proj": "attn1.to_out.0",
    "cross_attn.q_linear": "attn2.to_q",
    "cross_attn.proj": "attn2.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
# fused in ours, split along the output dimension in diffusers
_FUSED = {
    "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
}
# KV compression (when on in block i): ours "blocks.{i}.attn.*" → the processor's "transformer_blocks.{i}.attn1.processor.*"
_KV_COMPRESSION = {"attn.sr": "attn1.processor.sr", "attn.norm": "attn1.processor.norm"}
# ours only: the null caption (diffusers passes the negative prompt instead)
_NULL_CAPTION_KEYS = ("y_embedder.y_embedding", "y_embedder.y_mask")
# reference keys we do not support: PixArt-α 1024-MS micro-conditions
_MICRO_CONDITION_PREFIXES = ("csize_embedder.", "ar_embedder.")


# --------------------------------------------------------------------------------------------------
# Original PixArt-α/Σ .pth
# --------------------------------------------------------------------------------------------------


def load_original_checkpoint(
    path: str | Path, config: ModelConfig, *, key: str = "state_dict"
) -> PixArtSigma:
    """Build a model from a reference ``.pth`` (PixArt-α or -Σ); ``key`` picks EMA or not.

    The widths come from ``config``; what differs between the released checkpoints comes from the keys:
    KV compression (``blocks.{i}.attn.sr``, PixArt-Σ 2K/4K) and the caption length of the stored null
    caption (``y_embedding``: 120 rows in PixArt-α, 300 in PixArt-Σ).
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt[key] if key in ckpt else ckpt
    if "x_embedder.proj.weight" not in state:
        raise ValueError(f"{path}: no PixArt state dict under {key!r} (top-level keys: {sorted(ckpt)[:8]})")
    micro = sorted(k for k in state if k.startswith(_MICRO_CONDITION_PREFIXES))
    if micro:
        raise ValueError(
            f"{path}: micro-conditioning checkpoints (PixArt-α 1024-MS) are not supported: {micro[:4]}"
        )
    # The PE is recomputed for each grid; the saved one is for the training grid only.
    state = {k: v for k, v in state.items() if k != "pos_embed"}
    config = dataclasses.replace(config, **_shape_from_keys(state, config), null_caption=ORIGINAL_NULL_CAPTION,
                                 prompt_case=ORIGINAL_PROMPT_CASE)  # fmt: skip
    model = PixArtSigma(config)
    # Reference checkpoints have no null-caption mask: keep ours (all valid) and warn via the missing list.
    _load_exact(model, state, allowed_missing={"y_embedder.y_mask"}, source=str(path))
    return model


def _shape_from_keys(state: dict[str, Tensor], config: ModelConfig) -> dict:
    """ModelConfig fields a reference state dict decides: KV layers and ratio, caption token count."""
    kv_layers = sorted(
        int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.endswith("attn.sr.weight")
    )
    fields: dict = {"kv_compress_layers": tuple(kv_layers)}
    if kv_layers:
        fields["kv_compress_ratio"] = int(state[f"blocks.{kv_layers[0]}.attn.sr.weight"].shape[-1])
    null = state.get("y_embedder.y_embedding")
    if null is not None and null.ndim == 2:
        fields["max_token_length"] = int(null.shape[0])
    changed = {k: v for k, v in fields.items() if getattr(config, k) != v}
    if changed:
        logger.info("from the checkpoint's keys: %s", changed)
    return fields


# --------------------------------------------------------------------------------------------------
# diffusers PixArtTransformer2DModel
# --------------------------------------------------------------------------------------------------


def diffusers_config(config: ModelConfig) -> dict:
    """``PixArtTransformer2DModel`` kwargs for this config (Σ: no micro-conditions, explicit PE scale)."""
    if config.kv_compress_layers:
        raise ValueError(
            f"KV compression (layers {list(config.kv_compress_layers)}) has no diffusers equivalent in "
            "PixArtTransformer2DModel; export with training.pipeline.export_pipeline (PixArtKVTransformer2DModel, "
            "loads in PixArtSigmaPipeline) or with training.convert.save_model"
        )
    return _transformer_kwargs(config)


def kv_diffusers_config(config: ModelConfig) -> dict:
    """``PixArtKVTransformer2DModel`` kwargs: the plain ones plus the compressed layers and the ratio."""
    plain = dataclasses.replace(config, kv_compress_layers=())
    return {
        **_transformer_kwargs(plain),
        "kv_compress_layers": list(config.kv_compress_layers),
        "kv_compress_ratio": config.kv_compress_ratio,
    }


def diffusers_sample_size(config: ModelConfig) -> int:
    """diffusers' ``sample_size``: the latent side at the training resolution (its base_size = sample_size // patch)."""
    return config.base_size * config.patch_size


def _transformer_kwargs(config: ModelConfig) -> dict:
    if config.mlp_ratio != 4.0:
        raise ValueError(f"diffusers' FeedForward is fixed at mlp_ratio 4, got {config.mlp_ratio}")
    return {
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.head_dim,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "num_layers": config.depth,
        "cross_attention_dim": config.hidden_size,
        "attention_bias": True,
        "sample_size": diffusers_sample_size(config),
        "patch_size": config.patch_size,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": 1000,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        # Set explicitly: when None diffusers guesses max(sample_size // 64, 1), which is wrong for Σ 256/512.
        "interpolation_scale": config.pe_interpolation,
        # Set explicitly: when None diffusers turns micro-conditions on for sample_size 128 (the α 1024 case).
        "use_additional_conditions": False,
        "caption_channels": config.caption_channels,
    }


def to_diffusers_state_dict(state: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    """Rename and split our state dict into diffusers' layout (null caption dropped)."""
    state = dict(state)
    for k in _NULL_CAPTION_KEYS:
        state.pop(k, None)
    out: dict[str, Tensor] = {}
    for ours, theirs in _name_pairs(depth):
        for suffix in ("weight", "bias"):
            out[f"{theirs}.{suffix}"] = state.pop(f"{ours}.{suffix}")
    for i in range(depth):
        out[f"transformer_blocks.{i}.scale_shift_table"] = state.pop(f"blocks.{i}.scale_shift_table")
        for ours, parts in _FUSED.items():
            for suffix in ("weight", "bias"):
                chunks = state.pop(f"blocks.{i}.{ours}.{suffix}").chunk(len(parts), dim=0)
                for part, chunk in zip(parts, chunks, strict=True):
                    out[f"transformer_blocks.{i}.{part}.{suffix}"] = chunk.clone()
        for ours, theirs in _KV_COMPRESSION.items():  # only in compressed blocks
            for suffix in ("weight", "bias"):
                if f"blocks.{i}.{ours}.{suffix}" in state:
                    out[f"transformer_blocks.{i}.{theirs}.{suffix}"] = state.pop(
                        f"blocks.{i}.{ours}.{suffix}"
                    )
    out["scale_shift_table"] = state.pop("final_layer.scale_shift_table")
    if state:
        raise ValueError(f"keys with no diffusers equivalent: {sorted(state)[:8]}")
    return out


def from_diffusers_state_dict(state: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    """Inverse of `to_diffusers_state_dict` (without the null caption)."""
    state = dict(state)
    out: dict[str, Tensor] = {}
    for ours, theirs in _name_pairs(depth):
        for suffix in ("weight", "bias"):
            out[f"{ours}.{suffix}"] = state.pop(f"{theirs}.{suffix}")
    for i in range(depth):
        out[f"blocks.{i}.scale_shift_table"] = state.pop(f"transformer_blocks.{i}.scale_shift_table")
        for ours, parts in _FUSED.items():
            for suffix in ("weight", "bias"):
                chunks = [state.pop(f"transformer_blocks.{i}.{part}.{suffix}") for part in parts]
                out[f"blocks.{i}.{ours}.{suffix}"] = torch.cat(chunks, dim=0)
        for ours, theirs in _KV_COMPRESSION.items():
            for suffix in ("weight", "bias"):
                if f"transformer_blocks.{i}.{theirs}.{suffix}" in state:
                    out[f"blocks.{i}.{ours}.{suffix}"] = state.pop(
                        f"transformer_blocks.{i}.{theirs}.{suffix}"
                    )
    out["final_layer.scale_shift_table"] = state.pop("scale_shift_table")
    if state:
        raise ValueError(
            f"diffusers keys this model does not have (qk-norm? micro-conditions?): {sorted(state)[:8]}"
        )
    return out


def export_diffusers(model: PixArtSigma, folder: str | Path) -> None:
    """Save as a diffusers ``PixArtTransformer2DModel`` folder (+ our null caption); refuses a KV-compressed model."""
    diffusers_config(model.config)  # raises for KV compression
    to_diffusers_transformer(model).save_pretrained(folder)
    save_null_caption(model, folder)
    logger.info("exported diffusers PixArtTransformer2DModel to %s", folder)


def save_null_caption(model: PixArtSigma, folder: str | Path) -> Path:
    """``folder/null_caption.safetensors``: the stored null caption (L, C) and mask (L,), the mode in its metadata.

    diffusers has no such buffer (its pipeline encodes the negative prompt), so a transformer folder alone
    cannot say how a model trained with ``null_caption = "upstream"`` must be guided; this file can.
    """
    path = Path(folder) / NULL_CAPTION_FILE
    embedder = model.y_embedder
    tensors = {"y_embedding": embedder.y_embedding.detach().float().cpu().contiguous(),
               "y_mask": embedder.y_mask.detach().cpu().contiguous()}  # fmt: skip
    tmp = path.with_name(f".{path.name}.tmp")
    metadata = {"format": "pt", "null_caption": model.config.null_caption, "prompt_case": model.config.prompt_case}
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def read_null_caption(folder: str | Path) -> tuple[Tensor, Tensor, str, str] | None:
    """(y_embedding (L, C), y_mask (L,), mode, prompt case) from ``folder/null_caption.safetensors``, or None
    when absent. Files written before the prompt case was recorded come from models trained on captions as
    written (the trainer did not case them then)."""
    from safetensors import safe_open

    path = Path(folder) / NULL_CAPTION_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        mode, prompt_case = metadata.get("null_caption"), metadata.get("prompt_case", LEGACY_PROMPT_CASE)
        embedding, mask = f.get_tensor("y_embedding"), f.get_tensor("y_mask")
    if mode is None:
        raise ValueError(f"{path} does not say its null_caption mode (metadata 'null_caption')")
    return embedding, mask, mode, prompt_case


def to_diffusers_transformer(model: PixArtSigma) -> PixArtTransformer2DModel:
    """An fp32 CPU diffusers copy: ``PixArtTransformer2DModel``, or ``PixArtKVTransformer2DModel`` when KV is on."""
    from diffusers import PixArtTransformer2DModel

    if model.config.kv_compress_layers:
        from training.kv_processor import PixArtKVTransformer2DModel

        transformer = PixArtKVTransformer2DModel(**kv_diffusers_config(model.config))
    else:
        transformer = PixArtTransformer2DModel(**diffusers_config(model.config))
    state = to_diffusers_state_dict(model.state_dict(), model.config.depth)
    transformer.load_state_dict({k: v.detach().float().cpu() for k, v in state.items()}, strict=True)
    return transformer.eval()


def from_diffusers_model(
    transformer: PixArtTransformer2DModel, *, max_token_length: int = 300
) -> PixArtSigma:
    """Build our model from a loaded ``PixArtTransformer2DModel`` (fp32 copy of its weights)."""
    c = transformer.config
    kv_layers = tuple(c.get("kv_compress_layers") or ())
    if kv_layers and not hasattr(transformer.transformer_blocks[kv_layers[0]].attn1.processor, "sr"):
        raise ValueError(f"config names KV layers {list(kv_layers)} but the transformer has no KV processors")
    expected = {
        "norm_type": _kv_norm_type() if kv_layers else "ada_norm_single",
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "norm_elementwise_affine": False,
        "attention_type": "default",
    }
    wrong = {k: c.get(k) for k, v in expected.items() if c.get(k) != v}
    if wrong:
        raise ValueError(f"not a PixArt-α/Σ transformer; unexpected config values {wrong} (want {expected})")
    if transformer.use_additional_conditions:
        raise ValueError(
            "micro-conditioning (use_additional_conditions=True, PixArt-α 1024) is not supported"
        )
    if c.caption_channels is None:
        raise ValueError("caption_channels is None: PixArt needs the caption projection")
    hidden = c.num_attention_heads * c.attention_head_dim
    if c.cross_attention_dim != hidden:
        raise ValueError(f"cross_attention_dim={c.cross_attention_dim} must equal heads×head_dim={hidden}")
    out_channels = c.in_channels if c.out_channels is None else c.out_channels
    if out_channels not in (c.in_channels, 2 * c.in_channels):
        raise ValueError(
            f"out_channels={out_channels} must be in_channels or 2·in_channels ({c.in_channels})"
        )
    # Same fallback as diffusers when interpolation_scale is not set.
    pe_interpolation = (
        c.interpolation_scale if c.interpolation_scale is not None else max(c.sample_size // 64, 1)
    )
    config = ModelConfig(
        depth=c.num_layers,
        hidden_size=hidden,
        num_heads=c.num_attention_heads,
        patch_size=c.patch_size,
        in_channels=c.in_channels,
        learn_sigma=out_channels == 2 * c.in_channels,
        caption_channels=c.caption_channels,
        max_token_length=max_token_length,
        base_size=c.sample_size // c.patch_size,
        pe_interpolation=float(pe_interpolation),
        kv_compress_layers=kv_layers,
        kv_compress_ratio=int(c.get("kv_compress_ratio", 2)),
    )
    model = PixArtSigma(config)
    state = from_diffusers_state_dict(
        {k: v.detach().float().cpu() for k, v in transformer.state_dict().items()}, config.depth
    )
    # diffusers keeps no null-caption buffer (its pipeline encodes the negative prompt): load_diffusers
    # restores ours from null_caption.safetensors when the folder has one; else the trainer stores T5("")
    # with set_null_caption before training, and sampling encodes "" as diffusers does.
    _load_exact(model, state, allowed_missing=set(_NULL_CAPTION_KEYS), source="diffusers model")
    return model


def load_diffusers(
    path: str | Path, *, subfolder: str | None = None, max_token_length: int = 300
) -> PixArtSigma:
    """Load a diffusers transformer folder (plain or KV) or a pipeline folder with subfolder="transformer".

    Our exports carry ``null_caption.safetensors`` beside the weights: its buffer, its mask and its mode
    (and so the caption budget) are restored, and the prompt case its metadata records; a folder without it
    gets ``max_token_length``, mode diffusers and prompt case ``lower`` (what PixArtSigmaPipeline encodes).
    """
    from diffusers import PixArtTransformer2DModel

    from training.kv_processor import PixArtKVTransformer2DModel, refuse_pixsigma_folder

    refuse_pixsigma_folder(path, subfolder)
    config = PixArtTransformer2DModel.load_config(path, subfolder=subfolder)
    cls = PixArtKVTransformer2DModel if config.get("kv_compress_layers") else PixArtTransformer2DModel
    transformer = cls.from_pretrained(path, subfolder=subfolder, dtype=torch.float32)
    null = read_null_caption(Path(path) / (subfolder or ""))
    if null is None:
        return from_diffusers_model(transformer, max_token_length=max_token_length)
    embedding, mask, mode, prompt_case = null
    model = from_diffusers_model(transformer, max_token_length=embedding.shape[0])
    model.set_null_caption(embedding, mask, mode=mode)
    model.set_prompt_case(prompt_case)
    return model


def resolve_null_caption(setting: str, init: str | None) -> str:
    """``text.null_caption`` of a training config, ``auto`` resolved as the trainer does (training.main):
    an original ``.pth`` or a diffusers folder init → upstream (the released weights), one of our folders
    → its own mode, no init → diffusers."""
    if setting != "auto":
        return setting
    if not init:
        return "diffusers"
    path = Path(init)
    if path.suffix in (".pth", ".pt"):
        return ORIGINAL_NULL_CAPTION
    config = json.loads((path / CONFIG_NAME).read_text())
    if config.get("format") == FORMAT_NAME:
        return config.get("null_caption", "diffusers")
    return ORIGINAL_NULL_CAPTION


def _kv_norm_type() -> str:
    from training.kv_processor import KV_NORM_TYPE

    return KV_NORM_TYPE


# --------------------------------------------------------------------------------------------------
# Our own folder: any model, KV-compressed included
# --------------------------------------------------------------------------------------------------


def save_model(model: PixArtSigma, folder: str | Path) -> None:
    """Write ``config.json`` (the ModelConfig) and ``model.safetensors`` (every weight and buffer)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT_NAME, **dataclasses.asdict(model.config)}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # Write to temporary names, then rename: a crash never leaves a half-written pair.
    tmp_weights, tmp_config = folder / f".{WEIGHTS_NAME}.tmp", folder / f".{CONFIG_NAME}.tmp"
    save_file(state, str(tmp_weights), metadata={"format": "pt"})
    tmp_config.write_text(json.dumps(config, indent=2) + "\n")
    tmp_weights.replace(folder / WEIGHTS_NAME)
    tmp_config.replace(folder / CONFIG_NAME)


def load_model(folder: str | Path) -> PixArtSigma:
    """Inverse of `save_model`."""
    folder = Path(folder)
    raw = json.loads((folder / CONFIG_NAME).read_text())
    if raw.pop("format", None) != FORMAT_NAME:
        raise ValueError(f"{folder}: not a {FORMAT_NAME} folder (a diffusers folder? use load_diffusers)")
    raw["kv_compress_layers"] = tuple(raw["kv_compress_layers"])
    raw.setdefault("prompt_case", LEGACY_PROMPT_CASE)  # saved before it was recorded: trained as written
    model = PixArtSigma(ModelConfig(**raw))
    _load_exact(model, load_file(str(folder / WEIGHTS_NAME)), allowed_missing=set(), source=str(folder))
    return model


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _name_pairs(depth: int) -> list[tuple[str, str]]:
    """(ours, diffusers) module prefixes that map one to one."""
    pairs = list(_TOP_LEVEL.items())
    for i in range(depth):
        pairs += [(f"blocks.{i}.{a}", f"transformer_blocks.{i}.{b}") for a, b in _PER_BLOCK.items()]
    return pairs


def _load_exact(
    model: PixArtSigma, state: dict[str, Tensor], *, allowed_missing: set[str], source: str
) -> None:
    """load_state_dict that names every unexpected key and every missing one not in `allowed_missing`."""
    expected = set(model.state_dict())
    unexpected = sorted(set(state) - expected)
    missing = sorted(expected - set(state) - allowed_missing)
    if unexpected or missing:
        raise ValueError(
            f"{source} does not match {model.config}: unexpected keys {unexpected[:8]}, missing keys {missing[:8]}"
        )
    model.load_state_dict(state, strict=False)
