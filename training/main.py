"""Train the PixArt-Σ DiT through the weak-to-strong schedule.

    torchrun --nproc_per_node=N training/main.py --config configs/debug.toml [--output RUN_DIR] [--set k=v]

The same command runs on a laptop (gloo, CPU, tiny preset) and on a GPU cluster (NCCL). ``main`` reads
as the story: setup → preflight (config, data, models: fail in seconds) → build → resume → for each
stage: transition, loop (checkpoints, validation), stage export → final export. Stages follow PixArt-Σ §3
(arXiv 2403.04692): each starts from the previous stage's weights, and the transitions (caption length
120 → 300 from PixArt-α weights, VAE swap, resolution up, KV compression on) keep every existing weight;
the EMA is re-seeded from the weights entering each stage (``reseed_ema``).

SIGTERM (pre-emption) checkpoints at the next step boundary on every rank and exits with code 143, a
stage's last step included (its validation and export then run on resume); the same command resumes
exactly where it stopped, the data stream (and what waits in its buckets) included.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
import json
import logging
import math
import os
import re
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from manifests.features import NULL_CAPTION_FILE, SD_VAE_DOWNSAMPLE
from manifests.io import atomic_write_bytes
from manifests.progress import quiet_library_bars
from training.checkpoint import capture_rng, load_latest, restore_rng, save_checkpoint
from training.config import OptimSection, StageSection, TrainConfig, load_config, to_dict
from training.convert import resolve_null_caption
from training.data import make_stream, stream_seed
from training.diffusion import GaussianDiffusion, sample
from training.encoders import (
    TEXT_FEATURES_FILE,
    CaptionEncoder,
    LatentEncoder,
    ShardFeatures,
    TextFeatures,
    compute_text_features,
    same_model,
    vae_downsample_factor,
    vae_scaling_factor,
)
from training.evaluate import evaluate_in_training, training_eval_prompts
from training.model import PRESETS, PixArtSigma, pe_params_for_resolution
from training.observe import MetricsSink, image_grid, peak_tflops, save_grid, train_flops
from training.pipeline import export_weights, is_exported
from training.ranks import exit_torchrun_worker
from training.val_loss import VAL_LOSS_FILE, HeldOutSample, load_held_out, validation_loss

log = logging.getLogger("training")

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what a scheduler expects from a job it terminated


class PreflightError(ValueError):
    """The config, the data or a model does not check out; the message names the field and the fix."""


class Preempted(SystemExit):
    """Raised after the SIGTERM checkpoint: the run stopped cleanly; the same command resumes it."""

    def __init__(self) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)


# ------------------------------------------------------------------------------------------------
# Setup
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Join the torchrun group (NCCL on CUDA, gloo on CPU); a plain `python` run is world size 1."""
    if "RANK" not in os.environ:
        return Dist(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = attempt_store(rank, world_size)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", store=store, rank=rank, world_size=world_size, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    return Dist(rank, world_size, device)


def attempt_store(rank: int, world_size: int) -> dist.Store:
    """torchrun's store, under a prefix per restart attempt.

    Under ``torchrun --max-restarts`` the restarted workers may meet the store of the attempt that died;
    without a prefix they can read the dead workers' addresses and hang connecting (seen here about one
    restart in two with gloo). A prefix naming TORCHELASTIC_RESTART_COUNT gives every attempt clean keys.
    """
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    timeout = datetime.timedelta(minutes=10)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # the agent hosts the store: clients only
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    else:
        store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout, multi_tenant=True)
    return dist.PrefixStore(f"pixsigma/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def setup_logging(env: Dist) -> None:
    """Human logs on rank 0; warnings and errors from every rank."""
    logging.basicConfig(
        level=logging.INFO if env.is_main else logging.WARNING,
        format=f"%(asctime)s [rank {env.rank}] %(name)s: %(message)s",
    )
    quiet_library_bars()  # no \r bars (T5's "Loading weights") in a log file


class StopRequest:
    """SIGTERM sets a flag; the ranks agree on it in the step's all-reduce and stop at the same step."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)

    def uninstall(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True


def write_resolved_config(cfg: TrainConfig, env: Dist, run_dir: Path) -> None:
    """``config.json`` (loadable back) and ``run.json`` (what the config resolved to on this launch)."""
    if not env.is_main:
        return
    atomic_write_bytes(run_dir / "config.json", json.dumps(to_dict(cfg), indent=2).encode())
    resolved = {
        "world_size": env.world_size,
        "device": str(env.device),
        "torch": torch.__version__,
        "null_caption": null_caption_mode(cfg),
        "prompt_case": cfg.text.prompt_case,  # how captions and prompts are cased before T5
        "stages": {
            s.name: {
                "global_batch": global_batch(s, cfg.optim, env.world_size),
                "lr": stage_lr(s, cfg.optim, global_batch(s, cfg.optim, env.world_size)),
                "pe_interpolation": s.pe_interpolation,
                "compile": compile_enabled(cfg, s),
            }
            for s in cfg.stages
        },
    }
    atomic_write_bytes(run_dir / "run.json", json.dumps(resolved, indent=2).encode())


def global_batch(stage: StageSection, optim: OptimSection, world_size: int) -> int:
    return stage.batch_size * optim.grad_accum_steps * world_size


def stage_lr(stage: StageSection, optim: OptimSection, batch: int) -> float:
    """Stage lr, or base lr scaled by √(global batch / 256) as PixArt's `auto_lr` (sqrt rule) does."""
    return stage.lr if stage.lr is not None else optim.base_lr * math.sqrt(batch / 256)


def lr_at(step: int, *, lr: float, warmup_steps: int) -> float:
    """Linear warm-up, then constant (PixArt-Σ's schedule)."""
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr


def compile_enabled(cfg: TrainConfig, stage: StageSection) -> bool:
    return cfg.model.compile if stage.compile is None else stage.compile


# ------------------------------------------------------------------------------------------------
# Preflight: everything that can be checked before a model is loaded
# ------------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def preflight(cfg: TrainConfig) -> ShardFeatures:
    """Check the data, the models and the stages against each other; one-line errors that name the fix."""
    check_shards(cfg.data.shards)
    features = ShardFeatures.read(cfg.data.shards)
    preset = PRESETS[cfg.model.preset]
    if cfg.model.init and not Path(cfg.model.init).exists():
        raise PreflightError(
            f"model.init = {cfg.model.init}: no such file or folder (a PixArt .pth or a model folder)"
        )
    for i, stage in enumerate(cfg.stages):
        bad = [k for k in stage.kv_compress_layers if not 0 <= k < preset.depth]
        if bad:
            raise PreflightError(
                f"stages.{i}.kv_compress_layers {bad}: preset {cfg.model.preset} has {preset.depth} blocks"
            )
    if cfg.val_loss.every:  # the held-out set is read from local tars and encoded by T5 and each stage's VAE
        shards = Path(cfg.val_loss.shards)
        if not shards.is_dir() or not any(shards.glob("train-*.tar")):
            raise PreflightError(f"val_loss.shards = {shards}: not a folder of train-*.tar (held-out shards)")
        if shards.resolve() == Path(cfg.data.shards).resolve():
            raise PreflightError("val_loss.shards is data.shards: the validation loss needs held-out images")
    cached_text = cfg.data.use_cached_features and features.has_text(cfg.text.t5)
    check_cached_text_case(cfg, features, cached=cached_text)
    if t5_needed(cfg, features, cached_text) or cfg.val_loss.every:
        check_model_source(cfg.text.t5, "text.t5")
    for i, stage in enumerate(cfg.stages):
        check_cached_vae(i, stage, features, use_cached=cfg.data.use_cached_features)
        cached = latents_cached(cfg, stage, features)
        if not cached or stage.validation_prompts or cfg.val_loss.every:
            check_model_source(stage.vae, f"stages.{i}.vae")
        check_vae_scaling(i, stage, features, cached=cached)
    run_vae_downsample(cfg)
    return features


def run_vae_downsample(cfg: TrainConfig) -> int:
    """Pixels per latent cell of the run's VAEs, read from their configs (``2 ** (len(block_out_channels) - 1)``,
    diffusers' ``vae_scale_factor``): 8 for SD/SDXL, 4 for the toy world's VAEs.

    One factor for the whole run: a VAE swap between factors would change the latent grid of every
    resolution under the same weights (the paper's swap, SD → SDXL VAE, keeps 8×), so it is refused. A VAE
    whose config cannot be read (a hub id not in the cache) counts as SD/SDXL's 8×, with a warning; its
    loader checks the factor again (``LatentEncoder``)."""
    patch = PRESETS[cfg.model.preset].patch_size
    factors = []
    for i, stage in enumerate(cfg.stages):
        factor = vae_downsample_factor(stage.vae)
        if factor is None:
            log.warning("stages.%d: cannot read the config of VAE %s; assuming SD/SDXL's %d× downsample",
                        i, stage.vae, SD_VAE_DOWNSAMPLE)  # fmt: skip
            factor = SD_VAE_DOWNSAMPLE
        if stage.resolution % (factor * patch):
            raise PreflightError(
                f"stages.{i}.resolution = {stage.resolution} must be a multiple of {factor * patch} "
                f"(VAE {stage.vae} downsamples {factor}×, patch {patch})"
            )
        factors.append(factor)
    if len(set(factors)) > 1:
        pairs = enumerate(zip(cfg.stages, factors, strict=True))
        listed = ", ".join(f"stages.{i}.vae {stage.vae}: {factor}×" for i, (stage, factor) in pairs)
        raise PreflightError(
            f"the stages' VAEs downsample by different factors ({listed}): a VAE swap must keep the latent grid; "
            "use VAEs with the same number of blocks (block_out_channels) in every stage"
        )
    return factors[0]


def check_shards(shards: str) -> None:
    """``data.shards`` names a folder of train-*.tar, a tar, or a pattern/URL (checked when opened)."""
    fix = "pass --set data.shards=<the train_shards/<name> folder written by manifests.materialize>"
    if not shards:
        raise PreflightError(f"data.shards is empty: {fix}")
    if "://" in shards or any(c in shards for c in "*?[{"):
        return
    path = Path(shards)
    if not path.exists():
        raise PreflightError(f"data.shards = {shards} does not exist: {fix}")
    if path.is_dir() and not any(path.glob("train-*.tar")):
        raise PreflightError(f"data.shards = {shards} holds no train-*.tar: {fix}")


def check_model_source(value: str, name: str) -> None:
    """A model named by local path, or by hub id (cached, or the hub reachable); else a one-line error."""
    if Path(value).exists():
        return
    if not _HUB_ID.fullmatch(value):
        raise PreflightError(
            f"{name} = {value}: no such folder (pass a local model folder or a hub id like org/name)"
        )
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(value, "config.json"), str):
            raise PreflightError(
                f"{name} = {value}: not a local folder and not in the hub cache, and HF_HUB_OFFLINE is set; "
                f"download it first or pass a local path"
            )


