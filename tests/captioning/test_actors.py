"""The transformers captioner on plain Ray actors (issue 18, item 9): a captioner killed mid-run is replaced and the
captions equal an uninterrupted run's; the CLI on Ray prints no `E … constructor arguments in the object store` line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import manifests
from captioning import pipeline
from tests.captioning.test_pipeline import config
from tests.conftest import REPO, dies_once

E_LINE = "constructor arguments in the object store"
RAY_ERROR_LINE = re.compile(r"\[\d{4}-\d\d-\d\d [\d:,.]+ E \d+ \d+\]")  # Ray's C++ log: [date time E pid tid]


def captions(run: Path) -> list[tuple]:
    """(key, caption, status, reason) per row, as written: a rerun writes the same reasons (no object addresses)."""
    con = manifests.connect(run)
    rows = con.execute("SELECT key, caption, status, reason FROM captions ORDER BY key").fetchall()
    return rows


def test_a_captioner_killed_mid_run_is_replaced_and_captions_as_a_clean_run(
    curated_run, layout, tiny_llava, tiny_t5, ray_cluster, tmp_path, monkeypatch
):
    """The first generate call SIGKILLs its actor (as the OOM killer would): Ray restarts the actor, retries the
    call, and every caption row (text, status, reason) equals the uninterrupted run's."""
    clean = curated_run("clean")
    pipeline.run(config(clean, tiny_llava, tiny_t5))
    flag = str(tmp_path / "captioner-died")

    monkeypatch.setattr(pipeline, "Captioner", dies_once(pipeline.Captioner, flag))
    killed = curated_run("killed")
    pipeline.run(config(killed, tiny_llava, tiny_t5))
    assert Path(flag).exists()  # not vacuous: a captioner did die
    assert [row[0] for row in captions(killed)] == layout["kept"]
    assert captions(killed) == captions(clean)


def test_the_cli_on_ray_prints_no_constructor_argument_line(curated_run, layout, tiny_llava, tiny_t5, ray_cluster):
    run = curated_run()
    command = [
        sys.executable, "captioning/run.py", "--input", str(run), "--model", str(tiny_llava), "--tokenizer",
        str(tiny_t5), "--preset", "debug", "--max-new-tokens", "8", "--batch-size", "2",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=300, env=dict(os.environ))  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    assert E_LINE not in result.stdout and not RAY_ERROR_LINE.search(result.stdout), result.stdout[-3000:]
    assert [row[0] for row in captions(run)] == layout["kept"]
