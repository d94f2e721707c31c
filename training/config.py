"""Typed training configuration: one dataclass per component, nested in ``TrainConfig``, read from TOML.

A config file names a model preset, the data, the optimiser and a list of stages (the weak-to-strong
schedule). CLI flags only override fields: ``--output DIR`` and ``--set section.field=value``.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from manifests.buckets import BucketRule
from manifests.features import PromptCase

SD_VAE_SCALING = 0.18215  # SD 1.x/2.x VAE latents × this (PixArt-α)
SDXL_VAE_SCALING = 0.13025  # SDXL VAE (PixArt-Σ)
STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # stage names become folder names


def _at_least(name: str, value: float, low: float, *, strict: bool = False) -> None:
    """Range check whose message names the field (``_build`` prefixes the section)."""
    if value < low or (strict and value == low):
        raise ValueError(f"{name} must be {'>' if strict else '≥'} {low}, got {value}")


@dataclass
class ModelSection:
    preset: str = "tiny"  # a key of training.model.PRESETS
    grad_checkpointing: bool = False  # per-block activation checkpointing
    init: str = ""  # external init: a PixArt-α/Σ .pth, a diffusers transformer folder or one of ours
    # torch.compile each transformer block (dynamic shapes, so every aspect-ratio bucket shares one graph;
    # the PE and embeddings stay eager). A stage's own `compile` overrides this.
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend ("aot_eager" skips code generation)

    def __post_init__(self) -> None:
        from training.model import PRESETS

        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")


@dataclass
class TextSection:
    t5: str = "google/t5-v1_1-xxl"  # HF id or local path (tokenizer + encoder)
    max_tokens: int = 300  # PixArt-Σ's caption budget (PixArt-α: 120)
    # What a dropped caption (classifier-free guidance) looks like to the model:
    #   upstream  — T5("") padded to max_tokens, attended under the sample's own mask (PixArt's train.py and
    #               samplers); what the released α/Σ weights were trained with.
    #   diffusers — T5("")'s valid tokens under their own mask (diffusers' negative prompt).
    #   auto      — upstream when model.init names official weights (.pth or diffusers folder), the init's
    #               own choice for one of our folders, else diffusers.
    null_caption: Literal["auto", "upstream", "diffusers"] = "auto"
    # The text T5 sees, for training captions (cached by materialize --prompt-case, or on the fly), validation
    # and evaluation prompts, and every sampler of the model (recorded in run.json, checkpoints, exports):
    #   lower      — lowercased and stripped, what diffusers' PixArtSigmaPipeline encodes (clean_caption=False),
    #                so a plain diffusers call on an export samples the trained model exactly (the default);
    #   as_written — stripped only, PixArt-Σ's own code (tools/extract_features.py, scripts/inference.py).
    prompt_case: PromptCase = "lower"

    def __post_init__(self) -> None:
        _at_least("max_tokens", self.max_tokens, 1)


@dataclass
class DataSection:
    shards: str = ""  # folder of training shards (train-*.tar + shards.json), or a brace/glob pattern
    real_prompt_ratio: float = 0.5  # PixArt-Σ mixes the original and the VLM caption 50/50
    shuffle_buffer: int = 64  # samples per worker in the shuffle buffer (also capped by shuffle_buffer_mb)
    # Host RAM per rank: the shuffle and bucket buffers hold selected samples whose heavy members (T5 states,
    # latents, images) are references into local tars, read when a batch is complete (training/data.py);
    # shards that are URLs are held as bytes, and then these budgets bind. See configs/sigma.toml.
    shuffle_buffer_mb: float = 256.0
    bucket_buffer_mb: float = 256.0
    num_workers: int = 0  # DataLoader workers per rank decoding samples (0: in the training process)
    use_cached_features: bool = True  # False: always encode on the fly (the benchmark's baseline)
    # Bucket of a sample whose latents are not cached (cached ones keep the bucket they were cropped to):
    # "upstream" = PixArt-Σ's nearest rounded ratio key (get_closest_ratio), "exact" = nearest bucket h/w.
    bucket_rule: BucketRule = "upstream"

    def __post_init__(self) -> None:
        if not 0.0 <= self.real_prompt_ratio <= 1.0:
            raise ValueError(f"real_prompt_ratio must be in [0, 1], got {self.real_prompt_ratio}")
        _at_least("num_workers", self.num_workers, 0)
        _at_least("shuffle_buffer", self.shuffle_buffer, 1)
        _at_least("shuffle_buffer_mb", self.shuffle_buffer_mb, 0, strict=True)
        _at_least("bucket_buffer_mb", self.bucket_buffer_mb, 0, strict=True)


# Each optimiser's own defaults: CAME as PixArt-Σ's configs set it; AdamW's from torch (its eps is 1e-8,
# not CAME's 1e-16, which would make AdamW's update explode on near-zero second moments).
OPTIMIZER_DEFAULTS = {
    "came": {"betas": (0.9, 0.999, 0.9999), "eps": (1e-30, 1e-16)},
    "adamw": {"betas": (0.9, 0.999), "eps": (1e-8,)},
}


@dataclass
class OptimSection:
    """CAME as in PixArt-Σ's configs: betas (0.9, 0.999, 0.9999), eps (1e-30, 1e-16), no weight decay."""

    name: Literal["came", "adamw"] = "came"
    base_lr: float = 2e-5  # at global batch 256; scaled by sqrt(global_batch / 256)
    betas: tuple[float, ...] = ()  # empty: the optimiser's defaults (OPTIMIZER_DEFAULTS)
    eps: tuple[float, ...] = ()  # empty: the optimiser's defaults (CAME 2 values, AdamW 1)
    weight_decay: float = 0.0
    grad_clip: float = 0.01  # PixArt-Σ's clip_grad_norm
    mixed_precision: Literal["no", "bf16"] = "bf16"  # autocast on CUDA only; fp32 master weights
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    ema_decay: float = 0.0  # fp32 EMA of the weights when > 0 (e.g. 0.9999); 0 turns it off

    def __post_init__(self) -> None:
        defaults = OPTIMIZER_DEFAULTS[self.name]
        self.betas = self.betas or defaults["betas"]
        self.eps = self.eps or defaults["eps"]
        if len(self.betas) != len(defaults["betas"]) or len(self.eps) != len(defaults["eps"]):
            raise ValueError(
                f"betas/eps: {self.name} takes {len(defaults['betas'])} betas and {len(defaults['eps'])} eps, "
                f"got {list(self.betas)} and {list(self.eps)} (leave them out for {defaults})"
            )
        _at_least("base_lr", self.base_lr, 0, strict=True)
        _at_least("weight_decay", self.weight_decay, 0)
        _at_least("grad_clip", self.grad_clip, 0, strict=True)
        _at_least("grad_accum_steps", self.grad_accum_steps, 1)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass
