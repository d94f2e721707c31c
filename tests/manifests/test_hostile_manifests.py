"""Hostile and messy inputs to selection, eval set, materialisation and the manifest readers (issue 14).

Each case is generated here: SQL injection in every ``--where``, path names in every ``--name``, a backup
copy of ``manifests/`` inside the run, a truncated committed part, old-style commit markers, a selection
rerun with another ``--where``, empty selections and missing inputs.
"""

from __future__ import annotations

import json
import shutil

import duckdb
import pyarrow.parquet as pq
import pytest
import webdataset as wds

import manifests
from manifests import evalset, materialize, selection, verify
from manifests.checks import InputError, check_name, check_where
from manifests.io import COMMITTED_DIR, CorruptPartError, is_committed, marker_path
from manifests.materialize import MaterializeConfig
from manifests.selection import SelectionSpec, select
from tests.manifests.factories import make_run


@pytest.fixture
def run(tmp_path):
    root = tmp_path / "run"
    rows = make_run(root, num_images=18)
    return root, rows


def injections(target, secret) -> list[str]:
    """``--where`` values that try to run statements, read or write files, or escape their parentheses."""
    return [
        f"false) ; COPY (SELECT * FROM images) TO '{target}'; SELECT * FROM image_captions WHERE (false",
        f"false); COPY (SELECT 1) TO '{target}' --",
        f"key IN (SELECT column0 FROM read_csv('{secret}'))",
        f"key IN (SELECT key FROM '{secret}')",
        f"length(read_text('{secret}')) > 0",
        f"true) UNION ALL SELECT * FROM read_csv('{secret}') WHERE (true",
        "true) ORDER BY (key",
        "true -- a comment hides the closing parenthesis",
        "true /* comment */",
        "true; DROP VIEW images",
        "tier = ?",
        "",
    ]


def assert_one_line_error(capsys, excinfo, *needles: str) -> str:
    assert excinfo.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("cli", ["selection", "evalset"])
@pytest.mark.parametrize("case", range(len(injections("t", "s"))))
def test_every_where_is_one_expression_and_nothing_is_written(run, tmp_path, capsys, cli, case):
    root, _ = run
    target, secret = tmp_path / "pwned.csv", tmp_path / "secret.csv"
    secret.write_text("column0\n00000001\n")
    where = injections(target, secret)[case]
    main = {"selection": selection.main, "evalset": evalset.main}[cli]
    with pytest.raises(SystemExit) as excinfo:
        main(["--input", str(root), "--name", "x", "--where", where])
    assert_one_line_error(capsys, excinfo, "--where")
    assert not target.exists()
    assert not (root / "selections").exists() and not (root / "eval_shards").exists()


def test_a_valid_where_with_or_stays_inside_its_parentheses(run):
    root, rows = run
    # Pasted after "WHERE (", "tier = '4k') OR (true" would make the sample condition apply to one side only.
    select(root, SelectionSpec("s", "tier = '4k') OR (tier = '1k'", sample_fraction=0.5, seed=3))
    select(root, SelectionSpec("t", "(tier = '4k') OR (tier = '1k')", sample_fraction=0.5, seed=3))
    keys = pq.read_table(root / "selections" / "s" / "rows.parquet").column("key").to_pylist()
    assert keys == pq.read_table(root / "selections" / "t" / "rows.parquet").column("key").to_pylist()
    assert 0 < len(keys) < len(rows)


def test_restricted_connection_reads_its_manifests_and_no_other_file(run, tmp_path):
    root, rows = run
    (tmp_path / "secret.csv").write_text("a\n1\n")
    con = manifests.connect(root, restricted=True)
    assert con.execute("SELECT count(*) FROM image_captions").fetchone()[0] == len(rows)
    with pytest.raises(duckdb.PermissionException):
        con.execute(f"SELECT * FROM read_csv('{tmp_path / 'secret.csv'}')")
    with pytest.raises(duckdb.PermissionException):
        con.execute(f"COPY (SELECT 1) TO '{tmp_path / 'out.csv'}'")
    with pytest.raises(duckdb.Error, match="locked"):
        con.execute("SET enable_external_access = true")
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".hidden", "-flag", "x" * 200, "a b", "", "/abs"])
def test_check_name_refuses_paths(name):
    with pytest.raises(InputError, match="--name"):
        check_name(name)


@pytest.mark.parametrize("name", ["hq", "eval-2024.v1", "A_b"])
def test_check_name_accepts_plain_names(name):
    assert check_name(name) == name


def test_check_where_keeps_good_filters():
    for where in (
        "tier = '4k' AND aesthetic >= 5.5",
        "caption_vlm LIKE '%--%'",
        "key IN (SELECT key FROM images)",
    ):
        assert check_where(f"  {where} ", view="image_captions") == where


