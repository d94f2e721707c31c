"""pixsigma-evaluate on an eval set whose prompts are toy-world captions: the adherence metric lands in
metrics.json beside FID and CLIP score, per image in images.jsonl, with the same images' chance level (scored
against shifted prompts), and the real images score 1."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from manifests.tars import json_bytes, write_shard
from manifests.toy import Scene, caption, render, scene_for
from tests.training.eval_factories import build_eval_models, tiny_export
from training.adherence import SCORES, adherence_metrics, mean_scores, score_image, score_labels
from training.evaluate import (
    ClipScorer,
    EvalSettings,
    FidMetric,
    evaluate_generator,
    read_eval_set,
    read_real_images,
    run,
)
from training.ranks import Dist
from training.sample import ImageGenerator, SamplingSettings

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


class PaintingGenerator(ImageGenerator):
    """A perfect model: draws each prompt's own scene (the generator's render of its truth) at the job's size."""

    def __init__(self, scenes: dict[str, Scene]) -> None:  # noqa: D107 — no weights, no encoders
        self.scenes, self.name, self.resolution, self.vae_downsample = scenes, "painter", 64, 8

    def generate(self, jobs, settings):
        for job in reversed(jobs):  # not in job order: the real one groups jobs by size
            pixels = np.asarray(render(self.scenes[job.prompt], job.width, job.height), dtype=np.float32) / 255
            yield job, torch.from_numpy(pixels).permute(2, 0, 1)  # (3, H, W) in [0, 1]


def test_the_chance_level_is_each_image_against_another_rows_prompt(tmp_path, tmp_path_factory) -> None:
    """Perfect images, two per prompt: each scores 1 against its own prompt, and its chance level is the perfect
    detector's score of its scene against the scene of the prompt n/2 + 1 rows on (rows, not images)."""
    eval_set = build_toy_eval_set(tmp_path / "eval")
    rows = read_eval_set(eval_set)
    scenes = {caption(scene_for(5, i)): scene_for(5, i) for i in range(len(SIZES))}
    models = build_eval_models(tmp_path_factory.getbasetemp() / "eval_models")  # the toy_eval fixture's
    fid = FidMetric(device=torch.device("cpu"), inception=models["inception"], features=64)
    clip = ClipScorer(models["clip"], None, device=torch.device("cpu"))
    _, image_rows = evaluate_generator(
        PaintingGenerator(scenes), rows, read_real_images(eval_set, {r["key"] for r in rows}),
        settings=SamplingSettings(), eval_settings=EvalSettings(num_images_per_prompt=2), fid=fid, clip=clip,
        out=tmp_path / "out", real_out=None, env=Dist(),
    )  # fmt: skip
    assert len(image_rows) == 2 * len(rows) == 8
    labels = lambda prompt: [o.label() for o in scenes[prompt].objects]  # noqa: E731
    for r in image_rows:
        own, other = rows[r["index"] // 2]["prompt"], rows[(r["index"] // 2 + 3) % 4]["prompt"]  # 4 rows: 3 on
        assert r["prompt"] == own and r["adherence"] == score_labels(labels(own), labels(own))  # all 1
        assert r["shifted_adherence"] == score_labels(labels(own), labels(other))
    metrics = adherence_metrics(image_rows)
    assert metrics["adherence"]["overall"] == 1.0 and metrics["adherence_shifted"]["overall"] < 1.0
    assert metrics["adherence_shifted"] == pytest.approx(mean_scores(r["shifted_adherence"] for r in image_rows))


def test_evaluate_writes_the_chance_level(toy_eval) -> None:
    metrics, out, _ = toy_eval
    rows = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    assert all("shifted_adherence" in r for r in rows)
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
