"""Quiet, useful logs (issues 11, 18): our own Ray calls raise no deprecation warning, and a healthy run
prints neither Ray Data's INFO progress blocks nor libraries' INFO lines through the root logger.

Ray itself warns about its own settings on first use; only warnings pointing at our code count.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

from curation.config import CurationConfig
from curation.pipeline import ChunkPlan, ChunkWork, CommitTarget, _scan_dataset
from tests.conftest import REPO, VENV_BIN
from tests.curation.conftest import demo_flags


def test_no_deprecated_ray_remote_args(aesthetic_cfg, ray_cluster):
    cfg = CurationConfig(inputs=["unused"], output="unused", aesthetic=aesthetic_cfg)
    plan = ChunkPlan(
        works=(ChunkWork("chunk-r00", "unused.parquet", 3, "digest"),),
        target=CommitTarget(scored="unused", embeddings=None, batches="unused", batch_size=64),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _scan_dataset(plan, cfg, clip_size=224)  # builds the plan, runs nothing
    ours = [  # our files: in the repository, not in its .venv (where `make` puts Ray itself)
        w
        for w in caught
        if issubclass(w.category, DeprecationWarning)
        and w.filename.startswith(str(REPO))
        and not w.filename.startswith(sys.prefix)
    ]
    assert [f"{w.filename}:{w.lineno}: {w.message}" for w in ours] == []


# Ray Data's INFO lines: the execution plan, "Running Dataset", its progress blocks off a terminal.
RAY_DATA_CHATTER = ("streaming_executor", "logging_progress", "Running Dataset", "Progress will be logged")


@pytest.mark.parametrize("executor", ["ray", "auto"])
def test_a_healthy_run_logs_no_library_chatter(executor, demo_corpus, aesthetic_cfg, ray_cluster, tmp_path):
    """`--executor ray` on the session cluster, and `auto` with no cluster named (→ in-process): the log
    holds our lines, not Ray Data's progress blocks nor open_clip's model-load lines through the root logger."""
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    if executor == "auto":
        env.pop("RAY_ADDRESS", None)
    out = tmp_path / "run"
    command = [
        sys.executable,
        "curation/run.py",
        *demo_flags(demo_corpus, out, aesthetic_cfg),
        "--executor",
        executor,
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert [word for word in RAY_DATA_CHATTER if word in output] == [], output[-3000:]
    assert "INFO root:" not in output and "\r" not in output, output[-3000:]
    expected = "executor: local (auto:" if executor == "auto" else "executor: ray (--executor ray)"
    assert expected in output and "semantic dedup off: turned off" in output


# Ray's "E … core_worker.cc … has constructor arguments in the object store and max_restarts > 0" line. Ray Data
# 2.60 creates every map actor with ObjectRefs (its DataContext, the map transformer) and an actor handle as
# constructor arguments, and with max_restarts=-1, so the line comes for any actor pool, whatever our arguments
# (ray-project/ray#57733, open). Ours are small (configs, a plan of a few fields per chunk). Avoiding it would
# take max_restarts=0 (a lost scorer fails the run, the rerun resumes from committed chunks) or plain Ray actors
# instead of Ray Data's pool: a choice for the lead (issue 18, item 9), not a silenced stderr.
ACTOR_POOL = """
import ray, ray.data
class Identity:
    def __call__(self, batch):
        return batch
ray.init(log_to_driver=False)
ray.data.range(1).map_batches(Identity, compute=ray.data.ActorPoolStrategy(size=1)).materialize()
"""


@pytest.mark.xfail(strict=True, reason="Ray Data passes ObjectRefs to its map actors: ray-project/ray#57733")
def test_a_ray_data_actor_pool_with_no_arguments_prints_no_constructor_argument_error(ray_cluster):
    """A strict xfail: passes (and so fails, to be removed) once Ray Data stops printing the line."""
    result = subprocess.run(
        [sys.executable, "-c", ACTOR_POOL], capture_output=True, text=True, timeout=300, env=dict(os.environ)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "constructor arguments in the object store" not in output, output[-3000:]
