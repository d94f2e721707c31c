"""Atomic checkpoints: write a temporary folder, fsync, rename, then a completion marker; keep the last k."""

from __future__ import annotations

import logging
import os
import pickle
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


class CheckpointError(ValueError):
    """A checkpoint folder whose state does not load (truncated, corrupt, or not ours)."""


REQUIRED_KEYS = ("model", "optimizer", "position", "rng")


def read_checkpoint(path: Path) -> dict:
    """``path/state.pt`` as tensors on the CPU (never unpickles code), or CheckpointError naming the file."""
    file = Path(path) / "state.pt"
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (
        RuntimeError,
        EOFError,
        OSError,
        pickle.UnpicklingError,
    ) as err:  # torch's zip reader: RuntimeError
        raise CheckpointError(f"{file} does not load: {str(err).splitlines()[0]}") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{file} lacks {missing}")
    return state


def load_latest(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest complete checkpoint that loads, with its state; an unreadable newer one is skipped (warned).

    A checkpoint can be complete and still not load: a disk that filled after the marker, a copy cut short.
    Resuming from the one before costs ``checkpoint_every`` steps; aborting would cost the run.
    """
    for path in reversed(complete_checkpoints(run_dir)):
        try:
            return path, read_checkpoint(path)
        except CheckpointError as err:
            log.warning("%s; falling back to the checkpoint before it", err)
    return None


def capture_rng(generator: torch.Generator) -> dict:
    """This process's random state: torch CPU (and CUDA), the trainer's step generator, Python, NumPy.

    Stored as tensors and plain Python values only, so ``weights_only`` loading can read it back.
    """
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generator": generator.get_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached],
    }


def restore_rng(state: dict, generator: torch.Generator) -> None:
    """Inverse of ``capture_rng``."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["generator"])
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def _as_tuple(value):
    """Python's random state is nested tuples; make sure lists from a round trip become tuples again."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value
