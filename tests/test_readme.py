"""The README's cluster and query commands, run exactly as written from a fresh clone, on `ray start --head`.

The clone (of the committed tree) lies in a folder with nothing beside it, no ../shared: the cluster section's
curation is the demo's curation step under `ray job submit --working-dir .` from there. The commands read their data and models from the variables the README documents (INPUT, RUN, CLIP, SEMDEDUP, VLM, T5,
VAE, SELECT, CONFIG, NPROC, GPUS, RAY_ADDRESS); this test sets them to a small demo corpus, tiny models built
offline and a tiny training config, and nothing else. The query section runs from a folder where
`demo_out/run` is that run and `.venv` this venv, as it would after `make demo`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, VENV_BIN, free_port, ray_job_submit
from tests.manifests.hf_check import assert_card_loads_every_member

SECTIONS = ("On a real cluster", "Querying the manifests")
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)

TINY_TRAIN_CONFIG = """\
run_dir = "unused"
checkpoint_every = 100
[model]
preset = "tiny"
[text]
t5 = "{t5}"
max_tokens = 16
[data]
shards = "unused"
[optim]
base_lr = 2e-4
mixed_precision = "no"
[[stages]]
name = "32px"
resolution = 32
vae = "{vae}"
steps = 3
batch_size = 2
"""


def section(title: str, repo: Path = REPO) -> str:
    readme = (repo / "README.md").read_text()
    start = readme.index(f"\n## {title}\n")
    end = readme.find("\n## ", start + 1)
    return readme[start : end if end >= 0 else None]


def blocks(title: str, repo: Path = REPO) -> list[tuple[str, str]]:
    """(language, code) of every fenced block of a README section."""
    return FENCE.findall(section(title, repo))


def test_readme_sections_hold_the_commands():
    cluster = [code for lang, code in blocks(SECTIONS[0]) if lang == "bash"]
    assert len(cluster) == 2 and all(lang == "bash" for lang, _ in blocks(SECTIONS[0]))
    for form in (
        "ray job submit --working-dir . -- python curation/run.py",
        "ray job submit --working-dir . -- python captioning/run.py",
        "ray job submit --working-dir . -- python -m manifests.materialize",
        "torchrun --nproc_per_node=",
    ):
        assert form in cluster[1]
    assert re.search(r"torchrun .*training/main\.py --config", cluster[1])
    assert {lang for lang, _ in blocks(SECTIONS[1])} == {"bash", "sql", "python"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    """Tiny offline models and a small demo corpus, as the README variables name them."""
    from captioning.tiny import build_tiny_llava
    from curation.demo_corpus import generate
    from curation.tiny import build_tiny_clip
    from training.tiny import build_tiny_t5, build_tiny_vae

    root = tmp_path_factory.mktemp("readme")
    models = root / "models"
    t5, vae = build_tiny_t5(models), build_tiny_vae(models, name="vae")
    config = root / "tiny.toml"
    config.write_text(TINY_TRAIN_CONFIG.format(t5=t5, vae=vae))
    generate(root / "corpus", n=5, seed=1)  # the fifth good image is the 4K one
    return {
        "INPUT": str(root / "corpus"),
        "RUN": str(root / "run"),
        "CLIP": f"local-dir:{build_tiny_clip(models)}",
        "MIN_AESTHETIC": "none",  # a random CLIP's scores mean nothing
        "SEMDEDUP": "--no-semantic-dedup",  # and its embeddings of distinct pictures are alike
        "VLM": str(build_tiny_llava(models)),
        "T5": str(t5),
        "VAE": str(vae),
        "SELECT": "tier = '4k'",  # one sample: VAE latents at 1024 px are slow on a CPU
        "CONFIG": str(config),
        "NPROC": "1",
        "GPUS": "0",
    }


def run_bash(script: str, *, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A clone of the committed tree, alone in its folder."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a git checkout")
    clone = tmp_path_factory.mktemp("fresh") / "pixsigma"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{REPO}", str(clone)], check=True)
    assert os.listdir(clone.parent) == ["pixsigma"]  # nothing beside it
    return clone


def offline_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", **extra}


def test_relative_paths_are_refused_inside_a_ray_job(ray_cluster):
    """Under `ray job submit --working-dir .` a relative path would live in Ray's copy: one line, no traceback."""
    entrypoint = ["python", "curation/run.py", "--input", "demo_out/corpus", "--output", "demo_out/run"]
    result = ray_job_submit(ray_cluster, entrypoint, cwd=REPO, env=offline_env())
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output, output[-3000:]
    line = next(line for line in output.splitlines() if line.startswith("error: --input"))
    assert "--input 'demo_out/corpus' is a relative path inside a Ray job" in line
    assert "copy of --working-dir" in line and "absolute path" in line


def test_readme_commands_run_verbatim_from_a_fresh_clone(ray_cluster, tiny, clone, tmp_path):
    env = offline_env(
        **tiny,
        RAY_ADDRESS=ray_cluster.dashboard,
        PYTHONPATH=str(clone),  # the clone's code, not this checkout's
        PET_MASTER_PORT=str(free_port()),  # torchrun's --master-port: never the shared default 29500
    )
    assert ray_job_submit(ray_cluster, ["true"], cwd=clone, env=env, working_dir=False).returncode == 0
    cluster = "\n".join(code for _, code in blocks(SECTIONS[0], clone))
    result = run_bash(cluster, cwd=clone, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert len(re.findall(r"Job '\S+' succeeded", output)) == 3 and not re.search(r"Job '\S+' failed", output)
    # Quiet logs: no \r progress bars, no deprecation warning of our own Ray calls, no accelerate block.
    assert "\r" not in output and "RayDeprecationWarning" not in output and "accelerate" not in output

    run = Path(tiny["RUN"])
    summary = json.loads((run / "curation_summary.json").read_text())
    expected = [
        json.loads(line) for line in (Path(tiny["INPUT"]) / "expected.jsonl").read_text().splitlines()
    ]
    assert summary["inputs"] == len(expected)  # every input of the corpus, good and bad, is a row
    # The original, its byte copy and its re-encode are one group with one keeper.
    assert summary["kept"] == sum(e["expected_status"] == "kept" for e in expected)
    assert summary["kept_per_tier"]["4k"] == 1
    images = pq.read_table(run / "manifests" / "images", columns=["aesthetic_model"]).column(0).drop_null()
    assert {m.split("@")[0] for m in images.to_pylist()} == {
        "laion_aesthetic_v2.safetensors"
    }  # the builtin head
    assert (run / "captioning_summary.json").is_file()
    shards = run / "train_shards" / "hq"
    tars = sorted(shards.glob("train-*.tar"))
    rows = assert_card_loads_every_member(shards, None, tars, tmp_path / "hf")
    assert rows and all(row["vae1024.npy"] is not None for row in rows.values())
    assert (run / "train" / "final").is_dir()

    # The query section, from a folder laid out as after `make demo`.
    (tmp_path / "demo_out").mkdir()
    (tmp_path / "demo_out" / "run").symlink_to(run)
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    for lang, code in blocks(SECTIONS[1], clone):
        if lang == "bash":
            result = run_bash(code, cwd=tmp_path, env=env)
        elif lang == "sql":
            result = subprocess.run(
                [str(VENV_BIN / "duckdb"), "-bail"],
                input=code,
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
            )
        else:
            result = subprocess.run(
                [sys.executable, "-c", code],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
        assert result.returncode == 0 and "Error" not in result.stderr, (code, result.stdout, result.stderr)
        assert result.stdout.strip(), code  # every query prints a table