def latents_cached(cfg: TrainConfig, stage: StageSection, features: ShardFeatures) -> bool:
    """Whether the stage reads the shards' cached latents (same VAE, resolution cached) or encodes them."""
    use = cfg.data.use_cached_features and not stage.vae_on_the_fly
    return use and features.has_latents(stage.vae, stage.resolution)


def check_cached_vae(index: int, stage: StageSection, features: ShardFeatures, *, use_cached: bool) -> None:
    """Shards that cache the stage's resolution with another VAE are refused, unless the stage asks for its
    VAE on the fly (silently encoding would run a VAE the user did not expect, at a cost they did not plan)."""
    cached_here = features.vae is not None and stage.resolution in features.vae_resolutions
    if not use_cached or stage.vae_on_the_fly or not cached_here or same_model(features.vae, stage.vae):
        return
    raise PreflightError(
        f"stages.{index}.vae = {stage.vae}, but the shards' cached latents at {stage.resolution} px were made "
        f"with VAE {features.vae}: set --set stages.{index}.vae={features.vae}, or --set "
        f"stages.{index}.vae_on_the_fly=true to encode with {stage.vae} on the fly"
    )


def check_cached_text_case(cfg: TrainConfig, features: ShardFeatures, *, cached: bool) -> None:
    """Cached T5 features cased otherwise than ``text.prompt_case`` are refused: training on them and sampling
    with the other case would make every prompt a text the model never saw (shards.json records the case)."""
    if not cached or features.prompt_case == cfg.text.prompt_case:
        return
    raise PreflightError(
        f"text.prompt_case = {cfg.text.prompt_case!r}, but the shards' cached T5 features were cased "
        f"{features.prompt_case!r} (shards.json): materialize them again with --prompt-case "
        f"{cfg.text.prompt_case}, set --set text.prompt_case={features.prompt_case}, or --set "
        "data.use_cached_features=false to encode captions on the fly"
    )


def check_vae_scaling(index: int, stage: StageSection, features: ShardFeatures, *, cached: bool) -> None:
    """The stage's vae_scaling_factor must be its VAE's: the one recorded with cached latents, else the VAE's."""
    recorded = features.vae_scaling_factor if cached else None
    source = f"shards.json (latents made with {features.vae})"
    if recorded is None:
        recorded, source = vae_scaling_factor(stage.vae), f"the config of VAE {stage.vae}"
    if recorded is None:
        log.warning("stages.%d: cannot read the scaling factor of VAE %s to check it", index, stage.vae)
    elif abs(recorded - stage.vae_scaling_factor) > 1e-6:
        raise PreflightError(
            f"stages.{index}.vae_scaling_factor = {stage.vae_scaling_factor}, but {source} says {recorded}: "
            f"set --set stages.{index}.vae_scaling_factor={recorded}"
        )


