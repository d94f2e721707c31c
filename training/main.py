"""Train the PixArt-Σ DiT through the weak-to-strong schedule.

    torchrun --nproc_per_node=N training/main.py --config configs/debug.toml [--output RUN_DIR]

The same command runs on a laptop (gloo, CPU, tiny preset) and on a GPU cluster (NCCL). ``main`` reads
as the story: setup → build → for each stage: transition, loop, checkpoint → export.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from manifests.features import T5Features, VaeFeatures
from manifests.io import atomic_write_bytes
from training.checkpoint import load_latest, save_checkpoint
from training.config import OptimSection, StageSection, TrainConfig, load_config, to_dict
from training.data import make_stream
from training.diffusion import GaussianDiffusion
from training.model import PRESETS, PixArtSigma, pe_params_for_resolution

log = logging.getLogger("training")

NULL_CAPTION_FILE = "t5_null.npy"  # written by manifests.materialize beside cached T5 features


# ------------------------------------------------------------------------------------------------
# Setup helpers
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Dist:
    rank: int
    world_size: int
    device: torch.device


def setup_distributed() -> Dist:
    """Join the torchrun group (NCCL on CUDA, gloo on CPU); a plain `python` run is world size 1."""
    if "RANK" not in os.environ:
        return Dist(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return Dist(rank, dist.get_world_size(), device)


def lr_at(step: int, *, lr: float, warmup_steps: int) -> float:
    """Linear warm-up, then constant (PixArt-Σ's schedule)."""
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr


def stage_lr(stage: StageSection, optim: OptimSection, global_batch: int) -> float:
    """Stage lr, or base lr scaled by √(global batch / 256) as PixArt's `auto_lr` does."""
    return stage.lr if stage.lr is not None else optim.base_lr * math.sqrt(global_batch / 256)


def build_optimizer(model: torch.nn.Module, optim: OptimSection, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if optim.name == "came":
        from came_pytorch import CAME

        return CAME(params, lr=lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(
        params, lr=lr, betas=optim.betas[:2], eps=optim.eps[-1], weight_decay=optim.weight_decay
    )


def apply_stage(model: PixArtSigma, stage: StageSection) -> None:
    """The transition into ``stage``: new resolution (PE interpolated) and KV compression if asked.

    Every existing weight is kept; new KV-compression layers start at Conv Avg Init (PixArt-Σ §3.2).
    """
    base_size, _ = pe_params_for_resolution(stage.resolution, patch_size=model.config.patch_size)
    model.set_resolution(base_size, stage.pe_interpolation)
    if set(stage.kv_compress_layers) - set(model.config.kv_compress_layers):
        model.enable_kv_compression(stage.kv_compress_layers, stage.kv_compress_ratio)


class TextEncoder:
    """Caption features: cached in the shards when present, else T5 run on the fly (frozen)."""

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        self.cfg = cfg.text
        self.device = device
        self._t5: T5Features | None = None

    @property
    def t5(self) -> T5Features:
        if self._t5 is None:
            self._t5 = T5Features(self.cfg.t5, max_tokens=self.cfg.max_tokens, device=self.device)
        return self._t5

    def null_caption(self, shards: str) -> torch.Tensor:
        """T5("") valid-token states (L, C): from the shard folder when cached, else computed."""
        cached = Path(shards) / NULL_CAPTION_FILE
        if cached.exists():
            return torch.from_numpy(np.load(cached, allow_pickle=False).astype(np.float32))
        return torch.from_numpy(self.t5([""])[0].astype(np.float32))

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, C) features and (B, L) mask for the batch's chosen captions."""
        if "caption_features" in batch:
            features, mask = batch["caption_features"], batch["caption_mask"]
            features, mask = features[:, : self.cfg.max_tokens], mask[:, : self.cfg.max_tokens]
            return features.to(self.device), mask.to(self.device)
        states, mask = self.t5.encode_padded(batch["captions"])  # (B, max_tokens, C), (B, max_tokens)
        length = int(mask.sum(dim=1).max())  # trim the common padding; the mask covers the rest
        return states[:, :length], mask[:, :length].bool()


def latents_of(
    batch: dict, vae: VaeFeatures | None, scaling_factor: float, device: torch.device
) -> torch.Tensor:
    """Scaled latents (B, C, h, w): resampled from the cached posterior, else the VAE run on the fly."""
    if "latents" in batch:
        return batch["latents"].to(device) * scaling_factor
    if vae is None:
        raise ValueError("this batch has no cached latents and no VAE is loaded")
    mean, std = vae.posterior(batch["pixels"])
    return (mean + std * torch.randn_like(std)).to(device) * scaling_factor


def all_finite(loss: torch.Tensor, world_size: int) -> bool:
    """True when the loss is finite on every rank (one all-reduce), so all ranks skip a bad step together."""
    flag = torch.tensor([float(torch.isfinite(loss).all())], device=loss.device)
    if world_size > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


# ------------------------------------------------------------------------------------------------
# The story
# ------------------------------------------------------------------------------------------------


def main(cfg: TrainConfig) -> Path:
    """Run every stage of ``cfg``; returns the run folder."""
    env = setup_distributed()
    run_dir = Path(cfg.run_dir)
    is_main = env.rank == 0
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING, format="%(asctime)s %(name)s: %(message)s"
    )
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir / "config.json", json.dumps(to_dict(cfg), indent=2).encode())
    torch.manual_seed(cfg.seed)

    # Build: text features, then the model sized to them, with T5("") as its null caption.
    text = TextEncoder(cfg, env.device)
    null = text.null_caption(cfg.data.shards)  # (L0, C)
    first = cfg.stages[0]
    base_size, _ = pe_params_for_resolution(first.resolution)
    model_cfg = dataclasses.replace(
        PRESETS[cfg.model.preset],
        caption_channels=null.shape[1],
        max_token_length=cfg.text.max_tokens,
        base_size=base_size,
        pe_interpolation=first.pe_interpolation,
        grad_checkpointing=cfg.model.grad_checkpointing,
    )
    model = PixArtSigma(model_cfg).to(env.device)
    model.set_null_caption(null, torch.ones(null.shape[0], dtype=torch.bool))
    diffusion = GaussianDiffusion()

    resume = load_latest(run_dir)
    start_stage, start_step = (resume["stage_index"], resume["step"]) if resume else (0, 0)
    for index in range(start_stage + 1):  # rebuild the structure the checkpoint was saved with
        apply_stage(model, cfg.stages[index])
    if resume:
        model.load_state_dict(resume["model"])
        log.info("resumed at stage %s step %d", cfg.stages[start_stage].name, start_step)

    metrics_path = run_dir / "metrics.jsonl"
    global_step = resume["global_step"] if resume else 0
    for index in range(start_stage, len(cfg.stages)):
        stage = cfg.stages[index]
        if index > start_stage:
            log.info(
                "transition → stage %s (%d px, VAE %s, KV layers %s)",
                stage.name,
                stage.resolution,
                stage.vae,
                stage.kv_compress_layers,
            )
            apply_stage(model, stage)
            start_step = 0
        if start_step >= stage.steps:
            continue
        global_step = train_stage(
            cfg, stage, index, model, diffusion, text, env,
            start_step=start_step, global_step=global_step, metrics_path=metrics_path,
            optimizer_state=resume["optimizer"] if resume and index == start_stage and start_step else None,
        )  # fmt: skip
    if is_main:
        export(model, run_dir)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return run_dir


