"""Complete ``PixArtSigmaPipeline`` folders from our model, KV compression included, and loading them back.

A folder written by ``export_pipeline`` is what ``PixArtSigmaPipeline.save_pretrained`` writes —
``model_index.json``, ``transformer/``, ``scheduler/`` (DPM-Solver++ on our noise schedule, the settings
we sample with) and, with ``components="copy"``, ``vae/``, ``text_encoder/``, ``tokenizer/`` — plus
``transformer/null_caption.safetensors`` (the stored null caption and its mode, which diffusers has no
place for; ``training.convert.load_diffusers`` restores it) and ``pixsigma.json``: the model config, the
caption budget, the VAE scaling factor trained with, the resolution, where the frozen components come
from, the prompt case the model was trained with and ``diffusers_call``: the keyword arguments under which a
plain ``pipe(prompt, **diffusers_call)`` encodes prompts as the model was trained (``max_sequence_length`` =
the caption budget; ``clean_caption=False``, since diffusers' default ``True`` runs DeepFloyd's caption
cleaning, URL and punctuation removal, whenever bs4 and ftfy are installed) and, for a model diffusers' resolution
binning cannot sample as trained (4K's ``sample_size`` 360, the tiny preset, a VAE that is not 8×),
``use_resolution_binning=False``; it never holds a size (the pipeline's default is the trained one). With ``components="reference"`` (the trainer's
default: T5-XXL is ~19 GB) those three are ``[null, null]`` in ``model_index.json`` and named by path or
hub id in ``pixsigma.json``; ``load_pipeline`` fills them in, and a plain diffusers user passes them to
``from_pretrained`` (README, "Sampling, export and evaluation").

A KV-compressed model's transformer is a ``training.kv_processor.PixArtKVTransformer2DModel`` whose code
travels in the folder (``transformer/pixart_kv_transformer_<sha256[:8]>.py``, a diffusers custom component): plain
diffusers loads it with ``PixArtSigmaPipeline.from_pretrained(folder, trust_remote_code=True)``, pixsigma not
needed. With ``components="copy"`` (``pixsigma-export --standalone``) that call needs no other argument.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from manifests.features import SD_VAE_DOWNSAMPLE, vae_downsample
from manifests.io import atomic_write_bytes
from training.model import PixArtSigma

if TYPE_CHECKING:
    from training.config import TrainConfig

log = logging.getLogger(__name__)

INFO_FILE = "pixsigma.json"
INFO_FORMAT = "pixsigma.pipeline"
# What PixArtSigmaPipeline.__call__ does to a prompt under diffusers_call (_text_preprocessing with
# clean_caption=False): lowercase + strip, i.e. manifests.features' "lower" prompt case.
DIFFUSERS_PROMPT_CASE = "lower"
FROZEN_COMPONENTS = ("tokenizer", "text_encoder", "vae")
# transformer/<KV_MODULE>_<sha256[:8] of the code>.py: the KV transformer's code, in KV exports. diffusers
# keeps a custom module by its name in sys.modules, so the name carries the code's hash: two exports with
# different code loaded in one process each get their own class.
KV_MODULE = "pixart_kv_transformer"
# PixArtSigmaPipeline's use_resolution_binning (diffusers' pipeline_pixart_sigma.py, __call__) picks its
# ASPECT_RATIO_<px>_BIN table from transformer.config.sample_size alone, taking 8 px per latent cell, and raises
# "Invalid sample size" for any other sample_size (the tiny 64 px preset's 8, a 2880 px 4K model's 360).
DIFFUSERS_BIN_TABLES = {32: 256, 64: 512, 128: 1024, 256: 2048}  # sample_size → table (px)
PIPELINE_ENTRIES = ("model_index.json", "transformer", "scheduler", *FROZEN_COMPONENTS, INFO_FILE)
# What older trainer exports left at the top of final/: a bare transformer folder, or ours plus the config.
LEGACY_FILES = (
    "config.json",
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "train_config.json",
)


@dataclass(frozen=True)
class ComponentRef:
    """Where a frozen component loads from: a local folder or hub id, and the subfolder inside it."""

    path: str
    subfolder: str | None = None

    def to_dict(self) -> dict:
        return {"path": self.path, "subfolder": self.subfolder}


@dataclass(frozen=True)
class FrozenComponents:
    """T5 tokenizer and encoder, and the VAE with the scaling factor the DiT was trained with."""

    tokenizer: ComponentRef
    text_encoder: ComponentRef
    vae: ComponentRef
    vae_scaling_factor: float

    @classmethod
    def from_paths(cls, t5: str, vae: str, vae_scaling_factor: float) -> FrozenComponents:
        """A T5 folder/id holding tokenizer and encoder (as google/t5-v1_1-xxl), and a VAE folder/id."""
        t5, vae = local_or_id(t5), local_or_id(vae)
        return cls(ComponentRef(t5), ComponentRef(t5), ComponentRef(vae), vae_scaling_factor)

    def ref(self, name: str) -> ComponentRef:
        return getattr(self, name)

    def vae_downsample(self) -> int:
        """Pixels per latent cell of the VAE, from its config (diffusers' ``vae_scale_factor``); SD/SDXL's 8,
        with a warning, when the config cannot be read (a hub id not in the cache). Only recorded numbers (the
        export's ``resolution``) rest on that guess: a loaded VAE's own factor sizes every latent."""
        try:
            return vae_downsample(_vae_config(self.vae))
        except (OSError, ValueError) as err:
            log.warning("cannot read the config of VAE %s (%s): assuming SD/SDXL's %d× downsample",
                        self.vae.path, err, SD_VAE_DOWNSAMPLE)  # fmt: skip
            return SD_VAE_DOWNSAMPLE


def local_or_id(path_or_id: str) -> str:
    """An existing local path made absolute (exports outlive the working directory), else the id as is."""
    path = Path(path_or_id).expanduser()
    return str(path.resolve()) if path.exists() else path_or_id


def scheduler():
    """DPM-Solver++ (2M) on the IDDPM training schedule (linear betas 1e-4 → 0.02, 1000 steps), ε-prediction."""
    from training.diffusion import GaussianDiffusion

    return GaussianDiffusion().scheduler()


def model_resolution(model: PixArtSigma, vae_downsample: int) -> int:
    """The training resolution in pixels: token grid side × patch × VAE factor (e.g. 64 · 2 · 8 = 1024)."""
    return model.config.base_size * model.config.patch_size * vae_downsample


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def export_pipeline(
    model: PixArtSigma,
    folder: str | Path,
    components: FrozenComponents,
    *,
    mode: Literal["copy", "reference"] = "reference",
    extra: dict | None = None,
) -> Path:
    """Write a complete ``PixArtSigmaPipeline`` folder for ``model`` (plain or KV-compressed).

    Entries are written to a temporary sibling and then moved in one by one with ``pixsigma.json`` last,
    so a crash leaves either the previous export or a folder without a new ``pixsigma.json``; entries not
    produced by this export (e.g. ``final/<stage>/`` sub-exports) are left alone.
    """
    from diffusers import PixArtSigmaPipeline

    from training.convert import save_null_caption, to_diffusers_transformer

    if mode not in ("copy", "reference"):
        raise ValueError(f"mode must be 'copy' or 'reference', got {mode!r}")
    folder = Path(folder)
    tmp = folder.parent / f".{folder.name}.export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cpu = model if next(model.parameters()).device.type == "cpu" else None
    transformer = to_diffusers_transformer(cpu if cpu is not None else _cpu_copy(model))
    frozen = (
        load_frozen(components, dtype=torch.float32) if mode == "copy" else dict.fromkeys(FROZEN_COMPONENTS)
    )
    pipe = PixArtSigmaPipeline(transformer=transformer, scheduler=scheduler(), **frozen)
    # Referenced components are None here: diffusers warns "self.vae=None … cannot be saved" for each, per
    # export; they are recorded in pixsigma.json instead, so that warning is silenced for this call only.
    saver_log = logging.getLogger("diffusers.pipelines.pipeline_utils")
    level = saver_log.level
    saver_log.setLevel(logging.ERROR)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
    finally:
        saver_log.setLevel(level)
    save_null_caption(model, tmp / "transformer")  # the null caption and its mode travel with the weights
    if model.config.kv_compress_layers:
        ship_kv_transformer_code(tmp)
    factor = components.vae_downsample()
    info = {
        "format": INFO_FORMAT,
        "model": {**dataclasses.asdict(model.config), "grad_checkpointing": False},
        "max_token_length": model.config.max_token_length,
        "prompt_case": model.config.prompt_case,
        "diffusers_call": diffusers_call(model, factor),
        **prompt_case_note(model),
        "resolution": model_resolution(model, factor),
        "vae_scaling_factor": components.vae_scaling_factor,
        "components_mode": mode,
        # Referenced components are loaded from these; copied ones were saved from them.
        "components": {name: components.ref(name).to_dict() for name in FROZEN_COMPONENTS},
        "sampling": {
            "scheduler": "DPMSolverMultistepScheduler (dpmsolver++, order 2)",
            "steps": 20,
            "cfg_scale": 4.5,
        },
        **(extra or {}),
    }
    atomic_write_bytes(tmp / INFO_FILE, json.dumps(info, indent=2, default=str).encode())
    _publish(tmp, folder)
    log.info("exported PixArtSigmaPipeline (%s, components %s) to %s",
             type(transformer).__name__, mode, folder)  # fmt: skip
    return folder


def diffusers_bin_table(model: PixArtSigma, vae_downsample: int) -> int | None:
    """The ``ASPECT_RATIO_<px>_BIN`` table (px) PixArtSigmaPipeline's default binning samples this model on, or
    None where that binning cannot sample it as trained: no table for its ``sample_size`` (diffusers raises
    "Invalid sample size": 4K's 360, the tiny preset's 8), or a VAE that does not downsample 8× (the table is
    picked as if it did: a 128 px model on a 4× VAE, sample_size 32, would be sampled on the 256 px table)."""
    from training.convert import diffusers_sample_size

    if vae_downsample != SD_VAE_DOWNSAMPLE:
        return None
    return DIFFUSERS_BIN_TABLES.get(diffusers_sample_size(model.config))


def diffusers_call(model: PixArtSigma, vae_downsample: int) -> dict:
    """Keyword arguments for ``PixArtSigmaPipeline.__call__`` that encode prompts as pixsigma-sample does, and,
    for a model diffusers' binning cannot sample as trained (``diffusers_bin_table`` is None: a 2880 px 4K export,
    a VAE that is not 8×), turn binning off instead of failing or resizing.

    No ``height``/``width``: the pipeline defaults both to ``transformer.config.sample_size * vae_scale_factor``
    with ``vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)`` (pipeline_pixart_sigma.py), which is
    the trained size (``model_resolution``), and a call naming its own size must not pass them twice.
    """
    call = {"max_sequence_length": model.config.max_token_length, "clean_caption": False}
    if diffusers_bin_table(model, vae_downsample) is None:
        call["use_resolution_binning"] = False
    return call


def prompt_case_note(model: PixArtSigma) -> dict:
    """``{"prompt_case_note": …}`` for a model whose prompts plain diffusers cannot case as trained (and a
    warning), else nothing."""
    if model.config.prompt_case == DIFFUSERS_PROMPT_CASE:
        return {}
    note = (
        f"trained on captions cased {model.config.prompt_case!r}: PixArtSigmaPipeline lowercases every prompt "
        "(and negative prompt) whatever its arguments, so a plain diffusers call samples this model on text it "
        "was not trained on; pixsigma-sample cases prompts as trained"
    )
    log.warning("export: %s", note)
    return {"prompt_case_note": note}


def ship_kv_transformer_code(folder: Path) -> None:
    """Put ``PixArtKVTransformer2DModel``'s code in ``transformer/`` and name it in ``model_index.json``: diffusers'
    custom components, so a process with torch + diffusers alone loads the pipeline with
    ``trust_remote_code=True`` (training/kv_processor.py imports nothing of ours: it travels as it is)."""
    from training import kv_processor

    code = Path(kv_processor.__file__).read_bytes()
    module = f"{KV_MODULE}_{hashlib.sha256(code).hexdigest()[:8]}"
    atomic_write_bytes(folder / "transformer" / f"{module}.py", code)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["transformer"] = [module, "PixArtKVTransformer2DModel"]
    atomic_write_bytes(index_path, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())


def export_weights(model: PixArtSigma, ema: PixArtSigma | None, run_dir: str | Path, cfg: TrainConfig, *,
                   stage: str | None = None) -> Path:  # fmt: skip
    """The trainer's exports: ``final/`` and ``final_ema/``, or with ``stage`` ``final/<stage>/`` and
    ``final_ema/<stage>/`` (checkpoint pruning never touches them), as pipelines that reference the run's
    T5 and that stage's VAE and scaling factor (T5-XXL is not copied into every export)."""
    if stage is not None and stage in PIPELINE_ENTRIES:
        raise ValueError(
            f"stage name {stage!r} collides with a pipeline entry of final/ ({PIPELINE_ENTRIES})"
        )
    stage_cfg = next(s for s in cfg.stages if s.name == stage) if stage else cfg.stages[-1]
    components = FrozenComponents.from_paths(cfg.text.t5, stage_cfg.vae, stage_cfg.vae_scaling_factor)
    extra = {"stage": stage_cfg.name, "train_config": dataclasses.asdict(cfg)}
    run_dir = Path(run_dir)
    for name, weights in (("final", model), ("final_ema", ema)):
        if weights is not None:
            export_pipeline(weights, run_dir / name / (stage or ""), components, extra=extra)
    return run_dir / "final" / (stage or "")


