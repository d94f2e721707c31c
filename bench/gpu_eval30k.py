"""GPU benchmark (prepared; one call, a few minutes): the time of PixArt-Σ's 30K evaluation on one GPU.

    python -m bench.gpu_eval30k [--output OUT.md] [--record]
    python -m bench.gpu_eval30k --tiny          # CPU, tiny models and sizes: every code path in seconds

PixArt-Σ reports FID on 30K images (arXiv 2403.04692 §4): per image, what ``pixsigma-sample`` does (T5-XXL
encodes the prompt; the XL/2 DiT runs 20 DPM-Solver++ steps with classifier-free guidance at 1024², batch
``--sample-batch``), then what ``pixsigma-evaluate --images`` does (FID's Inception-v3 on the image brought to
299² by the TF bilinear resize; CLIP ViT-L/14 image and text towers, fp32 as ``training.evaluate`` runs them) at
several ``--feature-batch-size`` values. Each part is timed, then extrapolated to 30K images. Random weights of
the real architectures (timings do not depend on the values): our DiT (``training.model``, XL/2), T5 v1.1
XXL and CLIP ViT-L/14 from transformers configs, Inception-v3 from timm (torch-fidelity's TF-ported graph
differs only in pooling details). Needs torch, transformers and timm only — no diffusers, open_clip,
torch-fidelity, torchmetrics, ray, duckdb (the GPU machine has none): the DPM-Solver++(2M) update is written out
here on our noise schedule (``training.diffusion``; the solver arithmetic is a few elementwise operations, the
cost is the guided forwards). The SDXL VAE decode (diffusers) is not included.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from manifests.features import SD_VAE_DOWNSAMPLE
from training.diffusion import GaussianDiffusion
from training.model import PRESETS, PixArtSigma, pe_params_for_resolution

NUM_IMAGES = 30_000  # PixArt-Σ's evaluation size (COCO-30K / MJHQ-30K)
T5_TOKENS = 300  # PixArt-Σ's caption budget
CLIP_TOKENS = 77  # CLIP's context
FID_SIZE = 299  # the TF FID Inception's input
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64}
T5_TINY = {"vocab_size": 1000, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4}
CLIP_L14 = {"vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                       "num_attention_heads": 16, "patch_size": 14, "image_size": 224},
            "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                     "num_attention_heads": 12}, "projection_dim": 768}  # fmt: skip
CLIP_TINY = {"vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "patch_size": 16, "image_size": 64},
             "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 2}, "projection_dim": 32}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Plan:
    """What is timed: model sizes, image side, steps and batch sizes."""

    preset: str
    px: int
    steps: int
    sample_batch: int
    feature_batches: tuple[int, ...]
    t5: dict
    clip: dict
    device: str
    repeats: int = 3  # timed calls per feature batch, after one warm-up


def full_plan(args: argparse.Namespace) -> Plan:
    return Plan("XL/2", args.px, args.steps, args.sample_batch, tuple(args.feature_batches), T5_XXL, CLIP_L14,
                args.device)  # fmt: skip


def tiny_plan() -> Plan:
    return Plan("tiny", 64, 2, 2, (2,), T5_TINY, CLIP_TINY, "cpu", repeats=1)


def timed(step: Callable[[], object], device: torch.device, *, repeats: int = 1) -> float:
    """Seconds per call of ``step`` after one warm-up call (CUDA synchronised)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        step()
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        sync()
    return (time.perf_counter() - start) / repeats


# --------------------------------------------------------------------------------------------------
# Sampling: T5 + the DiT's guided DPM-Solver++(2M)
# --------------------------------------------------------------------------------------------------


def dpm_solver_2m(denoise: Callable, noise: torch.Tensor, *, steps: int, in_channels: int) -> torch.Tensor:
    """DPM-Solver++(2M), data prediction, linspace timesteps, first order on the last step (diffusers'
    ``DPMSolverMultistepScheduler`` defaults that ``PixArtSigmaPipeline`` uses), on our ᾱ schedule."""
    acp = GaussianDiffusion().alphas_cumprod  # (1000,) float64
    ts = torch.linspace(0, len(acp) - 1, steps + 1).round().long().flip(0)[:-1]  # t_0 > … > t_{n-1}
    alpha, sigma = acp.sqrt(), (1 - acp).sqrt()
    x, prev_x0, prev_h = noise.float(), None, None  # (B, C, h, w)
    for i, t in enumerate(ts.tolist()):
        eps = denoise(x, torch.full((x.shape[0],), t, device=x.device))[:, :in_channels].float()
        x0 = (x - float(sigma[t]) * eps) / float(alpha[t])
        if i == len(ts) - 1:
            return x0
        s = int(ts[i + 1])
        h = math.log(alpha[s] / sigma[s]) - math.log(alpha[t] / sigma[t])
        d = x0 if prev_x0 is None else (1 + h / (2 * prev_h)) * x0 - h / (2 * prev_h) * prev_x0  # midpoint 2M
        x = float(sigma[s] / sigma[t]) * x - float(alpha[s]) * math.expm1(-h) * d
        prev_x0, prev_h = x0, h
    return x


