"""pixsigma-evaluate on an eval set whose prompts are toy-world captions: the adherence metric lands in
metrics.json beside FID and CLIP score, per image in images.jsonl, with the same images' chance level (scored
against shifted prompts), and the real images score 1."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from manifests.tars import json_bytes, write_shard
from manifests.toy import caption, render, scene_for
from tests.training.eval_factories import build_eval_models, tiny_export
from training.adherence import SCORES, adherence_metrics, mean_scores, score_image
from training.evaluate import run

SIZES = ((64, 64), (48, 96), (96, 48), (64, 64))  # (height, width) of the real images


def build_toy_eval_set(out: Path) -> Path:
    """A toy-world eval set in manifests.evalset's layout: eval-*.tar (PNG + JSON) and prompts.jsonl."""
    out.mkdir(parents=True)
    rows, samples = [], []
    for i, (height, width) in enumerate(SIZES):
        scene = scene_for(5, i)
        buffer = io.BytesIO()
        render(scene, width, height).save(buffer, format="PNG")
        rows.append(
            {"key": f"t{i:03d}", "prompt": caption(scene), "width": width, "height": height, "tier": "1k"}
        )
        samples.append({"__key__": rows[-1]["key"], "png": buffer.getvalue(), "json": json_bytes(rows[-1])})
    write_shard(out / "eval-000000.tar", samples)
    (out / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.fixture(scope="module")
def toy_eval(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_eval")
    eval_set = build_toy_eval_set(root / "eval_shards" / "toy")
    models = build_eval_models(tmp_path_factory.getbasetemp() / "eval_models")
    export = tiny_export(tiny_models, root / "run" / "final", 3)
    metrics = run(["--model", str(export), "--input", str(eval_set), "--inception", str(models["inception"]),
                   "--fid-features", "64", "--clip-model", models["clip"], "--steps", "2", "--batch-size", "2",
                   "--device", "cpu", "--allow-small-fid"])  # fmt: skip
    return metrics, root / "run" / "eval" / "toy", eval_set


def test_adherence_is_reported_beside_fid_and_clip(toy_eval) -> None:
    metrics, out, _ = toy_eval
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert "fid" in metrics and "clip_score" in metrics
    assert set(metrics["adherence"]) == set(SCORES) == set(metrics["adherence_real"])
    # the numbers are those of the saved images, rescored here from disk against their prompts
    rows = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    rescored = [score_image(Image.open(out / "images" / r["file"]).convert("RGB"), r["prompt"]) for r in rows]
    assert [r["adherence"] for r in rows] == rescored
    assert metrics["adherence"] == pytest.approx(mean_scores(rescored))


def test_the_chance_level_is_each_image_against_another_rows_prompt(toy_eval) -> None:
    metrics, out, eval_set = toy_eval
    prompts = [json.loads(line)["prompt"] for line in (eval_set / "prompts.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    assert len(rows) == len(prompts) == 4
    for r in rows:
        # 4 prompts: image i against prompt (i + 4 // 2 + 1) mod 4, never its own
        other = prompts[(r["index"] + 3) % 4]
        assert other != r["prompt"]
        image = Image.open(out / "images" / r["file"]).convert("RGB")
        assert r["shifted_adherence"] == score_image(image, other)
    assert metrics["adherence_shifted"] == pytest.approx(mean_scores(r["shifted_adherence"] for r in rows))


def test_real_images_score_one(toy_eval) -> None:
    metrics, out, _ = toy_eval
    assert metrics["adherence_real"] == {name: 1.0 for name in SCORES}
    rows = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    for r in rows:
        assert (
            score_image(Image.open(out / "real" / r["real_file"]).convert("RGB"), r["prompt"])["overall"]
            == 1.0
        )


def test_prompts_without_truth_report_no_adherence() -> None:
    assert adherence_metrics([{"prompt": "a photo of a cat", "real_key": "k"}]) == {}
    assert adherence_metrics([]) == {}