def is_exported(folder: str | Path) -> bool:
    """Whether ``folder`` holds a finished export (``pixsigma.json`` is written last)."""
    return (Path(folder) / INFO_FILE).is_file()


def _cpu_copy(model: PixArtSigma) -> PixArtSigma:
    import copy

    return copy.deepcopy(model).cpu().float()


def _publish(tmp: Path, folder: Path) -> None:
    """Move tmp's entries into folder (pixsigma.json last); drop pipeline entries this export has not."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INFO_FILE).unlink(missing_ok=True)  # an export in progress has no pixsigma.json
    for stale in (*PIPELINE_ENTRIES, *LEGACY_FILES):
        if not (tmp / stale).exists() and (folder / stale).exists():
            _remove(folder / stale)
    for entry in sorted(tmp.iterdir(), key=lambda p: p.name == INFO_FILE):
        target = folder / entry.name
        if target.exists():
            _remove(target)
        os.replace(entry, target)
    tmp.rmdir()


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


# --------------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------------


def read_info(folder: str | Path) -> dict | None:
    """``pixsigma.json`` of an export, or None for a folder diffusers or someone else wrote."""
    path = Path(folder) / INFO_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def frozen_components(folder: str | Path, *, t5: str | None = None, vae: str | None = None,
                      vae_scaling_factor: float | None = None) -> FrozenComponents:  # fmt: skip
    """Where a pipeline folder's tokenizer, T5 and VAE come from: the folder, pixsigma.json, or the overrides."""
    folder = Path(folder)
    index = json.loads((folder / "model_index.json").read_text())
    info = read_info(folder) or {}
    refs = {}
    for name in FROZEN_COMPONENTS:
        if index.get(name, [None])[0] is not None and (folder / name).is_dir():
            refs[name] = ComponentRef(str(folder), name)
        elif name in info.get("components", {}):
            refs[name] = ComponentRef(**info["components"][name])
    if t5 is not None:
        refs["tokenizer"] = refs["text_encoder"] = ComponentRef(local_or_id(t5))
    if vae is not None:
        refs["vae"] = ComponentRef(local_or_id(vae))
    missing = [name for name in FROZEN_COMPONENTS if name not in refs]
    if missing:
        raise ValueError(
            f"{folder}: no {', '.join(missing)} in the folder or its {INFO_FILE}; name them with --t5 / --vae"
        )
    if vae_scaling_factor is None:
        vae_scaling_factor = info.get("vae_scaling_factor")
    if vae_scaling_factor is None:
        vae_scaling_factor = _vae_config(refs["vae"])["scaling_factor"]
    return FrozenComponents(refs["tokenizer"], refs["text_encoder"], refs["vae"], float(vae_scaling_factor))


