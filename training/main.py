"""Train the PixArt-Σ DiT through the weak-to-strong schedule.

    torchrun --nproc_per_node=N training/main.py --config configs/debug.toml [--output RUN_DIR] [--set k=v]

The same command runs on a laptop (gloo, CPU, tiny preset) and on a GPU cluster (NCCL). ``main`` reads
as the story: setup → build → resume → for each stage: transition, loop (checkpoints, validation) →
export. Stages follow PixArt-Σ §3 (arXiv 2403.04692): each starts from the previous stage's weights, and
the three transitions (VAE swap, resolution up, KV compression on) keep every existing weight.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import json
import logging
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from manifests.io import atomic_write_bytes
from manifests.progress import quiet_library_bars
from training.checkpoint import capture_rng, complete_checkpoints, restore_rng, save_checkpoint
from training.config import OptimSection, StageSection, TrainConfig, load_config, to_dict
from training.data import make_stream, stream_seed
from training.diffusion import GaussianDiffusion, sample
from training.encoders import CaptionEncoder, LatentEncoder, ShardFeatures
from training.evaluate import evaluate_in_training
from training.model import PRESETS, PixArtSigma, pe_params_for_resolution
from training.observe import MetricsSink, image_grid, peak_tflops, save_grid, train_flops
from training.pipeline import export_weights

log = logging.getLogger("training")


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


def write_resolved_config(cfg: TrainConfig, env: Dist, run_dir: Path) -> None:
    """``config.json`` (loadable back) and ``run.json`` (what the config resolved to on this launch)."""
    if not env.is_main:
        return
    atomic_write_bytes(run_dir / "config.json", json.dumps(to_dict(cfg), indent=2).encode())
    resolved = {
        "world_size": env.world_size,
        "device": str(env.device),
        "torch": torch.__version__,
        "stages": {
            s.name: {
                "global_batch": global_batch(s, cfg.optim, env.world_size),
                "lr": stage_lr(s, cfg.optim, global_batch(s, cfg.optim, env.world_size)),
                "pe_interpolation": s.pe_interpolation,
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


# ------------------------------------------------------------------------------------------------
# Build
# ------------------------------------------------------------------------------------------------


def build_model(cfg: TrainConfig, null_caption: torch.Tensor, device: torch.device) -> PixArtSigma:
    """The preset sized to the caption features, optionally from external weights, with T5("") as null."""
    if cfg.model.preset not in PRESETS:
        raise ValueError(f"model.preset must be one of {sorted(PRESETS)}, got {cfg.model.preset!r}")
    first = cfg.stages[0]
    base_size, _ = pe_params_for_resolution(first.resolution, patch_size=PRESETS[cfg.model.preset].patch_size)
    model_cfg = dataclasses.replace(
        PRESETS[cfg.model.preset],
        caption_channels=null_caption.shape[1],
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
    model.set_null_caption(null_caption, torch.ones(null_caption.shape[0], dtype=torch.bool))
    return model.to(device)


def load_init(model: PixArtSigma, path: str) -> None:
    """External init: a PixArt-α/Σ ``.pth``, one of our folders, or a diffusers transformer folder."""
    from training.convert import FORMAT_NAME, load_diffusers, load_model, load_original_checkpoint

    source_path = Path(path)
    if source_path.suffix in (".pth", ".pt"):
        source = load_original_checkpoint(source_path, model.config)
    elif json.loads((source_path / "config.json").read_text()).get("format") == FORMAT_NAME:
        source = load_model(source_path)
    else:
        source = load_diffusers(source_path, max_token_length=model.config.max_token_length)
    shape = ("depth", "hidden_size", "num_heads", "patch_size", "in_channels", "caption_channels")
    wrong = {
        k: getattr(source.config, k) for k in shape if getattr(source.config, k) != getattr(model.config, k)
    }
    if wrong:
        raise ValueError(f"model.init {path} has {wrong}; model.preset differs there")
    if source.config.kv_compress_layers:
        model.enable_kv_compression(source.config.kv_compress_layers, source.config.kv_compress_ratio)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("y_embedder.y_")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("y_embedder.y_") for k in missing), (missing, unexpected)
    log.info("initialised from %s", path)


def apply_stage(model: PixArtSigma, stage: StageSection) -> list[str]:
    """The transition into ``stage``: resolution (PE interpolation) and KV compression; returns new params.

    Every existing weight is kept. The PE is a function of the grid, base size and pe_interpolation, so a
    resolution change is a config change (PixArt-Σ: usable after ~100 steps). New KV-compression layers
    start at Conv Avg Init (PixArt-Σ §3.2). A VAE swap changes no weight: the trainer swaps the encoder.
    """
    base_size, _ = pe_params_for_resolution(stage.resolution, patch_size=model.config.patch_size)
    model.set_resolution(base_size, stage.pe_interpolation)
    before = set(model.state_dict())
    if set(stage.kv_compress_layers) - set(model.config.kv_compress_layers):
        model.enable_kv_compression(stage.kv_compress_layers, stage.kv_compress_ratio)
    return sorted(set(model.state_dict()) - before)


def enter_stage(
    model: PixArtSigma,
    ema: PixArtSigma | None,
    previous: StageSection | None,
    stage: StageSection,
    *,
    quiet: bool,
) -> None:
    """Apply the transition to the model and its EMA, and log what changed (PixArt-Σ's weak-to-strong)."""
    new_params = apply_stage(model, stage)
    if ema is not None:
        apply_stage(ema, stage)  # same deterministic init for the new layers, so EMA = model there
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
                       f"({len(new_params)} new tensors at Conv Avg Init)")  # fmt: skip
    log.info("stage %s: %s", stage.name, "; ".join(changes) or "same model, same data")


