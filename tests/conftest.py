"""Shared fixtures: one local Ray cluster per test session, offline environment."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# Offline and quiet, before ray/transformers are imported anywhere.
OFFLINE_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "WANDB_MODE": "disabled",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
os.environ.update(OFFLINE_ENV)
# Under `make test` (pytest-xdist) the test processes share the cores: each, and the CLIs it starts, gets
# its share of threads, since torch's default of one thread per core in every process oversubscribes the
# machine (a CPU-bound test ran 5× slower beside another).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(
        max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    )

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# bench/ is not an installed package (users get manifests, curation, captioning, training): tests of the bench
# scripts import them from this checkout, as `python -m bench.<name>` run from its root does.
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))
# The original LAION head beside the repository on the team's machines only; tests compare the copy shipped in
# curation/assets against it when it is there, and never need it.
SHARED_LAION_HEAD = (
    REPO.parent / "shared" / "models" / "laion-aesthetic-v2" / "sac+logos+ava1-l14-linearMSE.pth"
)


# The longest files (end-to-end runs, real SIGKILLs), longest first. `make test` runs files on two processes
# in collection order; starting these first lets them overlap instead of one finishing alone at the end.
LONGEST_FIRST = (
    "test_demo.py",
    "test_readme.py",
    "test_toy_run.py",
    "training/test_resume.py",
    "curation/test_resume.py",
    "curation/test_two_nodes.py",
    "training/test_sample_readme.py",
    "training/test_weak_to_strong.py",
    "training/test_evaluate_30k.py",
    "training/test_learning.py",
    "captioning/test_kill.py",
    "captioning/test_pipeline.py",
)


def pytest_collection_modifyitems(session, config, items) -> None:
    """Put LONGEST_FIRST's files first, in that order; every other test keeps its place (a stable sort)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    tests = Path(__file__).parent
    items.sort(key=lambda item: rank.get(Path(item.path).relative_to(tests).as_posix(), len(rank)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayCluster:
    """A `ray start --head --block` process on loopback; stopping it stops only this cluster."""

    def __init__(self, num_cpus: int = 2) -> None:
        self.port = free_port()
        self.dashboard_port = free_port()
        # Short temp dir: Ray's unix socket paths must stay under 107 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        cmd = [
            str(VENV_BIN / "ray"), "start", "--head", "--block",
            "--node-ip-address=127.0.0.1", f"--port={self.port}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--num-cpus={num_cpus}", f"--temp-dir={self.temp_dir}",
            "--object-store-memory=500000000", "--include-dashboard=true",
            # Every fixed default port moved, so two clusters on one machine never collide.
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
        ]  # fmt: skip
        self.log = open(Path(self.temp_dir) / "ray_start.log", "w")
        # The nodes run this venv's `python` (a `ray job submit … -- python …` entrypoint resolves it on PATH).
        env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 90) -> None:
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("ray head did not come up in time")

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the --block process (it stops what it started); after ``grace`` s, SIGKILL its group.

        Only this cluster's processes are touched: they all live in the process group started here.
        """
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers (workers) that outlived the head
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()


class RayWorkerNode:
    """A second node joined to ``head`` (`ray start --address … --block`): its own temp dir, ports and resources.

    ``prefix`` runs before `ray start` (e.g. `unshare -m bash -c 'mount …; exec "$@"' --`, a node whose mount
    table differs). ``stop`` ends only this node's processes (its own process group).
    """

    def __init__(self, head: RayCluster, *, num_cpus: int, resources: dict[str, float], prefix=()) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="raynode", dir="/tmp")
        cmd = [
            *prefix, str(VENV_BIN / "ray"), "start", f"--address={head.address}", "--block",
            "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", f"--resources={json.dumps(resources)}",
            f"--temp-dir={self.temp_dir}", "--object-store-memory=300000000",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
        ]  # fmt: skip
        self.log = open(Path(self.temp_dir) / "ray_start.log", "w")
        env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        self.node_id = self._wait_joined(head, resources)

    def _wait_joined(self, head: RayCluster, resources: dict[str, float], timeout: float = 90) -> str:
        """This node's Ray id, once the head lists it alive (asked from a separate driver process)."""
        (name,) = resources
        probe = (
            f"import json, ray; ray.init(address={head.address!r}, log_to_driver=False); "
            f"print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive'] and {name!r} in n['Resources']]))"
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {Path(self.log.name).read_text()[-2000:]}")
            out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
            ids = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else []
            if ids:
                return ids[0]
            time.sleep(1)
        raise RuntimeError("the worker node did not join in time")

    stop = RayCluster.stop


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session; this process is connected to it as a driver."""
    import ray

    cluster = RayCluster()
    os.environ["RAY_ADDRESS"] = cluster.address  # subprocess CLIs join this cluster
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)
    cluster.stop()


def ray_job_submit(
    cluster: RayCluster, entrypoint: list[str], *, cwd: Path, env: dict, working_dir: bool = True
) -> subprocess.CompletedProcess:
    """`ray job submit [--working-dir .] -- ENTRYPOINT` on ``cluster``; waits for the job to end.

    The head's job agent registers a few seconds after the dashboard answers: retried until it takes the job.
    """
    command = [str(VENV_BIN / "ray"), "job", "submit", "--address", cluster.dashboard]
    command += ["--working-dir", "."] if working_dir else []
    for _ in range(60):
        result = subprocess.run(
            [*command, "--", *entrypoint], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
        )
        if "No available agent" not in result.stdout + result.stderr:
            return result
        time.sleep(2)
    raise RuntimeError(f"the job agent never came up: {result.stderr[-2000:]}")


def dies_once(stage: type, flag: str) -> type:
    """``stage`` whose first call in any process SIGKILLs that process (as the OOM killer would; ``flag`` marks that
    it happened), and whose later calls run as ``stage``'s. Made inside a function, so Ray's cloudpickle sends the
    class to the actors by value."""

    class DiesOnce(stage):
        def __call__(self, *args):
            try:
                os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return super().__call__(*args)
            os.kill(os.getpid(), signal.SIGKILL)

    return DiesOnce
