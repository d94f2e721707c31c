"""Faults: SIGKILL the CLI driver at several points; the rerun ends exactly like a clean run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq

import manifests
from curation.demo_corpus import write_url_list
from curation.pipeline import run
from tests.conftest import REPO
from tests.curation.conftest import demo_config, demo_flags
from tests.curation.test_sources import http_corpus  # noqa: F401 (a fixture: the corpus over loopback HTTP)

# Kill points, in pipeline order: a committed scan + score chunk, then a committed shard.
KILL_WHEN = ("work/*/_committed/chunk-*", "shards/curated/*/_committed/*")


def outputs(root: Path) -> dict[str, bytes]:
    """Every visible shard and manifest part, by path relative to the run folder."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix in (".tar", ".parquet") and "work" not in p.parts
    }


def assert_nothing_partial(root: Path) -> None:
    """Every visible tar and Parquet file is whole (temporaries are hidden ``.*.tmp``)."""
    for path in root.rglob("*"):
        if "_committed" in path.parts:  # markers, named after their part
            continue
        if path.suffix == ".tar":
            with tarfile.open(path, "r:") as tar:
                assert all(tar.extractfile(m).read() is not None for m in tar if m.isfile())
        elif path.suffix == ".parquet":
            pq.read_table(path)


def run_cli(out: Path, flags: list[str], kill_when: str | None) -> int | None:
    """Run the CLI by path; SIGKILL it as soon as ``kill_when`` matches under ``out``. Returns the exit code."""
    proc = subprocess.Popen(
        [sys.executable, "curation/run.py", *flags],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if kill_when and any(out.glob(kill_when)):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    _, stderr = proc.communicate(timeout=300)
    if kill_when is None:
        assert proc.returncode == 0, stderr.decode()[-3000:]
    return proc.returncode


def test_killed_runs_resume_to_the_clean_result(demo_corpus, curated, tmp_path, ray_cluster, aesthetic_cfg):
    clean_root, clean_summary = curated
    out = tmp_path / "out"
    flags = demo_flags(demo_corpus, out, aesthetic_cfg)
    for kill_when in KILL_WHEN:
        code = run_cli(out, flags, kill_when)
        assert code == -signal.SIGKILL, f"run finished before {kill_when!r} matched"
        assert_nothing_partial(out)
    run_cli(out, flags, None)
    assert outputs(out) == outputs(clean_root)
    assert not list(out.rglob(".*.tmp"))
    kept = "SELECT key FROM images WHERE status = 'kept' ORDER BY key"
    assert (
        manifests.connect(out).execute(kept).fetchall()
        == manifests.connect(clean_root).execute(kept).fetchall()
    )


def test_killed_download_resumes_without_fetching_again(
    demo_corpus,
    http_corpus,  # noqa: F811
    tmp_path,
    ray_cluster,
    aesthetic_cfg,
):
    """SIGKILL once the URL list's shard is committed: the rerun reuses it (same tar, same marker) and ends with
    the manifest of a clean run."""
    url_list = write_url_list(demo_corpus, http_corpus, out=tmp_path / "urls.parquet")
    clean = tmp_path / "clean"
    run(demo_config(url_list, clean, aesthetic_cfg))
    out = tmp_path / "out"
    flags = demo_flags(url_list, out, aesthetic_cfg)
    shard_marker = "downloads/*/_committed/00000.committed"
    assert run_cli(out, flags, shard_marker) == -signal.SIGKILL
    (marker,) = out.glob(shard_marker)
    tar = marker.parent.parent / "00000.tar"
    before = (marker.stat().st_mtime_ns, tar.read_bytes())
    run_cli(out, flags, None)
    assert (marker.stat().st_mtime_ns, tar.read_bytes()) == before  # the shard was not fetched again
    rows = "SELECT key, status, reason, dup_of FROM images ORDER BY key"
    assert (
        manifests.connect(out).execute(rows).fetchall() == manifests.connect(clean).execute(rows).fetchall()
    )