def build_optimizer(model: torch.nn.Module, optim: OptimSection, lr: float) -> torch.optim.Optimizer:
    """CAME (PixArt-Σ's optimiser) or AdamW, over the trainable parameters; a fresh one per stage."""
    params = [p for p in model.parameters() if p.requires_grad]
    if optim.name == "came":
        from came_pytorch import CAME

        return CAME(params, lr=lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(
        params, lr=lr, betas=optim.betas[:2], eps=optim.eps[-1], weight_decay=optim.weight_decay
    )


@torch.no_grad()
def update_ema(ema: PixArtSigma, model: PixArtSigma, decay: float) -> None:
    """ema ← decay·ema + (1 - decay)·model, in fp32 (the EMA never sees bf16)."""
    ema_params = list(ema.parameters())
    torch._foreach_lerp_(ema_params, [p.detach().float() for p in model.parameters()], 1.0 - decay)


def load_resume(run_dir: Path, env: Dist) -> dict | None:
    """The newest complete checkpoint; rank 0 picks it and every rank loads the same one."""
    names = [str(complete_checkpoints(run_dir)[-1]) if complete_checkpoints(run_dir) else None]
    if env.world_size > 1:
        dist.broadcast_object_list(names, src=0)
    if names[0] is None:
        return None
    state = torch.load(Path(names[0]) / "state.pt", map_location="cpu", weights_only=True)
    if len(state["rng"]) != env.world_size:
        log.warning(
            "checkpoint from %d ranks, now %d: RNG states reseeded", len(state["rng"]), env.world_size
        )
    log.info(
        "resuming from %s (stage %s, step %d)",
        names[0],
        state["position"]["stage"],
        state["position"]["step"],
    )
    return state


# ------------------------------------------------------------------------------------------------
# The story
# ------------------------------------------------------------------------------------------------


def main(cfg: TrainConfig) -> Path:
    """Run every stage of ``cfg`` (resuming from the newest checkpoint); returns the run folder."""
    env = setup_distributed()
    setup_logging(env)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_resolved_config(cfg, env, run_dir)

    # Build: caption features decide the model's caption width; T5("") becomes its null caption.
    features = ShardFeatures.read(cfg.data.shards)
    cached_text = cfg.data.use_cached_features and features.has_text(cfg.text.t5)
    text = CaptionEncoder(cfg.text.t5, max_tokens=cfg.text.max_tokens, device=env.device, cached=cached_text)
    model = build_model(cfg, text.null_caption(cfg.data.shards), env.device)
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.optim.ema_decay else None
    diffusion = GaussianDiffusion()

    resume = load_resume(run_dir, env)
    position = resume["position"] if resume else {"stage_index": 0, "step": 0, "global_step": 0}
    torch.manual_seed(
        cfg.seed * 7919 + env.rank + 1
    )  # per-rank randomness (class dropout), restored on resume
    metrics = MetricsSink(
        run_dir, cfg.log, enabled=env.is_main, total_steps=sum(s.steps for s in cfg.stages),
        resume_global_step=position["global_step"],
    )  # fmt: skip
    global_step = position["global_step"]
    for index, stage in enumerate(cfg.stages):
        previous = cfg.stages[index - 1] if index else None
        enter_stage(model, ema, previous, stage, quiet=index < position["stage_index"])
        if index < position["stage_index"]:
            continue
        stage_resume = resume if resume is not None and index == position["stage_index"] else None
        global_step = train_stage(
            cfg, index, model, ema, diffusion, text, env, metrics, features,
            global_step=global_step, resume=stage_resume, resumed_run=resume is not None,
        )  # fmt: skip
        if cfg.export_stages and env.is_main:  # issue 12: final/<stage>/ pipelines, never pruned
            export_weights(model, ema, run_dir, cfg, stage=stage.name)
    metrics.close()
    if env.is_main:
        export(model, ema, run_dir, cfg)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return run_dir


def train_stage(
    cfg: TrainConfig,
    index: int,
    model: PixArtSigma,
    ema: PixArtSigma | None,
    diffusion: GaussianDiffusion,
    text: CaptionEncoder,
    env: Dist,
    metrics: MetricsSink,
    features: ShardFeatures,
    *,
    global_step: int,
    resume: dict | None,
    resumed_run: bool,
) -> int:
    """One stage: fresh optimiser, its VAE, its data; the loop; returns the global step after it."""
    stage = cfg.stages[index]
    start_step = resume["position"]["step"] if resume else 0
    if resume:
        model.load_state_dict(resume["model"])
        if ema is not None and resume["ema"] is not None:
            ema.load_state_dict(resume["ema"])
    if start_step >= stage.steps:
        return global_step
    cached = cfg.data.use_cached_features and features.has_latents(stage.vae, stage.resolution)
    latents = LatentEncoder(
        stage.vae, scaling_factor=stage.vae_scaling_factor, device=env.device, cached=cached
    )
    log.info("stage %s: latents %s, captions %s", stage.name, "cached" if cached else "VAE on the fly",
             "cached" if text.cached else "T5 on the fly")  # fmt: skip
    lr = stage_lr(stage, cfg.optim, global_batch(stage, cfg.optim, env.world_size))
    optimizer = build_optimizer(model, cfg.optim, lr)
    generator = torch.Generator(device=env.device).manual_seed(cfg.seed * 104_729 + index * 1_009 + env.rank)
    nonfinite = 0
    if resume:
        optimizer.load_state_dict(resume["optimizer"])
        nonfinite = resume["nonfinite_streak"]
        if len(resume["rng"]) == env.world_size:
            restore_rng(resume["rng"][env.rank], generator)
    model.train()
    net = DistributedDataParallel(model) if env.world_size > 1 else model
    net = torch.compile(net) if cfg.model.compile else net
    peak = peak_tflops(env.device, cfg.log.peak_tflops)
    stream = None

    for step in range(start_step, stage.steps):
        if stream is None or step % cfg.checkpoint_every == 0:  # a new data segment per checkpoint interval
            stream = open_stream(
                cfg, stage, index, step // cfg.checkpoint_every, env, latents.cached, text.cached
            )
        inject_faults(cfg, global_step, env.rank, resumed_run=resumed_run)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr=lr, warmup_steps=stage.warmup_steps)
        out = train_step(net, model, stream, diffusion, text, latents, generator, cfg, env, global_step)
        if out["finite"]:
            optimizer.step()
            if ema is not None:
                update_ema(ema, model, cfg.optim.ema_decay)
            nonfinite = 0
        else:
            nonfinite += 1
            log.warning(
                "stage %s step %d: non-finite loss/gradient; step skipped on every rank", stage.name, step
            )
            if nonfinite >= cfg.faults.max_nonfinite_steps:
                raise FloatingPointError(
                    f"stage {stage.name} step {step}: {nonfinite} non-finite steps in a row "
                    f"(faults.max_nonfinite_steps={cfg.faults.max_nonfinite_steps}); aborting. Lower the lr, "
                    f"check grad_clip and the data; the last good checkpoint is under {cfg.run_dir}/checkpoints"
                )
        optimizer.zero_grad(set_to_none=True)
        global_step += 1
        last = step + 1 == stage.steps
        record = {"stage": stage.name, "step": step, "global_step": global_step, "loss": out["loss"],
                  "grad_norm": out["grad_norm"], "lr": optimizer.param_groups[0]["lr"], "skipped": not out["finite"],
                  "force": last}  # fmt: skip
        metrics.step(record, seconds=out["seconds"], data_seconds=out["data_seconds"],
                     images=out["images"] * env.world_size, flops=out["flops"] * env.world_size, peak=peak)  # fmt: skip
        if cfg.validation.every and (step + 1) % cfg.validation.every == 0 and not last:
            validate(ema or model, stage, text, latents, cfg, env, metrics, global_step)
        if cfg.evaluation.every and (step + 1) % cfg.evaluation.every == 0:  # issue 12: FID / CLIP score
            evaluate_in_training(ema or model, cfg, stage, text, latents, env, metrics, global_step)
        if last or (step + 1) % cfg.checkpoint_every == 0:
            save_state(cfg, env, index, step + 1, global_step, model, ema, optimizer, generator, nonfinite)
    validate(ema or model, stage, text, latents, cfg, env, metrics, global_step)
    return global_step