def t5_needed(cfg: TrainConfig, features: ShardFeatures, cached_text: bool) -> bool:
    """Whether this launch loads T5: captions on the fly, or text features not yet saved in the run folder."""
    if not cached_text:
        return True
    key = text_features_key(cfg)
    if TextFeatures.load(Path(cfg.run_dir) / TEXT_FEATURES_FILE, key) is not None:
        return False
    has_null = (Path(cfg.data.shards) / NULL_CAPTION_FILE).exists()
    return bool(key["prompts"]) or key["mode"] == "upstream" or not has_null


# ------------------------------------------------------------------------------------------------
# Build
# ------------------------------------------------------------------------------------------------


def null_caption_mode(cfg: TrainConfig) -> str:
    """``text.null_caption``, with ``auto`` resolved by the one rule (training.convert.resolve_null_caption):
    upstream for official weights, an init's own, else diffusers."""
    return resolve_null_caption(cfg.text.null_caption, cfg.model.init)


def text_features_key(cfg: TrainConfig) -> dict:
    """What the saved text features depend on: the validation prompts and, when the run evaluates while it
    trains, the eval subset's prompts, so that T5 is never loaded again after the start."""
    prompts = {p for s in cfg.stages for p in s.validation_prompts}
    if cfg.evaluation.every:
        prompts.update(training_eval_prompts(cfg.evaluation))
    prompts = sorted(prompts)
    return {
        "t5": cfg.text.t5,
        "max_tokens": cfg.text.max_tokens,
        "mode": null_caption_mode(cfg),
        "prompt_case": cfg.text.prompt_case,
        "prompts": prompts,
    }


def prepare_text_features(cfg: TrainConfig, env: Dist, text: CaptionEncoder) -> TextFeatures:
    """The null caption and validation prompts' T5 states: rank 0 computes them once (T5 freed after)."""
    path, key = Path(cfg.run_dir) / TEXT_FEATURES_FILE, text_features_key(cfg)
    if env.is_main and TextFeatures.load(path, key) is None:
        cached_null = Path(cfg.data.shards) / NULL_CAPTION_FILE
        features = compute_text_features(
            cfg.text.t5, max_tokens=cfg.text.max_tokens, mode=key["mode"], prompts=key["prompts"],
            prompt_case=cfg.text.prompt_case, device=env.device, cached_null=cached_null if text.cached and cached_null.exists() else None,
            encoder=None if text.cached else text.t5,
        )  # fmt: skip
        features.save(path, key)
    if env.world_size > 1:
        dist.barrier()
    features = TextFeatures.load(path, key)
    assert features is not None
    return features


def build_model(cfg: TrainConfig, text: TextFeatures, device: torch.device, *, vae_downsample: int) -> PixArtSigma:
    """The preset sized to the caption features, optionally from external weights, with T5("") as null."""
    first = cfg.stages[0]
    base_size, _ = pe_params_for_resolution(
        first.resolution, patch_size=PRESETS[cfg.model.preset].patch_size, vae_downsample=vae_downsample
    )
    model_cfg = dataclasses.replace(
        PRESETS[cfg.model.preset],
        caption_channels=text.null.shape[1],
        max_token_length=cfg.text.max_tokens,
        base_size=base_size,
        pe_interpolation=first.pe_interpolation,
        kv_compress_layers=(),  # KV compression comes with the stage that turns it on
        grad_checkpointing=cfg.model.grad_checkpointing,
    )
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = PixArtSigma(model_cfg)
    if cfg.model.init:
        load_init(model, cfg.model.init)
    mode = null_caption_mode(cfg)
    model.set_null_caption(text.null, text.null_mask, mode=mode)
    model.set_prompt_case(cfg.text.prompt_case)  # travels with every checkpoint and export of the model
    log.info("null caption: %s (%d tokens stored); prompts cased %s", mode, text.null.shape[0],
             cfg.text.prompt_case)  # fmt: skip
    return model.to(device)


def load_init(model: PixArtSigma, path: str) -> None:
    """External init: a PixArt-α/Σ ``.pth``, one of our folders, or a diffusers transformer folder.

    KV compression comes from the source (its keys, or its config); a different caption length (PixArt-α
    stores 120 tokens, Σ 300) is the α → Σ transition: the source's null caption is replaced by ours.
    """
    from training.convert import FORMAT_NAME, load_model, load_original_checkpoint

    source_path = Path(path)
    if source_path.suffix in (".pth", ".pt"):
        source = load_original_checkpoint(source_path, model.config)
    elif json.loads((source_path / "config.json").read_text()).get("format") == FORMAT_NAME:
        source = load_model(source_path)
    else:
        source = _load_diffusers_folder(source_path, model.config.max_token_length)
    shape = ("depth", "hidden_size", "num_heads", "patch_size", "in_channels", "caption_channels")
    wrong = {
        k: getattr(source.config, k) for k in shape if getattr(source.config, k) != getattr(model.config, k)
    }
    if wrong:
        raise ValueError(f"model.init {path} has {wrong}; model.preset differs there")
    if source.config.kv_compress_layers:
        model.enable_kv_compression(source.config.kv_compress_layers, source.config.kv_compress_ratio)
    if source.config.max_token_length != model.config.max_token_length:
        log.info(
            "caption tokens %d → %d (PixArt-α → Σ): the init's null caption is replaced by T5(\"\")",
            source.config.max_token_length, model.config.max_token_length,
        )  # fmt: skip
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("y_embedder.y_")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("y_embedder.y_") for k in missing), (missing, unexpected)
    log.info("initialised from %s", path)


def _load_diffusers_folder(path: Path, max_token_length: int) -> PixArtSigma:
    """A diffusers transformer folder; its "no null-caption buffer" warning is moot here (the trainer sets it)."""
    from training import convert

    previous = convert.logger.level
    convert.logger.setLevel(logging.ERROR)
    try:
        return convert.load_diffusers(path, max_token_length=max_token_length)
    finally:
        convert.logger.setLevel(previous)


def apply_stage(model: PixArtSigma, stage: StageSection, *, vae_downsample: int) -> list[str]:
    """The transition into ``stage``: resolution (PE interpolation) and KV compression; returns new params.

    Every existing weight is kept. The PE is a function of the grid, base size and pe_interpolation, so a
    resolution change is a config change (PixArt-Σ: usable after ~100 steps). New KV-compression layers
    start at Conv Avg Init (PixArt-Σ §3.2), or the conv's default init for ``kv_compress_init = "random"``
    (the paper's ablation). A VAE swap changes no weight: the trainer swaps the encoder.
    """
    base_size, _ = pe_params_for_resolution(
        stage.resolution, patch_size=model.config.patch_size, vae_downsample=vae_downsample
    )  # PixArt: resolution // 8 // patch; the token grid of the run's VAE here
    model.set_resolution(base_size, stage.pe_interpolation)
    before = set(model.state_dict())
    if set(stage.kv_compress_layers) - set(model.config.kv_compress_layers):
        model.enable_kv_compression(
            stage.kv_compress_layers, stage.kv_compress_ratio, init=stage.kv_compress_init
        )
    return sorted(set(model.state_dict()) - before)


