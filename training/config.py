"""Typed training configuration: one dataclass per component, nested in ``TrainConfig``, read from TOML.

A config file names a model preset, the data, the optimiser and a list of stages (the weak-to-strong
schedule). CLI flags only override fields: ``--output DIR`` and ``--set section.field=value``.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

SD_VAE_SCALING = 0.18215  # SD 1.x/2.x VAE latents × this (PixArt-α)
SDXL_VAE_SCALING = 0.13025  # SDXL VAE (PixArt-Σ)


@dataclass
class ModelSection:
    preset: str = "tiny"  # a key of training.model.PRESETS
    grad_checkpointing: bool = False  # per-block activation checkpointing
    init: str = ""  # external init: a PixArt-α/Σ .pth, a diffusers transformer folder or one of ours
    compile: bool = False  # torch.compile the model (dynamic shapes: buckets change the grid)


@dataclass
class TextSection:
    t5: str = "google/t5-v1_1-xxl"  # HF id or local path (tokenizer + encoder)
    max_tokens: int = 300  # PixArt-Σ's caption budget


@dataclass
class DataSection:
    shards: str = ""  # folder of training shards (train-*.tar + index.parquet), or a brace/glob pattern
    real_prompt_ratio: float = 0.5  # PixArt-Σ mixes the original and the VLM caption 50/50
    shuffle_buffer: int = 64
    num_workers: int = 0  # DataLoader workers per rank decoding samples (0: in the training process)
    use_cached_features: bool = True  # False: always encode on the fly (the benchmark's baseline)

    def __post_init__(self) -> None:
        if not 0.0 <= self.real_prompt_ratio <= 1.0:
            raise ValueError(f"data.real_prompt_ratio must be in [0, 1], got {self.real_prompt_ratio}")
        if self.num_workers < 0 or self.shuffle_buffer < 1:
            raise ValueError("data.num_workers must be ≥ 0 and data.shuffle_buffer ≥ 1")


@dataclass
class OptimSection:
    """CAME as in PixArt-Σ's configs: betas (0.9, 0.999, 0.9999), eps (1e-30, 1e-16), no weight decay."""

    name: Literal["came", "adamw"] = "came"
    base_lr: float = 2e-5  # at global batch 256; scaled by sqrt(global_batch / 256)
    betas: tuple[float, ...] = (0.9, 0.999, 0.9999)
    eps: tuple[float, ...] = (1e-30, 1e-16)
    weight_decay: float = 0.0
    grad_clip: float = 0.01  # PixArt-Σ's clip_grad_norm
    mixed_precision: Literal["no", "bf16"] = "bf16"  # autocast on CUDA only; fp32 master weights
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    ema_decay: float = 0.0  # fp32 EMA of the weights when > 0 (e.g. 0.9999); 0 turns it off

    def __post_init__(self) -> None:
        if self.name not in ("came", "adamw"):
            raise ValueError(f"optim.name must be 'came' or 'adamw', got {self.name!r}")
        if self.name == "came" and (len(self.betas) != 3 or len(self.eps) != 2):
            raise ValueError("optim: CAME needs 3 betas and 2 eps")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"optim.mixed_precision must be 'no' or 'bf16', got {self.mixed_precision!r}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"optim.grad_accum_steps must be ≥ 1, got {self.grad_accum_steps}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"optim.ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass
class ValidationSection:
    """Samples for each stage's validation prompts: fixed seed, DPM-Solver++ (diffusers), one grid per call."""

    every: int = 0  # steps between validations inside a stage; 0: only at each stage's end
    seed: int = 0
    num_steps: int = 20
    cfg_scale: float = 4.5


@dataclass
class EvaluationSection:
    """In-training FID / CLIP score on the first prompts of an eval set (training/evaluate.py), rank 0."""

    every: int = 0  # steps between evaluations inside a stage; 0: off
    eval_set: str = ""  # eval shards folder (prompts.jsonl + eval-*.tar), as manifests.evalset writes it
    num_samples: int = 8  # prompts of the subset
    inception: str = ""  # FID Inception-v3 weights file; "" = torch-fidelity's file in the torch hub cache
    fid_features: int = 2048
    clip_model: str = "ViT-L-14-quickgelu"  # open_clip name (as curation's) or local-dir:PATH
    clip_pretrained: str = "openai"  # open_clip tag or weights file; ignored for local-dir:
    steps: int = 20
    cfg_scale: float = 4.5
    batch_size: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.every < 0 or self.num_samples < 1 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("evaluation: every must be >= 0; num_samples, steps and batch_size >= 1")
        if self.every and not self.eval_set:
            raise ValueError("evaluation.every is set but evaluation.eval_set (an eval set folder) is not")
        if self.fid_features not in (64, 192, 768, 2048):
            raise ValueError(f"evaluation.fid_features must be 64, 192, 768 or 2048, got {self.fid_features}")


