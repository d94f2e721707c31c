"""Two Ray nodes on one machine (issue 18): a real curation job runs its tasks on the second node, and a node
that does not see the run folder fails the job with one line naming that node and the folder, losing nothing.

The head starts with no CPUs, so every task and actor of the job must run on the worker node (`--resources
'{"node2": 1}'`, its own temp dir and ports). The node "without the mount" is the same `ray start` inside its
own mount namespace (`unshare -m`), with an empty tmpfs over the run folder's parent: the driver writes the
run folder, that node's tasks see an empty folder, as on a cluster node that never mounted the shared storage.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curation.pipeline import run
from tests.conftest import REPO, VENV_BIN, RayCluster, RayWorkerNode
from tests.curation.conftest import demo_config, demo_flags

pytestmark = pytest.mark.timeout(600)


def without_mount(hidden: Path) -> list[str]:
    """A command prefix that runs the rest in a mount namespace where ``hidden`` is an empty tmpfs."""
    base = (
        ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
    )  # -r: a user namespace, unprivileged
    if subprocess.run([*base, "true"], capture_output=True).returncode != 0:
        pytest.skip(f"`{' '.join(base)}` is not permitted here: no node without the mount to simulate")
    mount = f'mount -t tmpfs tmpfs {shlex.quote(str(hidden))} && exec "$@"'
    return [*base, "bash", "-c", mount, "bash"]


def curate(head: RayCluster, flags: list[str]) -> subprocess.CompletedProcess:
    """`python curation/run.py FLAGS` as a driver of ``head``'s cluster (``RAY_ADDRESS``)."""
    env = {**os.environ, "RAY_ADDRESS": head.address, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    command = [sys.executable, "curation/run.py", *flags]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)


def outcome(root: Path) -> tuple[list[tuple], dict[str, bytes]]:
    """Every manifest row's (key, status, reason, shard) in key order, and every shard's bytes by name."""
    images = pq.read_table(root / "manifests" / "images", columns=["key", "status", "reason", "shard"])
    rows = sorted(tuple(r.values()) for r in images.to_pylist())
    shards = {p.name: p.read_bytes() for p in sorted((root / "shards" / "curated").rglob("*.tar"))}
    return rows, shards


def test_tasks_run_on_the_second_node_and_a_node_without_the_folder_stops_the_job(
    demo_corpus, aesthetic_cfg, tmp_path
):
    shared = tmp_path / "shared"  # "the shared storage": hidden from the broken node
    out = shared / "run"
    flags = demo_flags(demo_corpus, out, aesthetic_cfg)
    reference = tmp_path / "reference"  # the same job in one process, no Ray
    run(demo_config(demo_corpus, reference, aesthetic_cfg, executor="local"))

    head = RayCluster(num_cpus=0)  # schedules nothing itself: every task needs the worker node
    try:
        shared.mkdir()
        broken = RayWorkerNode(head, num_cpus=2, resources={"node2": 1}, prefix=without_mount(shared))
        try:
            failed = curate(head, flags)
        finally:
            broken.stop()
        healthy = RayWorkerNode(head, num_cpus=2, resources={"node2": 1})
        try:
            result = curate(head, flags)
        finally:
            healthy.stop()
    finally:
        head.stop()

    # The broken node: exit 1 and one line naming the node and the folder, no traceback.
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr, failed.stderr[-3000:]
    (line,) = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert f"Ray node {broken.node_id}" in line and f"does not see the run folder {out} " in line, line
    assert "(IP " in line and "every Ray node mounts" in line

    # The rerun on a healthy cluster: every phase task ran on node2, and the result is the whole job's.
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "curation_summary.json").read_text())
    assert summary["executor"] == "ray"
    assert (
        set(summary["tasks_per_node"]) == {healthy.node_id} and summary["tasks_per_node"][healthy.node_id] > 5
    )
    assert outcome(out) == outcome(reference)