@pytest.mark.parametrize(
    "argv",
    [
        ["selection", "--name", "../../x"],
        ["selection", "--name", "ok", "--exclude", "../x"],
        ["evalset", "--name", "../../x"],
        ["materialize", "--selection", "all", "--name", "../../x"],
        ["materialize", "--selection", "../all"],
    ],
)
def test_every_name_is_checked_the_same_way(ray_cluster, run, tmp_path, capsys, argv):
    root, _ = run
    select(root, SelectionSpec("all"))
    mains = {"selection": selection.main, "evalset": evalset.main, "materialize": materialize.main}
    with pytest.raises(SystemExit) as excinfo:
        mains[argv[0]](["--input", str(root), *argv[1:]])
    assert_one_line_error(capsys, excinfo, "not a plain folder name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing written beside the run
    assert not (root / "train_shards").exists()


def shard_keys(out) -> set[str]:
    urls = sorted(str(p) for p in out.glob("train-*.tar"))
    return {s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}


def test_materialize_follows_a_rerun_selection(ray_cluster, run):
    root, rows = run
    cfg = MaterializeConfig(root=str(root), selection="s", samples_per_shard=2, resolutions=(256,))
    select(root, SelectionSpec("s", "tier = '1k'"))
    out = materialize.materialize(cfg)
    assert shard_keys(out) == {r["key"] for r in rows if r["tier"] == "1k"}
    before = len(list(out.glob("train-*.tar")))
    select(root, SelectionSpec("s", "tier = '4k'"))  # the same name, another WHERE
    materialize.materialize(cfg)
    fourk = {r["key"] for r in rows if r["tier"] == "4k"}
    assert shard_keys(out) == fourk
    assert len(list(out.glob("train-*.tar"))) == -(-len(fourk) // 2) < before  # old extra shards removed
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert sum(r["num_samples"] for r in index) == len(fourk)
    assert json.loads((out / "shards.json").read_text())["num_samples"] == len(fourk)
    assert verify.verify(root) == []


def test_connect_reads_only_the_runs_own_manifests(run, tmp_path):
    root, rows = run
    shutil.copytree(root / "manifests", root / "backup" / "manifests")  # a backup copy inside the run
    shutil.copytree(root / "manifests", root / "old" / "2024" / "manifests")
    con = manifests.connect(root)
    assert con.execute("SELECT count(*) FROM images").fetchone()[0] == len(rows) + 2
    assert con.execute("SELECT count(*) FROM image_captions").fetchone()[0] == len(rows)
    # A folder of runs still reads each run once (not the backups inside them).
    shutil.copytree(root, tmp_path / "run2", ignore=shutil.ignore_patterns("backup", "old"))
    both = manifests.connect(tmp_path)
    assert both.execute("SELECT count(*) FROM images").fetchone()[0] == 2 * (len(rows) + 2)


def test_truncated_committed_part_is_named(run, capsys):
    root, _ = run
    part = root / "manifests" / "captions" / "part-00000.parquet"
    part.write_bytes(part.read_bytes()[:-100])
    with pytest.raises(CorruptPartError, match="part-00000.parquet"):
        manifests.connect(root)
    with pytest.raises(SystemExit) as excinfo:
        selection.main(["--input", str(root), "--name", "s"])
    assert_one_line_error(capsys, excinfo, str(part), "truncated")
    # A legacy marker records no size: the Arrow error still names the part.
    markers = root / "manifests" / "captions" / COMMITTED_DIR
    (markers / "part-00000.committed").unlink()
    (markers / "part-00000").write_text('{"num_rows": 1}')
    with pytest.raises(CorruptPartError, match=f"cannot read committed part {part}"):
        manifests.connect(root)


def test_markers_carry_no_data_extension_and_old_markers_still_read(run):
    root, rows = run
    assert sorted(p.relative_to(root).as_posix() for p in root.glob("**/*.tar")) == sorted(
        {r["shard"] for r in rows}
    )
    assert all(p.name.endswith(".committed") for p in root.glob(f"**/{COMMITTED_DIR}/*"))
    # A run written before the rename: markers named after the part (``_committed/<shard>.tar``).
    for marker in list(root.glob(f"**/{COMMITTED_DIR}/*.committed")):
        marker.rename(marker.with_name(marker.name.removesuffix(".committed")))
    shard = root / rows[0]["shard"]
    assert is_committed(shard.parent, shard.name)
    assert manifests.connect(root).execute("SELECT count(*) FROM image_captions").fetchone()[0] == len(rows)
    findings = verify.verify(root)
    assert findings and not any(f.problem for f in findings)
    assert all("--migrate" in f.message for f in findings)
    verify.main(["--input", str(root), "--migrate"])
    assert sorted(p.relative_to(root).as_posix() for p in root.glob("**/*.tar")) == sorted(
        {r["shard"] for r in rows}
    )
    assert marker_path(shard.parent, shard.name).is_file() and verify.verify(root) == []


def test_verify_reports_every_broken_part_and_shard(run, capsys):
    root, rows = run
    verify.main(["--input", str(root)])
    assert "0 problems" in capsys.readouterr().out
    shards = sorted({r["shard"] for r in rows})
    (root / shards[0]).write_bytes((root / shards[0]).read_bytes()[:2048])  # truncated shard
    (root / shards[1]).unlink()  # shard gone, marker left
    (root / "manifests" / "images" / "part-00001.parquet").write_bytes(b"PAR1 not committed")
    with pytest.raises(SystemExit) as excinfo:
        verify.main(["--input", str(root)])
    assert excinfo.value.code == 1
    out = capsys.readouterr().out
    assert f"PROBLEM: {shards[0]}: 2048 bytes, its commit marker says" in out
    assert f"PROBLEM: {shards[1]}: commit marker without its file" in out
    assert "PROBLEM: manifests/images/part-00001.parquet: no commit marker" in out
    assert "3 problems" in out


def test_verify_finds_changed_bytes_and_dangling_shard_references(run, capsys):
    root, rows = run
    part = root / "manifests" / "captions" / "part-00000.parquet"
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF  # same size, other bytes
    part.write_bytes(bytes(data))
    assert [f.message for f in verify.verify(root)] == [
        "sha256 differs from its commit marker: the bytes changed after it was written"
    ]
    assert verify.verify(root, fast=True) == []
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    shard = root / rows[0]["shard"]
    shutil.rmtree(shard.parent / COMMITTED_DIR)  # a shard folder whose markers are gone
    findings = verify.verify(root)
    assert {f.path for f in findings} == {r["shard"] for r in rows if r["tier"] == rows[0]["tier"]}
    assert all("kept images rows, but it is missing or not committed" in f.message for f in findings)


def test_empty_selection_is_an_error_with_counts_unless_allowed(run, capsys):
    root, rows = run
    with pytest.raises(SystemExit) as excinfo:
        selection.main(["--input", str(root), "--name", "none", "--where", "aesthetic > 100"])
    assert_one_line_error(
        capsys, excinfo, "'none' has 0 rows", f"{len(rows)} kept images", "0 match --where 'aesthetic > 100'",
        "--allow-empty",
    )  # fmt: skip
    assert not (root / "selections" / "none").exists()
    selection.main(["--input", str(root), "--name", "none", "--where", "aesthetic > 100", "--allow-empty"])
    assert "none: 0 rows" in capsys.readouterr().out
    with pytest.raises(SystemExit) as excinfo:
        materialize.main(["--input", str(root), "--selection", "none"])
    assert_one_line_error(capsys, excinfo, "'none' has 0 rows", "aesthetic > 100", "--allow-empty")
    assert not (root / "train_shards").exists()


def test_empty_eval_set_is_an_error(run, capsys):
    root, _ = run
    with pytest.raises(SystemExit) as excinfo:
        evalset.main(["--input", str(root), "--where", "caption_vlm IS NULL AND caption_orig IS NULL"])
    assert_one_line_error(capsys, excinfo, "eval set 'eval' has 0 rows", "--allow-empty")


def test_unknown_selection_is_one_line_naming_the_fix(run, capsys):
    root, _ = run
    select(root, SelectionSpec("hq"))
    with pytest.raises(SystemExit) as excinfo:
        materialize.main(["--input", str(root), "--selection", "nope"])
    assert_one_line_error(capsys, excinfo, "--selection 'nope'", "have: hq", "python -m manifests.selection")
    with pytest.raises(SystemExit) as excinfo:
        selection.main(["--input", str(root), "--name", "t", "--exclude", "nope"])
    assert_one_line_error(capsys, excinfo, "--exclude 'nope'", "have: hq")


@pytest.mark.parametrize("cli", ["selection", "evalset"])
def test_missing_input_fails_fast_and_creates_nothing(tmp_path, capsys, cli):
    main = {"selection": selection.main, "evalset": evalset.main}[cli]
    with pytest.raises(SystemExit) as excinfo:
        main(["--input", str(tmp_path / "nonexistent"), "--name", "s"])
    assert_one_line_error(capsys, excinfo, "--input", "nonexistent", "is not a folder")
    assert not (tmp_path / "nonexistent").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as excinfo:
        main(["--input", str(tmp_path / "empty"), "--name", "s"])
    assert_one_line_error(capsys, excinfo, "holds no manifests/ folder")
    assert list((tmp_path / "empty").iterdir()) == []