@dataclass
class LogSection:
    every: int = 1  # steps between metric records
    progress_bar: bool = True  # tqdm on rank 0
    tensorboard: bool = True  # scalars under RUN_DIR/tensorboard
    peak_tflops: float = 0.0  # per device, for MFU; 0: looked up for known GPUs, else MFU is not logged


@dataclass
class FaultSection:
    """Non-finite steps, plus fault injection used by the tests (never set in a real config)."""

    max_nonfinite_steps: int = 5  # abort after this many non-finite steps in a row
    inject_nan_steps: tuple[int, ...] = ()  # global steps whose loss is made NaN on inject_rank
    inject_rank: int = 0
    kill_at_step: int = -1  # SIGKILL kill_rank before this global step, unless the run resumed
    kill_rank: int = 0


@dataclass
class StageSection:
    """One step of the weak-to-strong schedule (PixArt-Σ §3): resolution, VAE, KV compression, steps."""

    name: str
    resolution: int  # base resolution in pixels; picks the bucket table
    vae: str  # HF id or path
    vae_scaling_factor: float = SDXL_VAE_SCALING
    pe_interpolation: float | None = None  # default resolution / 512
    kv_compress_layers: tuple[int, ...] = ()
    kv_compress_ratio: int = 2
    steps: int = 100
    batch_size: int = 2  # per rank
    lr: float | None = None  # default: optim.base_lr scaled by the global batch
    warmup_steps: int = 0
    validation_prompts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.resolution % 32:
            raise ValueError(f"stages.{self.name}.resolution must be a multiple of 32, got {self.resolution}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"stages.{self.name}: steps and batch_size must be ≥ 1")
        if self.pe_interpolation is None:
            self.pe_interpolation = self.resolution / 512


@dataclass
class TrainConfig:
    run_dir: str
    stages: list[StageSection]
    model: ModelSection = field(default_factory=ModelSection)
    text: TextSection = field(default_factory=TextSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)  # issue 12: in-training FID/CLIP
    log: LogSection = field(default_factory=LogSection)
    faults: FaultSection = field(default_factory=FaultSection)
    seed: int = 0
    checkpoint_every: int = 50  # steps; also where the data stream is reseeded (see training/data.py)
    keep_checkpoints: int = 2
    export_stages: bool = True  # final/<stage>/ (+ final_ema/<stage>/) at each stage's end, never pruned

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("stages must list at least one stage")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("checkpoint_every and keep_checkpoints must be ≥ 1")


def _build(cls: type, data: Any, where: str) -> Any:
    """Build a dataclass (recursively) from parsed TOML, rejecting unknown keys with their path."""
    if not dataclasses.is_dataclass(cls):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{where}: unknown fields {sorted(unknown)}; allowed: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        origin = typing.get_origin(hint)
        if origin is list and dataclasses.is_dataclass(typing.get_args(hint)[0]):
            item_cls = typing.get_args(hint)[0]
            value = [_build(item_cls, v, f"{where}.{key}[{i}]") for i, v in enumerate(value)]
        elif dataclasses.is_dataclass(hint):
            value = _build(hint, value, f"{where}.{key}")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def _set(data: dict, path: str, raw: str) -> None:
    """Apply one ``a.b.c=value`` override (list items by index); the value is parsed as TOML, else a string."""
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    node: Any = data
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def load_config(path: str | Path, *, overrides: list[str] = (), output: str | None = None) -> TrainConfig:
    """Read a TOML config, apply ``section.field=value`` overrides and ``--output``, validate."""
    data = tomllib.loads(Path(path).read_text())
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override must look like section.field=value, got {item!r}")
        key, raw = item.split("=", 1)
        _set(data, key, raw)
    if output is not None:
        data["run_dir"] = output
    return _build(TrainConfig, data, "config")


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
