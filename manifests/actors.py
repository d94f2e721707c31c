"""Model-holding stages on plain Ray actors: the curation scorer, the captioner, the shard writer.

Why not Ray Data's ``ActorPoolStrategy``: Ray Data passes ObjectRefs of its own (its DataContext, the map
transformer) to every pool actor's constructor and creates it with ``max_restarts=-1``, so Ray 2.60 prints
``E … core_worker.cc … has constructor arguments in the object store and max_restarts > 0`` once per pool
(ray-project/ray#57733, #53727), whatever our arguments; the only knob, ``max_restarts=0``, is deprecated
and gives up restarts. Here an actor's constructor receives its stage's config only, checked to stay under
Ray's inlining limit (so nothing of it lives in the object store), and the actors keep restarts on: an actor
that dies is restarted and its in-flight calls are retried (the stages' calls are idempotent: atomic writes,
the same bytes again). Large inputs travel as *method* arguments.

``run_on_actors`` is the one driver loop: optional read tasks (streaming generators, one per plan item, e.g.
a chunk's scan or a shard's read) feed the actor calls; at most ``calls_per_actor`` calls wait per actor and
at most ``reads_ahead`` read tasks run ahead of the actors (each holds ``READ_BACKPRESSURE`` outputs at most
until the driver takes them), so memory stays bounded whatever the plan's size. Results (counts, small rows)
come back in completion order; an exception in a stage fails the loop with its traceback, never a hang.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # Ray is imported where a Ray path starts (the local curation executor never loads it)
    import ray

log = logging.getLogger(__name__)

# Ray inlines a task or actor argument smaller than `max_direct_call_object_size` (100 KiB by default) into
# the task spec; a larger one is put in the object store, and a constructor argument there is what makes Ray
# print the E line (core_worker.cc, ray-project/ray#53727). Constructor arguments must stay below it.
INLINE_BYTES = 100 * 1024
# Restarts as Ray Data gave its pool actors (-1: unbounded, so independent losses over a days-long run never
# end it); retries per call bounded, so a call that kills its actor on every try (a poison input, an OOM that
# always recurs) fails the run with its error instead of looping. Ray Data retried calls without bound.
MAX_RESTARTS = -1
MAX_TASK_RETRIES = 4
# How long the actors' placement group may wait for resources before each warning that says what it waits for.
PLACEMENT_WARN_SECONDS = 30
# Outputs a read task may hold that the driver has not taken yet (Ray's streaming-generator backpressure).
READ_BACKPRESSURE = 2


@dataclass(frozen=True)
class ActorSpec:
    """A pool of actors, each ``cls(**kwargs)``, with the resources the wiring declares (from config)."""

    cls: type
    kwargs: dict[str, Any] = field(default_factory=dict)
    num_actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory: int | None = None  # bytes per actor, when the caller's plan declares it
    calls_per_actor: int = 2  # one running, one waiting: the actor never idles between calls

    def __post_init__(self) -> None:
        if self.num_actors < 1 or self.calls_per_actor < 1:
            raise ValueError(
                f"num_actors and calls_per_actor must be ≥ 1, got {self.num_actors} and {self.calls_per_actor}"
            )

    def check_inlined(self) -> None:
        """Refuse constructor arguments Ray would put in the object store: ``(cls, kwargs)`` as Ray serializes
        them (cloudpickle, a class defined in ``__main__`` or a function travels by value)."""
        from ray import cloudpickle

        size = len(cloudpickle.dumps((self.cls, self.kwargs)))
        if size >= INLINE_BYTES:
            raise ValueError(
                f"{self.cls.__name__}'s constructor arguments are {size} bytes, over Ray's {INLINE_BYTES}-byte "
                "inlining limit: pass paths or configs, and send large inputs as method arguments"
            )

    def bundle(self) -> dict[str, float]:
        """One actor's reservation in the placement group (a bundle needs some resource: a sliver of CPU)."""
        bundle = {"CPU": self.num_cpus, "GPU": self.num_gpus, "memory": self.memory or 0}
        return {k: v for k, v in bundle.items() if v} or {"CPU": 0.01}


class _StageActor:
    """The actor around one stage instance: loads it once, then calls it (``stage(*args)``) per call."""

    def __init__(self, cls: type, kwargs: dict[str, Any]) -> None:
        self.stage = cls(**kwargs)

    def call(self, *args: Any) -> Any:
        return self.stage(*args)