def dit_seconds(plan: Plan, device: torch.device, dtype: torch.dtype) -> float:
    """Seconds per image of the DiT's guided DPM-Solver++ steps at ``plan.px`` (prompt and negative in one batch)."""
    config = PRESETS[plan.preset]
    model = PixArtSigma(config).to(device, dtype).eval()
    model.set_resolution(*pe_params_for_resolution(plan.px, patch_size=config.patch_size, vae_downsample=SD_VAE_DOWNSAMPLE))
    B, C, side = plan.sample_batch, config.in_channels, plan.px // 8  # VAE 8×
    y = torch.randn(2 * B, config.max_token_length, config.caption_channels, device=device, dtype=dtype)
    mask = torch.ones(2 * B, config.max_token_length, dtype=torch.long, device=device)
    noise = torch.randn(B, C, side, side, device=device)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model(torch.cat([x, x]).to(dtype), torch.cat([t, t]), y, mask).float()  # (2B, C_out, h, w)
        cond, uncond = out.chunk(2)
        return uncond[:, :C] + 4.5 * (cond[:, :C] - uncond[:, :C])  # PixArt-Σ's cfg 4.5

    return timed(lambda: dpm_solver_2m(denoise, noise, steps=plan.steps, in_channels=C), device) / B


def t5_seconds(plan: Plan, device: torch.device, dtype: torch.dtype) -> float:
    """Seconds per prompt of T5 v1.1 (XXL for the full plan) on 300 tokens."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(**plan.t5, feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=False)
    with torch.device(device):
        t5 = T5EncoderModel(config).to(dtype).eval()
    tokens = torch.randint(0, plan.t5["vocab_size"], (plan.feature_batches[-1], T5_TOKENS), device=device)
    return timed(lambda: t5(input_ids=tokens).last_hidden_state, device) / len(tokens)


def sampling_seconds(plan: Plan, device: torch.device, dtype: torch.dtype) -> dict:
    """Seconds per image: the DiT's guided steps and T5's encoding of the prompt."""
    dit = dit_seconds(plan, device, dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"dit_s_per_image": dit, "t5_s_per_prompt": t5_seconds(plan, device, dtype)}


# --------------------------------------------------------------------------------------------------
# Scoring: Inception (FID) and CLIP, per batch size
# --------------------------------------------------------------------------------------------------


def inception_step(batch: int, plan: Plan, device: torch.device) -> Callable[[], torch.Tensor]:
    """uint8 images at ``plan.px`` → TF-style bilinear resize to 299 → Inception-v3 pool features (fp32)."""
    import timm

    net = timm.create_model("inception_v3", pretrained=False, num_classes=0).to(device).eval()
    pixels = torch.randint(0, 256, (batch, 3, plan.px, plan.px), dtype=torch.uint8, device=device)

    def step() -> torch.Tensor:
        x = F.interpolate(pixels.float(), size=(FID_SIZE, FID_SIZE), mode="bilinear", align_corners=False)
        return net((x - 128) / 128)  # (B, 2048)

    return step


def clip_step(batch: int, plan: Plan, device: torch.device) -> Callable[[], torch.Tensor]:
    """CLIP score of a batch: image tower on 224² (bicubic resize), text tower on 77 tokens, cosine (fp32)."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(text_config=plan.clip["text"], vision_config=plan.clip["vision"],
                        projection_dim=plan.clip["projection_dim"])  # fmt: skip
    with torch.device(device):
        model = CLIPModel(config).eval()
    side = plan.clip["vision"]["image_size"]
    pixels = torch.randint(0, 256, (batch, 3, plan.px, plan.px), dtype=torch.uint8, device=device)
    tokens = torch.randint(0, config.text_config.vocab_size, (batch, CLIP_TOKENS), device=device)

    def step() -> torch.Tensor:
        x = F.interpolate(pixels.float() / 255, size=(side, side), mode="bicubic", align_corners=False)
        image = F.normalize(_projected(model.get_image_features(pixel_values=x)), dim=-1)  # (B, D)
        text = F.normalize(_projected(model.get_text_features(input_ids=tokens)), dim=-1)  # (B, D)
        return 100 * (image * text).sum(-1).clamp(min=0)  # (B,)

    return step