def enter_stage(
    model: PixArtSigma,
    ema: PixArtSigma | None,
    previous: StageSection | None,
    stage: StageSection,
    *,
    quiet: bool,
    vae_downsample: int,
) -> None:
    """Apply the transition to the model, re-seed its EMA, log what changed (PixArt-Σ's weak-to-strong)."""
    new_params = apply_stage(model, stage, vae_downsample=vae_downsample)
    if ema is not None:
        apply_stage(ema, stage, vae_downsample=vae_downsample)  # the same transition (PE, KV layers), so the state dicts match
        reseed_ema(ema, model)
    if quiet:
        return
    changes = []
    if previous is None or previous.resolution != stage.resolution:
        changes.append(f"resolution {previous.resolution if previous else '-'}→{stage.resolution} px "
                       f"(pe_interpolation {stage.pe_interpolation})")  # fmt: skip
    if previous is not None and (previous.vae, previous.vae_scaling_factor) != (
        stage.vae,
        stage.vae_scaling_factor,
    ):
        changes.append(f"VAE swap {previous.vae}→{stage.vae} (scaling {stage.vae_scaling_factor})")
    if new_params:
        changes.append(f"KV compression R={stage.kv_compress_ratio} on layers {list(stage.kv_compress_layers)} "
                       f"({len(new_params)} new tensors at {stage.kv_compress_init} init)")  # fmt: skip
    log.info("stage %s: %s", stage.name, "; ".join(changes) or "same model, same data")


def wrap_model(model: PixArtSigma, stage: StageSection, cfg: TrainConfig, env: Dist) -> torch.nn.Module:
    """The module the loop calls: blocks compiled or not for this stage, inside DDP when distributed.

    The blocks are compiled, not the DDP wrapper: DDP stays the outer module (``no_sync`` is found and
    used), the PE and embeddings stay eager, and with dynamic shapes every bucket shares one graph.
    """
    compiled = compile_enabled(cfg, stage)
    model.set_compile(compiled, backend=cfg.model.compile_backend)
    if compiled:
        log.info("stage %s: blocks compiled (%s, dynamic shapes)", stage.name, cfg.model.compile_backend)
    return DistributedDataParallel(model) if env.world_size > 1 else model


def build_optimizer(model: torch.nn.Module, optim: OptimSection, lr: float) -> torch.optim.Optimizer:
    """CAME (PixArt-Σ's optimiser) or AdamW, each with its own betas/eps, over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if optim.name == "came":
        from came_pytorch import CAME

        return CAME(params, lr=lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(
        params, lr=lr, betas=optim.betas, eps=optim.eps[0], weight_decay=optim.weight_decay
    )


@torch.no_grad()
def reseed_ema(ema: PixArtSigma, model: PixArtSigma) -> None:
    """EMA ← the weights entering the stage: each stage's EMA averages that stage's weights only.

    PixArt-Σ keeps no EMA (train_scripts/train.py builds none and saves none; ``ema_rate`` in
    configs/PixArt_xl2_internal.py is unread, and a stage starts from the previous stage's raw
    ``state_dict`` with ``load_ema=False``). An EMA carried across a transition would, at 0.9999 over a
    2K-step stage, still be 0.9999^2000 ≈ 82 % the previous stage's weights (SD-VAE latents, another
    resolution). Re-seeding from the raw weights at every transition is the nearest to upstream: the stage
    starts from the same raw weights as theirs, and ``final_ema/<stage>/`` is an average of that stage alone.
    """
    ema.load_state_dict(model.state_dict())


@torch.no_grad()
def update_ema(ema: PixArtSigma, model: PixArtSigma, decay: float) -> None:
    """ema ← decay·ema + (1 - decay)·model, in fp32 (the EMA never sees bf16)."""
    ema_params = list(ema.parameters())
    torch._foreach_lerp_(ema_params, [p.detach().float() for p in model.parameters()], 1.0 - decay)


def load_resume(run_dir: Path, env: Dist) -> dict | None:
    """The newest complete checkpoint that loads; rank 0 picks it and every rank loads the same one."""
    found = load_latest(run_dir) if env.is_main else None
    names = [str(found[0]) if found else None]
    if env.world_size > 1:
        dist.broadcast_object_list(names, src=0)
    if names[0] is None:
        return None
    state = (
        found[1] if found else torch.load(Path(names[0]) / "state.pt", map_location="cpu", weights_only=True)
    )
    if len(state["rng"]) != env.world_size:
        log.warning(
            "checkpoint from %d ranks, now %d: RNG states reseeded", len(state["rng"]), env.world_size
        )
    position = state["position"]
    log.info("resuming from %s (stage %s, step %d)", names[0], position["stage"], position["step"])
    return state


# ------------------------------------------------------------------------------------------------
# The story
# ------------------------------------------------------------------------------------------------


def main(cfg: TrainConfig) -> Path:
    """Run every stage of ``cfg`` (resuming from the newest checkpoint); returns the run folder.

    Raises ``Preempted`` (exit code 143) after the checkpoint a SIGTERM asked for.
    """
    features = preflight(cfg)  # before any process group or model: a config error costs seconds
    env = setup_distributed()
    setup_logging(env)
    stop = StopRequest()
    stop.install()
    try:
        return run(cfg, env, features, stop)
    finally:
        stop.uninstall()
        if dist.is_initialized():
            dist.destroy_process_group()
            gc.collect()  # DDP's hook cycles, which hold the group, go now rather than at interpreter exit


def run(cfg: TrainConfig, env: Dist, features: ShardFeatures, stop: StopRequest) -> Path:
    """Build → resume → every stage → final export (the story ``main`` sets up and tears down)."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_resolved_config(cfg, env, run_dir)

    # Build: T5 runs once for the null caption and the prompts (then freed); its width sizes the model.
    cached_text = cfg.data.use_cached_features and features.has_text(cfg.text.t5)
    text = CaptionEncoder(cfg.text.t5, max_tokens=cfg.text.max_tokens, device=env.device, cached=cached_text,
                          prompt_case=cfg.text.prompt_case)  # fmt: skip
    text_features = prepare_text_features(cfg, env, text)
    vae_downsample = run_vae_downsample(cfg)  # one factor for every stage (checked at preflight)
    model = build_model(cfg, text_features, env.device, vae_downsample=vae_downsample)
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.optim.ema_decay else None
    diffusion = GaussianDiffusion()

    resume = load_resume(run_dir, env)
    position = resume["position"] if resume else {"stage_index": 0, "step": 0, "global_step": 0}
    torch.manual_seed(cfg.seed * 7919 + env.rank + 1)  # per-rank randomness, restored on resume
    metrics = MetricsSink(
        run_dir, cfg.log, enabled=env.is_main, total_steps=sum(s.steps for s in cfg.stages),
        resume_global_step=position["global_step"],
    )  # fmt: skip
    global_step = position["global_step"]
    try:
        for index, stage in enumerate(cfg.stages):
            previous = cfg.stages[index - 1] if index else None
            enter_stage(model, ema, previous, stage, quiet=index < position["stage_index"],
                        vae_downsample=vae_downsample)  # fmt: skip
            if index < position["stage_index"]:
                continue
            stage_resume = resume if resume is not None and index == position["stage_index"] else None
            global_step = train_stage(
                cfg, index, model, ema, diffusion, text, text_features, env, metrics, features, stop,
                global_step=global_step, resume=stage_resume, resumed_run=resume is not None,
                vae_downsample=vae_downsample,
            )  # fmt: skip
    finally:
        metrics.close()
    if env.is_main:
        export(model, ema, run_dir, cfg)
    if env.world_size > 1:
        dist.barrier()
    return run_dir