class ValidationSection:
    """Samples of each stage's prompts from the raw and the EMA weights: fixed seed, DPM-Solver++ (diffusers)."""

    every: int = 0  # steps between validations inside a stage; 0: only at each stage's end
    seed: int = 0
    num_steps: int = 20
    cfg_scale: float = 4.5

    def __post_init__(self) -> None:
        _at_least("every", self.every, 0)
        _at_least("num_steps", self.num_steps, 1)
        _at_least("cfg_scale", self.cfg_scale, 0, strict=True)


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
class ValLossSection:
    """Deterministic held-out validation loss (training/val_loss.py): fixed latents, timesteps and noise, rank 0.

    Evaluated at each stage's start (before its first step), every ``every`` steps and at its end; records go
    to RUN/val_loss.jsonl and TensorBoard ``val_loss/*``. The held-out set is re-encoded per stage, with
    that stage's VAE at its resolution.
    """

    every: int = 0  # steps between evaluations inside a stage; 0: off
    shards: str = ""  # a training-shard folder of held-out images (never the training shards themselves)
    num_samples: int = 16
    timesteps: tuple[int, ...] = (50, 250, 500, 750, 950)  # training.val_loss.VAL_TIMESTEPS
    seed: int = 0  # seeds the noise of each (sample, timestep)
    batch_size: int = 8

    def __post_init__(self) -> None:
        _at_least("every", self.every, 0)
        _at_least("num_samples", self.num_samples, 1)
        _at_least("batch_size", self.batch_size, 1)
        if self.every and not self.shards:
            raise ValueError("val_loss.every is set but val_loss.shards (a held-out shard folder) is not")
        if not self.timesteps or any(not 0 <= t < 1000 for t in self.timesteps):
            raise ValueError(f"timesteps must be a non-empty list in [0, 1000), got {list(self.timesteps)}")


