"""pixsigma-sample under torchrun: rank-sharded, atomic, resumable; the files do not depend on the world size."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.training.conftest import REPO
from tests.training.eval_factories import tiny_export
from training.sample import IMAGES_FILE, RUN_FILE, ImageGenerator, run

PROMPTS = [
    {"prompt": "a photo of a cat at sunset", "id": "cat", "aspect": "1:2"},
    {"prompt": "a red car in the rain", "seed": 1234},
    {"prompt": "a lighthouse by the sea", "width": 96, "height": 48},
    {"prompt": "an oil painting of a castle", "id": "castle"},
    {"prompt": "a bowl of fruit", "aspect": "2:1"},
]


def sample(*args: str, nproc: int | None = None) -> None:
    """pixsigma-sample in a fresh process, one thread (as torchrun's ranks): CPU float sums then agree to the bit."""
    launcher = ([os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone",
                 f"--nproc_per_node={nproc}"] if nproc else [sys.executable])  # fmt: skip
    result = subprocess.run(
        [*launcher, "-m", "training.sample", *args], cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def sharded(tiny_models, tmp_path_factory):
    """The same prompt file sampled by one process and by torchrun with 2 ranks (CPU, gloo); one image per
    forward, so that each image is the same float computation whichever rank makes it."""
    root = tmp_path_factory.mktemp("sharded")
    model = tiny_export(tiny_models, root / "run" / "final", seed=5)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    common = ["--model", str(model), "--input", str(prompts), "--steps", "2", "--batch-size", "1",
              "--num-images-per-prompt", "2", "--seed", "3", "--device", "cpu"]  # fmt: skip
    sample(*common, "--output", str(root / "one"))
    sample(*common, "--output", str(root / "two"), nproc=2)
    return root, common


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_two_ranks_write_the_files_of_one_process(sharded):
    root, _ = sharded
    one, two = _files(root / "one"), _files(root / "two")
    assert one == two  # bytes: PNGs, images.jsonl (merged in prompt order), the run record
    rows = [json.loads(line) for line in one[IMAGES_FILE].decode().splitlines()]
    assert [r["index"] for r in rows] == list(range(10))
    assert [r["file"] for r in rows] == ["cat-0.png", "cat-1.png", "000002.png", "000003.png", "000004.png",
                                         "000005.png", "castle-0.png", "castle-1.png", "000008.png", "000009.png"]  # fmt: skip
    assert [r["seed"] for r in rows] == [3, 4, 1234, 1235, 7, 8, 9, 10, 11, 12]
    assert sorted(one) == sorted([r["file"] for r in rows] + [IMAGES_FILE, RUN_FILE])  # no rank parts left


def test_a_resumed_run_regenerates_only_what_is_missing(sharded, tmp_path):
    root, common = sharded
    reference = _files(root / "one")
    out = tmp_path / "resumed"
    out.mkdir()
    for name, data in reference.items():  # a run killed midway: no images.jsonl, some images missing …
        if name not in (IMAGES_FILE, "cat-1.png", "000004.png"):
            (out / name).write_bytes(data)
    (out / "castle-0.png").write_bytes(reference["castle-0.png"][:200])  # … one cut short (not via rename)
    (out / "images.rank-00001-of-00002.jsonl").write_text("{}\n")  # a stale part of the killed run
    kept = {p.name: p.stat().st_ino for p in out.glob("*.png") if p.name != "castle-0.png"}
    sample(*common, "--output", str(out))
    assert _files(out) == reference
    assert {p.name: p.stat().st_ino for p in out.glob("*.png") if p.name in kept} == kept  # not written again
    assert {p.name for p in out.glob("*.png")} - kept.keys() == {"cat-1.png", "000004.png", "castle-0.png"}


def test_another_run_in_the_folder_is_refused(sharded, tmp_path):
    root, common = sharded
    with pytest.raises(SystemExit, match="already holds a sampling run.*another plan"):
        run([*common, "--seed", "4", "--output", str(root / "one")])  # the last --seed wins
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "cat-0.png").write_bytes(b"")
    with pytest.raises(SystemExit, match=f"images without {RUN_FILE}"):
        run([*common, "--output", str(tmp_path / "x")])


# --------------------------------------------------------------------------------------------------
# What the plan digest covers (review of issue 19): a folder holds the images of one generator
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def small_run(tiny_models, tmp_path):
    """A tiny export and a three-prompt file, sampled once (in-process, 2 steps) into ``out``."""
    model = tiny_export(tiny_models, tmp_path / "run" / "final", seed=5)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS[:3]))
    common = ["--model", str(model), "--input", str(prompts), "--steps", "2", "--seed", "3", "--device", "cpu"]
    run([*common, "--output", str(tmp_path / "out")])
    return tmp_path, common


def test_a_rerun_with_another_prompt_case_or_other_weights_at_the_same_path_is_refused(small_run, tiny_models):
    """Same prompts, seeds and flags, but another --prompt-case, or the model re-exported at the same path with
    other weights: other images, so the folder is refused instead of resumed (resuming would keep the old PNGs)."""
    root, common = small_run
    out = str(root / "out")
    run([*common, "--output", out])  # the same run: resumed (nothing to do)
    with pytest.raises(SystemExit, match="already holds a sampling run.*another plan: the generator's prompt_case"):
        run([*common, "--output", out, "--prompt-case", "as_written"])  # the export was trained lower
    tiny_export(tiny_models, root / "run" / "final", seed=6)  # retrained: same path, other weights
    with pytest.raises(SystemExit, match="another plan: the generator's model_sha256 differ"):
        run([*common, "--output", out])


class _Killed(Exception):
    pass


def test_an_overwrite_killed_midway_then_resumed_leaves_only_the_new_runs_images(small_run, monkeypatch):
    """--overwrite with a new seed, killed after its first image, then the same command without --overwrite:
    the folder ends as a fresh run of the new plan (none of the old run's same-sized PNGs kept as complete)."""
    root, common = small_run
    new = [*common, "--seed", "40"]
    run([*new, "--output", str(root / "fresh")])
    generate = ImageGenerator.generate

    def killed_after_one(self, jobs, settings):
        for number, item in enumerate(generate(self, jobs, settings)):
            if number == 1:
                raise _Killed
            yield item

    monkeypatch.setattr(ImageGenerator, "generate", killed_after_one)
    with pytest.raises(_Killed):
        run([*new, "--output", str(root / "out"), "--overwrite"])
    monkeypatch.undo()
    run([*new, "--output", str(root / "out")])
    assert _files(root / "out") == _files(root / "fresh")