def train_stage(
    cfg: TrainConfig,
    index: int,
    model: PixArtSigma,
    ema: PixArtSigma | None,
    diffusion: GaussianDiffusion,
    text: CaptionEncoder,
    text_features: TextFeatures,
    env: Dist,
    metrics: MetricsSink,
    features: ShardFeatures,
    stop: StopRequest,
    *,
    global_step: int,
    resume: dict | None,
    resumed_run: bool,
    vae_downsample: int,
) -> int:
    """One stage: fresh optimiser, its VAE, its data; the loop; returns the global step after it."""
    stage = cfg.stages[index]
    start_step = resume["position"]["step"] if resume else 0
    if resume:
        restore_weights(model, ema, resume)
    cached = latents_cached(cfg, stage, features)
    latents = LatentEncoder(
        stage.vae, scaling_factor=stage.vae_scaling_factor, device=env.device, cached=cached,
        downsample=vae_downsample,
    )  # fmt: skip
    if start_step >= stage.steps:  # resumed from this stage's last checkpoint: its end, if not done yet
        finish_stage(model, ema, stage=stage, text_features=text_features, latents=latents, cfg=cfg, env=env,
                     metrics=metrics, global_step=global_step, stop=stop, resumed=True)  # fmt: skip
        if stop_agreed(stop, env):  # a SIGTERM during the export: exit before the next stage
            raise Preempted()
        return global_step
    log.info("stage %s: latents %s, captions %s", stage.name, "cached" if cached else "VAE on the fly",
             "cached" if text.cached else "T5 on the fly")  # fmt: skip
    lr = stage_lr(stage, cfg.optim, global_batch(stage, cfg.optim, env.world_size))
    optimizer = build_optimizer(model, cfg.optim, lr)
    generator = torch.Generator(device=env.device).manual_seed(cfg.seed * 104_729 + index * 1_009 + env.rank)
    nonfinite, skip = restore_stage(resume, optimizer, generator, cfg, env) if resume else (0, 0)
    held_out = held_out_set(cfg, stage, latents, text, env) if cfg.val_loss.every and not resume else None
    if held_out is not None:  # the stage's starting point: what the transition cost
        log_val_loss(
            model, diffusion, held_out, cfg, env, metrics, stage=stage, step=0, global_step=global_step
        )
    model.train()
    net = wrap_model(model, stage, cfg, env)
    peak = peak_tflops(env.device, cfg.log.peak_tflops)
    # One stream for the whole stage: what waits in its bucket buffers at a checkpoint stays there (issue 20).
    stream = open_stream(cfg, stage, index, env, latents, text.cached, model, skip=skip)

    for step in range(start_step, stage.steps):
        inject_faults(cfg, global_step, env.rank, resumed_run=resumed_run)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr=lr, warmup_steps=stage.warmup_steps)
        out = train_step(net, model, stream, diffusion, text, latents, generator, cfg, env, global_step, stop)
        if out["finite"]:
            optimizer.step()
            if ema is not None:
                update_ema(ema, model, cfg.optim.ema_decay)
            nonfinite = 0
        else:
            nonfinite = skip_nonfinite(stage, step, nonfinite + 1, cfg)
        optimizer.zero_grad(set_to_none=True)
        global_step += 1
        last = step + 1 == stage.steps
        record = {"stage": stage.name, "step": step, "global_step": global_step, "lr": optimizer.param_groups[0]["lr"],
                  **{k: out[k] for k in ("loss", "mse", "vb", "latent_std", "grad_norm", "samples", "partial_batches")},
                  "batches": cfg.optim.grad_accum_steps * env.world_size,
                  "skipped": not out["finite"], "force": last or out["stop"]}  # fmt: skip
        metrics.step(record, seconds=out["seconds"], data_seconds=out["data_seconds"],
                     images=out["samples"], flops=out["flops"] * env.world_size, peak=peak)  # fmt: skip
        if last or out["stop"] or (step + 1) % cfg.checkpoint_every == 0:
            save_state(cfg, env, index, step + 1, global_step, model, ema, optimizer, generator, nonfinite)
        if out["stop"]:  # the last step of a stage too: its validation and export run on resume
            log.warning("SIGTERM: checkpoint at stage %s step %d saved; rerun the same command to resume",
                        stage.name, step + 1)  # fmt: skip
            raise Preempted()
        if cfg.val_loss.every and ((step + 1) % cfg.val_loss.every == 0 or step + 1 == stage.steps):
            if held_out is None:  # a resumed stage: built at its first evaluation
                held_out = held_out_set(cfg, stage, latents, text, env)
            log_val_loss(model, diffusion, held_out, cfg, env, metrics, stage=stage, step=step + 1,
                         global_step=global_step)  # fmt: skip
        if last:  # the stage's end (validation, evaluation, export): finish_stage, also on resume
            break
        validating = bool(cfg.validation.every) and (step + 1) % cfg.validation.every == 0
        evaluating = bool(cfg.evaluation.every) and (step + 1) % cfg.evaluation.every == 0
        if validating:
            validate(model, ema, stage, text_features, latents, cfg, env, metrics, global_step)
        if evaluating:  # issue 12: FID / CLIP score
            # The weights this stage trains (as PixArt's log_validation samples its model), not the EMA.
            evaluate_in_training(model, cfg, stage, text_features, latents, env, metrics, global_step)
        if (validating or evaluating) and stop_agreed(stop, env):  # a SIGTERM while they ran: exit now
            if (step + 1) % cfg.checkpoint_every:
                save_state(
                    cfg, env, index, step + 1, global_step, model, ema, optimizer, generator, nonfinite
                )
            log.warning("SIGTERM during validation/evaluation: checkpoint at stage %s step %d saved; rerun the "
                        "same command to resume", stage.name, step + 1)  # fmt: skip
            raise Preempted()
    finish_stage(model, ema, stage=stage, text_features=text_features, latents=latents, cfg=cfg, env=env,
                 metrics=metrics, global_step=global_step, stop=stop, resumed=False)  # fmt: skip
    if stop_agreed(stop, env):  # a SIGTERM during the export: its last step's checkpoint is the state
        log.warning("SIGTERM: stage %s done and checkpointed; rerun the same command to resume", stage.name)
        raise Preempted()
    return global_step


