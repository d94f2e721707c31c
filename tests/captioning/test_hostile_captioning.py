"""Hostile and messy inputs to the captioning job (issue 14): SQL injection in ``--where``, a VLM's tokenizer
as ``--tokenizer``, a missing ``--input``, and rows that failed because their shard was gone."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds

import manifests
from captioning import cli, pipeline
from captioning.captioner import captioner_id, check_tokenizer
from captioning.config import debug_config
from captioning.reader import SHARD_ERROR
from manifests import verify
from manifests.checks import InputError
from tests.manifests.test_hostile_manifests import assert_one_line_error, injections


def flags(run: Path, llava: Path, t5: Path, *extra: str) -> list[str]:
    return ["--input", str(run), "--model", str(llava), "--tokenizer", str(t5), "--preset", "debug", *extra]


def assert_nothing_written(run: Path) -> None:
    assert not (run / pipeline.CONFIG_FILE).exists() and not (run / pipeline.SUMMARY_FILE).exists()
    assert not (run / pipeline.CAPTIONS_DIR).exists()


@pytest.mark.parametrize("case", range(len(injections("t", "s"))))
def test_where_is_one_expression_and_nothing_is_written(
    curated_run, tiny_llava, tiny_t5, tmp_path, capsys, case
):
    run = curated_run()
    target, secret = tmp_path / "pwned.csv", tmp_path / "secret.csv"
    secret.write_text("column0\nk00\n")
    with pytest.raises(SystemExit) as excinfo:
        cli.main(flags(run, tiny_llava, tiny_t5, "--where", injections(target, secret)[case]))
    assert_one_line_error(capsys, excinfo, "--where")
    assert not target.exists()
    assert_nothing_written(run)


def test_a_vlm_tokenizer_is_refused(curated_run, tiny_llava, capsys):
    run = curated_run()
    with pytest.raises(SystemExit) as excinfo:
        cli.main(flags(run, tiny_llava, tiny_llava))
    assert_one_line_error(capsys, excinfo, "--tokenizer", "not a T5 tokenizer", "--training-config")
    assert_nothing_written(run)


def test_the_training_configs_t5_is_the_tokenizer(tmp_path, tiny_llava, tiny_t5):
    config = tmp_path / "train.toml"
    config.write_text(f'[text]\nt5 = "{tiny_llava}"\n')
    # Whatever the training config names is what the trainer counts with, T5 class or not.
    assert check_tokenizer(str(tiny_llava), training_config=str(config)) == "TokenizersBackend"
    with pytest.raises(InputError, match="is not the T5 that --training-config"):
        check_tokenizer(str(tiny_t5), training_config=str(config))
    assert check_tokenizer(str(tiny_t5)) == "T5Tokenizer"
    parsed = cli.parse_args(["--input", "run", "--model", "m", "--training-config", str(config)])
    assert parsed.guards.tokenizer == str(tiny_llava) and parsed.training_config == str(config)
    config.write_text("[model]\npreset = 'tiny'\n")
    with pytest.raises(InputError, match=r"names no T5: it has no \[text\] t5"):
        cli.parse_args(["--input", "run", "--model", "m", "--training-config", str(config)])
    with pytest.raises(InputError, match="--tokenizer is required"):
        cli.parse_args(["--input", "run", "--model", "m"])


def test_missing_input_fails_fast_and_creates_nothing(tmp_path, tiny_llava, tiny_t5, capsys):
    missing = tmp_path / "nonexistent"
    with pytest.raises(SystemExit) as excinfo:
        cli.main(flags(missing, tiny_llava, tiny_t5))
    assert_one_line_error(capsys, excinfo, "--input", "is not a folder")
    assert not missing.exists()


def test_worth_retrying_waits_for_the_shard(tmp_path):
    shard = tmp_path / "shards" / "a.tar"
    failed = {
        "gen": ("generate_error: RuntimeError: CUDA out of memory", tmp_path / "p.parquet"),
        "gone": (f"{SHARD_ERROR}: FileNotFoundError: a.tar", tmp_path / "p.parquet"),
        "absent": ("missing_in_shard", tmp_path / "p.parquet"),
        "unselected": (f"{SHARD_ERROR}: FileNotFoundError: a.tar", tmp_path / "p.parquet"),
    }
    selected = [{"key": k, "shard": "shards/a.tar"} for k in ("gen", "gone", "absent", "other")]
    assert pipeline.worth_retrying(failed, selected, tmp_path) == {"gen"}  # the shard is still missing
    shard.parent.mkdir()
    shard.write_bytes(b"<html>not a tar</html>")
    assert pipeline.worth_retrying(failed, selected, tmp_path) == {"gen"}  # back, but unreadable
    with wds.TarWriter(str(shard)) as sink:
        sink.write({"__key__": "gone", "jpg": b"x", "json": b"{}"})
    assert pipeline.worth_retrying(failed, selected, tmp_path) == {"gen", "gone"}


def caption_rows(run: Path, captioner: str) -> list[tuple]:
    con = manifests.connect(run)
    return con.execute(
        "SELECT key, status, reason FROM captions WHERE captioner = ? ORDER BY key", [captioner]
    ).fetchall()


def test_rows_failed_for_their_shard_are_retried_once_it_is_back(
    ray_cluster, curated_run, layout, tiny_llava, tiny_t5
):
    run = curated_run()
    cfg = debug_config(str(run), model=str(tiny_llava), tokenizer=str(tiny_t5))
    cfg.generation.max_new_tokens = 8
    cfg.where = "tier = '4k'"
    cfg.model.model = str(Path(cfg.model.model).resolve())
    captioner, prompt = captioner_id(cfg.model), cfg.prompt.text
    fourk = layout["4k"]  # k03 and k04 in the 4k shard, k06 named by the manifest but not in it
    # An earlier run found the 4k shard gone: every 4k row was rejected with shard_error.
    writer = manifests.ManifestWriter(run / pipeline.CAPTIONS_DIR, "captions")
    rows = [
        {"key": k, "captioner": captioner, "prompt": prompt, "status": "rejected",
         "reason": f"{SHARD_ERROR}: FileNotFoundError: 4k-000000.tar"}
        for k in fourk
    ]  # fmt: skip
    part = writer.write(rows, pipeline.part_name(captioner, prompt, fourk))
    shard = run / "shards" / "curated" / "4k" / "4k-000000.tar"
    backup = shard.rename(shard.with_suffix(".away"))

    still_gone = pipeline.run(cfg)  # nothing worth retrying: no Ray, no new rows
    assert (still_gone["retried_failed"], still_gone["captioned"]) == (0, 0)
    backup.rename(shard)
    cfg.retry_failed = False
    kept_as_is = pipeline.run(cfg)
    assert (kept_as_is["retried_failed"], kept_as_is["captioned"]) == (0, 0)
    assert {reason.split(":")[0] for _, _, reason in caption_rows(run, captioner)} == {SHARD_ERROR}

    cfg.retry_failed = True
    retried = pipeline.run(cfg)
    assert (retried["retried_failed"], retried["captioned"], retried["selected"]) == (2, 2, 3)
    after = caption_rows(run, captioner)
    assert [key for key, *_ in after] == fourk  # one row per key, none twice
    reasons = {key: reason for key, _, reason in after}
    assert reasons[layout["missing"]].startswith(SHARD_ERROR)  # the shard is back, but without this key
    assert not any((reasons[k] or "").startswith(SHARD_ERROR) for k in fourk if k != layout["missing"])
    # The part that held the failed rows was replaced in place, under its own name.
    assert manifests.committed_parts(writer.directory) == [part]
    assert sorted(pq.read_table(part).column("key").to_pylist()) == fourk
    assert [f for f in verify.verify(run) if "captions" in f.path] == []  # size and sha256 match its marker
    assert json.loads((run / pipeline.SUMMARY_FILE).read_text())["retried_failed"] == 2
