"""Two executors for the partitioned phases: the same functions run in this process or as Ray tasks.

A phase is a top-level function over one small plan item (a partition, a bucket, a shard plan) that reads
and writes Parquet/tar files under the run folder and returns a small result (counts, a digest). The driver
only builds the list of items and folds the results; rows never pass through it. ``LocalExecutor`` runs the
items one after another (small jobs, tests, debugging; the scan, which is not a phase here, has its own process
pool in ``curation.pipeline``); ``RayExecutor`` runs each as a Ray task with
retries, keeping a bounded number in flight. (datatrove: ``executor/local.py`` beside ``executor/ray.py``.)

Before a Ray task runs its item it checks the run folder's nonce (``rundir.RunGuard``): a node that does not
mount the run folder fails the run with one line naming the node and the folder, before writing anything.
``RayExecutor.task_nodes`` counts the tasks each node ran.
"""

from __future__ import annotations

import logging
import resource
import socket
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from curation.rundir import RunGuard, find_not_shared

log = logging.getLogger(__name__)

# A worker's own footprint before its task reads anything (interpreter, pyarrow, duckdb, numpy, faiss): the base
# of every task's declared memory (``memory=``), an upper bound of the worker peak RSS measured by
# bench/bench_curation_scale.py (docs/benchmarks.md).
TASK_BASE_BYTES = 384 << 20


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

    def __init__(
        self, *, guard: RunGuard | None = None, max_in_flight: int | None = None, max_retries: int = 3
    ) -> None:
        self.guard = guard
        self.max_in_flight = max_in_flight
        self.max_retries = max_retries
        self.task_nodes: Counter[str] = Counter()  # Ray node id → tasks run there

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
        task = ray.remote(**options)(_guarded).options(name=fn.__name__)
        limit = self.max_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        results: list[Any] = [None] * len(items)
        pending: dict[Any, int] = {}
        next_item = 0
        while next_item < len(items) or pending:
            while next_item < len(items) and len(pending) < limit:
                pending[task.remote(fn, self.guard, items[next_item])] = next_item
                next_item += 1
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                try:
                    node, results[pending.pop(ref)] = ray.get(ref)
                except ray.exceptions.RayTaskError as err:
                    if (not_shared := find_not_shared(err)) is not None:
                        _drain(list(pending))  # their errors too are handled, not printed at exit
                        raise not_shared from None  # its one line, not a remote traceback
                    raise
                self.task_nodes[node] += 1
        return results


def _drain(refs: list[Any], timeout: float = 60.0) -> None:
    """Wait for tasks in flight and read their outcome, so Ray reports no unhandled error for them later."""
    import ray

    done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    for ref in done:
        try:
            ray.get(ref)
        except ray.exceptions.RayError as err:  # the run is failing already, with the error that stopped it
            log.debug("a task in flight when the run failed: %s", err)


def this_node() -> str:
    """This process's node for messages: host name, IP and (inside Ray) the Ray node id."""
    import ray

    if not ray.is_initialized():
        return f"node {socket.gethostname()}"
    node_id = ray.get_runtime_context().get_node_id()
    return f"node {socket.gethostname()} (IP {ray.util.get_node_ip_address()}, Ray node {node_id})"


def _guarded(fn: Callable[[Any], Any], guard: RunGuard | None, item: Any) -> tuple[str, Any]:
    """The task body: check that this node sees the run folder, run ``fn``, say where it ran."""
    import ray

    if guard is not None:
        guard.verify(node=this_node())
    return ray.get_runtime_context().get_node_id(), fn(item)


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