def open_stream(
    cfg: TrainConfig,
    stage: StageSection,
    index: int,
    segment: int,
    env: Dist,
    cached_latents: bool,
    cached_text: bool,
):
    """This rank's batches for one checkpoint segment of a stage (see training/data.py on resume)."""
    return make_stream(
        cfg.data.shards, resolution=stage.resolution, batch_size=stage.batch_size,
        real_prompt_ratio=cfg.data.real_prompt_ratio, seed=stream_seed(cfg.seed, index, segment), rank=env.rank,
        shuffle_buffer=cfg.data.shuffle_buffer, cached_latents=cached_latents, cached_text=cached_text,
        num_workers=cfg.data.num_workers,
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
) -> dict:
    """Forward/backward over grad_accum_steps micro-batches, clip, and agree on finiteness across ranks."""
    started = time.perf_counter()
    num_micro = cfg.optim.grad_accum_steps
    autocast = env.device.type == "cuda" and cfg.optim.mixed_precision == "bf16"
    loss_sum, data_seconds, images, flops = torch.zeros((), device=env.device), 0.0, 0, 0
    for micro in range(num_micro):
        fetch = time.perf_counter()
        batch = next(stream)
        data_seconds += time.perf_counter() - fetch
        x0 = latents(batch, generator)  # (B, 4, h, w), scaled
        y, mask = text(batch)  # (B, L, C), (B, L)
        t = torch.randint(0, diffusion.num_timesteps, (x0.shape[0],), device=env.device, generator=generator)
        noise = torch.randn(x0.shape, device=env.device, generator=generator)  # (B, 4, h, w)
        x_t = diffusion.q_sample(x0, t, noise).float()
        sync = micro == num_micro - 1 or not isinstance(net, DistributedDataParallel)
        with contextlib.nullcontext() if sync else net.no_sync():
            with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=autocast):
                out = net(x_t, t, y, mask)  # (B, 8, h, w)
            loss = diffusion.training_losses(out.float(), x0, t, noise)["loss"].mean() / num_micro
            if global_step in cfg.faults.inject_nan_steps and env.rank == cfg.faults.inject_rank:
                loss = loss * float("nan")  # fault injection (tests): a NaN on one rank only
            loss.backward()
        loss_sum += loss.detach()
        images += x0.shape[0]
        flops += train_flops(model.config, x0, y.shape[1])
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    # One all-reduce: the loss summed over ranks, and how many ranks saw a finite loss and gradient.
    local_ok = torch.isfinite(loss_sum) & torch.isfinite(grad_norm)
    stats = torch.stack([torch.nan_to_num(loss_sum, nan=0.0, posinf=0.0, neginf=0.0), local_ok.float()])
    if env.world_size > 1:
        dist.all_reduce(stats)
    finite = int(stats[1].item()) == env.world_size
    return {
        "finite": finite,
        "loss": stats[0].item() / env.world_size if finite else float("nan"),
        "grad_norm": float(grad_norm) if finite else float("nan"),
        "seconds": time.perf_counter() - started,
        "data_seconds": data_seconds,
        "images": images,
        "flops": flops,
    }


