"""The captioning job end to end on a tiny curated run: the `ray job submit` path, one row per selected key,
WHERE, resume, a killed run's leftovers, and per-item retry of a failing batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import manifests
from captioning import pipeline
from captioning.captioner import Captioner
from captioning.config import CaptioningConfig, debug_config
from manifests import Rejected

pytestmark = pytest.mark.usefixtures("ray_cluster")  # one cluster per session; the job joins it


def config(run: Path, llava: Path, t5: Path, **fields) -> CaptioningConfig:
    cfg = debug_config(str(run), model=str(llava), tokenizer=str(t5))
    cfg.generation.max_new_tokens = 8
    cfg.resources.rows_per_part = 3  # several parts per run: the resume unit is a part
    for name, value in fields.items():
        setattr(cfg, name, value)
    return cfg


def caption_rows(run: Path) -> list[tuple]:
    con = manifests.connect(run)
    return con.execute("SELECT key, captioner, prompt, status, reason FROM captions ORDER BY key").fetchall()


def leave_killed_run_debris(run: Path, captioner: str, prompt: str, key: str) -> Path:
    """What a SIGKILL can leave: a part renamed into place but never committed, and a temporary file.
    Plus a committed row for the same key by another captioner, which must not count as done."""
    writer = manifests.ManifestWriter(run / pipeline.CAPTIONS_DIR, "captions")
    row = {"key": key, "caption": "a photo.", "captioner": captioner, "prompt": prompt, "status": "kept"}
    orphan = writer.write([row], "part-bbbbbbbbbbbbbbbb")
    manifests.io.unmark_committed(writer.directory, orphan.stem)
    (writer.directory / ".part-cccccccccccccccc.parquet.1234abcd.tmp").write_bytes(b"partial")
    writer.write([{**row, "captioner": "other@0"}], "part-dddddddddddddddd")
    return orphan


def test_where_resume_and_killed_run(curated_run, layout, tiny_llava, tiny_t5, ray_cluster):
    run = curated_run()
    # (`ray job submit … captioning/run.py` itself runs in tests/test_readme.py, verbatim from the README.)
    first = pipeline.run(config(run, tiny_llava, tiny_t5, where="tier = '4k'"))
    assert json.loads((run / pipeline.SUMMARY_FILE).read_text()) == first
    captioner, prompt = first["captioner"], first["prompt"]
    assert (first["selected"], first["captioned"], first["skipped_already_captioned"]) == (3, 3, 0)
    assert [r[0] for r in caption_rows(run)] == layout["4k"]
    assert json.loads((run / pipeline.CONFIG_FILE).read_text())["captioner"] == captioner

    # Rerun with the default WHERE (status = 'kept') after a "killed" run left debris for k00.
    orphan = leave_killed_run_debris(run, captioner, prompt, "k00")
    second = pipeline.run(config(run, tiny_llava, tiny_t5))
    assert (second["selected"], second["captioned"], second["skipped_already_captioned"]) == (7, 4, 3)
    assert second["uncommitted_parts_removed"] == 1 and not orphan.exists()
    rows = [r for r in caption_rows(run) if r[1] == captioner]
    assert [r[0] for r in rows] == layout["kept"]  # one row per key: no duplicate, none missing
    reasons = {key: reason for key, _, _, status, reason in rows if status == "rejected"}
    assert reasons[layout["missing"]] == "missing_in_shard"
    assert reasons[layout["broken"]].startswith("decode_error: ")
    captions_dir = run / pipeline.CAPTIONS_DIR
    assert sorted(captions_dir.glob("*.parquet")) == manifests.committed_parts(captions_dir)

    third = pipeline.run(config(run, tiny_llava, tiny_t5))  # nothing left to do: Ray is not even needed
    assert (third["captioned"], third["skipped_already_captioned"]) == (0, 7)
    assert json.loads((run / pipeline.SUMMARY_FILE).read_text()) == third
    assert len(caption_rows(run)) == 7 + 1  # + the other captioner's row

    con = manifests.connect(run)  # the captions manifest joins to images on key
    joined = "SELECT count(*) FROM images i JOIN captions c USING (key) WHERE c.captioner = ? AND i.status = 'kept'"
    assert con.execute(joined, [captioner]).fetchone()[0] == 7
    num_tokens, gen_params, seconds, truncated = con.execute(
        "SELECT num_tokens, gen_params, seconds, truncated FROM captions WHERE key = 'k01'"
    ).fetchone()
    assert json.loads(gen_params)["max_new_tokens"] == 8 and seconds >= 0 and truncated is False


class FlakyCaptioner(Captioner):
    """Fails every batch of more than one image (as an OOM would), and always on 13-pixel-wide images."""

    def generate(self, images):
        if len(images) > 1 or images[0].width == 13:
            raise RuntimeError("CUDA out of memory (simulated)")
        return super().generate(images)


def test_failing_batch_is_retried_item_by_item(image_factory, tiny_llava, tiny_t5):
    cfg = config(Path("unused"), tiny_llava, tiny_t5)
    captioner = FlakyCaptioner(
        model=cfg.model, prompt=cfg.prompt.text, generation=cfg.generation, guards=cfg.guards, captioner="t@0"
    )
    results = captioner.caption(
        [image_factory(0, (20, 20)), image_factory(1, (13, 20)), image_factory(2, (30, 20))]
    )
    assert isinstance(results[0][0], str) and isinstance(results[2][0], str)
    assert results[1][0] == Rejected("generate_error: RuntimeError: CUDA out of memory (simulated)")
