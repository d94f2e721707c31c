"""Sample images from any PixArt-Σ weights: a run folder, a checkpoint, a diffusers folder, a hub id, a .pth.

    python -m training.sample --model RUN --input run/eval_shards/eval/prompts.jsonl --output samples/
    python -m training.sample --model RUN/final --prompt "a cat" --resolution 1024 --aspect-ratio 16:9

Every source becomes our ``PixArtSigma`` (``training.convert``), so one code path samples them all; the
frozen T5 and VAE come from the export (``pixsigma.json``, ``train_config.json``), the checkpoint's config,
or ``--t5``/``--vae``; so does the null caption and its mode (``null_caption.safetensors`` beside an exported
transformer, the checkpoint's config, upstream for an original ``.pth``), so that a model trained with
``text.null_caption = "upstream"`` samples as the trainer's validation did; and so does the prompt case
(``text.prompt_case``: prompts lowercased as PixArtSigmaPipeline does, or as written), unless ``--prompt-case``
overrides it. Samplers: DPM-Solver++ (diffusers'
``DPMSolverMultistepScheduler`` on our noise schedule, what ``PixArtSigmaPipeline`` runs), SA-Solver
(diffusers' ``SASolverScheduler`` with PixArt-Σ's demo settings) and the IDDPM ancestral sampler with the
learned variance on respaced timesteps (Nichol & Dhariwal §4; PixArt's ``IDDPM(str(steps))``). Guidance is classifier-free
against the encoded negative prompt ("" by default, the pipeline's choice); only the ε channels are guided.
Each image's starting noise (and IDDPM's per-step noise) comes from its own CPU generator seeded with
``--seed`` + its index, so an image does not depend on the batch it lands in or on the device.
Writes one PNG per image and ``images.jsonl`` (prompt, seed, size, sampler, steps, cfg, model). Under torchrun
rank r makes the images i with i % world_size == r (the files do not depend on the world size); the folder's
``sampling_run.json`` holds the plan's digest (the image rows and ``ImageGenerator.identity``: weights, prompt
case, T5/VAE, dtype), and a rerun of the same plan keeps every complete PNG (written to a temporary name, then
renamed) and makes the rest: a 30K run resumes after a kill. Prompt files:
``training.prompt_files`` (JSONL with id/seed/size, MJHQ's meta_data.json, plain text).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from manifests.buckets import nearest_bucket
from manifests.features import LEGACY_PROMPT_CASE, PROMPT_CASES, SD_VAE_DOWNSAMPLE, t5_states, vae_downsample
from manifests.io import atomic_write_bytes
from manifests.progress import quiet_library_bars
from training.convert import NULL_CAPTION_FILE, diffusers_sample_size, resolve_null_caption
from training.diffusion import CFG_SCALE, SAMPLE_STEPS, GaussianDiffusion
from training.model import PRESETS, PixArtSigma, pe_params_for_resolution
from training.pipeline import (
    DIFFUSERS_BIN_TABLES,
    ComponentRef,
    FrozenComponents,
    diffusers_bin_table,
    frozen_components,
    local_or_id,
    read_info,
)
from training.prompt_files import parse_aspect, read_prompt_file
from training.ranks import Dist, close_distributed, default_device, exit_torchrun_worker, init_distributed

log = logging.getLogger(__name__)

SAMPLERS = ("dpm-solver", "iddpm", "sa-solver")
# Bucket tables: "pixart", the 40 buckets per resolution the model trained on (manifests.buckets, PixArt's
# ASPECT_RATIO_* tables, 256…2880, by nearest h/w); "diffusers", PixArtSigmaPipeline's 33-bucket *_BIN tables
# (256/512/1024/2048, picked as its use_resolution_binning picks) with an asked size resized back to it.
BINNINGS = ("pixart", "diffusers")
EXACT_SIZE = "exact"  # what sampling_run.json records for --height/--width with --binning pixart: no table
IMAGES_FILE = "images.jsonl"
RUN_FILE = "sampling_run.json"  # what a sampling folder holds: its plan digest (resume only the same run)
RANK_ROWS_PREFIX = "images.rank-"  # each rank's rows before the merge
DEFAULT_MAX_TOKENS = 300  # PixArt-Σ's caption budget, for sources that do not record theirs
TILING_MIN_SIDE = 2048  # --vae-tiling auto: tile decodes from 2K up (an SDXL VAE decode of 4K needs > 40 GB)


# --------------------------------------------------------------------------------------------------
# What to generate
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageJob:
    """One image: its prompt, seed and pixel size; ``key`` ties it to an eval-set row; ``output_size`` (H, W),
    when set, is the asked size the image is resized-and-cropped back to (diffusers' binning)."""

    index: int
    prompt: str
    seed: int
    height: int
    width: int
    key: str | None = None
    output_size: tuple[int, int] | None = None

    @property
    def file_name(self) -> str:
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", self.key) if self.key is not None else f"{self.index:06d}"
        return f"{stem}.png"


@dataclass(frozen=True)
class SamplingSettings:
    """Sampler, steps, guidance scale, negative prompt and batch size."""

    sampler: str = "dpm-solver"
    steps: int = SAMPLE_STEPS
    cfg_scale: float = CFG_SCALE
    negative_prompt: str = ""
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if self.sampler == "iddpm" and self.steps < 2:
            raise ValueError("the IDDPM sampler needs steps >= 2 (respaced timesteps include 0 and 999)")


def read_prompts(path: str | Path) -> list[dict]:
    """Rows with ``prompt`` (and ``key``, ``seed``, ``width``/``height`` or ``aspect``) from a prompt file
    (``training.prompt_files``: JSONL, MJHQ's meta_data.json, or one prompt per line)."""
    return read_prompt_file(path)


def diffusers_bins(resolution: int) -> dict[str, list[float]]:
    """PixArtSigmaPipeline's ``ASPECT_RATIO_<resolution>_BIN`` table (what ``use_resolution_binning`` uses)."""
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_sigma as sigma

    tables = {px: getattr(sigma, f"ASPECT_RATIO_{px}_BIN") for px in DIFFUSERS_BIN_TABLES.values()}
    if resolution not in tables:
        raise ValueError(
            f"diffusers has binning tables for {sorted(tables)} px, not {resolution}: use binning 'pixart' "
            "(PixArt's tables, 256…2880 and scaled ones)"
        )
    return tables[resolution]


def bucket(height: int, width: int, resolution: int, binning: str = "pixart") -> tuple[int, int]:
    """The (H, W) an image of aspect height/width is generated at, in the chosen tables."""
    if binning == "pixart":
        return nearest_bucket(height, width, resolution)
    if binning != "diffusers":
        raise ValueError(f"binning must be one of {BINNINGS}, got {binning!r}")
    from diffusers.image_processor import PixArtImageProcessor

    # diffusers keys its tables by the ratio rounded to 2 decimals and picks the nearest key (not the bucket's
    # own h/w): 8.5 % of sizes land elsewhere than in PixArt's tables.
    return PixArtImageProcessor.classify_height_width_bin(height, width, ratios=diffusers_bins(resolution))


def bucket_resolution(generator: ImageGenerator, resolution: int | None, binning: str) -> int:
    """The bucket table (px) to plan on: ``resolution`` (--resolution) when given, else the model's own; with
    ``binning="diffusers"`` and no ``resolution``, the table PixArtSigmaPipeline's binning would pick for the
    model, refused (ValueError) where it has none: the export samples such a model with binning off at its
    trained size (``pixsigma.json``'s ``diffusers_call``), which no bucket table reproduces."""
    if resolution is not None:
        return resolution
    if binning == "diffusers" and diffusers_bin_table(generator.model, generator.vae_downsample) is None:
        sample_sizes = "/".join(str(size) for size in DIFFUSERS_BIN_TABLES)
        raise ValueError(
            f"{generator.name}: PixArtSigmaPipeline's binning has no table for this model (sample_size "
            f"{diffusers_sample_size(generator.model.config)}, {generator.vae_downsample}× VAE; it bins sample_size {sample_sizes} "
            f"on an 8× VAE), so its export's diffusers_call samples it with use_resolution_binning=False at "
            f"{generator.resolution}×{generator.resolution}: use --binning pixart (PixArt's tables, 256…2880 px), "
            "or --height/--width with --binning pixart (an exact size, as diffusers_call does)"
        )
    return generator.resolution


def plan_jobs(
    rows: list[dict],
    *,
    resolution: int,
    seed: int,
    num_images_per_prompt: int = 1,
    size: tuple[int, int] | None = None,
    aspect_ratio: tuple[int, int] = (1, 1),
    binning: str | None = None,
) -> list[ImageJob]:
    """One job per prompt × image: an explicit size, else the bucket nearest to the row's (or the given) aspect.

    With ``binning`` and an explicit size, the size is binned and the image resized back to it, as
    ``PixArtSigmaPipeline(..., use_resolution_binning=True)`` does; without, an explicit size is exact.
    """
    if num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
    if size is not None and binning is None and (size[0] % 16 or size[1] % 16 or min(size) < 16):
        raise ValueError(f"height and width must be positive multiples of 16 (VAE 8 × patch 2), got {size}")
    jobs = []
    for row_index, row in enumerate(rows):
        output_size = None
        if size is not None and binning is not None:
            (height, width), output_size = bucket(*size, resolution, binning), size
        elif size is not None:
            height, width = size
        elif row.get("width") and row.get("height"):
            height, width = bucket(int(row["height"]), int(row["width"]), resolution, binning or "pixart")
        elif row.get("aspect"):
            height, width = bucket(*parse_aspect(row["aspect"]), resolution, binning or "pixart")
        else:
            height, width = bucket(aspect_ratio[0], aspect_ratio[1], resolution, binning or "pixart")
        for j in range(num_images_per_prompt):
            index = row_index * num_images_per_prompt + j
            key = row.get("key")
            if key is not None and num_images_per_prompt > 1:
                key = f"{key}-{j}"
            # a row's own seed (prompt files) wins: its images are the same whatever precedes it in the file
            image_seed = row["seed"] + j if "seed" in row else seed + index
            jobs.append(ImageJob(index, row["prompt"], image_seed, height, width, key, output_size))
    check_file_names(jobs)
    return jobs


def check_file_names(jobs: list[ImageJob]) -> None:
    """Refuse two images bound for one file (ids equal once unsafe characters become '_', an id ``000001``
    beside an unnamed row): one would silently overwrite the other, and its row would point at the wrong image."""
    first: dict[str, ImageJob] = {}
    for job in jobs:
        other = first.setdefault(job.file_name, job)
        if other is not job:
            raise ValueError(
                f"images {other.index} (id {other.key!r}) and {job.index} (id {job.key!r}) would both be written "
                f"to {job.file_name}: give the prompts ids that differ once characters outside [A-Za-z0-9._-] "
                "become '_'"
            )


# --------------------------------------------------------------------------------------------------
# Loading any source as our model + frozen components
# --------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """Our model in fp32 on CPU, where its T5/VAE come from, its training resolution and its caption budget."""

    model: PixArtSigma
    components: FrozenComponents | None
    resolution: int
    name: str


def load_source(
    spec: str,
    *,
    weights: str = "ema",
    preset: str = "XL/2",
    resolution: int | None = None,
    t5: str | None = None,
    vae: str | None = None,
    vae_scaling_factor: float | None = None,
) -> LoadedModel:
    """A run folder, ``final/``, a checkpoint, a pipeline/transformer folder, our folder, a cached hub id or a .pth."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    path = Path(spec).expanduser()
    overrides = {"t5": t5, "vae": vae, "vae_scaling_factor": vae_scaling_factor}
    if not path.exists():
        path = cached_hub_snapshot(spec)
    if path.is_file():
        return _load_pth(path, spec, preset=preset, resolution=resolution, **overrides)
    if (path / "state.pt").is_file():
        return _load_checkpoint(path, spec, weights=weights, **overrides)
    if (path / "model_index.json").is_file():
        return _load_pipeline(path, spec, **overrides)
    inner = _run_member(path, weights)
    if inner is not None:
        return load_source(str(inner), weights=weights, **overrides)
    if (path / "config.json").is_file():
        return _load_transformer_folder(path, spec, **overrides)
    raise ValueError(
        f"{path}: not a model: expected a run folder (final/, final_ema/ or checkpoints/), a checkpoint (state.pt), "
        "a diffusers pipeline (model_index.json) or transformer (config.json), or a pixsigma folder"
    )


def _run_member(path: Path, weights: str) -> Path | None:
    """In a run folder: the finished EMA (or raw) export, else the newest complete checkpoint."""
    from training.checkpoint import complete_checkpoints

    for name in ("final_ema", "final") if weights == "ema" else ("final", "final_ema"):
        # a finished export: final/ may hold only final/<stage>/ sub-exports while the run goes on
        if (path / name / "model_index.json").is_file() or (path / name / "config.json").is_file():
            return path / name
    checkpoints = complete_checkpoints(path)
    return checkpoints[-1] if checkpoints else None


def _load_pth(path: Path, spec: str, *, preset: str, resolution: int | None, **overrides) -> LoadedModel:
    """An original PixArt ``.pth``: its shape from ``--preset``, its PE from ``--resolution``."""
    from training.convert import load_original_checkpoint

    if path.suffix not in (".pth", ".pt"):
        raise ValueError(f"{path}: a file model must be an original PixArt .pth")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    resolution = resolution or 1024
    components = _flag_components(**overrides)
    base_size, pe = pe_params_for_resolution(
        resolution, patch_size=PRESETS[preset].patch_size, vae_downsample=_vae_downsample(components)
    )
    config = dataclasses.replace(PRESETS[preset], base_size=base_size, pe_interpolation=pe)
    model = load_original_checkpoint(path, config, key="state_dict")
    return LoadedModel(model, components, resolution, spec)


def _load_pipeline(path: Path, spec: str, **overrides) -> LoadedModel:
    """A PixArtSigmaPipeline folder (ours, with pixsigma.json, or anyone's)."""
    from training.convert import load_diffusers

    info = read_info(path) or {}
    max_tokens = info.get("max_token_length", DEFAULT_MAX_TOKENS)
    model = load_diffusers(path, subfolder="transformer", max_token_length=max_tokens)
    _check_null_caption(model, info.get("model", {}).get("null_caption"), path)
    if info and not (path / "transformer" / NULL_CAPTION_FILE).is_file():  # ours, from before the sidecar
        model.set_prompt_case(info["model"].get("prompt_case", LEGACY_PROMPT_CASE))
    components = frozen_components(path, **overrides)
    return LoadedModel(model, components, info.get("resolution") or _resolution(model, components), spec)


def _load_transformer_folder(path: Path, spec: str, **overrides) -> LoadedModel:
    """A diffusers transformer folder or one of ours, with the trainer's ``train_config.json`` beside or not."""
    from training.convert import FORMAT_NAME, load_diffusers, load_model

    train_cfg = _train_config_beside(path)
    if json.loads((path / "config.json").read_text()).get("format") == FORMAT_NAME:
        model = load_model(path)
    else:
        max_tokens = train_cfg["text"]["max_tokens"] if train_cfg else DEFAULT_MAX_TOKENS
        model = load_diffusers(path, max_token_length=max_tokens)
        if train_cfg is not None:
            _check_null_caption(model, _trained_null_caption(train_cfg, None, path), path)
            if not (path / NULL_CAPTION_FILE).is_file():  # ours, from before the sidecar recorded the case
                model.set_prompt_case(_trained_prompt_case(train_cfg))
    if train_cfg is not None:
        components = _components_from_train_config(train_cfg, len(train_cfg["stages"]) - 1, **overrides)
    else:
        components = _flag_components(**overrides)
    return LoadedModel(model, components, _resolution(model, components), spec)


def _trained_null_caption(cfg: dict, stored: str | None, path: Path) -> str:
    """The null-caption mode a model was trained with: the one its checkpoint stores (the trainer resolves it
    while ``model.init`` exists), else, for checkpoints from before that, ``auto`` resolved from the init."""
    if stored is not None:
        return stored
    try:
        return resolve_null_caption(cfg["text"]["null_caption"], cfg["model"]["init"])
    except FileNotFoundError as err:
        raise ValueError(
            f"{path}: saved before checkpoints stored their null_caption mode, with null_caption='auto' and "
            f"an init that is gone ({err.filename}); put the init back at that path to resolve it"
        ) from None


def _trained_prompt_case(cfg: dict) -> str:
    """``text.prompt_case`` of a training config; configs from before it existed trained on captions as written."""
    return cfg["text"].get("prompt_case", LEGACY_PROMPT_CASE)


def _check_null_caption(model: PixArtSigma, trained: str | None, path: Path) -> None:
    """Refuse to sample a model trained with ``null_caption = "upstream"`` whose export lost its null caption
    (exports before null_caption.safetensors): guided against T5("") it would not be the trained model."""
    if trained is not None and trained != model.config.null_caption:
        raise ValueError(
            f"{path}: trained with null_caption={trained!r} but the export has no {NULL_CAPTION_FILE} to "
            f"sample it that way; export it again from its checkpoint (pixsigma-export --input CHECKPOINT)"
        )


def cached_hub_snapshot(repo_id: str) -> Path:
    """The local snapshot of a hub pipeline already in the HF cache (nothing is downloaded here)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if repo_id.count("/") != 1:
        raise ValueError(f"{repo_id}: no such file or folder, and not a hub id of the form owner/name")
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError as error:
        raise ValueError(
            f"{repo_id}: not a local path and not in the HF cache; download it first "
            f"(`hf download {repo_id}`) or pass a local folder"
        ) from error


def _vae_downsample(components: FrozenComponents | None) -> int:
    """The components' VAE factor; SD/SDXL's 8 when no VAE is named (such a model cannot generate until --vae
    names one: ``ImageGenerator.load`` refuses it) or its config cannot be read (``vae_downsample`` warns)."""
    return SD_VAE_DOWNSAMPLE if components is None else components.vae_downsample()


def _resolution(model: PixArtSigma, components: FrozenComponents | None) -> int:
    """The training resolution: token grid side × patch × the VAE's factor."""
    return model.config.base_size * model.config.patch_size * _vae_downsample(components)


def _train_config_beside(path: Path) -> dict | None:
    """The trainer writes ``train_config.json`` into its exports (older ``final/`` folders)."""
    config = path / "train_config.json"
    return json.loads(config.read_text()) if config.is_file() else None


def _components_from_train_config(
    cfg: dict, stage_index: int, *, t5: str | None, vae: str | None, vae_scaling_factor: float | None
) -> FrozenComponents:
    stage = cfg["stages"][stage_index]
    return FrozenComponents.from_paths(
        t5 or cfg["text"]["t5"],
        vae or stage["vae"],
        vae_scaling_factor if vae_scaling_factor is not None else stage["vae_scaling_factor"],
    )


def _flag_components(
    *, t5: str | None, vae: str | None, vae_scaling_factor: float | None
) -> FrozenComponents | None:
    """Components named on the command line, for sources that do not say which T5/VAE they were trained with."""
    if t5 is None or vae is None:
        return None  # ImageGenerator raises, naming --t5/--vae, if asked to generate
    if vae_scaling_factor is None:
        from diffusers import AutoencoderKL

        vae_scaling_factor = AutoencoderKL.load_config(local_or_id(vae))["scaling_factor"]
    return FrozenComponents.from_paths(t5, vae, vae_scaling_factor)


def _load_checkpoint(path: Path, spec: str, *, weights: str, t5, vae, vae_scaling_factor) -> LoadedModel:
    """A trainer checkpoint: the model shape from its config and state dict, the stage it was in."""
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    cfg, position = state["config"], state["position"]
    stage = cfg["stages"][position["stage_index"]]
    weights_state = state["ema"] if weights == "ema" and state.get("ema") is not None else state["model"]
    preset = PRESETS[cfg["model"]["preset"]]
    null = weights_state["y_embedder.y_embedding"]  # (max_tokens, C): the caption width and budget
    null_mode = _trained_null_caption(cfg, state.get("null_caption"), path)
    prompt_case = state.get("prompt_case") or _trained_prompt_case(cfg)
    kv_layers = tuple(i for i in range(preset.depth) if f"blocks.{i}.attn.sr.weight" in weights_state)
    ratio = int(weights_state[f"blocks.{kv_layers[0]}.attn.sr.weight"].shape[-1]) if kv_layers else 2
    components = _components_from_train_config(
        cfg, position["stage_index"], t5=t5, vae=vae, vae_scaling_factor=vae_scaling_factor
    )
    base_size, default_pe = pe_params_for_resolution(
        stage["resolution"], patch_size=preset.patch_size, vae_downsample=_vae_downsample(components)
    )
    config = dataclasses.replace(
        preset, caption_channels=null.shape[1], max_token_length=null.shape[0], base_size=base_size,
        pe_interpolation=stage.get("pe_interpolation") or default_pe, kv_compress_layers=kv_layers,
        kv_compress_ratio=ratio, grad_checkpointing=False, null_caption=null_mode, prompt_case=prompt_case,
    )  # fmt: skip
    model = PixArtSigma(config)
    model.load_state_dict(weights_state, strict=True)
    return LoadedModel(model.eval(), components, stage["resolution"], spec)


# --------------------------------------------------------------------------------------------------
# Frozen encoders at sampling time
# --------------------------------------------------------------------------------------------------


class PromptEncoder:
    """Prompts → T5 states (B, L, C) float32 and mask (B, L), L = the longest prompt's token count.

    Prompts are cased by ``prompt_case`` (the model's ``text.prompt_case``; ``lower`` is what a plain
    ``PixArtSigmaPipeline`` call with ``clean_caption=False`` encodes) and cut at the model's caption budget
    (``max_tokens``: ``max_sequence_length`` there, 300 by default, Σ's budget).
    """

    def __init__(
        self, tokenizer: ComponentRef, encoder: ComponentRef, *, max_tokens: int, device: torch.device,
        dtype: torch.dtype, prompt_case: str,
    ) -> None:  # fmt: skip
        from transformers import AutoTokenizer, T5EncoderModel

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer.path, subfolder=tokenizer.subfolder or "")
        self.encoder = T5EncoderModel.from_pretrained(
            encoder.path, subfolder=encoder.subfolder or "", dtype=dtype
        )
        self.encoder = self.encoder.to(device).eval().requires_grad_(False)
        self.max_tokens = max_tokens
        self.device = device
        self.prompt_case = prompt_case

    def __call__(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        states, mask = t5_states(
            self.tokenizer, self.encoder, prompts, max_tokens=self.max_tokens, prompt_case=self.prompt_case
        )
        length = int(mask.sum(dim=1).max())  # the padding every prompt shares is dropped
        return states[:, :length].float(), mask[:, :length].bool()  # (B, L, C), (B, L)


class LatentDecoder:
    """Scaled latents (B, C, h, w) → images (B, 3, H, W) in [0, 1]; tiling/slicing for 2K/4K decodes."""

    def __init__(
        self,
        vae: ComponentRef,
        *,
        scaling_factor: float,
        device: torch.device,
        dtype: torch.dtype,
        slicing: bool,
    ) -> None:
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL.from_pretrained(vae.path, subfolder=vae.subfolder, dtype=dtype)
        self.vae = self.vae.to(device).eval().requires_grad_(False)
        self.scaling_factor = scaling_factor
        self.downsample = vae_downsample(self.vae.config)  # diffusers' vae_scale_factor
        if slicing:
            self.vae.enable_slicing()

    @torch.no_grad()
    def __call__(self, latents: Tensor, tile: bool) -> Tensor:
        if tile:
            self.vae.enable_tiling()
        else:
            self.vae.disable_tiling()
        z = (latents / self.scaling_factor).to(self.vae.device, self.vae.dtype)
        images = self.vae.decode(z).sample.float()  # (B, 3, H, W) in ~[-1, 1]
        return images / 2 + 0.5  # clamped by ImageGenerator.decode, after any resize (as diffusers orders them)


# --------------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------------

Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x (B, C, h, w), t (B,)) → model output (B, C_out, h, w)


def guided_denoiser(
    model: PixArtSigma, y: Tensor, mask: Tensor, y_neg: Tensor, mask_neg: Tensor, cfg_scale: float
) -> Denoiser:
    """Classifier-free guidance on the ε channels against the negative prompt; σ channels from the prompt pass."""
    C = model.config.in_channels
    dtype = next(model.parameters()).dtype
    if cfg_scale == 1.0:
        return lambda x, t: model(x.to(dtype), t, y.to(dtype), mask).float()
    length = max(y.shape[1], y_neg.shape[1])
    y_both = torch.cat([_pad_tokens(y, length), _pad_tokens(y_neg, length)]).to(dtype)  # (2B, L, C_cap)
    mask_both = torch.cat([_pad_tokens(mask, length), _pad_tokens(mask_neg, length)])  # (2B, L)

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        out = model(
            torch.cat([x, x]).to(dtype), torch.cat([t, t]), y_both, mask_both
        ).float()  # (2B, C_out, h, w)
        cond, uncond = out.chunk(2)
        eps = uncond[:, :C] + cfg_scale * (cond[:, :C] - uncond[:, :C])  # (B, C, h, w)
        return torch.cat([eps, cond[:, C:]], dim=1)

    return denoise


def null_caption_denoiser(model: PixArtSigma, y: Tensor, mask: Tensor, cfg_scale: float) -> Denoiser:
    """Guidance against the model's stored null caption: how a model trained with ``null_caption = "upstream"``
    is sampled. PixArt's own samplers (scripts/inference.py in PixArt-sigma) guide against the padded T5("")
    buffer attended under the *prompt's* mask, the way such a model saw dropped captions in training;
    encoding "" as a negative prompt (diffusers' way) would attend one token instead."""
    dtype = next(model.parameters()).dtype
    y = y.to(dtype)
    if cfg_scale == 1.0:
        return lambda x, t: model(x.to(dtype), t, y, mask).float()
    return lambda x, t: model.forward_with_cfg(x.to(dtype), t, y, mask, cfg_scale=cfg_scale).float()


def _pad_tokens(x: Tensor, length: int) -> Tensor:
    """Zero-pad (B, L, …) to (B, length, …); padded mask entries are False."""
    pad = length - x.shape[1]
    if pad == 0:
        return x
    return torch.cat([x, x.new_zeros((x.shape[0], pad, *x.shape[2:]))], dim=1)


def dpm_solver_sample(denoise: Denoiser, noise: Tensor, *, steps: int, in_channels: int) -> Tensor:
    """DPM-Solver++ (2M): the loop ``PixArtSigmaPipeline`` runs, on our schedule; returns x_0 (B, C, h, w)."""
    scheduler = GaussianDiffusion().scheduler()
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise.float() * scheduler.init_noise_sigma  # (B, C, h, w)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        out = denoise(model_input, t.expand(x.shape[0]))  # (B, C_out, h, w)
        eps = out[:, :in_channels]  # the σ channels are not used by an ODE solver
        x = scheduler.step(eps, t, x).prev_sample
    return x


def sa_solver_tau(t: float) -> float:
    """SA-Solver's stochasticity τ(t) in PixArt-Σ's demo (app.py): SDE steps for 200 ≤ t ≤ 800, ODE elsewhere."""
    return 1.0 if 200 <= t <= 800 else 0.0


def sa_solver_scheduler():
    """diffusers' ``SASolverScheduler`` (Xue et al. 2023; PixArt-Σ's second sampler) on our noise schedule, with
    the demo's settings: data prediction, predictor and corrector of order 2, ``sa_solver_tau``."""
    from diffusers import SASolverScheduler

    return SASolverScheduler.from_config(
        GaussianDiffusion().scheduler().config, algorithm_type="data_prediction", tau_func=sa_solver_tau,
        predictor_order=2, corrector_order=2,
    )  # fmt: skip


def sa_solver_sample(
    denoise: Denoiser, noise: Tensor, *, steps: int, in_channels: int, generators: list[torch.Generator]
) -> Tensor:
    """SA-Solver, the loop ``PixArtSigmaPipeline`` runs with that scheduler; its step noise is drawn per image from
    ``generators`` (CPU), so an image does not depend on its batch; returns x_0 (B, C, h, w)."""
    scheduler = sa_solver_scheduler()
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise.float() * scheduler.init_noise_sigma  # (B, C, h, w)
    for t in scheduler.timesteps:
        out = denoise(scheduler.scale_model_input(x, t), t.expand(x.shape[0]))  # (B, C_out, h, w)
        x = scheduler.step(out[:, :in_channels], t, x, generator=generators).prev_sample
    return x


class RespacedDiffusion:
    """IDDPM tables on ``num_steps`` of the 1000 training timesteps (improved-diffusion ``respace.py``).

    Timesteps are ``round(i · 999 / (num_steps - 1))``; the betas of the shorter chain are
    1 - ᾱ_{t_k}/ᾱ_{t_{k-1}}, so the marginals q(x_t | x_0) are those of training; the model sees the
    original timestep t_k. With 1000 steps these are the training tables exactly (tested).
    """

    def __init__(self, num_steps: int, base: GaussianDiffusion | None = None) -> None:
        base = base or GaussianDiffusion()
        T = base.num_timesteps
        if not 2 <= num_steps <= T:
            raise ValueError(f"num_steps must be in [2, {T}], got {num_steps}")
        stride = (T - 1) / (num_steps - 1)
        self.timesteps = torch.tensor(sorted({round(i * stride) for i in range(num_steps)}))  # ascending
        ac = base.alphas_cumprod[self.timesteps]  # float64
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        self.alphas_cumprod = ac
        self.betas = 1.0 - ac / ac_prev
        self.posterior_variance = self.betas * (1.0 - ac_prev) / (1.0 - ac)
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = self.betas * ac_prev.sqrt() / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * (1.0 - self.betas).sqrt() / (1.0 - ac)

    def step(self, k: int, x: Tensor, out: Tensor, noise: Tensor | None) -> Tensor:
        """x_{t_{k-1}} from x_{t_k} and the model output [ε, v] (learned-range variance), as IDDPM p_sample."""
        C = x.shape[1]
        eps, var_values = out[:, :C], out[:, C:]
        f = lambda table: float(table[k])  # noqa: E731
        frac = (var_values + 1) / 2  # v ∈ [-1, 1] → between log β̃ (v = -1) and log β (v = 1)
        log_variance = frac * math.log(f(self.betas)) + (1 - frac) * f(self.posterior_log_variance_clipped)
        x0 = math.sqrt(1.0 / f(self.alphas_cumprod)) * x - math.sqrt(1.0 / f(self.alphas_cumprod) - 1.0) * eps
        mean = f(self.posterior_mean_coef1) * x0 + f(self.posterior_mean_coef2) * x
        return mean if noise is None else mean + torch.exp(0.5 * log_variance) * noise


def iddpm_sample(
    denoise: Denoiser, noise: Tensor, *, steps: int, in_channels: int, generators: list[torch.Generator]
) -> Tensor:
    """Ancestral IDDPM sampling with the learned variance; per-step noise from each image's own generator."""
    diffusion = RespacedDiffusion(steps)
    x = noise.float()  # (B, C, h, w)
    for k in reversed(range(len(diffusion.timesteps))):
        t = diffusion.timesteps[k].expand(x.shape[0]).to(x.device)  # the model's (original) timestep
        out = denoise(x, t)  # (B, 2C, h, w)
        if out.shape[1] != 2 * in_channels:
            raise ValueError(
                "the IDDPM sampler needs a learned-sigma model (2·in_channels outputs); use dpm-solver"
            )
        step_noise = _per_image_noise(generators, x.shape[1:], x.device) if k > 0 else None
        x = diffusion.step(k, x, out, step_noise)
    return x


def _per_image_noise(generators: list[torch.Generator], shape: tuple, device: torch.device) -> Tensor:
    """(B, *shape) standard normal, row i from generators[i] on the CPU (device-independent)."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators]).to(device)


# --------------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------------


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA (PixArt-Σ samples in half precision), fp32 on CPU."""
    choices = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in choices:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(choices)}, got {name!r}")
    return choices[name]