@dataclass
class LogSection:
    every: int = 1  # steps between metric records
    progress_bar: bool = (
        True  # tqdm on rank 0 when stderr is a terminal; else a log line per progress_every_s
    )
    progress_every_s: float = 30.0
    tensorboard: bool = True  # scalars under RUN_DIR/tensorboard
    peak_tflops: float = 0.0  # per device, for MFU; 0: looked up for known GPUs, else MFU is not logged

    def __post_init__(self) -> None:
        _at_least("every", self.every, 1)
        _at_least("progress_every_s", self.progress_every_s, 0)
        _at_least("peak_tflops", self.peak_tflops, 0)


@dataclass
class FaultSection:
    """Non-finite steps, plus fault injection used by the tests (never set in a real config)."""

    max_nonfinite_steps: int = 5  # abort after this many non-finite steps in a row
    inject_nan_steps: tuple[int, ...] = ()  # global steps whose loss is made NaN on inject_rank
    inject_rank: int = 0
    kill_at_step: int = -1  # SIGKILL kill_rank before this global step, unless the run resumed
    kill_rank: int = 0
    sigterm_at_step: int = -1  # a real SIGTERM to sigterm_rank before this global step, unless resumed
    sigterm_rank: int = 0

    def __post_init__(self) -> None:
        _at_least("max_nonfinite_steps", self.max_nonfinite_steps, 1)