def inject_faults(cfg: TrainConfig, global_step: int, rank: int, *, resumed_run: bool) -> None:
    """Fault injection for the resume tests: SIGKILL one rank once, in a run that did not resume."""
    if global_step == cfg.faults.kill_at_step and rank == cfg.faults.kill_rank and not resumed_run:
        log.warning("fault injection: SIGKILL rank %d before global step %d", rank, global_step)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


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
        }  # fmt: skip
        save_checkpoint(
            Path(cfg.run_dir), f"{global_step:08d}-{stage.name}", state, keep=cfg.keep_checkpoints
        )
    if env.world_size > 1:
        dist.barrier()


def data_position(cfg: TrainConfig, index: int, step: int) -> dict:
    """Where this rank's data stream stands: the stage, the segment it reopens, batches read so far."""
    return {
        "stage_index": index,
        "segment": step // cfg.checkpoint_every,
        "segment_seed": stream_seed(cfg.seed, index, step // cfg.checkpoint_every),
        "batches_read": step * cfg.optim.grad_accum_steps,
    }


@torch.no_grad()
def validate(
    model: PixArtSigma,
    stage: StageSection,
    text: CaptionEncoder,
    latents: LatentEncoder,
    cfg: TrainConfig,
    env: Dist,
    metrics: MetricsSink,
    global_step: int,
) -> None:
    """Rank 0 samples the stage's prompts (fixed seed, DPM-Solver++) and saves one image grid."""
    if env.is_main and stage.validation_prompts:
        was_training = model.training
        model.eval()
        y, mask = text.encode(list(stage.validation_prompts))  # (P, L, C), (P, L)
        generator = torch.Generator(device=env.device).manual_seed(cfg.validation.seed)
        size = stage.resolution // 8
        z = sample(model, y, mask, latent_size=(size, size), num_steps=cfg.validation.num_steps,
                   cfg_scale=cfg.validation.cfg_scale, generator=generator)  # fmt: skip
        grid = image_grid(latents.decode(z).cpu())
        path = save_grid(grid, Path(cfg.run_dir) / "samples" / stage.name / f"{global_step:08d}.png")
        metrics.image(f"samples/{stage.name}", grid, global_step)
        log.info("validation samples → %s", path)
        model.train(was_training)
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
    return load_config(args.config, overrides=args.set, output=args.output)


def cli(argv: list[str] | None = None) -> None:
    """Console script ``pixsigma-train`` (under torchrun: ``torchrun --no-python … pixsigma-train …``)."""
    main(parse_args(argv))


if __name__ == "__main__":
    cli()
