"""The curation job on the demo corpus, on the session's Ray cluster (tiny CLIP + the real LAION head)."""

from __future__ import annotations

import json

import pytest
import webdataset as wds

import manifests
from curation.pipeline import run
from curation.stages import hamming
from tests.curation.conftest import demo_config


def expected_rows(corpus) -> dict[str, dict]:
    return {
        json.loads(line)["path"]: json.loads(line)
        for line in (corpus / "expected.jsonl").read_text().splitlines()
    }


def test_every_input_ends_kept_or_rejected_as_expected(demo_corpus, curated):
    out, summary = curated
    con = manifests.connect(out)
    rows = {
        src.rsplit("/", 1)[1]: (status, reason, tier, dup_of)
        for src, status, reason, tier, dup_of in con.execute(
            "SELECT source, status, reason, tier, dup_of FROM images"
        ).fetchall()
    }
    expected = expected_rows(demo_corpus)
    assert set(rows) == set(expected)  # nothing lost, nothing invented
    group = {name for name, exp in expected.items() if exp["kind"].startswith("duplicate_")}
    group |= {expected[name]["dup_of"] for name in group}
    # One keeper for the original, its byte copy and its re-encode (pHash distance 0); which one is
    # fixed by the keeper rule (equal pixels, so the higher tiny-CLIP score), not by file names.
    categories = sorted((rows[name][0], (rows[name][1] or "").split(":")[0]) for name in group)
    assert categories == [("kept", "")] + [("rejected", "duplicate")] * 2
    keeper_key = con.execute(
        "SELECT key FROM images WHERE source LIKE '%' || ? AND status = 'kept'",
        [next(name for name in group if rows[name][0] == "kept")],
    ).fetchone()[0]
    assert {rows[name][3] for name in group if rows[name][0] == "rejected"} == {keeper_key}
    # Each names the test that matched its keeper directly, and the distance (the manifest's own hashes).
    hashes = {
        key: (sha, ph) for key, sha, ph in con.execute("SELECT key, sha256, phash FROM images").fetchall()
    }
    for key, reason in con.execute(
        "SELECT key, reason FROM images WHERE reason LIKE 'duplicate%'"
    ).fetchall():
        (sha, ph), (keeper_sha, keeper_ph) = hashes[key], hashes[keeper_key]
        assert reason == (
            "duplicate: sha256" if sha == keeper_sha else f"duplicate: phash {hamming(ph, keeper_ph)}"
        )
    for name, exp in expected.items():
        status, reason, tier, _ = rows[name]
        if name in group:
            continue
        assert status == exp["expected_status"], name
        assert (reason or "").split(":")[0] == (exp["expected_reason"] or ""), name
        assert tier == exp["expected_tier"], name
    assert summary["inputs"] == len(expected)
    assert summary["rejected_per_reason"]["duplicate"] == 2


def test_kept_rows_carry_score_hash_and_model_ids(curated, aesthetic_cfg):
    con = manifests.connect(curated[0])
    rows = con.execute(
        "SELECT aesthetic, aesthetic_model, clip_model, phash, sha256 FROM images WHERE status = 'kept'"
    ).fetchall()
    assert rows and all(a is not None and p is not None and s for a, _, _, p, s in rows)
    assert {(m, c) for _, m, c, _, _ in rows} == {
        ("laion_aesthetic_v2.safetensors@sha256:88ad5c5b60b7", aesthetic_cfg.clip_model)
    }
    # Rows rejected before the decode are never scored.
    assert con.execute(
        "SELECT count(*) FROM images WHERE reason = 'too_small' AND aesthetic IS NOT NULL"
    ).fetchone() == (0,)


def test_shards_hold_original_bytes_and_manifest_names_them(curated):
    out, _ = curated
    con = manifests.connect(out)
    kept = {
        k: (src, shard, sha, aes)
        for k, src, shard, sha, aes in con.execute(
            "SELECT key, source, shard, sha256, aesthetic FROM images WHERE status = 'kept'"
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
        source, manifest_shard, sha, aesthetic = kept[key]
        assert shard == manifest_shard
        assert image == open(source.removeprefix("file://"), "rb").read()  # no re-encode
        assert meta["sha256"] == sha and meta["key"] == key
        assert meta["aesthetic"] == pytest.approx(aesthetic) and meta["tier"] in ("1k", "4k")


def test_shards_read_with_hf_datasets(curated):
    """HF's WebDataset builder wants one member layout per dataset: each tier × format group loads whole."""
    from datasets import load_dataset

    out, summary = curated
    groups: dict[str, list[str]] = {}
    for tar in sorted((out / "shards" / "curated").glob("*/*.tar")):
        groups.setdefault(tar.name.rsplit("-", 1)[0], []).append(str(tar))  # "1k-png-000000.tar" → "1k-png"
    assert {g.split("-")[1] for g in groups} >= {"jpg", "png", "webp"}
    total = 0
    for group, tars in groups.items():
        tier, ext = group.split("-")
        dataset = load_dataset("webdataset", data_files={"train": tars}, split="train")
        for sample in dataset:
            assert sample["json"]["key"] == sample["__key__"] and sample["json"]["tier"] == tier
            width, height = sample[ext].size
            assert min(width, height) >= 1024 and (tier == "1k" or width * height >= 3840 * 2160)
        total += len(dataset)
    assert total == summary["kept"]


def test_rerun_is_idempotent(demo_corpus, curated, aesthetic_cfg):
    out, first = curated
    before = {
        p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.suffix in (".tar", ".parquet")
    }
    second = run(demo_config(demo_corpus, out, aesthetic_cfg))
    after = {
        p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.suffix in (".tar", ".parquet")
    }
    assert after == before
    assert second["shards_written"] == 0 and second["kept"] == first["kept"]


def test_thresholds_and_embeddings(demo_corpus, tmp_path, ray_cluster, aesthetic_cfg):
    """A 4k threshold no score reaches rejects the 4K image only; embeddings land in their side manifest."""
    cfg = demo_config(demo_corpus, tmp_path, aesthetic_cfg, report=False)
    cfg.aesthetic = type(aesthetic_cfg)(
        **{**aesthetic_cfg.__dict__, "min_score": {"4k": 1e9}, "save_embeddings": True}
    )
    summary = run(cfg)
    con = manifests.connect(tmp_path)
    assert summary["rejected_per_reason"]["low_aesthetic"] == 1 and "4k" not in summary["kept_per_tier"]
    assert con.execute(
        "SELECT width * height >= 3840 * 2160 FROM images WHERE reason = 'low_aesthetic'"
    ).fetchall() == [(True,)]
    scored, dims = con.execute("SELECT count(*), min(len(embedding)) FROM clip_embeddings").fetchone()
    assert scored == con.execute("SELECT count(*) FROM images WHERE aesthetic IS NOT NULL").fetchone()[0]
    assert dims == 768
