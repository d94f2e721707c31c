"""Toy world (issue 21): does the tiny DiT learn to draw what its caption says? Adherence after N steps, per seed.

For each seed: toy-world training shards (``toy_inputs``: scenes 0…num-1 of corpus 0, cached toy-T5 states and
latents of ``--vae`` at ``--resolution``), ``training.main`` for ``--steps`` (AdamW, tiny preset,
``real_prompt_ratio`` 1), then the final weights sample the training prompts (memorisation) and as many held-out
prompts (scenes 10,000…), all from one starting noise (``sample_shared_noise``: a caption-blind model draws one image
for every prompt), decoded by the VAE and scored by ``training.adherence``. Beside them: the same run's samples
scored against shifted prompts (``training.adherence.shifted_prompts``: the chance level of these very images), the VAE round trip of the
training images (the ceiling a perfect DiT reaches through this VAE) and the chance row (perfect detector,
shuffled truths).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from bench.record import write_section
from manifests.buckets import resize_to_cover_and_crop
from manifests.toy import caption, render, scene_for
from training.adherence import SCORES, chance_levels, mean_scores, score_image, shifted_prompts
from training.config import load_config
from training.convert import load_diffusers
from training.diffusion import CFG_SCALE, sample
from training.encoders import CaptionEncoder, LatentEncoder
from training.main import main as train
from training.model import PixArtSigma
from training.tiny import TOY_MAX_TOKENS, build_toy_t5, write_synthetic_shards
from training.toy_vae import round_trip, to_pixels

HELD_OUT_START = 10_000  # held-out prompts: scenes of the same corpus seed never written to the shards
NUM_PROMPTS = 32

CONFIG = """
run_dir = "{run}"
seed = {seed}
checkpoint_every = 100000
[text]
t5 = "{t5}"
max_tokens = {max_tokens}
[model]
preset = "{preset}"
[data]
shards = "{shards}"
real_prompt_ratio = 1.0
shuffle_buffer = 16
[optim]
name = "adamw"
grad_clip = 1.0
mixed_precision = "no"
[log]
progress_bar = false
tensorboard = false
every = 50
[[stages]]
name = "toy"
resolution = {resolution}
vae = "{vae}"
vae_scaling_factor = {scaling}
steps = {steps}
batch_size = {batch_size}
lr = {lr}
warmup_steps = 20
"""


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """(B, 3, H, W) in [-1, 1] → B (H, W, 3) uint8 arrays, as a PNG would hold them."""
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    return list(pixels.numpy())


def scores_of(images: list[np.ndarray], prompts: list[str]) -> dict[str, float]:
    return mean_scores(score_image(image, prompt) for image, prompt in zip(images, prompts, strict=True))


def sample_shared_noise(model: PixArtSigma, y: torch.Tensor, mask: torch.Tensor, side: int, *,
                        cfg_scale: float = CFG_SCALE) -> torch.Tensor:  # fmt: skip
    """Latents (B, C, side, side) from one starting noise for every prompt: a model that ignores its caption draws the
    same image for each and scores exactly its shifted level (with noise per prompt it could draw different
    memorised scenes and beat that level by luck)."""
    noise = torch.randn((1, model.config.in_channels, side, side), generator=torch.Generator().manual_seed(0))
    return sample(model, y.float(), mask, latent_size=(side, side), latents=noise.expand(y.shape[0], -1, -1, -1),
                  num_steps=20, cfg_scale=cfg_scale)  # fmt: skip


def toy_inputs(root: Path, vae: str, *, num_images: int, resolution: int) -> tuple[str, Path, float]:
    """(toy T5 path, training shards, the VAE's scaling factor) for a run on toy scenes 0…num_images-1."""
    scaling = json.loads((Path(vae) / "config.json").read_text())["scaling_factor"]
    t5 = str(build_toy_t5(root / "models"))
    shards = write_synthetic_shards(
        root / "shards", num_images=num_images, samples_per_shard=num_images, sizes=((resolution, resolution),),
        t5=t5, vae=vae, vae_resolutions=(resolution,), max_tokens=TOY_MAX_TOKENS, toy_seed=0,
    )  # fmt: skip
    return t5, shards, scaling


@torch.no_grad()
def sampled_scores(run_dir: Path, args: argparse.Namespace, t5: str, shards: Path, scaling: float) -> dict:
    """Adherence of the final weights on the training prompts and on held-out prompts."""
    model = load_diffusers(run_dir / "final", subfolder="transformer", max_token_length=TOY_MAX_TOKENS).eval()
    text = CaptionEncoder(t5, max_tokens=TOY_MAX_TOKENS, device=torch.device("cpu"), cached=False)
    null = text.null_caption(str(shards))
    model.set_null_caption(null, torch.ones(null.shape[0], dtype=torch.bool))
    latents = LatentEncoder(args.vae, scaling_factor=scaling, device=torch.device("cpu"), cached=True)
    size = args.resolution // latents.downsample  # the VAE's factor (4 for the toy VAEs), from its config
    result = {}
    for split, start in (("train", 0), ("held-out", HELD_OUT_START)):
        prompts = [caption(scene_for(0, i)) for i in range(start, start + min(NUM_PROMPTS, args.num_images))]
        y, mask = text.encode(prompts)
        images = to_uint8(latents.decode(sample_shared_noise(model, y, mask, size)))
        result[split] = scores_of(images, prompts)
        if split == "train":  # the same images against other prompts: this run's chance level
            result["shuffled"] = scores_of(images, shifted_prompts(prompts))
    return result


def run_seed(seed: int, args: argparse.Namespace, root: Path, t5: str, shards: Path, scaling: float) -> dict:
    config = root / f"seed{seed}.toml"
    config.write_text(CONFIG.format(
        run=root / f"run{seed}", seed=seed, t5=t5, max_tokens=TOY_MAX_TOKENS, shards=shards,
        resolution=args.resolution, vae=args.vae, scaling=scaling, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, preset=args.preset,
    ))  # fmt: skip
    started = time.monotonic()
    run_dir = train(load_config(config))
    seconds = time.monotonic() - started
    return {"seed": seed, "train_s": seconds, **sampled_scores(run_dir, args, t5, shards, scaling)}


def markdown(
    rows: list[dict], ceiling: dict, chance: dict, command: str, load: tuple[float, float], threads: int = 1
) -> str:
    lines = [
        "### Toy world: learning (adherence after training)",
        "",
        f"Command: `{command}`. Machine: {platform.machine()}, {os.cpu_count()} cores shared with another "
        f"engineer's jobs (load average {load[0]:.1f} before, {load[1]:.1f} after), {threads} torch thread(s).",
        "",
        "| row | " + " | ".join(SCORES) + " | train s |",
        "|---|" + "---:|" * (len(SCORES) + 1),
    ]
    labels = {"train": "train prompts", "held-out": "held-out prompts",
              "shuffled": "train-prompt samples vs shuffled prompts (chance)"}  # fmt: skip
    for row in rows:
        for split, label in labels.items():
            values = " | ".join(f"{row[split][s]:.3f}" for s in SCORES)
            lines.append(f"| seed {row['seed']}, {label} | {values} | {row['train_s']:.0f} |")
    lines.append("| VAE round trip of the training images (ceiling) | "
                 + " | ".join(f"{ceiling[s]:.3f}" for s in SCORES) + " | |")  # fmt: skip
    lines.append("| chance (perfect detector, shuffled truths) | "
                 + " | ".join(f"{chance[s]:.3f}" for s in SCORES) + " | |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("--vae", required=True, help="toy VAE folder (AutoencoderKL with its scaling_factor)")
    parser.add_argument("--output", type=Path, default=Path("out/bench_toy_learning"), help="scratch folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--num-images", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--preset", default="tiny", help="training.model.PRESETS key of the DiT")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--no-record", action="store_true", help="print only, leave docs/benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    root = args.output
    t5, shards, scaling = toy_inputs(root, args.vae, num_images=args.num_images, resolution=args.resolution)
    rows = [run_seed(seed, args, root, t5, shards, scaling) for seed in args.seeds]
    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    num = min(NUM_PROMPTS, args.num_images)
    # the shards' images (write_synthetic_shards: rendered at 4× and cropped to the square bucket), there and back
    side = args.resolution
    images = [resize_to_cover_and_crop(render(scene_for(0, i), 4 * side, 4 * side), (side, side)) for i in range(num)]
    reconstructions = to_uint8(round_trip(vae, torch.stack([to_pixels(image) for image in images])))
    ceiling = scores_of(reconstructions, [caption(scene_for(0, i)) for i in range(num)])
    command = (f"python -m bench.bench_toy_learning --vae {args.vae} --seeds {' '.join(map(str, args.seeds))} "
               f"--steps {args.steps} --num-images {args.num_images} --resolution {args.resolution} "
               f"--batch-size {args.batch_size} --lr {args.lr}"
               + (f" --preset {args.preset}" if args.preset != "tiny" else "")
               + (f" --threads {args.threads}" if args.threads != 1 else ""))  # fmt: skip
    text = markdown(rows, ceiling, chance_levels(num_pairs=5000), command, (load_before, os.getloadavg()[0]), args.threads)
    print(text)
    if not args.no_record:
        print(f"wrote {write_section('toy_learning', text)}")


if __name__ == "__main__":
    main()
