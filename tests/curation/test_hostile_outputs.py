"""Hostile outputs (issue 14): the run folder is never left inconsistent, shared, re-ingested or cleaned of
a user's files. Each case was reproduced on the old driver loop."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import manifests
from curation.config import CurationConfig, ShardConfig
from curation.pipeline import run
from curation.rundir import remove_stale_temporaries
from tests.conftest import REPO
from tests.curation.conftest import TINY_CLIP_DEDUP


def write_images(folder: Path, seeds: range) -> None:
    """Distinct 1K pictures (smooth random colours, so their pHashes differ), one JPEG per seed."""
    folder.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        rng = np.random.default_rng(seed)
        small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        small.resize((1024 + 8 * seed, 1024), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
        (folder / f"img{seed:03d}.jpg").write_bytes(buffer.getvalue())


def config(inputs: list[Path], out: Path, aesthetic_cfg, **overrides) -> CurationConfig:
    return CurationConfig(
        inputs=[str(p) for p in inputs],
        output=str(out),
        shards=ShardConfig(samples_per_shard=2),
        aesthetic=aesthetic_cfg,
        chunk_size=3,
        report=False,
        **{"dedup": TINY_CLIP_DEDUP, **overrides},
    )


def shard_contents(out: Path) -> dict[str, str]:
    """Key → the shard (relative path) that holds it, over every tar under shards/curated."""
    found: dict[str, str] = {}
    for tar_path in sorted((out / "shards" / "curated").glob("*/*.tar")):
        with tarfile.open(tar_path) as tar:
            for name in tar.getnames():
                key, _, ext = name.partition(".")
                if ext != "json":
                    assert key not in found, f"{key} is in two shards"
                    found[key] = tar_path.relative_to(out).as_posix()
    return found


def kept_shards(out: Path) -> dict[str, str]:
    con = manifests.connect(out)
    return dict(con.execute("SELECT key, shard FROM images WHERE status = 'kept'").fetchall())


def test_rerun_after_adding_inputs_keeps_every_kept_row_in_the_shard_the_manifest_names(
    tmp_path, ray_cluster, aesthetic_cfg
):
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    write_images(corpus, range(6))
    first = run(config([corpus], out, aesthetic_cfg))
    assert first["kept"] == 6 and shard_contents(out) == kept_shards(out)
    write_images(corpus, range(6, 9))  # three more pictures in the same input folder
    second = run(config([corpus], out, aesthetic_cfg))
    assert second["inputs"] == second["kept"] == 9
    assert shard_contents(out) == kept_shards(out)  # each kept row in the shard named, no stray sample


def test_another_run_into_the_same_folder_is_refused(tmp_path, aesthetic_cfg):
    first_corpus, other_corpus, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    write_images(first_corpus, range(3))
    write_images(other_corpus, range(10, 13))
    run(config([first_corpus], out, aesthetic_cfg, executor="local"))
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and "work" not in p.parts}
    with pytest.raises(RuntimeError, match="other inputs"):
        run(config([other_corpus], out, aesthetic_cfg, executor="local"))
    after = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and "work" not in p.parts}
    assert after == before


def test_a_second_concurrent_run_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path, aesthetic_cfg):
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    write_images(corpus, range(2))
    cfg = config([corpus], out, aesthetic_cfg, executor="local")
    holder = subprocess.Popen(  # another run's process, holding the run folder's lock as a run does
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from curation.rundir import run_lock\n"
         "with run_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(120)", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        with pytest.raises(RuntimeError, match="another curation run"):
            run(cfg)
        assert not (out / "manifests").exists()
    finally:
        holder.kill()
        holder.wait()
    assert run(cfg)["kept"] == 2  # the kernel dropped the dead holder's lock


def test_output_inside_input_is_never_reingested(tmp_path, aesthetic_cfg):
    corpus = tmp_path / "photos"
    write_images(corpus, range(3))
    out = corpus / "curated"  # the output lives inside the input folder
    first = run(config([corpus], out, aesthetic_cfg, executor="local"))
    second = run(config([corpus], out, aesthetic_cfg, executor="local"))
    assert first["inputs"] == second["inputs"] == second["kept"] == 3
    sources = [s for (s,) in manifests.connect(out).execute("SELECT source FROM images").fetchall()]
    assert not any("/curated/" in s for s in sources)
    # And an input inside the output is refused before anything runs.
    with pytest.raises(ValueError, match="inside --output"):
        run(dataclasses.replace(config([out / "shards"], out, aesthetic_cfg, executor="local")))


def test_only_our_own_temporaries_are_removed(tmp_path):
    out = tmp_path / "out"
    ours = [
        out / "manifests" / "images" / ".part-00000.parquet.0123abcd.tmp",
        out / "shards" / "curated" / "1k" / ".1k-jpg-r00_ab12cd34ef.tar.89abcdef.tmp",
        out / "shards" / "curated" / "1k" / "_committed" / ".1k-jpg-r00_ab12cd34ef.tar.fedcba98.tmp",
        out / ".curation_summary.json.00c0ffee.tmp",
    ]
    users = [
        out / ".draft.tmp",  # hidden, .tmp, but not one of our names
        out / "notes" / ".todo.0123abcd.tmp",  # our name pattern, in a folder we never write
        out / "manifests" / "images" / "mine.tmp",
    ]
    for path in ours + users:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    assert remove_stale_temporaries(out) == len(ours)
    assert [p.exists() for p in ours] == [False] * len(ours)
    assert [p.exists() for p in users] == [True] * len(users)