@dataclass
class StageSection:
    """One step of the weak-to-strong schedule (PixArt-Σ §3): resolution, VAE, KV compression, steps."""

    name: str
    resolution: int  # base resolution in pixels; picks the bucket table
    vae: str  # HF id or path
    vae_scaling_factor: float = SDXL_VAE_SCALING
    # True: encode with this stage's VAE on the fly although the shards cache latents of another VAE (the
    # weak stage of a VAE swap, whose VAE the shards were not made with). False: such a stage is refused.
    vae_on_the_fly: bool = False
    # Default resolution / 512: PE interpolation (PixArt-α §2.3 / PixArt-Σ §3, upstream `pe_interpolation`),
    # every resolution's grid spans the same positions. The previous stage's value instead = no interpolation:
    # the new grid's PE extends the old token spacing past the positions the model saw (the ablation's "off").
    pe_interpolation: float | None = None
    kv_compress_layers: tuple[int, ...] = ()
    kv_compress_ratio: int = 2
    # How layers this stage newly compresses start: conv_avg = Conv Avg Init (PixArt-Σ §3.2: the R×R conv
    # starts as average pooling, so the model starts near the uncompressed one); random = the conv's own
    # default (Kaiming-uniform) init, the paper's ablation baseline.
    kv_compress_init: Literal["conv_avg", "random"] = "conv_avg"
    steps: int = 100
    batch_size: int = 2  # per rank
    lr: float | None = None  # default: optim.base_lr scaled by the global batch
    warmup_steps: int = 0
    validation_prompts: tuple[str, ...] = ()
    compile: bool | None = None  # None: model.compile

    def __post_init__(self) -> None:
        if not STAGE_NAME.fullmatch(self.name):
            raise ValueError(
                f"name must be letters, digits, '_', '.', '-' (it names folders), got {self.name!r}"
            )
        if self.resolution < 32 or self.resolution % 32:
            raise ValueError(f"resolution must be a positive multiple of 32, got {self.resolution}")
        _at_least("vae_scaling_factor", self.vae_scaling_factor, 0, strict=True)
        _at_least("kv_compress_ratio", self.kv_compress_ratio, 1)
        _at_least("steps", self.steps, 1)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("warmup_steps", self.warmup_steps, 0)
        if self.lr is not None:
            _at_least("lr", self.lr, 0, strict=True)
        if self.pe_interpolation is None:
            self.pe_interpolation = self.resolution / 512
        _at_least("pe_interpolation", self.pe_interpolation, 0, strict=True)


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
    val_loss: ValLossSection = field(default_factory=ValLossSection)  # issue 21: held-out loss, fixed noise
    log: LogSection = field(default_factory=LogSection)
    faults: FaultSection = field(default_factory=FaultSection)
    seed: int = 0
    checkpoint_every: int = 50  # steps (the data stream runs on across checkpoints: training/data.py)
    keep_checkpoints: int = 2
    export_stages: bool = True  # final/<stage>/ (+ final_ema/<stage>/) at each stage's end, never pruned

    def __post_init__(self) -> None:
        if not self.run_dir:
            raise ValueError("run_dir must name the run folder (or pass --output)")
        if not self.stages:
            raise ValueError("stages must list at least one stage ([[stages]] tables)")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stages: names must be unique, got {names}")
        _at_least("checkpoint_every", self.checkpoint_every, 1)
        _at_least("keep_checkpoints", self.keep_checkpoints, 1)


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """``value`` as the field's type (ints widen to floats, lists become tuples), else a one-line ValueError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_type(value, inner, where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where} must be a list, got {value!r} ({type(value).__name__})")
        return tuple(_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, hint)
    if not ok:
        kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, hint)
        raise ValueError(f"{where} must be {kind}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls: type, data: Any, where: str) -> Any:
    """Build a dataclass (recursively) from parsed TOML: unknown keys, wrong types and ranges name their path.

    ``where`` is the path as ``--set`` spells it (``stages.0``, ``optim``); a field's error reads
    ``stages.0.steps must be an integer, got '4' (str)``.
    """
    prefix = f"{where}." if where else ""
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'} must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{where or 'config'}: unknown fields {sorted(unknown)}; allowed: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if typing.get_origin(hint) is list and dataclasses.is_dataclass(typing.get_args(hint)[0]):
            if not isinstance(value, list):
                raise ValueError(f"{prefix}{key} must be a list of tables ([[{key}]]), got {value!r}")
            item_cls = typing.get_args(hint)[0]
            value = [_build(item_cls, v, f"{prefix}{key}.{i}") for i, v in enumerate(value)]
        elif dataclasses.is_dataclass(hint):
            value = _build(hint, value, f"{prefix}{key}")
        else:
            value = _check_type(value, hint, f"{prefix}{key}")
        kwargs[key] = value
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs and _required(f)]
    if missing:
        raise ValueError(f"{where or 'config'}: missing required fields {missing}")
    try:
        return cls(**kwargs)
    except ValueError as err:  # range checks in __post_init__ name the field; add where it lives
        raise ValueError(f"{prefix}{err}") from None


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _set(data: dict, path: str, raw: str) -> None:
    """Apply one ``a.b.c=value`` override (list items by index); the value is parsed as TOML, else a string."""
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    node: Any = data
    parts = path.split(".")
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        here = ".".join(parts[:depth]) or "the config"
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ValueError(
                    f"--set {path}={raw}: {here} has {len(node)} entries, so the index after "
                    f"'{here}.' must be 0–{len(node) - 1}, got {part!r}"
                )
            key: Any = int(part)
        elif isinstance(node, dict):
            key = part
        else:
            raise ValueError(f"--set {path}={raw}: {here} is a value ({node!r}), not a table")
        if last:
            node[key] = value
        elif isinstance(node, dict):
            node = node.setdefault(key, {})
        else:
            node = node[key]


def load_config(path: str | Path, *, overrides: list[str] = (), output: str | None = None) -> TrainConfig:
    """Read a TOML config, apply ``section.field=value`` overrides and ``--output``, validate every field."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"--config {path}: no such file (the presets are in configs/: sigma.toml, debug.toml)"
        )
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"--config {path}: not valid TOML ({err})") from None
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set must look like section.field=value, got {item!r}")
        key, raw = item.split("=", 1)
        _set(data, key.strip(), raw.strip())
    if output is not None:
        data["run_dir"] = output
    return _build(TrainConfig, data, "")


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


TOY_VAE_NAMES = ("sd", "sdxl")  # the toy VAEs (training.toy_vae.SPECS), shipped in assets/toy_vae/<name>


def toy_run_plan(cfg: TrainConfig) -> tuple[str, int, list[int]]:
    """What configs/toy.sh needs of a toy-world config: the one toy VAE its stages name (``sd`` or ``sdxl``, by
    folder name; toy.sh caches its latents and points every stage at it), the number of stages and their
    resolutions. ValueError when the stages name different VAEs (a VAE swap is the ablation bench's, not the
    toy run's) or a folder that is not a toy VAE."""
    names = {Path(stage.vae).name for stage in cfg.stages}
    if len(names) != 1 or not names <= set(TOY_VAE_NAMES):
        raise ValueError(
            f"a toy-world config names one toy VAE ({' or '.join(TOY_VAE_NAMES)}) in every stage, got "
            f"{sorted(Path(stage.vae).name for stage in cfg.stages)}"
        )
    return names.pop(), len(cfg.stages), sorted({stage.resolution for stage in cfg.stages})
