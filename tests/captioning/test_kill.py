"""Resume after a real SIGKILL: the CLI driver is killed once it has committed a part but not all of them;
the rerun of the same command skips the committed keys and ends with exactly one row per selected key."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import webdataset as wds

import manifests
from captioning import pipeline
from tests.captioning.conftest import _row, encode, make_image
from tests.conftest import REPO

EXTRA_KEYS = [f"x{i:03d}" for i in range(48)]  # enough rows that the kill lands mid-run
EXTRA_SHARD = "shards/curated/1k/1k-000001.tar"


def add_rows(root: Path) -> None:
    """More kept rows for the tiny curated run: one more shard and one more ``images`` part."""
    path = root / EXTRA_SHARD
    with wds.TarWriter(str(path)) as sink:
        for i, key in enumerate(EXTRA_KEYS):
            sink.write({"__key__": key, "png": encode(make_image(100 + i, (40, 32)), "PNG"), "json": b"{}"})
    rows = [{**_row(key, "1k", "PNG", (40, 32)), "shard": EXTRA_SHARD} for key in EXTRA_KEYS]
    manifests.ManifestWriter(root / "manifests" / "images", "images").write(rows, "part-00001")


def start(args: list[str], log: Path, ray_cluster) -> subprocess.Popen:
    """The CLI by path, joined to the session cluster, in its own process group (killed as a whole)."""
    with open(log, "wb") as stderr:  # a file, not a pipe: a full pipe would stall the driver while we poll
        return subprocess.Popen(
            [sys.executable, "captioning/run.py", *args],
            cwd=REPO,
            env={**os.environ, "RAY_ADDRESS": ray_cluster.address},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )


def committed_keys(captions_dir: Path) -> list[str]:
    return [
        key
        for part in manifests.committed_parts(captions_dir)
        for key in pq.read_table(part)["key"].to_pylist()
    ]


def test_sigkilled_run_reruns_to_one_row_per_key(
    curated_run, layout, tiny_llava, tiny_t5, tmp_path, ray_cluster
):
    run = curated_run()
    add_rows(run)
    expected = sorted(layout["kept"] + EXTRA_KEYS)
    captions_dir = run / pipeline.CAPTIONS_DIR
    args = [
        "--input", str(run), "--model", str(tiny_llava), "--tokenizer", str(tiny_t5), "--preset", "debug",
        "--max-new-tokens", "8", "--batch-size", "2", "--rows-per-part", "2",
    ]  # fmt: skip

    # First run: SIGKILL the driver's process group as soon as one part is committed.
    proc = start(args, tmp_path / "killed.log", ray_cluster)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and not manifests.committed_parts(captions_dir):
        time.sleep(0.01)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    log = (tmp_path / "killed.log").read_text(errors="replace")[-3000:]
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{log}"
    done = committed_keys(captions_dir)
    # Not vacuous: killed after some rows were committed and before all of them were.
    assert 0 < len(done) < len(expected), (len(done), log)
    assert len(done) == len(set(done))
    uncommitted = [
        p for p in captions_dir.glob("*.parquet") if p not in manifests.committed_parts(captions_dir)
    ]
    resolved = json.loads((run / pipeline.CONFIG_FILE).read_text())
    captioner, prompt = resolved["captioner"], resolved["prompt_text"]

    # Rerun the same command to completion.
    proc = start(args, tmp_path / "rerun.log", ray_cluster)
    assert proc.wait(timeout=240) == 0, (tmp_path / "rerun.log").read_text(errors="replace")[-3000:]
    summary = json.loads((run / pipeline.SUMMARY_FILE).read_text())
    assert (summary["captioner"], summary["prompt"]) == (captioner, prompt)
    assert summary["selected"] == len(expected)
    assert summary["skipped_already_captioned"] == len(done)
    assert summary["captioned"] == len(expected) - len(done)
    assert summary["uncommitted_parts_removed"] == len(uncommitted)

    # Exactly one row per selected key for this (captioner, prompt): no duplicate, none missing.
    con = manifests.connect(run)
    counts = con.execute(
        "SELECT key, count(*) FROM captions WHERE captioner = ? AND prompt = ? GROUP BY key ORDER BY key",
        [captioner, prompt],
    ).fetchall()
    assert counts == [(key, 1) for key in expected]
    assert con.execute("SELECT count(*) FROM captions").fetchone()[0] == len(expected)
    assert sorted(committed_keys(captions_dir)) == expected
    # Nothing visible is uncommitted or partial (temporaries are hidden ``.*.tmp``).
    visible = sorted(captions_dir.glob("*.parquet"))
    assert visible == manifests.committed_parts(captions_dir)
    assert sum(pq.read_table(p).num_rows for p in visible) == len(expected)
