"""The eval set: stratified SQL draw, disjoint from training by key, sha256 and pHash; shards and prompts."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

import manifests
from manifests.evalset import EvalSetSpec, allocate, eval_rows, main
from manifests.selection import SelectionSpec, register_excluded, select
from tests.manifests.factories import make_run


def image(key: str, *, tier: str = "1k", aesthetic: float | None = 5.0, sha: str | None = None,
          phash: int | None = None, caption: str | None = "a caption") -> dict:  # fmt: skip
    return {
        "key": key, "source": f"file:///{key}.jpg", "status": "kept", "width": 64, "height": 64,
        "format": "JPEG", "sha256": sha or key * 4, "tier": tier, "shard": "shards/x.tar",
        "caption_orig": caption, "aesthetic": aesthetic, "phash": phash,
    }  # fmt: skip


def draw(root, spec: EvalSetSpec):
    con = manifests.connect(root)
    register_excluded(con, root, spec.exclude)
    return eval_rows(con, spec)


def test_eval_set_is_disjoint_by_key_sha256_and_phash_group(tmp_path):
    train = [
        image("t1", sha="s1", phash=0x0F0F),
        image("t2", sha="s2", phash=None),
        image("t3", phash=1 << 40),
    ]
    candidates = [
        image("c_same_bytes", sha="s1"),  # sha256 of t1
        image("c_near", phash=0x0F0F ^ 0b1010),  # 2 bits from t1
        image("c_near_t3", phash=((1 << 40) ^ 1) - (1 << 63)),  # 2 bits from t3, sign bit included
        image("c_far", phash=0x0F0F ^ 0xFF),  # 8 bits from t1: another image
        image("c_no_phash", phash=None),  # the perceptual pass did not run: key and sha256 only
        image("c_no_prompt", caption=None),  # nothing to prompt with
    ]
    manifests.ManifestWriter(tmp_path / "manifests" / "images", "images").write(train + candidates, "part-0")
    select(tmp_path, SelectionSpec("train", "key LIKE 't%'"))
    table, _, _ = draw(tmp_path, EvalSetSpec(exclude=("train",), num_samples=100))
    assert table.column("key").to_pylist() == ["c_far", "c_no_phash"]
    table, _, _ = draw(tmp_path, EvalSetSpec(exclude=("train",), num_samples=100, phash_max_distance=8))
    assert table.column("key").to_pylist() == ["c_no_phash"]
    table, _, _ = draw(tmp_path, EvalSetSpec(num_samples=100))  # nothing excluded
    assert len(table) == len(train) + len(candidates) - 1


def test_stratified_draw_is_proportional_and_seeded(tmp_path):
    rows = [image(f"a{i:03d}", tier="1k", aesthetic=float(i % 10)) for i in range(60)]
    rows += [image(f"b{i:03d}", tier="4k", aesthetic=float(i % 10)) for i in range(20)]
    rows += [image(f"c{i:03d}", tier="1k", aesthetic=None) for i in range(20)]
    manifests.ManifestWriter(tmp_path / "manifests" / "images", "images").write(rows, "part-0")
    spec = EvalSetSpec(num_samples=20, num_aesthetic_buckets=2, seed=1)
    table, _, strata = draw(tmp_path, spec)
    assert len(table) == 20
    assert {(s["tier"], s["aesthetic_bucket"]): s["num_selected"] for s in strata} == {
        ("1k", 0): 4, ("1k", 1): 6, ("1k", 2): 6, ("4k", 1): 2, ("4k", 2): 2,
    }  # fmt: skip
    assert [s["num_candidates"] for s in strata] == [20, 30, 30, 10, 10]
    low = [r for r in table.to_pylist() if r["tier"] == "1k" and r["aesthetic_bucket"] == 1]
    assert all(r["aesthetic"] <= 4 for r in low)  # the lower half of the 1k scores
    assert table.equals(draw(tmp_path, spec)[0])
    other = draw(tmp_path, EvalSetSpec(num_samples=20, num_aesthetic_buckets=2, seed=2))[0]
    assert other.column("key").to_pylist() != table.column("key").to_pylist()


def test_allocate_uses_largest_remainder():
    assert allocate({("a", 1): 5, ("b", 1): 3, ("c", 1): 2}, 5) == {("a", 1): 3, ("b", 1): 1, ("c", 1): 1}
    assert allocate({("a", 1): 2}, 10) == {("a", 1): 2}


@pytest.mark.parametrize(
    ("fields", "message"), [({"num_samples": 0}, "num_samples"), ({"prompt": "x"}, "prompt")]
)
def test_spec_rejects_bad_values(fields, message):
    with pytest.raises(ValueError, match=message):
        EvalSetSpec(**fields)


def test_eval_shards_and_prompts(ray_cluster, tmp_path, capsys):
    rows = make_run(tmp_path, num_images=12)
    select(tmp_path, SelectionSpec("train", "aesthetic < 5.5"))
    main(["--input", str(tmp_path), "--exclude", "train", "--num-samples", "4", "--samples-per-shard", "3"])
    assert "eval set eval: 4 rows" in capsys.readouterr().out
    out = tmp_path / "eval_shards" / "eval"
    train_keys = set(
        pq.read_table(tmp_path / "selections" / "train" / "rows.parquet").column("key").to_pylist()
    )
    prompts = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == 4 and train_keys.isdisjoint(p["key"] for p in prompts)
    by_key = {r["key"]: r for r in rows}
    for p in prompts:
        assert p["prompt"] == (by_key[p["key"]]["caption_vlm"] or by_key[p["key"]]["caption_orig"])
    assert (out / "prompts.txt").read_text().splitlines() == [p["prompt"] for p in prompts]
    assert sorted(p.name for p in out.glob("eval-*.tar")) == ["eval-000000.tar", "eval-000001.tar"]
    info = json.loads((out / "eval.json").read_text())
    assert info["inputs"]["excluded_selections"].keys() == {"train"}
    assert sum(s["num_selected"] for s in info["strata"]) == 4
