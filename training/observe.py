"""What a run shows while it trains: metrics.jsonl, TensorBoard scalars, a rank-0 progress bar (a progress
line every log.progress_every_s when stderr is not a terminal), sample grids.

Only rank 0 writes. Throughput numbers are over the window since the last record: images per second,
the share of step time spent waiting for data, achieved TFLOP/s from the analytic FLOP counter
(``training/flops.py``) and MFU against the device's peak.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from manifests.progress import ProgressLog, interactive
from training.config import LogSection
from training.flops import forward_flops
from training.model import ModelConfig

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
EXTRA_FILES = ("val_loss.jsonl",)  # other per-evaluation records (training.val_loss), truncated on resume too
SCALARS = (
    "loss",
    "mse",
    "vb",
    "latent_std",
    "lr",
    "grad_norm",
    "partial_batches",
    "images_per_s",
    "data_wait_share",
    "tflops",
    "mfu",
)
# Dense bf16 peak TFLOP/s per device, from the vendors' data sheets (SXM parts).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "4090": 165.0}


def peak_tflops(device: torch.device, configured: float) -> float:
    """The configured peak, else the data-sheet peak of a known GPU; 0 when unknown (no MFU logged)."""
    if configured > 0:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
    return 0.0


def train_flops(config: ModelConfig, latents: torch.Tensor, num_tokens: int) -> int:
    """FLOPs of one training step on a batch: forward, backward = 2× forward, + one forward if checkpointed."""
    p = config.patch_size
    grid = (latents.shape[-2] // p, latents.shape[-1] // p)
    passes = 4 if config.grad_checkpointing else 3
    return passes * latents.shape[0] * forward_flops(config, grid, num_tokens).total


class MetricsSink:
    """Rank 0's metric records: one JSON line per record, the same scalars to TensorBoard, and tqdm."""

    def __init__(
        self, run_dir: Path, cfg: LogSection, *, enabled: bool, total_steps: int, resume_global_step: int
    ) -> None:
        self.enabled = enabled
        self.cfg = cfg
        self.path = run_dir / METRICS_FILE
        self.writer = self.bar = self.progress = None
        self.window = {"seconds": 0.0, "data_seconds": 0.0, "images": 0, "flops": 0}
        # stage → [partial, all] micro-batches over every rank since this launch (each record has its step's)
        self.stage_batches: dict[str, list[int]] = {}
        if not enabled:
            return
        _truncate_after(self.path, resume_global_step)  # a resumed run rewrites what followed its checkpoint
        for extra in EXTRA_FILES:
            _truncate_after(run_dir / extra, resume_global_step)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_global_step or None)
        if cfg.progress_bar and interactive():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=resume_global_step, desc="train", dynamic_ncols=True)
        elif cfg.progress_bar:  # a log file: a line with rate and ETA every 30 s, not a line of \r frames
            self.progress = ProgressLog(
                "train", total_steps, unit="steps", initial=resume_global_step, logger=log,
                every_seconds=cfg.progress_every_s,
            )  # fmt: skip

    def step(
        self, record: dict, *, seconds: float, data_seconds: float, images: int, flops: int, peak: float
    ) -> None:
        """Account one step; write a record every ``log.every`` steps (and whenever ``record['force']``)."""
        if not self.enabled:
            return
        window = self.window
        window["seconds"] += seconds
        window["data_seconds"] += data_seconds
        window["images"] += images
        window["flops"] += flops
        # Short batches from the bucket sampler (issue 20) in the progress line: the stage's since this launch.
        counts = self.stage_batches.setdefault(record["stage"], [0, 0])
        counts[0] += record.get("partial_batches", 0)
        counts[1] += record.get("batches", 0)
        partial = {"partial": f"{counts[0]}/{counts[1]}"} if counts[1] else {}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(stage=record["stage"], loss=f"{record['loss']:.4f}", **partial)
        elif self.progress is not None:
            note = f"stage {record['stage']}, loss {record['loss']:.4f}"
            self.progress.update(
                1, note=note + (f", partial batches {partial['partial']}" if partial else "")
            )
        if not (record.pop("force", False) or record["global_step"] % self.cfg.every == 0):
            return
        elapsed = max(window["seconds"], 1e-9)
        tflops = window["flops"] / elapsed / 1e12
        record.update(
            images_per_s=window["images"] / elapsed,
            data_wait_share=window["data_seconds"] / elapsed,
            tflops=tflops,
            mfu=tflops / peak if peak else None,
        )
        self.window = dict.fromkeys(window, 0)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for name in SCALARS:
                value = record.get(name)
                if value is not None and math.isfinite(value):
                    self.writer.add_scalar(f"train/{name}", value, record["global_step"])

    def extra(self, name: str, record: dict, *, prefix: str) -> None:
        """Append ``record`` (with its ``global_step``) to RUN/``name``; its numbers to TensorBoard as prefix/key."""
        if not self.enabled:
            return
        with open(self.path.parent / name, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "global_step") and isinstance(value, float) and math.isfinite(value):
                    self.writer.add_scalar(f"{prefix}/{key}", value, record["global_step"])

    def image(self, tag: str, grid: np.ndarray, global_step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, grid, global_step, dataformats="HWC")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _truncate_after(path: Path, global_step: int) -> None:
    """Drop records past ``global_step`` (steps a killed run did after its last checkpoint)."""
    if not path.exists():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line and json.loads(line)["global_step"] <= global_step
    ]
    path.write_text("".join(line + "\n" for line in kept))


def image_grid(images: torch.Tensor, *, columns: int = 4) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] → one (rows·H, columns·W, 3) uint8 grid, row-major."""
    B, _, H, W = images.shape
    columns = min(columns, B)
    rows = -(-B // columns)
    pixels = (
        ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    )  # (B, H, W, 3)
    grid = torch.zeros(rows * H, columns * W, 3, dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, columns)
        grid[r * H : (r + 1) * H, c * W : (c + 1) * W] = pixels[i]
    return grid.numpy()


def save_grid(grid: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path
