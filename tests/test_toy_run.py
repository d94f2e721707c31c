"""End to end: the toy-world run (configs/toy.sh + configs/toy.toml) through the real pipeline, small and short.

What must hold whatever the model learned: every distinct toy scene passes curation (the 1K tiers, pHash at 0
bits), the truth travels (each training sample's and eval prompt's caption is the generator's own caption,
from its truth.jsonl), and in-training evaluation reports adherence — in eval/in_training.jsonl and
TensorBoard — equal to the adherence metric rescored here from the saved images. The toy VAE is a random
tiny one (training.tiny): this checks the wiring, not learning (bench/bench_toy_learning.py measures that).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from manifests.toy import parse_caption
from tests.conftest import REPO, VENV_BIN
from training.adherence import SCORES, mean_scores, score_image
from training.tiny import build_tiny_vae

NUM_SCENES = 12
STEPS = 4  # of the first stage; evaluation every 2 steps
SETS = (  # short: evaluations at steps 2 and 4 of the first stage only (the second stops at step 1)
    f"stages.0.steps={STEPS} stages.1.steps=1 stages.0.batch_size=4 stages.1.batch_size=4 evaluation.every=2 "
    "evaluation.steps=2 evaluation.num_samples=4 stages.0.validation_prompts=[] stages.1.validation_prompts=[] "
    "checkpoint_every=100"
)


# The whole pipeline, Ray and torchrun included: ~9–10 min on the loaded 2-core machine.
@pytest.mark.timeout(900)
def test_toy_run_end_to_end(ray_cluster, tmp_path) -> None:
    out = tmp_path / "toy"
    vae_scaling = 0.5
    build_tiny_vae(tmp_path / "vaes", scaling_factor=vae_scaling, name="sdxl", downsample=4)  # as the shipped toy VAEs
    env = {
        **os.environ,
        "TOY_OUT": str(out),
        "TOY_N": str(NUM_SCENES),
        "TOY_VAE": str(tmp_path / "vaes"),
        "TOY_SETS": SETS,
        "NPROC": "1",
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
        "RAY_ADDRESS": ray_cluster.address,
    }
    result = subprocess.run(
        ["bash", "configs/toy.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    check_toy_run(out, result.stdout + result.stderr, num_scenes=NUM_SCENES, num_eval=4, eval_steps=(2, 4))


def check_toy_run(
    out: Path, output: str, *, num_scenes: int, num_eval: int, eval_steps: tuple[int, ...]
) -> None:
    """The invariants of a finished toy run in ``out`` (TOY_OUT), whatever the model learned."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # The corpus's own truth, by the bytes of each image (the shards carry the original files).
    truth = {
        hashlib.sha256((out / "corpus" / f"{r['name']}.png").read_bytes()).hexdigest(): r["caption"]
        for r in map(json.loads, (out / "corpus" / "truth.jsonl").read_text().splitlines())
    }
    eval_rows = [json.loads(line) for line in (out / "run" / "eval_shards" / "eval" / "prompts.jsonl").open()]
    pairs = [*shard_pairs(out / "run" / "train_shards" / "toy", "train-*.tar", "caption_orig"),
             *shard_pairs(out / "run" / "eval_shards" / "eval", "eval-*.tar", None)]  # fmt: skip
    prompts = {r["key"]: r["prompt"] for r in eval_rows}
    # Every scene is kept and lands once in the training or the eval shards (distinct toy scenes are not near
    # duplicates at pHash 0 bits; all are ≥ 1K), and the truth travels: each caption is its image's own.
    assert len(truth) == num_scenes and sorted(digest for _, digest, _ in pairs) == sorted(truth)
    for key, digest, text in pairs:
        text = text if text is not None else prompts[key]
        assert text == truth[digest] and parse_caption(text) is not None, (key, text)

    # In-training evaluation: adherence in the JSONL and TensorBoard equals the metric on the saved images.
    run_dir = out / "train"
    rows = [json.loads(line) for line in (run_dir / "eval" / "in_training.jsonl").read_text().splitlines()]
    assert tuple(r["global_step"] for r in rows) == eval_steps
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    for row in rows:
        folder = run_dir / "eval" / "in_training" / f"{row['global_step']:08d}"
        images = sorted((folder / "images").glob("*.png"))  # <key>.png, one per eval prompt
        assert len(images) == num_eval
        rescored = [score_image(Image.open(path).convert("RGB"), prompts[path.stem]) for path in images]
        assert row["adherence"] == pytest.approx(mean_scores(rescored))
        assert row["adherence_real"]["overall"] == 1.0  # the real eval images: the metric's ceiling
        for name in SCORES:
            for kind in ("adherence", "adherence_shifted"):  # the score and its chance level on these images
                logged = {e.step: e.value for e in events.Scalars(f"eval/{kind}/{name}")}
                assert logged[row["global_step"]] == pytest.approx(row[kind][name], abs=1e-6)
    assert "adherence colour" in output
    assert np.isfinite([r["fid"] for r in rows]).all()


def shard_pairs(folder: Path, pattern: str, caption_field: str | None) -> list[tuple[str, str, str | None]]:
    """(key, sha256 of the image bytes, caption) of every sample in a folder of WebDataset shards."""
    pairs = []
    for path in sorted(folder.glob(pattern)):
        with tarfile.open(path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in members:
                if name.endswith(".png"):
                    key = name[: -len(".png")]
                    meta = json.loads(tar.extractfile(members[f"{key}.json"]).read())
                    digest = hashlib.sha256(tar.extractfile(members[name]).read()).hexdigest()
                    pairs.append((key, digest, meta[caption_field] if caption_field else None))
    return pairs


def test_toy_sh_refuses_a_folder_it_did_not_make(tmp_path) -> None:
    """toy.sh removes a corpus, run or training only when its own toy.args says it made them with other settings: a
    TOY_OUT that holds such folders without it (another run, e.g. the main demo's demo_out) is left untouched."""
    out = tmp_path / "demo_out"
    (out / "train").mkdir(parents=True)
    (out / "train" / "model.safetensors").write_bytes(b"weights")
    env = {**os.environ, "TOY_OUT": str(out), "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", "configs/toy.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no toy.args" in result.stderr, result.stdout + result.stderr
    assert (out / "train" / "model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in out.iterdir()) == ["train"]