def held_out_set(
    cfg: TrainConfig, stage: StageSection, latents: LatentEncoder, text: CaptionEncoder, env: Dist
) -> list[HeldOutSample] | None:
    """Rank 0's held-out samples for ``stage``: its resolution, its VAE's posterior mean, T5 of the orig captions."""
    if not env.is_main:
        return None
    vae = latents.vae  # loaded if the stage reads cached latents (the held-out set is always encoded)

    def encode_pixels(pixels: torch.Tensor) -> torch.Tensor:
        mean, _ = vae.posterior(pixels)  # (1, C, h, w)
        return mean * latents.scaling_factor

    return load_held_out(
        cfg.val_loss.shards, num_samples=cfg.val_loss.num_samples, resolution=stage.resolution,
        encode_pixels=encode_pixels, encode_captions=text.encode,
    )  # fmt: skip


def log_val_loss(
    model: PixArtSigma,
    diffusion: GaussianDiffusion,
    held_out: list[HeldOutSample] | None,
    cfg: TrainConfig,
    env: Dist,
    metrics: MetricsSink,
    *,
    stage: StageSection,
    step: int,
    global_step: int,
) -> None:
    """Rank 0: the deterministic held-out loss per timestep and mean → RUN/val_loss.jsonl and TensorBoard."""
    if env.is_main and held_out is not None:
        section = cfg.val_loss
        values = validation_loss(model, diffusion, held_out, timesteps=section.timesteps, seed=section.seed,
                                 batch_size=section.batch_size)  # fmt: skip
        record = {"stage": stage.name, "step": step, "global_step": global_step, **values}
        metrics.extra(VAL_LOSS_FILE, record, prefix="val_loss")
        log.info("stage %s step %d: val loss %.4f (%s)", stage.name, step, values["mean"],
                 ", ".join(f"{k} {x:.4f}" for k, x in values.items() if k != "mean"))  # fmt: skip
    if env.world_size > 1:
        dist.barrier()


def restore_weights(model: PixArtSigma, ema: PixArtSigma | None, resume: dict) -> None:
    """The checkpoint's weights and EMA; an EMA the checkpoint lacks starts from its weights."""
    model.load_state_dict(resume["model"])
    if ema is not None and resume["ema"] is not None:
        ema.load_state_dict(resume["ema"])
    elif ema is not None:  # a checkpoint without one (ema_decay turned on since): the resumed weights
        log.warning("checkpoint has no EMA (optim.ema_decay was 0): EMA re-seeded from its weights")
        reseed_ema(ema, model)


def restore_stage(
    resume: dict, optimizer: torch.optim.Optimizer, generator: torch.Generator, cfg: TrainConfig, env: Dist
) -> tuple[int, int]:
    """The optimiser and this rank's RNG as checkpointed; returns (non-finite streak, batches of the stage's
    stream read before the checkpoint)."""
    optimizer.load_state_dict(resume["optimizer"])
    if len(resume["rng"]) == env.world_size:
        restore_rng(resume["rng"][env.rank], generator)
    return resume["nonfinite_streak"], stage_batches_read(resume, cfg, env)


def finish_stage(
    model: PixArtSigma,
    ema: PixArtSigma | None,
    *,
    stage: StageSection,
    text_features: TextFeatures,
    latents: LatentEncoder,
    cfg: TrainConfig,
    env: Dist,
    metrics: MetricsSink,
    global_step: int,
    stop: StopRequest,
    resumed: bool,
) -> None:
    """A stage's end: validation grids, the stage-end evaluation (FID / CLIP score), then ``final/<stage>/``.

    Resumed from the stage's last checkpoint, only what the stopped run did not do: the ``stage_end``
    marker says validation and evaluation are done (an export, written after them, says so too). A SIGTERM
    that arrives while they run exits before the export (``Preempted``); the resumed run exports.
    """
    run_dir = Path(cfg.run_dir)
    exported = cfg.export_stages and is_exported(run_dir / "final" / stage.name)
    if not (resumed and (exported or stage_end_done(run_dir, stage, global_step))):
        validate(model, ema, stage, text_features, latents, cfg, env, metrics, global_step)
        if cfg.evaluation.every and stage.steps % cfg.evaluation.every == 0:  # as an uninterrupted loop would
            evaluate_in_training(model, cfg, stage, text_features, latents, env, metrics, global_step)
        if env.is_main:
            atomic_write_bytes(
                stage_end_marker(run_dir, stage), json.dumps({"global_step": global_step}).encode()
            )
        if env.world_size > 1:
            dist.barrier()
        if stop_agreed(stop, env):
            log.warning("SIGTERM during stage %s's end: exiting before its export; rerun the same command to "
                        "resume (the export runs then)", stage.name)  # fmt: skip
            raise Preempted()
    export_stage(model, ema, stage, cfg, env)


def stage_end_marker(run_dir: Path, stage: StageSection) -> Path:
    """Written once a stage's validation grids and evaluation are done (before its export)."""
    return run_dir / "stage_end" / f"{stage.name}.json"


def stage_end_done(run_dir: Path, stage: StageSection, global_step: int) -> bool:
    """Whether this stage's end (at ``global_step``) already validated and evaluated."""
    marker = stage_end_marker(run_dir, stage)
    return marker.is_file() and json.loads(marker.read_text()).get("global_step") == global_step


def stop_agreed(stop: StopRequest, env: Dist) -> bool:
    """Whether any rank has a SIGTERM pending (one all-reduce, so every rank stops at the same point)."""
    flag = torch.tensor(float(stop.requested), device=env.device)
    if env.world_size > 1:
        dist.all_reduce(flag)
    return bool(flag.item() > 0)


