"""The README's "Sampling, export and evaluation" commands, run verbatim on tiny models built here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np

from tests.training.conftest import REPO
from tests.training.eval_factories import PROMPTS, build_eval_models, build_eval_set, real_images, tiny_export

HEADING = "## Sampling, export and evaluation"


def readme_block(heading: str, lang: str = "bash") -> str:
    """The first ```<lang> block under ``heading`` in README.md, as written."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(heading) :]
    match = re.search(rf"^```{lang}\n(.*?)^```$", section, flags=re.S | re.M)
    assert match, f"no {lang} block under {heading!r}"
    return match.group(1)


def _env(tmp_path, models, **variables: str) -> dict:
    return {
        **os.environ,
        "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        # Only the variables the README names:
        "INCEPTION": models["inception"], "CLIP": models["clip"], "NPROC": "1",
        "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),  # where diffusers copies custom code
        **variables,
    }  # fmt: skip


def test_readme_sampling_export_and_evaluation_commands_run(tiny_models, tmp_path_factory, tmp_path):
    run, baseline = tmp_path / "run", tmp_path / "run0" / "train"
    # A run as the trainer leaves it: train/final/ (KV-compressed, the last stage of the schedule), final_ema/.
    tiny_export(tiny_models, run / "train" / "final", seed=1)
    tiny_export(tiny_models, run / "train" / "final_ema", seed=2)
    tiny_export(tiny_models, baseline / "final_ema", seed=3, kv_layers=())
    models = build_eval_models(tmp_path_factory.getbasetemp() / "eval_models")
    build_eval_set(run / "eval_shards" / "eval", num=3)
    env = {
        **os.environ,
        "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        # Only the variables the README names:
        "RUN": str(run), "BASELINE": str(baseline), "INCEPTION": models["inception"], "CLIP": models["clip"],
        "NPROC": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),  # where diffusers copies custom code
    }  # fmt: skip
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", readme_block(HEADING)], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    rows = [json.loads(line) for line in (run / "samples" / "images.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a lighthouse by the sea at dawn", *PROMPTS[:3]]
    assert json.loads((run / "pipeline" / "model_index.json").read_text())["transformer"][1] == (
        "PixArtKVTransformer2DModel"
    )
    assert (run / "pipeline" / "lighthouse.png").is_file()
    compare = json.loads((run / "train" / "eval" / "compare" / "compare.json").read_text())
    assert [m["model"] for m in compare["models"]] == [str(run / "train"), str(baseline)]
    assert [(m["num_images"], m["fid_features"]) for m in compare["models"]] == [(3, 2048), (3, 2048)]
    for label in compare["labels"]:
        assert (run / "train" / "eval" / "compare" / label / "metrics.json").is_file()
    assert (run / "train" / "eval" / "compare" / "index.html").is_file()
    assert list((run / "pipeline" / "transformer").glob("pixart_kv_transformer_*.py"))  # --standalone

    # The three lines of plain diffusers, on a standalone export where `make demo` leaves one.
    (tmp_path / "demo" / "demo_out").mkdir(parents=True)
    (tmp_path / "demo" / "demo_out" / "pipeline").symlink_to(run / "pipeline")
    lines = readme_block(HEADING, lang="python")
    assert len(lines.strip().splitlines()) == 3
    result = subprocess.run([sys.executable, "-c", lines], cwd=tmp_path / "demo", env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "demo" / "demo_out" / "cat.png").is_file()


def test_readme_30k_protocol_runs(tiny_models, tmp_path_factory, tmp_path):
    """The 30K block: reference statistics of a real folder, sharded sampling of MJHQ's meta_data.json under
    torchrun, the sampled folder scored against the statistics (three prompts, four real images)."""
    run = tmp_path / "run"
    tiny_export(tiny_models, run / "train" / "final_ema", seed=2, kv_layers=())
    models = build_eval_models(tmp_path_factory.getbasetemp() / "eval_models")
    (tmp_path / "mjhq").mkdir()
    meta = {f"m{i}": {"prompt": p, "category": "things"} for i, p in enumerate(PROMPTS[:3])}
    (tmp_path / "mjhq" / "meta_data.json").write_text(json.dumps(meta))
    real = tmp_path / "mjhq" / "images" / "things"  # MJHQ's layout: a folder per category
    real.mkdir(parents=True)
    for i, image in enumerate(real_images()[:4]):
        image.save(real / f"r{i}.png")
    env = _env(tmp_path, models, RUN=str(run), PROMPTS=str(tmp_path / "mjhq" / "meta_data.json"),
               REAL=str(tmp_path / "mjhq" / "images"), FID_CHECK="--allow-small-fid")  # fmt: skip
    block = readme_block("### The paper's protocol at 30K")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    with np.load(run / "real30k.npz") as stats:
        assert int(stats["num_images"]) == 4 and stats["mu"].shape == (2048,)
    rows = [json.loads(line) for line in (run / "samples30k" / "images.jsonl").read_text().splitlines()]
    assert [(r["file"], r["prompt"], r["steps"]) for r in rows] == [(f"m{i}.png", p, 20) for i, p in enumerate(PROMPTS[:3])]
    metrics = json.loads((run / "samples30k" / "eval" / "metrics.json").read_text())
    assert (metrics["num_real_images"], metrics["num_generated_images"]) == (4, 3)
    assert metrics["reference_stats"] == str(run / "real30k.npz") and metrics["fid_small_n"]
