"""Atomic checkpoints: write a temporary folder, fsync, rename, then a completion marker; keep the last k."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from manifests.io import atomic_write_bytes

log = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, name: str, state: dict, *, keep: int) -> Path:
    """Save ``state`` as ``checkpoints/<name>/state.pt`` atomically; prune all but the newest ``keep``."""
    root = checkpoint_dir(run_dir)
    final = root / name
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with open(tmp / "state.pt", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write_bytes(final / COMPLETE_MARKER, b"")
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    log.info("checkpoint %s", final)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders that have their completion marker, oldest first (names sort by step)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if not p.name.startswith(".") and (p / COMPLETE_MARKER).exists())


def load_latest(run_dir: Path) -> dict | None:
    """The newest complete checkpoint's state (tensors on CPU), or None. Never unpickles code."""
    checkpoints = complete_checkpoints(run_dir)
    if not checkpoints:
        return None
    return torch.load(checkpoints[-1] / "state.pt", map_location="cpu", weights_only=True)
