"""Issue 18: the defaults the README's cluster command runs with, `--executor auto`, and the run-folder nonce."""

from __future__ import annotations

import os
import re
import shlex
import tarfile
from pathlib import Path

import pytest

from curation import auto
from curation.config import CurationConfig
from curation.executor import RayExecutor
from curation.run import parse_args
from curation.rundir import NONCE_FILE, RunFolderNotShared, RunGuard, find_not_shared, write_nonce
from tests.conftest import REPO

# ----------------------------------------------------------------------------------------------------
# Defaults: embeddings kept and SemDeDup on, in the README's cluster command


def readme_curation_command() -> list[str]:
    """The README's curation command, its variables at their documented defaults, as argv after run.py."""
    readme = (REPO / "README.md").read_text()
    defaults = dict(re.findall(r"^(\w+)=\$\{\1:-(.*?)\}\s", readme, flags=re.MULTILINE))
    (command,) = re.findall(r"python curation/run\.py (.*?--num-gpus \"\$GPUS\")", readme, flags=re.DOTALL)
    command = command.replace("\\\n", " ")
    return [re.sub(r"\$(\w+)", lambda m: defaults[m.group(1)], arg) for arg in shlex.split(command)]


def test_the_readme_cluster_command_keeps_embeddings_and_runs_semdedup():
    argv = readme_curation_command()
    assert "--semantic-dedup" in argv and "--input" in argv
    cfg = parse_args(argv)
    assert cfg.aesthetic.save_embeddings and cfg.semantic_dedup and cfg.semantic_dedup_off_reason is None
    assert cfg.executor == "auto"  # under `ray job submit` RAY_ADDRESS is set: Ray


def test_semantic_dedup_defaults_and_reasons():
    cfg = CurationConfig(inputs=["x"], output="o")
    assert cfg.aesthetic.save_embeddings and cfg.semantic_dedup
    off = parse_args(["--input", "x", "--output", "o", "--no-semantic-dedup"])
    assert not off.semantic_dedup and "--no-semantic-dedup" in off.semantic_dedup_off_reason
    no_embeddings = parse_args(["--input", "x", "--output", "o", "--no-save-embeddings"])
    assert (
        not no_embeddings.semantic_dedup and "--no-save-embeddings" in no_embeddings.semantic_dedup_off_reason
    )
    with pytest.raises(ValueError, match="dedup.semantic needs aesthetic.save_embeddings"):
        parse_args(["--input", "x", "--output", "o", "--no-save-embeddings", "--semantic-dedup"])


# ----------------------------------------------------------------------------------------------------
# --executor auto


@pytest.fixture
def folder_of_files(tmp_path) -> Path:
    """12 files in nested folders, a tar of 5 files and a 4-line CSV URL list."""
    root = tmp_path / "in"
    for i in range(12):
        path = root / f"d{i % 3}" / f"e{i % 2}" / f"f{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for i in range(5):
            tar.add(root / "d0" / "e0" / "f0.jpg", arcname=f"s{i}.jpg")
    (tmp_path / "urls.csv").write_text("url\n" + "".join(f"http://127.0.0.1/{i}.jpg\n" for i in range(3)))
    return tmp_path


def brute_force_count(inputs: list[str]) -> int:
    """Files under folders + tar members + URL-list lines, by plain os.walk / tarfile / readlines."""
    total = 0
    for spec in inputs:
        if os.path.isdir(spec):
            total += sum(len(files) for _, _, files in os.walk(spec))
        elif spec.endswith(".tar"):
            total += len(tarfile.open(spec).getnames())
        else:
            total += len(Path(spec).read_text().splitlines())
    return total


@pytest.mark.parametrize("limit", [0, 5, 19, 20, 100])
def test_count_inputs_up_to_matches_brute_force(folder_of_files, limit):
    inputs = [
        str(folder_of_files / "in"),
        str(folder_of_files / "shard.tar"),
        str(folder_of_files / "urls.csv"),
    ]
    total = brute_force_count(inputs)
    assert total == 12 + 5 + 4
    assert auto.count_inputs_up_to(inputs, limit) == min(total, limit + 1)
    assert auto.count_inputs_up_to([str(folder_of_files / "in" / "**" / "*.jpg")], 100) == 12  # a glob
    assert auto.count_inputs_up_to(["s3://bucket/raw/"], limit) is None