def reserve(spec: ActorSpec) -> ray.util.placement_group.PlacementGroup:
    """A placement group of one bundle per actor, spread over the nodes (Ray Data's default for its pools),
    waited for: the actors' resources are theirs before any read task starts, and a restarted actor gets its
    bundle back. Without it, read tasks queued behind a full actor pool take the CPUs a starting or restarting
    actor needs and then wait for that actor to take their outputs: a deadlock."""
    import ray
    from ray.util.placement_group import placement_group

    group = placement_group([spec.bundle()] * spec.num_actors, strategy="SPREAD")
    while not ray.wait([group.ready()], timeout=PLACEMENT_WARN_SECONDS)[0]:
        log.warning(
            "waiting for resources for %d %s actors (%s each); the cluster has %s",
            spec.num_actors, spec.cls.__name__, spec.bundle(), ray.cluster_resources(),
        )  # fmt: skip
    return group


def start_actors(spec: ActorSpec, group: ray.util.placement_group.PlacementGroup) -> list[ray.actor.ActorHandle]:
    """``spec.num_actors`` actors, actor i in bundle i of ``group``, with restarts on and idempotent calls
    retried."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    spec.check_inlined()
    options: dict[str, Any] = {
        "num_cpus": spec.num_cpus,
        "num_gpus": spec.num_gpus,
        "max_restarts": MAX_RESTARTS,
        "max_task_retries": MAX_TASK_RETRIES,
    }
    if spec.memory is not None:
        options["memory"] = spec.memory
    actor = ray.remote(_StageActor)
    return [
        actor.options(
            **options, scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)
        ).remote(spec.cls, spec.kwargs)
        for i in range(spec.num_actors)
    ]


def warn_if_reads_cannot_run(spec: ActorSpec, read_cpus: float) -> None:
    """Warn when the actors take every CPU the cluster has now: the read tasks would wait until it grows."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0.0)
    if read_cpus and cpus - spec.num_actors * spec.num_cpus < read_cpus:
        log.warning(
            "%d %s actors × %g CPUs leave less than %g of the cluster's %g CPUs to the read tasks: they wait "
            "until the cluster grows (fewer actors or fewer CPUs per actor)",
            spec.num_actors, spec.cls.__name__, spec.num_cpus, read_cpus, cpus,
        )  # fmt: skip


def run_on_actors(
    spec: ActorSpec,
    items: Iterable[Any],
    *,
    read: Callable[..., Iterator[Any]] | None = None,
    read_args: tuple[Any, ...] = (),
    read_resources: dict[str, Any] | None = None,
    reads_ahead: int = 1,
) -> Iterator[Any]:
    """Each item through the actors: ``stage(item)``, or with ``read`` (a generator function, run as a Ray task
    per item with ``read_resources``: ``num_cpus``, ``memory``) ``stage(output)`` for every output of
    ``read(item, *read_args)``. Yields each call's result as it finishes; the actors are released when the loop
    ends, however it ends."""
    import ray

    if reads_ahead < 1:
        raise ValueError(f"reads_ahead must be ≥ 1, got {reads_ahead}")
    if read is not None:
        warn_if_reads_cannot_run(spec, (read_resources or {}).get("num_cpus", 1))
        read = ray.remote(read).options(
            num_returns="streaming", _generator_backpressure_num_objects=READ_BACKPRESSURE, **(read_resources or {})
        )
    spec.check_inlined()  # before reserving anything
    group = reserve(spec)
    try:
        actors = start_actors(spec, group)
    except BaseException:
        ray.util.remove_placement_group(group)
        raise
    free = deque(actor for _ in range(spec.calls_per_actor) for actor in actors)  # call slots, round robin
    calls: dict[ray.ObjectRef, ray.actor.ActorHandle] = {}
    reads: set[ray.ObjectRefGenerator] = set()  # running read tasks
    ready: deque[tuple[Any, ...]] = deque()  # the arguments of calls whose input is there
    todo = iter(items)
    try:
        while True:
            while read is not None and len(reads) < reads_ahead and (item := next(todo, _END)) is not _END:
                reads.add(read.remote(item, *read_args))
            while free:  # every free slot gets a call, if there is one to make
                if ready:
                    args = ready.popleft()
                elif read is None and (item := next(todo, _END)) is not _END:
                    args = (item,)
                else:
                    break
                actor = free.popleft()
                calls[actor.call.remote(*args)] = actor
            # A read's next output is taken only when no taken one waits: the rest wait in their tasks.
            waitables = [*calls, *(reads if not ready else ())]
            if not waitables:  # no call, no read running, and (the slots being free) no item left
                return
            # fetch_local=False: a read's output goes from its task's node to the actor's, never through this one
            (done,), _ = ray.wait(waitables, num_returns=1, fetch_local=False)
            if isinstance(done, ray.ObjectRefGenerator):
                try:
                    ready.append((next(done),))
                except StopIteration:
                    reads.remove(done)
            else:
                free.append(calls.pop(done))
                yield ray.get(done)  # a stage's exception is raised here, with its traceback
    finally:
        for generator in reads:
            ray.cancel(generator, force=True)
        for actor in actors:
            ray.kill(actor, no_restart=True)
        ray.util.remove_placement_group(group)


_END = object()
