"""The curation job on the demo corpus, on the session's Ray cluster."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import webdataset as wds

import manifests
from curation.config import CurationConfig, ShardConfig
from curation.demo_corpus import generate
from curation.pipeline import run
from tests.conftest import REPO


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    generate(out, n=8, seed=0)
    return out


@pytest.fixture(scope="module")
def curated(corpus, tmp_path_factory, ray_cluster):
    out = tmp_path_factory.mktemp("run")
    summary = run(
        CurationConfig(inputs=[str(corpus)], output=str(out), shards=ShardConfig(samples_per_shard=3))
    )
    return out, summary


def expected_rows(corpus) -> dict[str, dict]:
    return {
        json.loads(line)["path"]: json.loads(line)
        for line in (corpus / "expected.jsonl").read_text().splitlines()
    }


def test_every_input_ends_kept_or_rejected_as_expected(corpus, curated):
    out, summary = curated
    con = manifests.connect(out)
    rows = {
        src.rsplit("/", 1)[1]: (status, reason, tier)
        for src, status, reason, tier in con.execute(
            "SELECT source, status, reason, tier FROM images"
        ).fetchall()
    }
    expected = expected_rows(corpus)
    assert set(rows) == set(expected)  # nothing lost, nothing invented
    exact_group = {name for name, exp in expected.items() if exp["kind"] == "duplicate_exact"}
    exact_group |= {expected[name]["dup_of"] for name in exact_group}
    # One keeper per byte-identical group; which one is fixed by the keeper rule, not by file names.
    assert sorted(rows[name][:2] for name in exact_group) == [("kept", None), ("rejected", "duplicate")]
    for name, exp in expected.items():
        status, reason, tier = rows[name]
        if name in exact_group or exp["kind"] == "duplicate_near":
            continue  # near-duplicates need the perceptual-hash pass
        assert status == exp["expected_status"], name
        assert (reason or "").split(":")[0] == (exp["expected_reason"] or ""), name
        assert tier == exp["expected_tier"], name
    assert summary["inputs"] == len(expected)


def test_exact_duplicate_points_at_its_keeper(curated):
    con = manifests.connect(curated[0])
    (dup_of,) = con.execute("SELECT dup_of FROM images WHERE reason = 'duplicate'").fetchall()[0]
    assert con.execute(f"SELECT status FROM images WHERE key = '{dup_of}'").fetchall() == [("kept",)]


def test_shards_hold_original_bytes_and_manifest_names_them(corpus, curated):
    out, _ = curated
    con = manifests.connect(out)
    kept = {
        k: (src, shard, sha)
        for k, src, shard, sha in con.execute(
            "SELECT key, source, shard, sha256 FROM images WHERE status = 'kept'"
        ).fetchall()
    }
    seen = {}
    for tar in sorted((out / "shards" / "curated").glob("*/*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False):
            meta = json.loads(sample["json"])
            image = next(v for k, v in sample.items() if k in ("jpg", "png", "webp"))
            seen[sample["__key__"]] = (tar.relative_to(out).as_posix(), image, meta)
    assert set(seen) == set(kept)
    for key, (shard, image, meta) in seen.items():
        source, manifest_shard, sha = kept[key]
        assert shard == manifest_shard
        assert image == open(source.removeprefix("file://"), "rb").read()  # no re-encode
        assert meta["sha256"] == sha and meta["key"] == key


def test_rerun_is_idempotent(corpus, curated, tmp_path):
    out, first = curated
    before = {
        p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.suffix in (".tar", ".parquet")
    }
    second = run(
        CurationConfig(inputs=[str(corpus)], output=str(out), shards=ShardConfig(samples_per_shard=3))
    )
    after = {
        p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.suffix in (".tar", ".parquet")
    }
    assert after == before
    assert second["shards_written"] == 0 and second["kept"] == first["kept"]


def test_cli_runs_by_path(corpus, tmp_path, ray_cluster):
    # `python curation/run.py` joins the session cluster through RAY_ADDRESS (set by the fixture).
    result = subprocess.run(
        [sys.executable, "curation/run.py", "--input", str(corpus / "good_00*"), "--output", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "curation_summary.json").read_text())
    assert summary["inputs"] == 8
