"""SQL selection: WHERE, limit, seeded sampling, exclusion, hashes; the DuckDB views it reads."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import manifests
from manifests.selection import SelectionSpec, main, phash_bands, select
from tests.manifests.factories import make_run


@pytest.fixture
def run(tmp_path):
    return tmp_path, make_run(tmp_path, num_images=40)


def selected_keys(root, name: str) -> list[str]:
    return pq.read_table(root / "selections" / name / "rows.parquet").column("key").to_pylist()


def record(root, name: str) -> dict:
    return json.loads((root / "selections" / name / "selection.json").read_text())


def test_where_selects_kept_rows_ordered_by_key_with_both_captions(run):
    root, rows = run
    select(root, SelectionSpec("fourk", "tier = '4k' AND aesthetic >= 5"))
    expected = [r for r in rows if r["tier"] == "4k" and r["aesthetic"] >= 5]
    assert selected_keys(root, "fourk") == [r["key"] for r in expected]
    table = pq.read_table(root / "selections" / "fourk" / "rows.parquet").to_pylist()
    assert [t["caption_vlm"] for t in table] == [r["caption_vlm"] for r in expected]
    assert [t["caption_orig"] for t in table] == [r["caption_orig"] for r in expected]
    assert {t["captioner"] for t in table if t["caption_vlm"]} == {"tiny-vlm@0"}  # rejected caption ignored
    assert record(root, "fourk")["num_rows"] == len(expected)


def test_limit_takes_the_first_keys(run):
    root, rows = run
    select(root, SelectionSpec("first5", limit=5))
    assert selected_keys(root, "first5") == [r["key"] for r in rows[:5]]


def test_sample_fraction_is_deterministic_by_seed_and_independent_of_where(run):
    root, rows = run
    select(root, SelectionSpec("a", sample_fraction=0.5, seed=1))
    select(root, SelectionSpec("b", sample_fraction=0.5, seed=1))
    select(root, SelectionSpec("c", sample_fraction=0.5, seed=2))
    select(root, SelectionSpec("d", "tier = '1k'", sample_fraction=0.5, seed=1))
    a, c, d = selected_keys(root, "a"), selected_keys(root, "c"), selected_keys(root, "d")
    assert a == selected_keys(root, "b")
    assert a != c
    assert 8 <= len(a) <= 32  # 40 rows at p = 0.5
    assert set(d) == {k for k in a if next(r for r in rows if r["key"] == k)["tier"] == "1k"}
    assert (root / "selections" / "a" / "rows.parquet").read_bytes() == (
        root / "selections" / "b" / "rows.parquet"
    ).read_bytes()


def test_hashes_change_with_query_and_inputs_but_not_on_rerun(run):
    root, rows = run
    select(root, SelectionSpec("s", "tier = '1k'"))
    first = record(root, "s")
    select(root, SelectionSpec("s", "tier = '1k'"))
    assert record(root, "s") == first
    select(root, SelectionSpec("s", "tier = '1k' AND true"))
    second = record(root, "s")
    assert second["query_sha256"] != first["query_sha256"]
    assert second["inputs_sha256"] == first["inputs_sha256"]
    assert second["keys_sha256"] == first["keys_sha256"]
    # A new captions part (another captioner) changes the inputs, not the query.
    manifests.ManifestWriter(root / "manifests" / "captions", "captions").write(
        [{"key": rows[0]["key"], "caption": "x", "captioner": "b", "prompt": "p", "status": "kept"}],
        "part-00001",
    )
    select(root, SelectionSpec("s", "tier = '1k' AND true"))
    third = record(root, "s")
    assert third["query_sha256"] == second["query_sha256"]
    assert third["inputs_sha256"] != second["inputs_sha256"]
    assert set(third["inputs"]["captions"]) == {
        "manifests/captions/part-00000.parquet",
        "manifests/captions/part-00001.parquet",
    }


def test_exclude_drops_same_key_sha256_and_near_phash(run):
    root, rows = run
    select(root, SelectionSpec("held", "key IN ('00000001', '00000002')"))
    held = {r["key"]: r for r in rows if r["key"] in ("00000001", "00000002")}
    # Another image with the bytes of a held one, and one whose pHash is 3 bits from a held one.
    twin = dict(rows[3], key="0a000001", sha256=held["00000001"]["sha256"], phash=None)
    near = dict(rows[4], key="0a000002", sha256="f" * 64, phash=held["00000002"]["phash"] ^ 0b1011)
    far = dict(rows[6], key="0a000003", sha256="e" * 64, phash=held["00000002"]["phash"] ^ 0b11111)
    extra = [{k: v for k, v in r.items() if k not in ("data", "caption_vlm")} for r in (twin, near, far)]
    manifests.ManifestWriter(root / "manifests" / "images", "images").write(extra, "part-00001")
    select(root, SelectionSpec("train", exclude=("held",)))
    keys = set(selected_keys(root, "train"))
    assert keys.isdisjoint({"00000001", "00000002", "0a000001", "0a000002"})
    assert "0a000003" in keys  # 5 bits apart: another image
    assert {r["key"] for r in rows if r["phash"] is None} - set(held) <= keys  # null pHash: key/sha256 only
    assert len(keys) == len(rows) - 2 + 1
    assert record(root, "train")["inputs"]["excluded_selections"] == {
        "held": record(root, "held")["keys_sha256"]
    }


@pytest.mark.parametrize("max_distance", [0, 4, 9, 14])
def test_phash_bands_cover_64_bits_in_max_distance_plus_one_bands(max_distance):
    bands = phash_bands("p", max_distance)
    assert len(bands) == max_distance + 1
    widths = (
        [64] if max_distance == 0 else [(int(b.rsplit("& ", 1)[1][:-1]) + 1).bit_length() - 1 for b in bands]
    )
    assert sum(widths) == 64


def test_views_shards_and_rejects(run):
    root, rows = run
    con = manifests.connect(root)
    per_tier = dict(con.execute("SELECT tier, sum(num_samples) FROM shards GROUP BY 1").fetchall())
    assert per_tier == {
        "1k": sum(r["tier"] == "1k" for r in rows),
        "4k": sum(r["tier"] == "4k" for r in rows),
    }
    assert con.execute("SELECT max(num_samples) FROM shards").fetchall() == [(4,)]
    assert sorted(con.execute("SELECT reason FROM rejects").fetchall()) == [
        ("too_small",),
        ("unreadable: x",),
    ]
    assert con.execute("SELECT count(*) FROM train_shards").fetchall() == [(0,)]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "a/b"}, "plain folder name"),
        ({"name": "a", "sample_fraction": 0.0}, "sample_fraction"),
        ({"name": "a", "limit": -1}, "limit"),
        ({"name": "a", "phash_max_distance": 40}, "phash_max_distance"),
        ({"name": "a", "exclude": ("a",)}, "exclude"),
    ],
)
def test_spec_rejects_bad_values(fields, message):
    with pytest.raises(ValueError, match=message):
        SelectionSpec(**fields)


def test_exclude_of_missing_selection_is_an_error(run):
    root, _ = run
    with pytest.raises(ValueError, match="nope"):
        select(root, SelectionSpec("t", exclude=("nope",)))


def test_cli(run, capsys):
    root, rows = run
    main(["--input", str(root), "--name", "cli", "--where", "tier = '4k'", "--limit", "2"])
    assert "cli: 2 rows" in capsys.readouterr().out
    assert selected_keys(root, "cli") == [r["key"] for r in rows if r["tier"] == "4k"][:2]


def test_views_read_parts_that_predate_a_nullable_column(tmp_path):
    old = manifests.IMAGES.remove(
        manifests.IMAGES.get_field_index("phash")
    )  # as written before phash existed
    part = tmp_path / "manifests" / "images" / "part-00000.parquet"
    part.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"key": "a", "source": "s", "status": "kept"}], schema=old), part)
    manifests.io.mark_committed(part.parent, "part-00000")
    con = manifests.connect(tmp_path)
    assert con.execute("SELECT key, phash FROM images").fetchall() == [("a", None)]
