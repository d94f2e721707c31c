"""bench/gpu_eval30k.py runs where the GPU machine can run it: torch, transformers, timm and safetensors only."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

from tests.conftest import REPO

# What the GPU machine lacks (the script must not import them, nor pixsigma modules that do).
ABSENT = ("diffusers", "open_clip", "ray", "webdataset", "duckdb", "torch_fidelity", "torchmetrics", "pyarrow",
          "scipy", "pixsigma", "__editable__", "_pixsigma")  # fmt: skip


def _site_without_absent(folder) -> str:
    """A copy of site-packages (links) without the packages the GPU machine lacks, nor their metadata."""
    site = sysconfig.get_paths()["purelib"]
    for entry in sorted(Path(site).iterdir()):
        if not entry.name.replace("-", "_").lower().startswith(ABSENT):
            (folder / entry.name).symlink_to(entry)
    return str(folder)


def test_tiny_mode_runs_with_only_torch_transformers_timm(tmp_path):
    (tmp_path / "site").mkdir()
    site = _site_without_absent(tmp_path / "site")
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); sys.path.append({site!r}); "
            "import importlib.util; assert importlib.util.find_spec('diffusers') is None; "
            "from bench.gpu_eval30k import main; main(['--tiny', '--output', sys.argv[1]])")  # fmt: skip
    result = subprocess.run([sys.executable, "-S", "-c", code, str(tmp_path / "out.md")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    table = (tmp_path / "out.md").read_text()
    for part in ("DiT sampling", "T5 prompt encoding", "Inception, batch 2", "CLIP, batch 2", "**total**"):
        assert part in table


def test_its_dpm_solver_is_diffusers_on_our_schedule():
    """The script's plain-torch DPM-Solver++(2M) against diffusers' scheduler (training.sample's loop) on a
    fixed denoiser: the same x_0."""
    from bench.gpu_eval30k import dpm_solver_2m
    from training.sample import dpm_solver_sample

    weight = torch.linspace(0.5, 1.5, 4).view(1, 4, 1, 1)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # ε depends on x and t, σ channels ignored
        eps = torch.tanh(weight * x) * (t.float().view(-1, 1, 1, 1) / 1000 + 0.1)
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for steps in (2, 5, 20):
        ours = dpm_solver_2m(denoise, noise, steps=steps, in_channels=4)
        theirs = dpm_solver_sample(denoise, noise, steps=steps, in_channels=4)
        assert torch.allclose(ours, theirs, atol=1e-4), (steps, (ours - theirs).abs().max())
