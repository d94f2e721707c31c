"""Which executor ``--executor auto`` picks: Ray for a cluster or a big job, this process for a small one.

On one machine Ray's fixed cost (runtime start, worker processes, the scorer actor loading its model, the
first tasks' imports: ~10 s more than in-process on 2 cores, docs/benchmarks.md "Curation: small jobs") buys
nothing for a few thousand images, which this process scans (a process pool, one per core), scores and dedups
in seconds with the same functions (``executor.LocalExecutor``). So, in order:

1. a cluster is named (``RAY_ADDRESS``, which ``ray job submit`` sets for its entrypoint, or Ray is already
   initialised in this process): the user asked for the cluster → Ray;
2. an input that cannot be counted cheaply here (an fsspec URI such as ``s3://``, a remote URL list) → Ray;
3. more than ``auto_local_max_inputs`` local input files (counting stops there) → Ray; else in-process.

Files are counted, not images: sidecars (``.txt``, ``.json``) count too, so the bound errs towards Ray.
"""

from __future__ import annotations

import glob
import os
import sys
import tarfile
from collections.abc import Iterator

import pyarrow.parquet as pq

from curation import rundir
from curation.config import CurationConfig
from curation.sources import URL_LIST_EXTENSIONS


def connected_to_cluster() -> bool:
    """Whether this process was pointed at a Ray cluster (``RAY_ADDRESS``) or already joined one."""
    # Ray not imported yet: not initialised either (importing it to ask costs the small job ~0.3 s).
    ray = sys.modules.get("ray")
    return bool(os.environ.get("RAY_ADDRESS")) or (ray is not None and ray.is_initialized())


def _files(path: str) -> Iterator[int]:
    """One item per input file of a local input spec (a URL list yields one per URL)."""
    if any(ch in path for ch in "*?["):
        yield from (1 for p in glob.iglob(path, recursive=True) if os.path.isfile(p))
    elif os.path.isdir(path):
        for _, _, files in os.walk(path):
            yield from (1 for _ in files)
    elif path.lower().endswith(URL_LIST_EXTENSIONS) and path.lower().endswith(".parquet"):
        yield from (1 for _ in range(pq.ParquetFile(path).metadata.num_rows))
    elif path.lower().endswith(URL_LIST_EXTENSIONS):  # .csv: one URL a line
        with open(path, "rb") as f:
            yield from (1 for _ in f)
    elif path.lower().endswith(".tar") and tarfile.is_tarfile(path):
        with tarfile.open(path) as tar:
            yield from (1 for member in tar if member.isfile())
    elif os.path.exists(path):
        yield 1


def count_inputs_up_to(inputs: list[str], limit: int) -> int | None:
    """The number of local input files, counting at most ``limit + 1``; ``None`` if an input is not local."""
    count = 0
    for spec in inputs:
        path = rundir.local_path(spec)
        if path is None:
            return None
        for _ in _files(path):
            count += 1
            if count > limit:
                return count
    return count


def choose_executor(cfg: CurationConfig) -> tuple[str, str]:
    """(``"ray"`` or ``"local"``, why) for ``cfg.executor``; see the module docstring for ``auto``."""
    if cfg.executor != "auto":
        return cfg.executor, f"--executor {cfg.executor}"
    if connected_to_cluster():
        return "ray", "auto: a Ray cluster is named (RAY_ADDRESS)"
    remote = [s for s in cfg.inputs if rundir.local_path(s) is None and not s.startswith("memory://")]
    if remote:
        return "ray", f"auto: input {remote[0]!r} is not a local path"
    limit = cfg.auto_local_max_inputs
    local_inputs = [s for s in cfg.inputs if not s.startswith("memory://")]
    count = count_inputs_up_to(local_inputs, limit)
    if count is not None and count > limit:
        return "ray", f"auto: more than {limit} input files (--auto-local-max-inputs)"
    return "local", f"auto: {count} input files ≤ {limit} (--auto-local-max-inputs), no RAY_ADDRESS"