def skip_nonfinite(stage: StageSection, step: int, streak: int, cfg: TrainConfig) -> int:
    """Warn about a skipped non-finite step; abort after faults.max_nonfinite_steps in a row."""
    log.warning("stage %s step %d: non-finite loss/gradient; step skipped on every rank", stage.name, step)
    if streak >= cfg.faults.max_nonfinite_steps:
        raise FloatingPointError(
            f"stage {stage.name} step {step}: {streak} non-finite steps in a row "
            f"(faults.max_nonfinite_steps={cfg.faults.max_nonfinite_steps}); aborting. Lower the lr, "
            f"check grad_clip and the data; the last good checkpoint is under {cfg.run_dir}/checkpoints"
        )
    return streak


def open_stream(
    cfg: TrainConfig,
    stage: StageSection,
    index: int,
    env: Dist,
    latents: LatentEncoder,
    cached_text: bool,
    model: PixArtSigma,
    *,
    skip: int = 0,
):
    """This rank's batches for one stage, from its ``skip``-th on (see training/data.py on resume)."""
    d = cfg.data
    return make_stream(
        d.shards, resolution=stage.resolution, batch_size=stage.batch_size, seed=stream_seed(cfg.seed, index),
        rank=env.rank, num_workers=d.num_workers, skip=skip, real_prompt_ratio=d.real_prompt_ratio,
        shuffle_buffer=d.shuffle_buffer, shuffle_buffer_mb=d.shuffle_buffer_mb, bucket_buffer_mb=d.bucket_buffer_mb,
        cached_latents=latents.cached, cached_text=cached_text, caption_channels=model.config.caption_channels,
        latent_channels=model.config.in_channels, bucket_rule=d.bucket_rule, vae_downsample=latents.downsample,
    )  # fmt: skip


def train_step(
    net: torch.nn.Module,
    model: PixArtSigma,
    stream,
    diffusion: GaussianDiffusion,
    text: CaptionEncoder,
    latents: LatentEncoder,
    generator: torch.Generator,
    cfg: TrainConfig,
    env: Dist,
    global_step: int,
    stop: StopRequest | None = None,
) -> dict:
    """Forward/backward over grad_accum_steps micro-batches, clip, and agree on finiteness and stop across ranks.

    Every sample weighs the same in the step, whatever the size of its micro-batch (issue 20: a short batch
    from the bucket sampler must not weigh more per sample): the loss is the sum of per-sample losses over
    the step's global sample count (all micro-batches, all ranks; one small all-reduce before the forward).
    DDP averages gradients over ranks, so each rank scales by world_size / count, and the averaged gradient
    is that of the mean over every sample of the step. Gradients are all-reduced on the last micro-batch
    only (``no_sync`` on the others). Captions are dropped for classifier-free guidance here (probability
    class_dropout_prob, and always for a sample with no caption), with the trainer's seeded generator.
    """
    started = time.perf_counter()
    num_micro = cfg.optim.grad_accum_steps
    autocast = env.device.type == "cuda" and cfg.optim.mixed_precision == "bf16"
    batches = [next(stream) for _ in range(num_micro)]
    data_seconds = time.perf_counter() - started
    num_samples, num_partial = step_counts(batches, env)
    scale = env.world_size / num_samples  # DDP's mean over ranks × this = the mean over the step's samples
    sums = torch.zeros(4, device=env.device)  # loss, mse, vb: sums over samples; latent std: mean
    flops = 0
    for micro, batch in enumerate(batches):
        x0 = latents(batch, generator)  # (B, 4, h, w), scaled
        y, mask = text(batch)  # (B, L, C), (B, L)
        B = x0.shape[0]
        t = torch.randint(0, diffusion.num_timesteps, (B,), device=env.device, generator=generator)
        noise = torch.randn(x0.shape, device=env.device, generator=generator)  # (B, 4, h, w)
        x_t = diffusion.q_sample(x0, t, noise).float()
        drop = torch.rand(B, device=env.device, generator=generator) < model.config.class_dropout_prob  # (B,)
        drop = drop | batch["null_caption"].to(env.device)
        sync = micro == num_micro - 1 or not isinstance(net, DistributedDataParallel)
        with contextlib.nullcontext() if sync else net.no_sync():
            with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=autocast):
                out = net(x_t, t, y, mask, force_drop_ids=drop)  # (B, 8, h, w)
            terms = diffusion.training_losses(out.float(), x0, t, noise)
            loss = terms["loss"].sum() * scale
            if global_step in cfg.faults.inject_nan_steps and env.rank == cfg.faults.inject_rank:
                loss = loss * float("nan")  # fault injection (tests): a NaN on one rank only
            loss.backward()
        parts = [
            loss.detach() / scale,
            terms["mse"].detach().sum(),
            terms["vb"].detach().sum(),
            x0.detach().float().std() / num_micro,
        ]
        sums += torch.stack(parts)
        flops += train_flops(model.config, x0, y.shape[1])
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    # One all-reduce: the sums over ranks, how many ranks saw a finite loss and gradient, and any SIGTERM.
    local_ok = torch.isfinite(sums[0]) & torch.isfinite(grad_norm)
    stop_flag = torch.tensor(float(stop is not None and stop.requested), device=env.device)
    stats = torch.cat(
        [torch.nan_to_num(sums, nan=0.0, posinf=0.0, neginf=0.0), local_ok.float()[None], stop_flag[None]]
    )
    if env.world_size > 1:
        dist.all_reduce(stats)
    finite = int(stats[4].item()) == env.world_size
    mean = (stats[:3] / num_samples).tolist()  # per-sample means over the whole step
    nan = float("nan")
    return {
        "finite": finite,
        "stop": bool(stats[5].item() > 0),
        "loss": mean[0] if finite else nan,
        "mse": mean[1] if finite else nan,
        "vb": mean[2] if finite else nan,
        "latent_std": (stats[3] / env.world_size).item(),
        "grad_norm": float(grad_norm) if finite else nan,
        "seconds": time.perf_counter() - started,
        "data_seconds": data_seconds,
        "flops": flops,
        "samples": num_samples,  # every rank's, this step
        "partial_batches": num_partial,  # every rank's micro-batches short of the stage's batch size
    }


def step_counts(batches: list[dict], env: Dist) -> tuple[int, int]:
    """The step's samples and partial micro-batches over every rank (one all-reduce)."""
    counts = torch.tensor(
        [sum(len(b["keys"]) for b in batches), sum(bool(b.get("partial", False)) for b in batches)],
        dtype=torch.float64, device=env.device,
    )  # fmt: skip
    if env.world_size > 1:
        dist.all_reduce(counts)
    return int(counts[0].item()), int(counts[1].item())


def inject_faults(cfg: TrainConfig, global_step: int, rank: int, *, resumed_run: bool) -> None:
    """Fault injection for the resume tests: SIGKILL or a real SIGTERM to one rank once, in a run that did not resume."""
    faults = cfg.faults
    if resumed_run:
        return
    if global_step == faults.kill_at_step and rank == faults.kill_rank:
        log.warning("fault injection: SIGKILL rank %d before global step %d", rank, global_step)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
    if global_step == faults.sigterm_at_step and rank == faults.sigterm_rank:
        log.warning("fault injection: SIGTERM to rank %d before global step %d", rank, global_step)
        os.kill(os.getpid(), signal.SIGTERM)