def test_auto_picks_local_for_a_small_job_and_ray_for_a_cluster_or_a_big_one(folder_of_files, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(auto, "connected_to_cluster", lambda: bool(os.environ.get("RAY_ADDRESS")))
    inputs = [str(folder_of_files / "in")]

    def pick(**kw) -> str:
        return auto.choose_executor(CurationConfig(inputs=kw.pop("inputs", inputs), output="o", **kw))[0]

    assert pick(auto_local_max_inputs=12) == "local" and pick(auto_local_max_inputs=11) == "ray"
    assert pick(inputs=["s3://bucket/raw/"]) == "ray"
    assert pick(executor="ray", auto_local_max_inputs=100) == "ray" and pick(executor="local") == "local"
    monkeypatch.setenv(
        "RAY_ADDRESS", "127.0.0.1:1"
    )  # as `ray job submit` sets it: the user asked for the cluster
    assert pick(auto_local_max_inputs=100) == "ray"
    assert "RAY_ADDRESS" in auto.choose_executor(CurationConfig(inputs=inputs, output="o"))[1]


# ----------------------------------------------------------------------------------------------------
# The run-folder nonce


def test_guard_accepts_its_own_nonce_and_names_the_node_and_folder_otherwise(tmp_path):
    guard = RunGuard(str(tmp_path), write_nonce(tmp_path))
    guard.verify(node="node a")
    with pytest.raises(
        RunFolderNotShared, match=rf"^node b does not see the run folder {tmp_path / 'elsewhere'} \(no "
    ):
        RunGuard(str(tmp_path / "elsewhere"), guard.nonce).verify(node="node b")
    (tmp_path / NONCE_FILE).write_text("another run")
    with pytest.raises(RunFolderNotShared, match="is another run's"):
        guard.verify(node="node a")
    assert write_nonce(tmp_path) != guard.nonce  # a fresh one per run


def test_guard_reads_a_missing_nonce_again_before_failing_but_not_a_wrong_one(tmp_path, monkeypatch):
    """An NFS client can miss a just-written file for a moment: a missing nonce is read again, a bounded
    number of times (NONCE_READS, NONCE_RETRY_SECONDS apart); another run's nonce fails at once."""
    from curation import rundir

    nonce = "this run's"
    slept: list[float] = []

    def appears_after_first_wait(seconds: float) -> None:
        slept.append(seconds)
        (tmp_path / NONCE_FILE).write_text(nonce)

    monkeypatch.setattr(rundir.time, "sleep", appears_after_first_wait)
    RunGuard(str(tmp_path), nonce).verify(node="node a")
    assert slept == [rundir.NONCE_RETRY_SECONDS]

    slept.clear()
    monkeypatch.setattr(rundir.time, "sleep", slept.append)  # never appears
    with pytest.raises(RunFolderNotShared, match=r"\(no \.curation_nonce there\)"):
        RunGuard(str(tmp_path / "elsewhere"), nonce).verify(node="node b")
    assert slept == [rundir.NONCE_RETRY_SECONDS] * (rundir.NONCE_READS - 1)
    assert rundir.NONCE_READS * rundir.NONCE_RETRY_SECONDS <= 5  # bounded: a missing mount still fails fast

    slept.clear()
    with pytest.raises(RunFolderNotShared, match="is another run's"):
        RunGuard(str(tmp_path), "another run's").verify(node="node a")
    assert slept == []


def test_a_ray_task_that_does_not_see_the_nonce_writes_nothing_and_fails_in_one_line(ray_cluster, tmp_path):
    write_nonce(tmp_path)
    wrong = RunGuard(str(tmp_path), "not this run's")
    items = [str(tmp_path / f"out-{i}") for i in range(4)]
    with pytest.raises(RunFolderNotShared) as caught:  # os.mkdir: a writer the Ray workers can import
        RayExecutor(guard=wrong).map(os.mkdir, items)
    assert type(caught.value) is RunFolderNotShared and "\n" not in str(caught.value)
    assert str(caught.value).startswith("node ") and f"Ray node {ray_cluster_node_id()}" in str(caught.value)
    assert not any(Path(p).exists() for p in items)  # checked before writing
    right = RayExecutor(guard=RunGuard(str(tmp_path), (tmp_path / NONCE_FILE).read_text()))
    assert right.map(os.mkdir, items) == [None] * len(items) and all(Path(p).is_dir() for p in items)
    assert sum(right.task_nodes.values()) == len(items)


def ray_cluster_node_id() -> str:
    import ray

    (node,) = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    return node


def test_find_not_shared_unwraps_ray_errors():
    import ray

    inner = RunFolderNotShared("node x does not see the run folder /r")
    wrapped = ray.exceptions.RayTaskError("fn", "Traceback …", inner)
    try:
        try:
            raise wrapped
        except Exception as err:
            raise RuntimeError("Ray Data: a task failed") from err
    except RuntimeError as outer:
        assert find_not_shared(outer) is inner
    assert find_not_shared(ValueError("other")) is None


def test_scan_and_score_workers_check_the_nonce_before_reading_or_writing(tmp_path, aesthetic_cfg):
    """The Ray Data scan tasks and the scorer actors (which write scored batches and commit chunks) have the
    same check as the executor's tasks: they run on any node."""
    import pyarrow as pa

    from curation.config import DecodeConfig, TierConfig
    from curation.pipeline import ChunkWork, CommitTarget, ScanChunk, ScannedBatch, ScoreAndCommit

    write_nonce(tmp_path)
    work = ChunkWork("chunk-r00", str(tmp_path / "absent.parquet"), 1, "digest")
    target = CommitTarget(
        scored=str(tmp_path / "scored"), embeddings=None, batches=str(tmp_path / "batches"), batch_size=1
    )
    stranger = RunGuard(str(tmp_path), "another run's")
    scan = ScanChunk(TierConfig(), DecodeConfig(), clip_size=64, guard=stranger)
    with pytest.raises(RunFolderNotShared, match=f"does not see the run folder {tmp_path} "):
        next(iter(scan(work)))
    score = ScoreAndCommit(aesthetic_cfg, target, guard=stranger)
    with pytest.raises(RunFolderNotShared, match=f"does not see the run folder {tmp_path} "):
        score(ScannedBatch(work, 0, pa.table({"key": ["k"]})))
    assert not (tmp_path / "batches").exists() and not (tmp_path / "scored").exists()
