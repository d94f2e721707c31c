"""pixsigma-sample against a plain ``PixArtSigmaPipeline`` in a process that cannot import pixsigma, on long
mixed-case prompts (> 100 T5 tokens, issue 19 §5), for each ``text.prompt_case``.

The export's ``pixsigma.json`` says how to call the pipeline (``diffusers_call``: the caption budget as
``max_sequence_length``, ``clean_caption=False``). diffusers' own default, ``clean_caption=True``, runs DeepFloyd's
caption cleaning whenever bs4 and ftfy are importable and silently lowercases only when they are not; this
test requires both (they are test dependencies), so a rule of ours that differed from the pipeline's with
cleaning on, or a ``diffusers_call`` that left it on, fails here instead of passing by their absence.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from manifests.features import PROMPT_CASES
from tests.training.conftest import REPO
from tests.training.test_pipeline import NO_PIXSIGMA, TINY, _components, _randomize
from training.model import PixArtSigma
from training.pipeline import export_pipeline, read_info
from training.sample import run as sample_cli

BUDGET = 300  # Σ's caption budget: the whole prompt is encoded, not the tiny preset's 16 tokens
SEED = 10
# Mixed case, spaces around, a handle and a URL (what clean_caption removes), > 100 T5 tokens
PROMPTS = [
    "  A Photo by @JaneDoe of a CAT on a Red Sofa at Sunset, see https://Example.com/Cats for More; "
    + " ".join(f"Golden Light{i} through the Window, highly Detailed, 35mm Film, Bokeh" for i in range(3)) + "  ",
    "A RED Car in the Rain, Reflections on Wet Asphalt, NEON Signs, " * 3,
]

PLAIN_DIFFUSERS_CALL = NO_PIXSIGMA + """
import json
import torch
import bs4, ftfy  # with both, diffusers' default clean_caption=True really cleans
from diffusers import PixArtSigmaPipeline

folder, inputs = sys.argv[2], torch.load(sys.argv[3])
call = json.load(open(f"{folder}/pixsigma.json"))["diffusers_call"]
pipe = PixArtSigmaPipeline.from_pretrained(folder, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
common = dict(height=48, width=80, num_inference_steps=4, guidance_scale=4.5, output_type="pt")
out = {
    "recorded": pipe(inputs["prompts"], latents=inputs["noise"], **call, **common).images,  # at 48×80
    # diffusers' defaults but the budget and binning (the tiny preset has no bin table): clean_caption=True
    "default": pipe(inputs["prompts"], latents=inputs["noise"], max_sequence_length=call["max_sequence_length"],
                    use_resolution_binning=False, **common).images,
}
torch.save(out, sys.argv[3] + ".out")
"""


def _env_without_pixsigma(tmp_path: Path) -> dict:
    """This environment, its PYTHONPATH less the repository (NO_PIXSIGMA drops it from sys.path too)."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO]
    return {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": os.pathsep.join(paths),
            "OMP_NUM_THREADS": "1"}  # fmt: skip


@pytest.mark.parametrize("prompt_case", PROMPT_CASES)
def test_pixsigma_sample_is_a_plain_diffusers_call_on_long_mixed_case_prompts(
    tiny_models, tmp_path, caplog, prompt_case
):
    import importlib.util

    from transformers import AutoTokenizer

    for name in ("bs4", "ftfy"):  # test dependencies (pyproject [dev]): without both, diffusers never cleans
        assert importlib.util.find_spec(name), f"{name} is not installed: `make test` installs the dev extras"
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models / "t5"))
    assert all(100 < len(tokenizer(text).input_ids) < BUDGET for p in PROMPTS for text in (p, p.lower()))
    model = PixArtSigma(dataclasses.replace(TINY, kv_compress_layers=(1,), max_token_length=BUDGET,
                                            prompt_case=prompt_case))  # fmt: skip
    model = _randomize(model, 7)
    with caplog.at_level(logging.WARNING, logger="training.pipeline"):
        folder = export_pipeline(model, tmp_path / "export", _components(tiny_models), mode="copy")
    info = read_info(folder)
    assert info["prompt_case"] == prompt_case and info["model"]["prompt_case"] == prompt_case
    # the tiny preset's sample_size 8 has no diffusers bin table: binning off (the default size is the trained one)
    assert info["diffusers_call"] == {"max_sequence_length": BUDGET, "clean_caption": False,
                                      "use_resolution_binning": False}  # fmt: skip
    lowers = prompt_case == "lower"
    assert ("prompt_case_note" in info) != lowers and ("PixArtSigmaPipeline lowercases" in caplog.text) != lowers

    out = tmp_path / "samples"
    argv = ["--model", str(folder), "--output", str(out), "--height", "48", "--width", "80", "--steps", "4",
            "--cfg-scale", "4.5", "--seed", str(SEED), "--device", "cpu", "--dtype", "fp32"]  # fmt: skip
    sample_cli(argv + [arg for p in PROMPTS for arg in ("--prompt", p)])
    ours = np.stack([np.asarray(Image.open(out / f"{i:06d}.png"), np.float64) for i in range(len(PROMPTS))])

    noise = torch.stack([torch.randn(4, 6, 10, generator=torch.Generator().manual_seed(SEED + i))
                         for i in range(len(PROMPTS))])  # fmt: skip
    torch.save({"prompts": PROMPTS, "noise": noise}, tmp_path / "inputs.pt")
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_DIFFUSERS_CALL, str(REPO), str(folder), str(tmp_path / "inputs.pt")],
        cwd=tmp_path, env=_env_without_pixsigma(tmp_path), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    theirs = torch.load(tmp_path / "inputs.pt.out")
    pixels = {k: v.permute(0, 2, 3, 1).double().numpy() * 255 for k, v in theirs.items()}  # (B, H, W, 3)
    assert ours.std() > 2
    gap = np.abs(ours - pixels["recorded"]).max()
    if lowers:  # the PNG is the pipeline's image rounded to 8 bits (fp32 parity 1e-5 before rounding)
        assert gap <= 0.5 + 255 * 1e-5, gap
    else:  # what the export's note says: plain diffusers lowercases, the model was trained as written
        assert gap > 1.0, gap
    # diffusers' default clean_caption=True cleans these prompts (handle, URL): not the model's text
    assert np.abs(ours - pixels["default"]).max() > 1.0
