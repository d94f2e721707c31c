"""Plain Ray actors for the jobs' model-holding stages (issue 18, item 9): every item once, the results a plain loop
gives, bounded in-flight work, a killed actor replaced and its call retried, and no `E … constructor arguments in the
object store` line from Ray while restarts stay on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import ray

from manifests.actors import INLINE_BYTES, MAX_RESTARTS, ActorSpec, run_on_actors
from tests.conftest import REPO

E_LINE = "constructor arguments in the object store"
# The stages below live in this test module, which Ray's workers cannot import by name: they travel by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Square:
    """A stage: loads nothing, returns (item, item²)."""

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset

    def __call__(self, item: int) -> tuple[int, int]:
        return item, item * item + self.offset


def split(item: int, parts: int):
    """A read task: ``parts`` outputs per item."""
    for part in range(parts):
        yield item * 100 + part


def test_results_are_a_plain_loops_whatever_the_order(ray_cluster):
    items = list(range(23))
    expected = sorted(Square(offset=1)(i) for i in items)  # the reference: the stage called in a loop
    spec = ActorSpec(Square, {"offset": 1}, num_actors=2, num_cpus=0.5)
    assert sorted(run_on_actors(spec, items)) == expected


def test_read_tasks_feed_every_output_to_the_actors(ray_cluster):
    items = list(range(7))
    expected = sorted(Square()(out) for i in items for out in split(i, 3))
    spec = ActorSpec(Square, num_actors=1, num_cpus=0.5)
    results = run_on_actors(spec, items, read=split, read_args=(3,), read_resources={"num_cpus": 0.25}, reads_ahead=2)
    assert sorted(results) == expected


@pytest.mark.parametrize("with_read", [False, True])
def test_in_flight_work_is_bounded(ray_cluster, with_read):
    """Items drawn but not yet returned never exceed the call slots (+ the read tasks ahead and the one output
    taken from them), however many items there are: the driver holds plans and counts, not the whole plan's work."""
    drawn = []

    def items():
        for i in range(40):
            drawn.append(i)
            yield i

    spec = ActorSpec(Square, num_actors=2, num_cpus=0.5, calls_per_actor=2)
    reads_ahead = 2
    bound = spec.num_actors * spec.calls_per_actor + (reads_ahead + 1 if with_read else 0)
    results = run_on_actors(
        spec, items(), read=split if with_read else None, read_args=(1,), read_resources={"num_cpus": 0.25},
        reads_ahead=reads_ahead,
    )  # fmt: skip
    ahead = []
    for returned, _ in enumerate(results, start=1):
        ahead.append(len(drawn) - returned)
    assert len(ahead) == 40 and max(ahead) <= bound, ahead


