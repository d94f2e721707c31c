"""Two executors for the partitioned phases: the same functions run in this process or as Ray tasks.

A phase is a top-level function over one small plan item (a partition, a bucket, a shard plan) that reads
and writes Parquet/tar files under the run folder and returns a small result (counts, a digest). The driver
only builds the list of items and folds the results; rows never pass through it. ``LocalExecutor`` runs the
items one after another (tests, benchmarks, debugging); ``RayExecutor`` runs each as a Ray task with
retries, keeping a bounded number in flight. (datatrove: ``executor/local.py`` beside ``executor/ray.py``.)
"""

from __future__ import annotations

import resource
from collections.abc import Callable, Sequence
from typing import Any, Protocol


class Executor(Protocol):
    name: str

    def map(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[Any],
        *,
        num_cpus: float = 1.0,
        memory: int | None = None,
    ) -> list[Any]:
        """``[fn(item) for item in items]``, in order; ``memory``: bytes one item's task may hold (Ray
        schedules no more tasks on a node than its memory takes; the local executor ignores it)."""
        ...


class LocalExecutor:
    """Every item in this process, in order."""

    name = "local"

    def map(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[Any],
        *,
        num_cpus: float = 1.0,
        memory: int | None = None,
    ) -> list[Any]:
        return [fn(item) for item in items]


class RayExecutor:
    """Every item as a Ray task (``max_retries``: a lost worker's item runs again; phases are idempotent)."""

    name = "ray"

    def __init__(self, *, max_in_flight: int | None = None, max_retries: int = 3) -> None:
        self.max_in_flight = max_in_flight
        self.max_retries = max_retries

    def map(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[Any],
        *,
        num_cpus: float = 1.0,
        memory: int | None = None,
    ) -> list[Any]:
        import ray

        if not items:
            return []
        options = {"num_cpus": num_cpus, "max_retries": self.max_retries}
        if memory:
            largest = max(n["Resources"].get("memory", 0) for n in ray.nodes() if n["Alive"])
            if memory > largest:  # Ray would wait forever for a node that big
                raise ValueError(f"{fn.__name__} needs {memory / 2**30:.1f} GiB per task; the largest node has "
                                 f"{largest / 2**30:.1f} GiB (lower rows_per_partition)")  # fmt: skip
            options["memory"] = int(memory)
        task = ray.remote(**options)(fn)
        limit = self.max_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        results: list[Any] = [None] * len(items)
        pending: dict[Any, int] = {}
        next_item = 0
        while next_item < len(items) or pending:
            while next_item < len(items) and len(pending) < limit:
                pending[task.remote(items[next_item])] = next_item
                next_item += 1
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                results[pending.pop(ref)] = ray.get(ref)
        return results


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