def _projected(out: object) -> torch.Tensor:
    """The projected embedding: transformers 4 returns it, transformers 5 an output whose pooler_output it is."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def scoring_seconds(plan: Plan, device: torch.device) -> list[dict]:
    rows = []
    for batch in plan.feature_batches:
        inception = timed(inception_step(batch, plan, device), device, repeats=plan.repeats) / batch
        clip = timed(clip_step(batch, plan, device), device, repeats=plan.repeats) / batch
        rows.append({"batch": batch, "inception_s_per_image": inception, "clip_s_per_image": clip})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def markdown(plan: Plan, sampling: dict, scoring: list[dict], header: dict) -> str:
    best = min(scoring, key=lambda r: r["inception_s_per_image"] + r["clip_s_per_image"])
    per_image = sampling["dit_s_per_image"] + sampling["t5_s_per_prompt"]
    hours = lambda s: s * NUM_IMAGES / 3600  # noqa: E731
    lines = [
        "## 30K evaluation (PixArt-Σ protocol) on one GPU: sampling, Inception, CLIP, extrapolated",
        "",
        f"Command: `{header['command']}`",
        "",
        f"Device: {header['device']}, torch {header['torch']}; DiT {plan.preset} {header['dtype']} at {plan.px}², "
        f"{plan.steps} DPM-Solver++ steps with CFG, batch {plan.sample_batch}; T5 {header['dtype']}, "
        f"{T5_TOKENS} tokens; Inception and CLIP fp32 (as pixsigma-evaluate). Random weights; VAE decode excluded.",
        "",
        "| part | s/image | 30K images, h |",
        "|---|---:|---:|",
        f"| DiT sampling | {sampling['dit_s_per_image']:.3f} | {hours(sampling['dit_s_per_image']):.2f} |",
        f"| T5 prompt encoding | {sampling['t5_s_per_prompt']:.4f} | {hours(sampling['t5_s_per_prompt']):.2f} |",
    ]  # fmt: skip
    for r in scoring:
        lines.append(f"| Inception, batch {r['batch']} | {r['inception_s_per_image']:.5f} | "
                     f"{hours(r['inception_s_per_image']):.3f} |")  # fmt: skip
        lines.append(f"| CLIP, batch {r['batch']} | {r['clip_s_per_image']:.5f} | {hours(r['clip_s_per_image']):.3f} |")
    total = per_image + best["inception_s_per_image"] + best["clip_s_per_image"]
    lines += [
        f"| **total** (feature batch {best['batch']}) | {total:.3f} | **{hours(total):.2f}** |",
        "",
        f"Reference statistics of 30K real images (once): {hours(best['inception_s_per_image']):.3f} h of Inception "
        "plus decoding. Sampling dominates; the feature passes are "
        f"{100 * (best['inception_s_per_image'] + best['clip_s_per_image']) / total:.1f} % of the total.",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--px", type=int, default=1024, help="image side (PixArt-Σ evaluates at 1024)")
    parser.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps (PixArt-Σ's default)")
    parser.add_argument("--sample-batch", type=int, default=8, help="images per sampling forward (×2 with CFG)")
    parser.add_argument("--feature-batches", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny models: checks every code path")
    parser.add_argument("--output", type=Path, help="markdown file")
    parser.add_argument("--record", action="store_true", help="write the section into docs/benchmarks.md")
    args = parser.parse_args(argv)
    plan = tiny_plan() if args.tiny else full_plan(args)
    device = torch.device(plan.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.gpu_eval30k needs a CUDA device (or --tiny)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sampling = sampling_seconds(plan, device, dtype)
    print(json.dumps(sampling), flush=True)
    scoring = scoring_seconds(plan, device)
    header = {"command": "python -m bench.gpu_eval30k " + " ".join(sys.argv[1:] if argv is None else argv),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "dtype": "bf16" if dtype == torch.bfloat16 else "fp32"}  # fmt: skip
    text = markdown(plan, sampling, scoring, header)
    print(text)
    if args.output:
        args.output.write_text(text)
    if args.record:
        from bench.record import write_section

        write_section("gpu_eval30k", text)


if __name__ == "__main__":
    main()