def save_state(
    cfg: TrainConfig,
    env: Dist,
    index: int,
    step: int,
    global_step: int,
    model: PixArtSigma,
    ema: PixArtSigma | None,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    nonfinite: int,
) -> None:
    """Gather every rank's RNG state and data position; rank 0 writes the checkpoint atomically."""
    stage = cfg.stages[index]
    mine = {"rng": capture_rng(generator), "data": data_position(cfg, index, step)}
    gathered = [None] * env.world_size
    if env.world_size > 1:
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    if env.is_main:
        state = {
            "model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(),
            "scheduler": {"lr": stage_lr(stage, cfg.optim, global_batch(stage, cfg.optim, env.world_size)),
                          "warmup_steps": stage.warmup_steps, "step": step},
            "position": {"stage_index": index, "stage": stage.name, "step": step, "global_step": global_step},
            "rng": [g["rng"] for g in gathered], "data": [g["data"] for g in gathered],
            "nonfinite_streak": nonfinite, "world_size": env.world_size, "config": to_dict(cfg),
            # resolved here, where model.init exists: a loader need not find the init folder again
            "null_caption": null_caption_mode(cfg),
            "prompt_case": cfg.text.prompt_case,
        }  # fmt: skip
        save_checkpoint(
            Path(cfg.run_dir), f"{global_step:08d}-{stage.name}", state, keep=cfg.keep_checkpoints
        )
    if env.world_size > 1:
        dist.barrier()


def data_position(cfg: TrainConfig, index: int, step: int) -> dict:
    """Where this rank's data stream stands: the stage's stream and the batches read from it so far."""
    return {
        "stage_index": index,
        "stream_seed": stream_seed(cfg.seed, index),
        "batches_read": step * cfg.optim.grad_accum_steps,  # in this stage
    }


def stage_batches_read(resume: dict, cfg: TrainConfig, env: Dist) -> int:
    """Batches of the stage's stream read before the checkpoint (the resumed stream replays as many)."""
    data = resume["data"][env.rank] if len(resume["data"]) == env.world_size else None
    if data is None:
        return resume["position"]["step"] * cfg.optim.grad_accum_steps
    if "segment" in data:  # written when the stream was reopened per checkpoint interval (before issue 20)
        log.warning(
            "rank %d: checkpoint from before one data stream per stage (its data position is segment %d): "
            "resuming at batch %d of the stage's one stream, not the batches the interrupted run would "
            "have read next", env.rank, data["segment"], data["batches_read"],
        )  # fmt: skip
    return data["batches_read"]


@torch.no_grad()
def validate(
    model: PixArtSigma,
    ema: PixArtSigma | None,
    stage: StageSection,
    text: TextFeatures,
    latents: LatentEncoder,
    cfg: TrainConfig,
    env: Dist,
    metrics: MetricsSink,
    global_step: int,
) -> None:
    """Rank 0 samples the stage's prompts from the raw and the EMA weights (fixed seed, DPM-Solver++).

    Both, because the EMA (re-seeded at each transition, ``reseed_ema``) still holds most of the weights
    that entered the stage for thousands of steps (after 2K steps at 0.9999, 0.9999^2000 ≈ 82 %): the raw
    grid shows what the stage learnt. Prompt states were computed at the start (T5 is not loaded here);
    bf16 autocast on CUDA; the VAE decodes tiled.
    """
    if env.is_main and stage.validation_prompts:
        y, mask = text.prompt_batch(list(stage.validation_prompts))  # (P, L, C), (P, L)
        y, mask = y.to(env.device), mask.to(env.device)
        autocast = env.device.type == "cuda" and cfg.optim.mixed_precision == "bf16"
        size = stage.resolution // latents.downsample  # the square bucket's latent grid
        for suffix, weights in (("", model), ("-ema", ema)):
            if weights is None:
                continue
            was_training = weights.training
            weights.eval()
            generator = torch.Generator(device=env.device).manual_seed(cfg.validation.seed)
            with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=autocast):
                z = sample(weights, y, mask, latent_size=(size, size), num_steps=cfg.validation.num_steps,
                           cfg_scale=cfg.validation.cfg_scale, generator=generator)  # fmt: skip
            weights.train(was_training)
            grid = image_grid(latents.decode(z.float()))
            path = save_grid(
                grid, Path(cfg.run_dir) / "samples" / stage.name / f"{global_step:08d}{suffix}.png"
            )
            metrics.image(f"samples{suffix}/{stage.name}", grid, global_step)
            log.info("validation samples → %s", path)
    if env.world_size > 1:
        dist.barrier()


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------


def export_stage(
    model: PixArtSigma, ema: PixArtSigma | None, stage: StageSection, cfg: TrainConfig, env: Dist
) -> None:
    """``final/<stage>/`` (and ``final_ema/<stage>/``) pipelines of each stage's end weights, which checkpoint
    pruning never removes (training/pipeline.py); skipped when ``export_stages`` is off or the export is
    already there (a run resumed from a stage's last checkpoint)."""
    if cfg.export_stages and env.is_main and not is_exported(Path(cfg.run_dir) / "final" / stage.name):
        export_weights(model, ema, Path(cfg.run_dir), cfg, stage=stage.name)
    if env.world_size > 1:
        dist.barrier()


def export(model: PixArtSigma, ema: PixArtSigma | None, run_dir: Path, cfg: TrainConfig) -> Path:
    """``final/`` and ``final_ema/``: complete PixArtSigmaPipeline folders (KV-compressed models included), which
    reference the run's T5 and last VAE; ``final/<stage>/`` sub-exports inside stay (training/pipeline.py)."""
    return export_weights(model, ema, run_dir, cfg)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default."""


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config", required=True, help="TOML file (see configs/)")
    parser.add_argument("--output", help="run folder; overrides run_dir of the config")
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a config field"
    )
    args = parser.parse_args(argv)
    try:
        return load_config(args.config, overrides=args.set, output=args.output)
    except ValueError as err:
        parser.error(str(err))


def cli(argv: list[str] | None = None) -> None:
    """Console script ``pixsigma-train`` (under torchrun: ``torchrun --no-python … pixsigma-train …``) and
    ``torchrun … training/main.py``: config and preflight errors are one line (exit code 2 for --set/TOML)."""
    cfg = parse_args(argv)
    try:
        main(cfg)
    except PreflightError as err:
        if "RANK" in os.environ and os.environ["RANK"] != "0":
            raise SystemExit(2) from None
        raise SystemExit(f"error: {err}") from None
    exit_torchrun_worker()  # finished on every rank: no interpreter shutdown racing gloo's threads


if __name__ == "__main__":
    cli()
