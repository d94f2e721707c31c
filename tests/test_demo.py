"""End to end: the `make demo` pipeline (configs/demo.sh) on a small corpus, on the session's Ray cluster.

Its toy-world part runs for a few steps: the wiring (held-out and seen eval sets, adherence with its chance level in
the summary), not the learning (tests/training/test_learning.py). tests/test_toy_run.py checks the toy run itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

from tests.conftest import REPO, VENV_BIN
from tests.training.test_pipeline import NO_PIXSIGMA
from tests.training.test_sample_readme import readme_block

TOY_STEPS = 30


# 2.5 min alone on 2 cores (toy part included), up to 4 under make test's load.
@pytest.mark.timeout(900)
def test_demo_pipeline_end_to_end(ray_cluster, tmp_path):
    out = tmp_path / "demo"
    env = {
        **os.environ,
        "DEMO_OUT": str(out),
        "DEMO_N": "8",
        "NPROC": "2",
        "DEMO_TOY_STEPS": str(TOY_STEPS),  # the wiring, not the learning (tests/training/test_learning.py)
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
        "RAY_ADDRESS": ray_cluster.address,  # every Ray step joins the session cluster
    }
    result = subprocess.run(
        ["bash", "configs/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=840
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