class DiesOnce(Square):
    """Kills its own process (SIGKILL, as the OOM killer would) on its first call of the run, once."""

    def __init__(self, flag: str) -> None:
        super().__init__()
        self.flag = flag

    def __call__(self, item: int) -> tuple[int, int]:
        try:
            os.close(os.open(self.flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return super().__call__(item)
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")


def test_a_killed_actor_is_replaced_and_its_call_retried(ray_cluster, tmp_path):
    flag = tmp_path / "died"
    items = list(range(9))
    spec = ActorSpec(DiesOnce, {"flag": str(flag)}, num_actors=1, num_cpus=0.5)
    assert sorted(run_on_actors(spec, items)) == sorted(Square()(i) for i in items)
    assert flag.exists()  # not vacuous: the actor did die


class Fails(Square):
    def __call__(self, item: int) -> tuple[int, int]:
        if item == 3:
            raise ValueError(f"a planted stage error on item {item}")
        return super().__call__(item)


def test_a_stage_error_fails_the_loop_with_its_traceback(ray_cluster):
    spec = ActorSpec(Fails, num_actors=2, num_cpus=0.5)
    with pytest.raises(ray.exceptions.RayTaskError, match="a planted stage error on item 3") as caught:
        list(run_on_actors(spec, range(8)))
    assert "in __call__" in str(caught.value)  # the stage's own frame


def read_fails(item: int):
    if item == 2:
        raise ValueError(f"a planted read error on item {item}")
    yield item


def test_a_read_task_error_fails_the_loop_with_its_traceback(ray_cluster):
    spec = ActorSpec(Square, num_actors=1, num_cpus=0.5)
    with pytest.raises(ray.exceptions.RayTaskError, match="a planted read error on item 2") as caught:
        list(run_on_actors(spec, range(5), read=read_fails, read_resources={"num_cpus": 0.25}))
    assert "raise ValueError(f\"a planted read error" in str(caught.value)  # the read's own frame


def test_constructor_arguments_over_the_inlining_limit_are_refused():
    with pytest.raises(ValueError, match=r"Square's constructor arguments are \d+ bytes, over Ray's 102400"):
        ActorSpec(Square, {"offset": b"x" * INLINE_BYTES}).check_inlined()
    ActorSpec(Square, {"offset": b"x" * (INLINE_BYTES // 2)}).check_inlined()  # half of it is fine


def test_a_class_sent_by_value_counts_in_the_constructor_arguments():
    """Ray pickles (cls, kwargs): a class defined in a test module or in __main__ travels by value, its code too."""
    body = {f"method_{i}": (lambda self, i=i: "x" * 40 + str(i)) for i in range(1200)}
    big = type("Big", (Square,), {"__module__": __name__, **body})
    with pytest.raises(ValueError, match="Big's constructor arguments"):
        ActorSpec(big, {"offset": 1}).check_inlined()


CONTENDED = """
import os, signal, sys, time, ray
from manifests.actors import ActorSpec, run_on_actors

FLAG = sys.argv[1]

class Stage:  # in __main__: travels by value; with a flag path, SIGKILLs its actor on its 5th call, once
    def __init__(self):
        self.calls = 0
    def __call__(self, x):
        self.calls += 1
        if FLAG != "-" and self.calls == 5 and not os.path.exists(FLAG):
            open(FLAG, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.02)
        return x

def read(item):  # more outputs than a read task may hold untaken: it waits on the driver holding its CPU
    for part in range(10):
        yield item, part

ray.init(log_to_driver=False)
cpus = int(ray.cluster_resources()["CPU"])
spec = ActorSpec(Stage, num_actors=1, num_cpus=1)
out = list(run_on_actors(spec, range(6), read=read, read_resources={"num_cpus": 1}, reads_ahead=cpus))
print("results", len(out), len(set(out)), os.path.exists(FLAG), flush=True)
"""


@pytest.mark.parametrize("killed", [False, True], ids=["starting", "restarting"])
def test_read_tasks_ahead_never_take_the_cpus_an_actor_needs(ray_cluster, tmp_path, killed):
    """Reads queued as many as the cluster has CPUs, each with more outputs than it may hold untaken: were the
    actor's CPU not reserved, a read would take it (at start, or while a killed actor restarts) and wait forever
    for that actor to take its outputs. Every output must come through once, in bounded time."""
    flag = str(tmp_path / "killed") if killed else "-"
    try:
        result = subprocess.run([sys.executable, "-c", CONTENDED, flag], cwd=REPO, capture_output=True, text=True,
                                timeout=120, env=dict(os.environ))  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("run_on_actors hung: read tasks hold the CPUs the actor needs")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"results 60 60 {killed}" in result.stdout, result.stdout + result.stderr[-3000:]


QUIET = """
import sys, ray
from manifests.actors import ActorSpec, run_on_actors

class Square:  # in __main__: travels to the workers by value
    def __init__(self, offset):
        self.offset = offset
    def __call__(self, item):
        return item, item * item + self.offset

ray.init(log_to_driver=True)
spec = ActorSpec(Square, {"offset": 1}, num_actors=2, num_cpus=0.5)
print("results", sorted(run_on_actors(spec, range(5))), flush=True)
print("-- control --", flush=True)

@ray.remote(max_restarts=1, num_cpus=0.5)
class Big:  # the control: a constructor argument Ray puts in the object store
    def __init__(self, data):
        self.size = len(data)
    def size_of(self):
        return self.size

print("control", ray.get(Big.remote(b"x" * (2 * INLINE)).size_of.remote()), flush=True)
"""


def test_our_actors_make_ray_print_no_constructor_argument_line(ray_cluster):
    """A driver joined to the session cluster runs a pool with restarts on (MAX_RESTARTS ≠ 0): Ray prints no `E …
    constructor arguments in the object store` line for it; the control (an actor whose constructor argument is over
    the limit, restarts on) shows the same driver does print the line when it applies."""
    assert MAX_RESTARTS != 0  # -1: unbounded, as Ray Data's pools
    code = QUIET.replace("INLINE", str(INLINE_BYTES))
    result = subprocess.run(  # one stream, in the order things happened (Ray's line goes to stderr)
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=300, env=dict(os.environ),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    ours, _, control = result.stdout.partition("-- control --")
    assert "results [(0, 1), (1, 2), (2, 5), (3, 10), (4, 17)]" in ours, ours[-3000:]
    assert E_LINE not in ours, ours[-3000:]
    assert E_LINE in control and "'Big'" in control, control[-3000:]


def test_actors_that_take_every_cpu_warn_that_the_reads_would_wait(ray_cluster, caplog):
    """The session cluster has 2 CPUs: two 1-CPU actors leave none to a read task (a hang to explain, not to hit)."""
    from manifests.actors import warn_if_reads_cannot_run

    with caplog.at_level("WARNING", logger="manifests.actors"):
        warn_if_reads_cannot_run(ActorSpec(Square, num_actors=1, num_cpus=1), 1)
        assert caplog.records == []
        warn_if_reads_cannot_run(ActorSpec(Square, num_actors=2, num_cpus=1), 1)
    (record,) = caplog.records
    assert "2 Square actors × 1 CPUs leave less than 1 of the cluster's 2 CPUs" in record.getMessage()