def _vae_config(ref: ComponentRef) -> dict:
    from diffusers import AutoencoderKL

    return dict(AutoencoderKL.load_config(ref.path, subfolder=ref.subfolder))


def load_frozen(
    components: FrozenComponents, *, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> dict:
    """{tokenizer, text_encoder, vae} loaded; the VAE's config carries the scaling factor trained with."""
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, T5EncoderModel

    tok, enc, vae_ref = components.tokenizer, components.text_encoder, components.vae
    tokenizer = AutoTokenizer.from_pretrained(tok.path, subfolder=tok.subfolder or "")
    text_encoder = T5EncoderModel.from_pretrained(enc.path, subfolder=enc.subfolder or "", dtype=dtype)
    vae = AutoencoderKL.from_pretrained(vae_ref.path, subfolder=vae_ref.subfolder, torch_dtype=dtype)
    if abs(float(vae.config.scaling_factor) - components.vae_scaling_factor) > 1e-9:
        log.info("VAE %s: scaling_factor %s → %s (the factor the DiT was trained with)",
                 vae_ref.path, vae.config.scaling_factor, components.vae_scaling_factor)  # fmt: skip
        vae.register_to_config(scaling_factor=components.vae_scaling_factor)
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder.to(device).eval(),
        "vae": vae.to(device).eval(),
    }


def load_pipeline(folder: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  t5: str | None = None, vae: str | None = None):  # fmt: skip
    """``PixArtSigmaPipeline`` from any export of ours (plain or KV, components copied or referenced).

    The pipeline is assembled from its parts, a KV transformer with our own class: nothing is executed from
    the folder's code copy (diffusers' ``from_pretrained`` would resolve it even for a passed component).
    """
    import diffusers
    from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel

    from training.kv_processor import PixArtKVTransformer2DModel

    components = frozen_components(folder, t5=t5, vae=vae)
    frozen = load_frozen(components, dtype=dtype, device=device)
    index = json.loads((Path(folder) / "model_index.json").read_text())
    kv = index["transformer"][1] == PixArtKVTransformer2DModel.__name__
    transformer_class = PixArtKVTransformer2DModel if kv else PixArtTransformer2DModel
    transformer = transformer_class.from_pretrained(folder, subfolder="transformer", dtype=dtype)
    scheduler = getattr(diffusers, index["scheduler"][1]).from_pretrained(folder, subfolder="scheduler")
    pipe = PixArtSigmaPipeline(transformer=transformer, scheduler=scheduler, **frozen)
    return pipe.to(device)
