"""The pipeline summary prints each evaluation's FID with the note evaluate.py stored in metrics.json, and the
adherence scores of a toy-world evaluation beside their chance level and the real images' own."""

from __future__ import annotations

import json
from pathlib import Path

from manifests.summary import _add_evaluations, format_summary

BASE = {
    "inputs": 4, "kept_per_tier": {}, "rejected_per_reason": {}, "captions_kept": 4, "captions_rejected": 0,
    "selections": {}, "outputs": {},
}  # fmt: skip


def _metrics(train_dir: Path, name: str, **extra) -> None:
    folder = train_dir / "eval" / name
    folder.mkdir(parents=True)
    metrics = {"fid": 158.8912, "clip_score": 21.5, "num_images": 12, "model": "final_ema", **extra}
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_summary_prints_the_stored_fid_note(tmp_path):
    note = "trend only: fewer than 4096 images per side"  # whatever evaluate.py wrote, not a fixed text
    _metrics(tmp_path, "small", fid_small_n=True, fid_note=note)
    _metrics(tmp_path, "full", fid_small_n=False)
    summary = json.loads(json.dumps(BASE))
    _add_evaluations(summary, tmp_path)
    lines = {line.split(":")[0]: line for line in format_summary(summary).splitlines()}
    assert lines["evaluation small"].endswith(f"(12 images) [FID {note}]")
    assert lines["evaluation full"].endswith("(12 images)")
    assert summary["evaluation"]["small"]["fid_note"] == note


def test_summary_prints_toy_world_adherence(tmp_path):
    model = {"overall": 0.25, "count": 0.75, "colour": 0.6, "shape": 0.3, "position": 0.85}
    chance = {"overall": 0.0, "count": 0.5, "colour": 0.2, "shape": 0.35, "position": 0.45}
    real = dict.fromkeys(model, 1.0)
    _metrics(tmp_path, "seen", adherence=model, adherence_shifted=chance, adherence_real=real)
    _metrics(tmp_path, "photos")  # prompts without toy-world truth: no adherence
    summary = json.loads(json.dumps(BASE))
    _add_evaluations(summary, tmp_path)
    text = format_summary(summary)
    assert "  adherence seen:     overall 0.25, count 0.75, colour 0.60, shape 0.30, position 0.85" in text
    assert "vs shifted prompts (chance): overall 0.00, count 0.50, colour 0.20, shape 0.35, position 0.45" in text
    assert "real images:                 overall 1.00, count 1.00" in text
    # the model's score minus its chance level, score by score
    assert "margin:                      overall +0.25, count +0.25, colour +0.40, shape -0.05, position +0.40" in text
    assert "adherence" not in summary["evaluation"]["photos"] and "adherence photos" not in text
