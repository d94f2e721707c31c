"""End to end: the `make demo` pipeline (configs/demo.sh) on a small corpus, on the session's Ray cluster.

Its toy-world part is the toy-world run through the real pipeline (configs/toy.sh), checked for what must hold
whatever the model learned: every distinct toy scene passes curation (the 1K tiers, pHash at 0 bits), the truth
travels (each training sample's and eval prompt's caption is the generator's own caption, from its truth.jsonl),
and in-training evaluation (turned on here) reports adherence — in eval/in_training.jsonl and TensorBoard — equal
to the adherence metric rescored here from the saved images. Few steps: the wiring, not the learning
(tests/training/test_learning.py and bench/bench_toy_learning.py measure that).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from manifests.toy import parse_caption
from tests.conftest import REPO, VENV_BIN
from tests.training.test_pipeline import NO_PIXSIGMA
from tests.training.test_sample_readme import readme_block
from training.adherence import SCORES, mean_scores, score_image

TOY_STEPS = 30
TOY_EVAL_EVERY = 15  # in-training evaluation (of the held-out toy eval set) at steps 15 and 30


@pytest.mark.timeout(900)
def test_demo_pipeline_end_to_end(ray_cluster, tmp_path):
    out = tmp_path / "demo"
    env = {
        **os.environ,
        "DEMO_OUT": str(out),
        "DEMO_N": "8",
        "NPROC": "2",
        "DEMO_TOY_STEPS": str(TOY_STEPS),  # the wiring, not the learning (tests/training/test_learning.py)
        "DEMO_TOY_SETS": f"evaluation.every={TOY_EVAL_EVERY} evaluation.steps=2",
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
        "RAY_ADDRESS": ray_cluster.address,  # every Ray step joins the session cluster
    }
    result = subprocess.run(
        ["bash", "configs/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    expected = [json.loads(line) for line in (out / "corpus" / "expected.jsonl").read_text().splitlines()]
    assert summary["inputs"] == len(expected)
    kept = sum(summary["kept_per_tier"].values())
    rejected = sum(summary["rejected_per_reason"].values())
    assert kept + rejected == summary["inputs"]  # every input lands somewhere
    assert {
        "too_small",
        "empty_file",
        "unreadable",
        "decode_error",
        "too_many_pixels",
        "aspect_ratio",
    } <= set(summary["rejected_per_reason"])
    assert summary["captions_kept"] + summary["captions_rejected"] == kept
    assert summary["selections"]["demo"] > 0 and summary["selections"]["eval"] > 0
    assert list((out / "run" / "eval_shards" / "eval").glob("eval-*.tar"))
    training = summary["training"]
    assert training["steps"] > 0 and training["first_loss"] is not None
    assert (out / "train" / "final").is_dir()
    shards = json.loads((out / "run" / "train_shards" / "demo" / "shards.json").read_text())
    assert shards["features"]["vae_resolutions"]  # trained from cached features
    assert "inputs:" in result.stdout and "training:" in result.stdout
    # Quiet logs (issue 11): no \r bars, no library chatter through the root logger, no spurious warnings.
    output = result.stdout + result.stderr
    assert "\r" not in output and "INFO root:" not in output, output[-3000:]
    assert "null-caption buffer" not in output and "issue_detector" not in output, output[-3000:]
    # Issue 18: no Ray Data progress blocks, no diffusers warning per export; semantic dedup off, saying why.
    assert "streaming_executor" not in output and "logging_progress" not in output, output[-3000:]
    assert "cannot be saved" not in output, output[-3000:]
    assert "semantic dedup off: turned off" in output and "tiny random CLIP" in output, output[-3000:]
    # The trained demo model sampled the eval prompts and was evaluated (issue 12).
    num_eval = summary["selections"]["eval"]
    assert len((out / "samples" / "images.jsonl").read_text().splitlines()) == num_eval
    assert list((out / "pipeline" / "transformer").glob("pixart_kv_transformer_*.py"))  # the standalone export
    _readme_lines_sample_the_demo_export(out, tmp_path)
    evaluation = summary["evaluation"]["eval"]
    assert (
        evaluation["num_images"] == num_eval and evaluation["fid"] == evaluation["fid"]
    )  # a number, not NaN
    assert (out / "train" / "eval" / "eval" / "index.html").exists()
    assert "evaluation eval:" in result.stdout and "FID" in result.stdout
    assert {"samples", "eval/eval"} <= set(summary["outputs"])
    _toy_world_part(out, result.stdout)
    check_toy_run(out / "toy", output, num_scenes=8, num_eval=4, eval_steps=(TOY_EVAL_EVERY, TOY_STEPS))


def _toy_world_part(out, stdout: str) -> None:
    """The demo's toy-world run (issue 21): 8 square scenes, 4 held out ("eval"), the other 4 trained on and
    evaluated as "seen"; adherence, its chance level and the real images' score in the summary it prints."""
    toy = json.loads((out / "toy" / "summary.json").read_text())
    assert toy["inputs"] == 8 and toy["kept_per_tier"] == {"1k": 8}
    assert toy["selections"] == {"eval": 4, "seen": 4, "toy": 4}
    assert toy["training"]["steps"] == TOY_STEPS

    def keys(name: str) -> set[str]:
        prompts = out / "toy" / "run" / "eval_shards" / name / "prompts.jsonl"
        return {json.loads(line)["key"] for line in prompts.read_text().splitlines()}

    trained = set()
    for shard in (out / "toy" / "run" / "train_shards" / "toy").glob("train-*.tar"):
        with tarfile.open(shard) as tar:
            trained |= {name.split(".", 1)[0] for name in tar.getnames()}
    assert keys("seen") == trained and not keys("eval") & trained  # seen: trained on; eval: held out
    for corpus_image in (out / "toy" / "corpus").glob("*.png"):
        with Image.open(corpus_image) as image:
            assert image.size == (1024, 1024)  # square only: no bucket names its scene
    for name in ("seen", "eval"):
        evaluation = toy["evaluation"][name]
        assert evaluation["num_images"] == 4
        assert {"adherence", "adherence_shifted", "adherence_real"} <= set(evaluation)
        assert evaluation["adherence_real"]["overall"] == 1.0
        assert f"  adherence {name}:" in stdout
    assert "vs shifted prompts (chance)" in stdout and "What the toy world shows" in stdout


def _readme_lines_sample_the_demo_export(out, tmp_path) -> None:
    """The README's three lines of plain diffusers, as written, on this demo's own ``demo_out/pipeline``, in a
    process that cannot import pixsigma: they write the image; their arguments are the export's diffusers_call."""
    block = readme_block("## Sampling, export and evaluation", lang="python")
    info = json.loads((out / "pipeline" / "pixsigma.json").read_text())
    call = info["diffusers_call"]
    assert all(f"{key}={value!r}" in block for key, value in call.items()), (call, block)
    cwd = tmp_path / "readme"
    cwd.mkdir()
    (cwd / "demo_out").symlink_to(out)  # the README names demo_out/, make demo's default DEMO_OUT
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", NO_PIXSIGMA + block, str(REPO)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    with Image.open(out / "cat.png") as image:  # the call names no size: the pipeline's default, the trained one
        assert image.size == (info["resolution"], info["resolution"])


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
            logged = {e.step: e.value for e in events.Scalars(f"eval/adherence/{name}")}
            assert logged[row["global_step"]] == pytest.approx(row["adherence"][name], abs=1e-6)
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
