"""`ray job submit --working-dir . -- python curation/run.py …` against the session's `ray start --head`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from curation.demo_corpus import generate
from tests.conftest import REPO, VENV_BIN
from tests.curation.conftest import clip_flags


def test_ray_job_submit_runs_curation(ray_cluster, tmp_path, aesthetic_cfg):
    corpus = tmp_path / "corpus"
    generate(corpus, n=4, seed=1)
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.dashboard}
    command = [
        str(VENV_BIN / "ray"), "job", "submit", "--address", ray_cluster.dashboard, "--working-dir", ".",
        "--", sys.executable, "curation/run.py", "--input", str(corpus), "--output", str(out), *clip_flags(aesthetic_cfg),
    ]  # fmt: skip
    for _ in range(30):  # the head's job agent registers a few seconds after the dashboard answers
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in result.stderr:
            break
        time.sleep(2)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "succeeded" in result.stdout
    summary = json.loads((out / "curation_summary.json").read_text())
    expected = [json.loads(line) for line in (corpus / "expected.jsonl").read_text().splitlines()]
    assert summary["inputs"] == len(expected)
    # The original, its byte copy and its re-encode are one group with one keeper.
    assert summary["kept"] == sum(e["expected_status"] == "kept" for e in expected)