def train_stage(
    cfg: TrainConfig,
    stage: StageSection,
    stage_index: int,
    model: PixArtSigma,
    diffusion: GaussianDiffusion,
    text: TextEncoder,
    env: Dist,
    *,
    start_step: int,
    global_step: int,
    metrics_path: Path,
    optimizer_state: dict | None,
) -> int:
    """One stage's loop; returns the global step after it."""
    model.train()
    ddp = DistributedDataParallel(model) if env.world_size > 1 else model
    lr = stage_lr(stage, cfg.optim, stage.batch_size * env.world_size)
    optimizer = build_optimizer(model, cfg.optim, lr)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    vae = (
        None
        if _has_cached_latents(cfg.data.shards, stage.resolution)
        else VaeFeatures(stage.vae, device=env.device)
    )
    stream = make_stream(
        cfg.data.shards, resolution=stage.resolution, batch_size=stage.batch_size,
        real_prompt_ratio=cfg.data.real_prompt_ratio, seed=cfg.seed + 1000 * stage_index + start_step, rank=env.rank,
        shuffle_buffer=cfg.data.shuffle_buffer,
    )  # fmt: skip
    generator = torch.Generator(device=env.device).manual_seed(cfg.seed * 7919 + env.rank + global_step)
    autocast = env.device.type == "cuda" and cfg.optim.mixed_precision == "bf16"

    for step in range(start_step, stage.steps):
        started = time.perf_counter()
        batch = next(stream)
        data_seconds = time.perf_counter() - started
        x0 = latents_of(batch, vae, stage.vae_scaling_factor, env.device)  # (B, 4, h, w)
        y, mask = text(batch)  # (B, L, C), (B, L)
        t = torch.randint(0, diffusion.num_timesteps, (x0.shape[0],), device=env.device, generator=generator)
        noise = torch.randn(x0.shape, device=env.device, generator=generator)  # (B, 4, h, w)
        x_t = diffusion.q_sample(x0, t, noise).float()
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = ddp(x_t, t, y, mask)  # (B, 8, h, w)
        loss = diffusion.training_losses(out.float(), x0, t, noise)["loss"].mean()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr=lr, warmup_steps=stage.warmup_steps)
        optimizer.zero_grad(set_to_none=True)
        if not all_finite(loss.detach(), env.world_size):
            log.warning("stage %s step %d: non-finite loss, step skipped on every rank", stage.name, step)
            continue
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        global_step += 1
        if env.rank == 0 and (step % cfg.log_every == 0 or step == stage.steps - 1):
            record = {
                "stage": stage.name, "step": step, "global_step": global_step, "loss": round(loss.item(), 6),
                "grad_norm": round(float(grad_norm), 6), "lr": optimizer.param_groups[0]["lr"],
                "images_per_s": round(x0.shape[0] * env.world_size / (time.perf_counter() - started), 3),
                "data_seconds": round(data_seconds, 4),
            }  # fmt: skip
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            log.info("%s step %d/%d loss %.4f", stage.name, step + 1, stage.steps, record["loss"])
        last = step == stage.steps - 1
        if env.rank == 0 and (last or (step + 1) % cfg.checkpoint_every == 0):
            # `step` is the next step to run in this stage; a finished stage resumes into the next one.
            state = {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "stage_index": stage_index, "step": step + 1, "global_step": global_step,
            }  # fmt: skip
            save_checkpoint(
                Path(cfg.run_dir), f"{global_step:08d}-{stage.name}", state, keep=cfg.keep_checkpoints
            )
        if env.world_size > 1 and last:
            dist.barrier()
    return global_step


def _has_cached_latents(shards: str, resolution: int) -> bool:
    """Whether the training shards were materialised with VAE latents at this resolution."""
    info = Path(shards) / "shards.json"
    return info.exists() and resolution in json.loads(info.read_text())["features"]["vae_resolutions"]


def export(model: PixArtSigma, run_dir: Path) -> Path:
    """Save the final weights and model config (safetensors) under ``run_dir/final``."""
    from safetensors.torch import save_file

    out = run_dir / "final"
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    atomic_write_bytes(out / "config.json", json.dumps(dataclasses.asdict(model.config), indent=2).encode())
    return out


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="TOML file (see configs/)")
    parser.add_argument("--output", help="run folder; overrides run_dir of the config")
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a config field"
    )
    args = parser.parse_args(argv)
    return load_config(args.config, overrides=args.set, output=args.output)


if __name__ == "__main__":
    main(parse_args())