class ImageGenerator:
    """Our model + a prompt encoder + a latent decoder on one device: prompts and seeds in, images out.

    ``load`` builds one from any source; the trainer builds one around its live model, T5 and VAE.
    """

    def __init__(
        self,
        model: PixArtSigma,
        text: Callable[[list[str]], tuple[Tensor, Tensor]],
        decoder: Callable[[Tensor, bool], Tensor],
        *,
        name: str,
        resolution: int,
        vae_downsample: int,
        device: torch.device,
        vae_tiling: str = "auto",
        setup: dict | None = None,
    ) -> None:
        if vae_tiling not in ("auto", "on", "off"):
            raise ValueError(f"vae_tiling must be auto, on or off, got {vae_tiling!r}")
        self.model, self.text, self.decoder = model, text, decoder
        self.name, self.resolution, self.device, self.vae_tiling = name, resolution, device, vae_tiling
        self.vae_downsample = vae_downsample  # pixels per latent cell of the decoder's VAE
        self.setup = setup or {}  # how the frozen parts were loaded (T5/VAE sources, dtype): see identity()

    def identity(self) -> dict:
        """What, besides the image plan, decides the pixels: the weights (sha256 over every tensor of the state
        dict, in the dtype they sample in), the model config (null caption, trained prompt case…), the prompt
        case actually applied, the T5/VAE sources and the VAE tiling. A sampling run's digest includes it, so a
        rerun with another ``--prompt-case``, ``--weights``, ``--dtype``, ``--t5``/``--vae`` or retrained weights
        at the same path refuses the folder instead of mixing its images with the old ones."""
        digest = hashlib.sha256()
        for name, tensor in self.model.state_dict().items():
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        config = json.loads(json.dumps(dataclasses.asdict(self.model.config)))  # as sampling_run.json holds it
        return {"model_sha256": digest.hexdigest(), "model_config": config,
                "prompt_case": getattr(self.text, "prompt_case", config["prompt_case"]),
                "vae_tiling": self.vae_tiling, **self.setup}  # fmt: skip

    @classmethod
    def load(
        cls,
        loaded: LoadedModel,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        vae_tiling: str = "auto",
        vae_slicing: bool = False,
        prompt_case: str | None = None,
    ) -> ImageGenerator:
        """Move the model to ``device``/``dtype`` (bf16 on CUDA by default) and load its T5 and VAE there;
        prompts are cased as the model was trained (``prompt_case`` overrides it, with a warning)."""
        if loaded.components is None:
            raise ValueError(
                f"{loaded.name}: the T5 and VAE it was trained with are not recorded; pass --t5 and --vae"
            )
        device = device or default_device()
        dtype = dtype or resolve_dtype("auto", device)
        model = loaded.model.to(device, dtype).eval().requires_grad_(False)
        c = loaded.components
        trained = model.config.prompt_case
        if prompt_case is not None and prompt_case != trained:
            log.warning("%s was trained on captions cased %r; prompts are cased %r as asked (--prompt-case)",
                        loaded.name, trained, prompt_case)  # fmt: skip
        text = PromptEncoder(c.tokenizer, c.text_encoder, max_tokens=model.config.max_token_length,
                             device=device, dtype=dtype, prompt_case=prompt_case or trained)  # fmt: skip
        decoder = LatentDecoder(c.vae, scaling_factor=c.vae_scaling_factor, device=device, dtype=dtype,
                                slicing=vae_slicing)  # fmt: skip
        grid = model.config.base_size * model.config.patch_size * decoder.downsample
        if loaded.resolution is not None and grid != loaded.resolution:  # e.g. --vae of another factor
            raise ValueError(
                f"{loaded.name} was trained at {loaded.resolution} px on a {model.config.base_size}-token grid, "
                f"but its VAE {c.vae.to_dict()} downsamples {decoder.downsample}× ({grid} px): use a VAE of the "
                "factor it was trained with"
            )
        setup = {"dtype": str(dtype).removeprefix("torch."), "text_encoder": c.text_encoder.to_dict(),
                 "tokenizer": c.tokenizer.to_dict(), "vae": c.vae.to_dict(),
                 "vae_scaling_factor": c.vae_scaling_factor}  # fmt: skip
        return cls(model, text, decoder, name=loaded.name, resolution=loaded.resolution,
                   vae_downsample=decoder.downsample, device=device,
                   vae_tiling=vae_tiling, setup=setup)  # fmt: skip

    @torch.no_grad()
    def latents(self, jobs: list[ImageJob], settings: SamplingSettings) -> Tensor:
        """Final latents (B, C, h, w) for jobs of one size."""
        height, width = jobs[0].height, jobs[0].width
        assert all((j.height, j.width) == (height, width) for j in jobs)
        C = self.model.config.in_channels
        if height % self.vae_downsample or width % self.vae_downsample:
            raise ValueError(f"image size {height}×{width} is not a multiple of the VAE's {self.vae_downsample}×")
        latent_hw = (height // self.vae_downsample, width // self.vae_downsample)
        generators = [torch.Generator().manual_seed(j.seed) for j in jobs]
        noise = _per_image_noise(generators, (C, *latent_hw), self.device)  # (B, C, h, w)
        y, mask = self.text([j.prompt for j in jobs])
        if settings.negative_prompt == "" and self.model.config.null_caption == "upstream":
            denoise = null_caption_denoiser(self.model, y, mask, settings.cfg_scale)
        else:
            y_neg, mask_neg = self.text([settings.negative_prompt] * len(jobs))
            denoise = guided_denoiser(self.model, y, mask, y_neg, mask_neg, settings.cfg_scale)
        if settings.sampler == "iddpm":
            return iddpm_sample(denoise, noise, steps=settings.steps, in_channels=C, generators=generators)
        if settings.sampler == "sa-solver":
            return sa_solver_sample(denoise, noise, steps=settings.steps, in_channels=C, generators=generators)
        return dpm_solver_sample(denoise, noise, steps=settings.steps, in_channels=C)

    def decode(self, latents: Tensor, output_size: tuple[int, int] | None = None) -> Tensor:
        """(B, 3, H, W) float images in [0, 1]; resized and center-cropped to ``output_size`` (H, W) when given,
        before the clamp, as PixArtSigmaPipeline's binning does (``resize_and_crop_tensor``)."""
        side = max(latents.shape[-2:]) * self.vae_downsample
        tile = self.vae_tiling == "on" or (self.vae_tiling == "auto" and side >= TILING_MIN_SIDE)
        images = self.decoder(latents, tile).cpu()  # (B, 3, H, W)
        if output_size is not None:
            from diffusers.image_processor import PixArtImageProcessor

            images = PixArtImageProcessor.resize_and_crop_tensor(images, output_size[1], output_size[0])
        return images.clamp(0, 1)

    def generate(self, jobs: list[ImageJob], settings: SamplingSettings) -> Iterator[tuple[ImageJob, Tensor]]:
        """(job, (3, H, W) image in [0, 1]) for every job; batches hold jobs of one size, in job order."""
        by_size: dict[tuple, list[ImageJob]] = {}
        for job in jobs:
            by_size.setdefault((job.height, job.width, job.output_size), []).append(job)
        for group in by_size.values():
            for start in range(0, len(group), settings.batch_size):
                batch = group[start : start + settings.batch_size]
                images = self.decode(self.latents(batch, settings), batch[0].output_size)  # (B, 3, H, W)
                yield from zip(batch, images, strict=True)


def to_png_bytes(image: Tensor) -> bytes:
    """(3, H, W) in [0, 1] → PNG bytes (8-bit, rounded)."""
    import io

    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


def image_row(job: ImageJob, settings: SamplingSettings, model_name: str) -> dict:
    """The JSONL record of one generated image."""
    height, width = job.output_size or (job.height, job.width)
    return {
        "file": job.file_name, "index": job.index, "key": job.key, "prompt": job.prompt,
        "negative_prompt": settings.negative_prompt, "seed": job.seed, "height": height, "width": width,
        "bucket": [job.height, job.width], "sampler": settings.sampler, "steps": settings.steps,
        "cfg_scale": settings.cfg_scale, "model": model_name,
    }  # fmt: skip


def write_images(
    generator: ImageGenerator,
    jobs: list[ImageJob],
    settings: SamplingSettings,
    out_dir: Path,
    *,
    on_image: Callable[[ImageJob, Tensor], None] | None = None,
) -> list[dict]:
    """Generate ``jobs`` into ``out_dir`` (one PNG each, written atomically); returns their rows in job order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = {}
    for job, image in generator.generate(jobs, settings):
        atomic_write_bytes(out_dir / job.file_name, to_png_bytes(image))
        rows[job.index] = image_row(job, settings, generator.name)
        if on_image is not None:
            on_image(job, image)
        log.info("%s (%dx%d) %s", job.file_name, job.width, job.height, job.prompt[:60])
    return [rows[job.index] for job in jobs]


def write_rows(path: Path, rows: list[dict]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


# --------------------------------------------------------------------------------------------------
# Sharded, resumable sampling (torchrun)
# --------------------------------------------------------------------------------------------------


def plan_digest(rows: list[dict], generator: dict) -> str:
    """sha256 of the planned image rows (file, prompt, seed, size, sampler, steps, cfg, model) and of the
    generator's identity (``ImageGenerator.identity``: weights, prompt case, T5/VAE, dtype): a run's identity."""
    plan = {"rows": rows, "generator": generator}
    return hashlib.sha256(json.dumps(plan, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def is_complete_png(path: Path, size: tuple[int, int]) -> bool:
    """Whether ``path`` is a whole PNG of (H, W) ``size``: every chunk's CRC checked (a finished image)."""
    if not path.is_file():
        return False
    try:
        with Image.open(path) as image:
            image.verify()  # reads every chunk to IEND; a truncated or corrupted file raises
            return image.format == "PNG" and image.size == (size[1], size[0])
    except (OSError, SyntaxError) as error:  # PIL's errors for a broken file: it is generated again
        log.warning("%s is incomplete (%s): generating it again", path, error)
        return False


def check_sampling_run(out: Path, run_record: dict, planned: list[dict], *, overwrite: bool) -> None:
    """Refuse an output folder that holds another sampling run (other prompts, seeds, sizes, settings or
    model) or images of no recorded run; the same run is resumed."""
    if overwrite or not out.exists():
        return
    record = out / RUN_FILE
    if record.is_file():
        theirs = json.loads(record.read_text())
        if theirs.get("plan_sha256") == run_record["plan_sha256"]:
            return
        ours, old = run_record["generator"], theirs.get("generator") or {}
        changed = sorted(k for k in ours.keys() | old.keys() if ours.get(k) != old.get(k))
        why = f"the generator's {', '.join(changed)} differ" if changed else "other images, seeds or settings"
        raise SystemExit(
            f"{out} already holds a sampling run ({RUN_FILE}: {theirs.get('num_images')} images of "
            f"{theirs.get('model')}, another plan: {why}); pass --overwrite to replace it, or another --output"
        )
    if (out / IMAGES_FILE).exists() or any((out / r["file"]).exists() for r in planned):
        raise SystemExit(
            f"{out} already holds a sampling run ({IMAGES_FILE} or images without {RUN_FILE}); pass "
            "--overwrite to replace it"
        )


def clear_sampling_run(out: Path, planned: list[dict]) -> None:
    """``--overwrite``: remove the previous run's record, then every planned file, before the new record is
    written; else a kill before this run overwrote them would leave the old run's PNGs (same names, same sizes)
    to be kept as complete by the resume."""
    (out / RUN_FILE).unlink(missing_ok=True)  # first: a kill below leaves images without a record (refused)
    for row in planned:
        (out / row["file"]).unlink(missing_ok=True)


def sample_sharded(
    generator: ImageGenerator,
    jobs: list[ImageJob],
    settings: SamplingSettings,
    out: Path,
    *,
    env: Dist,
    overwrite: bool = False,
    binning: str,
) -> list[dict]:
    """Rank r generates the jobs with index % world_size == r, skipping those whose PNG is already complete
    (resume after a kill); each rank writes its rows, rank 0 merges them into images.jsonl in job order.
    ``sampling_run.json`` records the plan's digest, the generator and the bucket tables (``binning``: one of
    ``BINNINGS``, or ``EXACT_SIZE`` where the jobs were planned at an explicit size with no table) the jobs were
    planned on (``evaluate --images`` copies the latter two into ``metrics.json``).

    Every image depends only on its own seed (``ImageGenerator.latents``), so the files are the same for any
    number of ranks and any batch they land in.
    """
    planned = [image_row(job, settings, generator.name) for job in jobs]
    identity = generator.identity()
    # binning is recorded, not digested: it acts through the planned sizes (rows' height/width and bucket), so
    # two plans that differ in binning alone give the same images
    run_record = {"model": generator.name, "num_images": len(jobs), "sampling": dataclasses.asdict(settings),
                  "binning": binning, "generator": identity, "plan_sha256": plan_digest(planned, identity)}  # fmt: skip
    check_sampling_run(out, run_record, planned, overwrite=overwrite)  # every rank, before anyone writes
    env.barrier()
    if env.is_main:
        if overwrite:
            clear_sampling_run(out, planned)
        atomic_write_bytes(out / RUN_FILE, json.dumps(run_record, indent=2).encode())
        (out / IMAGES_FILE).unlink(missing_ok=True)  # written again once every image is there
    env.barrier()  # no rank writes an image before rank 0 has cleared the folder
    mine = [job for job in jobs if job.index % env.world_size == env.rank]
    todo = [job for job in mine if overwrite or not is_complete_png(out / job.file_name, _saved_size(job))]
    log.info("rank %d: %d of %d images to generate (%d already complete)", env.rank, len(todo), len(mine),
             len(mine) - len(todo))  # fmt: skip
    write_images(generator, todo, settings, out)
    write_rows(out / f"{RANK_ROWS_PREFIX}{env.rank:05d}-of-{env.world_size:05d}.jsonl",
               [planned[job.index] for job in mine])  # fmt: skip
    env.barrier()
    if not env.is_main:
        return planned
    merged = merge_rank_rows(out, env.world_size)
    if [r["index"] for r in merged] != [job.index for job in jobs]:
        raise RuntimeError(f"{out}: the ranks' rows do not cover the plan ({len(merged)} of {len(jobs)})")
    write_rows(out / IMAGES_FILE, merged)
    for part in out.glob(f"{RANK_ROWS_PREFIX}*.jsonl"):
        part.unlink()
    return merged


def _saved_size(job: ImageJob) -> tuple[int, int]:
    return job.output_size or (job.height, job.width)


def merge_rank_rows(out: Path, world_size: int) -> list[dict]:
    """Every rank's rows (``images.rank-RRRRR-of-WWWWW.jsonl``) in job order."""
    rows = []
    for rank in range(world_size):
        part = out / f"{RANK_ROWS_PREFIX}{rank:05d}-of-{world_size:05d}.jsonl"
        rows += [json.loads(line) for line in part.read_text().splitlines()]
    return sorted(rows, key=lambda r: r["index"])


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared with training.evaluate: where the model and its frozen components come from."""
    group = parser.add_argument_group("model")
    group.add_argument("--weights", choices=("ema", "model"), default="ema",
                       help="for run folders and checkpoints: the EMA weights (when kept) or the raw ones")  # fmt: skip
    group.add_argument("--t5", help="T5 folder or hub id (default: the one the model was trained with)")
    group.add_argument("--vae", help="VAE folder or hub id (default: the one the model was trained with)")
    group.add_argument(
        "--vae-scaling-factor", type=float, help="default: recorded with the model, else the VAE's"
    )
    group.add_argument(
        "--preset", default="XL/2", choices=sorted(PRESETS), help="model shape of an original .pth"
    )
    group.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    group.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                       help="auto: bf16 on CUDA, fp32 on CPU")  # fmt: skip


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Sampler flags shared with training.evaluate."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--sampler", choices=SAMPLERS, default="dpm-solver",
                       help="DPM-Solver++ (diffusers, as PixArtSigmaPipeline), IDDPM ancestral, or SA-Solver "
                       "(diffusers' SASolverScheduler with PixArt-Σ's demo settings)")  # fmt: skip
    group.add_argument("--steps", type=int, default=SAMPLE_STEPS, help="sampler steps")
    group.add_argument("--cfg-scale", type=float, default=CFG_SCALE, help="classifier-free guidance scale")
    group.add_argument("--negative-prompt", default="", help="the unconditional side of guidance")
    group.add_argument("--seed", type=int, default=0, help="image i gets seed + i")
    group.add_argument("--batch-size", type=int, default=4, help="images per forward (same size)")
    group.add_argument(
        "--resolution", type=int, help="bucket table (px); default: the model's training resolution"
    )
    group.add_argument(
        "--num-images-per-prompt", type=int, default=1, help="images per prompt, seeds in a row"
    )
    group.add_argument("--binning", choices=BINNINGS, default="pixart",
                       help="bucket tables: pixart = the 40 buckets per resolution the model trained on (256…2880); "
                       "diffusers = PixArtSigmaPipeline's 33-bucket *_BIN tables (256…2048), an explicit "
                       "--height/--width binned and resized back as use_resolution_binning does")  # fmt: skip
    group.add_argument("--vae-tiling", choices=("auto", "on", "off"), default="auto",
                       help=f"tiled VAE decode; auto: from {TILING_MIN_SIDE} px")  # fmt: skip
    group.add_argument("--vae-slicing", action="store_true", help="decode one image of a batch at a time")
    group.add_argument("--prompt-case", choices=PROMPT_CASES,
                       help="override how prompts are cased before T5 (lower: as PixArtSigmaPipeline; as_written); "
                       "default: as the model was trained (text.prompt_case, recorded with it)")  # fmt: skip


def settings_from_args(args: argparse.Namespace) -> SamplingSettings:
    return SamplingSettings(args.sampler, args.steps, args.cfg_scale, args.negative_prompt, args.batch_size)


def generator_from_args(
    args: argparse.Namespace, model: str, device: torch.device | None = None
) -> ImageGenerator:
    """Load ``model`` as the flags say and put it on ``device`` (default: --device)."""
    device = device or (default_device() if args.device == "auto" else torch.device(args.device))
    loaded = load_source(
        model, weights=args.weights, preset=args.preset, resolution=args.resolution, t5=args.t5, vae=args.vae,
        vae_scaling_factor=args.vae_scaling_factor,
    )  # fmt: skip
    return ImageGenerator.load(loaded, device=device, dtype=resolve_dtype(args.dtype, device),
                               vae_tiling=args.vae_tiling, vae_slicing=args.vae_slicing,
                               prompt_case=args.prompt_case)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pixsigma-sample", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--model", required=True,
                        help="run folder, final/, checkpoint, pipeline/transformer folder, cached hub id or .pth")  # fmt: skip
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument(
        "--input", help="prompts: JSONL with 'prompt' (and key/width/height), or one per line"
    )
    parser.add_argument("--num-samples", type=int, help="only the first N prompts")
    parser.add_argument("--output", required=True, help="folder for the PNGs and images.jsonl")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a previous sampling run in --output"
    )
    parser.add_argument(
        "--aspect-ratio", default="1:1", help="H:W, bucketed at --resolution (rows' own size wins)"
    )
    parser.add_argument("--height", type=int, help="explicit size in px (with --width), no bucketing")
    parser.add_argument("--width", type=int, help="explicit width in px (with --height)")
    add_sampling_arguments(parser)
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    if not args.prompt and not args.input:
        parser.error("give --prompt and/or --input")
    if (args.height is None) != (args.width is None):
        parser.error("--height and --width go together")
    return args


def parse_aspect_ratio(text: str) -> tuple[int, int]:
    return parse_aspect(text)


def run(argv: list[str] | None = None) -> Path:
    """Parse the flags, sample this rank's share (skipping finished images), merge the rows; returns the folder."""
    args = parse_args(argv)
    env, device = init_distributed()
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    quiet_library_bars()  # no \r bars (T5's "Loading weights") in a log file
    out = Path(args.output)
    rows = [{"prompt": p} for p in args.prompt] + (read_prompts(args.input) if args.input else [])
    rows = rows[: args.num_samples] if args.num_samples is not None else rows
    generator = generator_from_args(args, args.model, device if args.device == "auto" else None)
    size = (args.height, args.width) if args.height is not None else None
    binning = None if args.binning == "pixart" and size is not None else args.binning  # None: the size is exact
    jobs = plan_jobs(rows, resolution=bucket_resolution(generator, args.resolution, args.binning), seed=args.seed,
                     num_images_per_prompt=args.num_images_per_prompt, size=size,
                     aspect_ratio=parse_aspect_ratio(args.aspect_ratio), binning=binning)  # fmt: skip
    settings = settings_from_args(args)
    image_rows = sample_sharded(generator, jobs, settings, out, env=env, overwrite=args.overwrite,
                                binning=binning or EXACT_SIZE)  # fmt: skip
    if env.is_main:
        print(f"{len(image_rows)} images ({settings.sampler}, {settings.steps} steps, cfg {settings.cfg_scale}) "
              f"→ {out}")  # fmt: skip
    close_distributed()
    return out


def main(argv: list[str] | None = None) -> None:
    """Console script ``pixsigma-sample`` (returns None: a console script's return value is its exit status)."""
    run(argv)
    exit_torchrun_worker()  # finished on every rank: no interpreter shutdown racing gloo's threads


if __name__ == "__main__":
    main()
