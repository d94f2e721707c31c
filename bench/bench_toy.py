"""Toy world (issue 21): the toy VAEs' reconstruction (PSNR, round-trip adherence) and the adherence metric's validation.

For each toy VAE folder (``--vae``; default: the shipped ``assets/toy_vae/{sd,sdxl}``): PSNR of decode(encode(x))
with the posterior mean on held-out toy images at the toy run's sizes, its scaling factor and the std of its
scaled latents. For the metric (``training.adherence``): the mean scores of the generator's own images as
training shards hold them (rendered at corpus size, resized as materialize does) at 64, 128 and 256 px, the
same after a round trip through each VAE at the toy run's resolutions (``training.toy_vae.TRAIN_RESOLUTIONS``),
shuffled image–prompt pairs, and the chance level (a perfect detector on shuffled pairs of the generator's
distribution, simulated; count analytically 1/3).
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from bench.record import write_section
from manifests.toy import caption, scene_for
from training.adherence import SCORES, chance_levels, mean_scores, score_image
from training.toy_vae import SPECS, TRAIN_RESOLUTIONS, held_out, materialized, psnr, round_trip, toy_vae_path

RESOLUTIONS = (64, 128, 256)  # the metric's validation; VAE round trips at TRAIN_RESOLUTIONS
PSNR_SIZES = ((128, 128), (96, 160), (256, 256))  # (height, width): square and 5:3 buckets of the toy run
VALIDATION_SEED = 2024  # a corpus seed neither the VAEs (training.toy_vae) nor the tests use


def materialized_pairs(num: int, resolution: int) -> list[tuple[Image.Image, str]]:
    """(image, caption) of ``num`` scenes as the training shards at ``resolution`` hold them."""
    return [(materialized(VALIDATION_SEED, i, resolution), caption(scene_for(VALIDATION_SEED, i))) for i in range(num)]


@torch.no_grad()
def vae_round_trip(vae: AutoencoderKL, image: Image.Image) -> Image.Image:
    pixels = torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)[
        None
    ]  # (1, 3, H, W)
    out = round_trip(vae, pixels)[0].permute(1, 2, 0).numpy()  # (H, W, 3)
    return Image.fromarray(np.rint((out + 1) * 127.5).clip(0, 255).astype(np.uint8))


def vae_rows(paths: list[str], num: int) -> list[dict]:
    rows = []
    for path in paths:
        vae = AutoencoderKL.from_pretrained(path).eval()
        row = {"name": path, "scaling_factor": vae.config.scaling_factor, "num": num,
               "params": sum(p.numel() for p in vae.parameters())}  # fmt: skip
        for size in PSNR_SIZES:
            pixels = held_out(num, size)
            row[f"psnr_{size[0]}x{size[1]}"] = psnr(pixels, round_trip(vae, pixels))
        with torch.no_grad():
            row["scaled_std"] = (
                (vae.encode(held_out(num)).latent_dist.mean * vae.config.scaling_factor).std().item()
            )  # held_out: 128 px
        row["vae"] = vae
        rows.append(row)
    return rows


def metric_rows(num: int, vaes: list[dict]) -> list[tuple[str, dict]]:
    rows = []
    for resolution in RESOLUTIONS:
        pairs = materialized_pairs(num, resolution)
        rows.append((f"own images, {resolution} px", mean_scores(score_image(im, p) for im, p in pairs)))
        for v in vaes if resolution in TRAIN_RESOLUTIONS else ():
            scores = mean_scores(score_image(vae_round_trip(v["vae"], im), p) for im, p in pairs)
            rows.append((f"own images through {v['name']}, {resolution} px", scores))
        shift = num // 2 + 1
        shuffled = (score_image(pairs[i][0], pairs[(i + shift) % num][1]) for i in range(num))
        rows.append((f"shuffled pairs, {resolution} px", mean_scores(shuffled)))
    rows.append(("chance (perfect detector, shuffled truths, 20k pairs)", chance_levels(num_pairs=20_000)))
    return rows


def markdown(vaes: list[dict], metrics: list[tuple[str, dict]], command: str, num: int, load: tuple) -> str:
    lines = [
        "## Toy world: trained toy VAEs and the adherence metric's validation",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
        f"1-minute load average {load[0]:.1f} before and {load[1]:.1f} after (2 cores shared with another "
        "engineer's jobs: no timings here, only quality numbers, which the load does not move).",
        "",
        "VAEs shipped in `assets/toy_vae/` and built by `python -m training.toy_vae --output assets/toy_vae --seed 0` "
        "(specs `WEAK`/`STRONG` in that module; recipe, versions and sha256 in each folder's `toy_training.json`): "
        f"PSNR of decode(encode(x)) with the posterior mean on {vaes[0]['num'] if vaes else 0} held-out toy images per size; scaling factor "
        "= 1 / std of the latents (as SD's 0.18215 and SDXL's 0.13025 were set); std of the scaled latents.",
        "",
        "| VAE | params | scaling factor | PSNR 128×128 (dB) | PSNR 96×160 (dB) | PSNR 256×256 (dB) | scaled latent std |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for v in vaes:
        lines.append(
            f"| {v['name']} | {v['params']:,} | {v['scaling_factor']:.5f} | {v['psnr_128x128']:.2f} | "
            f"{v['psnr_96x160']:.2f} | {v['psnr_256x256']:.2f} | {v['scaled_std']:.3f} |"
        )
    lines += [
        "",
        f"Adherence metric (`training.adherence`), mean over {num} scenes per row (corpus seed {VALIDATION_SEED}; "
        "images rendered at the corpus sizes and resized to the 64/128/256 px buckets as materialize does; VAE round "
        "trips with the posterior mean at the toy run's 64 and 128 px). "
        "`overall` = share of images whose (colour, shape, position) objects equal the caption's exactly. "
        "Acceptance: ≥ 0.95 on own images; shuffled pairs at the chance row (count's chance is 1/3 analytically).",
        "",
        "| images | " + " | ".join(SCORES) + " |",
        "|---|" + "---:|" * len(SCORES),
    ]
    for label, scores in metrics:
        lines.append(f"| {label} | " + " | ".join(f"{scores[s]:.3f}" for s in SCORES) + " |")
    lines += [
        "",
        "Reading: the metric passes its validation on the generator's images (≥ 0.95 overall at every size) and "
        "sits at chance on shuffled pairs. The shipped toy VAEs are 4× (3 blocks, 16/32/32 channels, trained at "
        "64/128 px: 2,000 / 2,400 steps, 225 / 726 s on one core of the loaded machine, runs that also scored checkpoints; `python -m training.toy_vae --vae sd` / `--vae sdxl` rebuilt both bit-exactly, in 350 / 542 s; they replaced an 8× pair "
        "whose round trip kept no colour, 0.02–0.11 overall). Through the strong one (`sdxl`) a 128 px image keeps "
        "its truth 0.98 of the time (colour 1.00), above the 0.9 issue 21 item 2 asks; the weak one (`sd`, half the "
        "pixels per step, fewer steps, a 10× KL weight) 0.845, above the 0.7 asked, with 5 dB less PSNR and another "
        "scaling factor (1.37 vs 0.98), so the pair stands for SD → SDXL. At 64 px (16×16 latents) colour, count "
        "and position survive (≥ 0.87) but shape is the weak point (0.80 strong, 0.35 weak: a square's corners "
        "round off), so `overall` is 0.645 / 0.160 there: the toy run pre-trains at 64 px and ends at 128 px.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("--num", type=int, default=200, help="scenes per row")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--vae", action="append", default=[],
                        help="toy VAE folder (python -m training.toy_vae); default: the shipped sd and sdxl")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    paths = args.vae or [str(toy_vae_path(name).relative_to(Path.cwd())) for name in SPECS]
    vaes = vae_rows(paths, min(args.num, 64))
    metrics = metric_rows(args.num, vaes)
    command = f"python -m bench.bench_toy --num {args.num} --threads {args.threads}" + "".join(
        f" --vae {v}" for v in args.vae
    )  # no --vae: the shipped pair
    text = markdown(vaes, metrics, command, args.num, (load_before, os.getloadavg()[0]))
    print(text)
    print(f"wrote {write_section('toy', text)}")


if __name__ == "__main__":
    main()
