"""Toy world (issue 21) diagnosis: which timesteps teach the DiT its caption? PixArt's ε-loss against a v-like weight.

Why this probe exists: ``bench_toy_learning`` found no adherence after 3,000 trainer steps at 128 px, and the samples'
*global* content (the background grey, which the caption names) was as wrong as their objects. A toy scene is mostly
flat background, so its brightness stays readable from x_t to high t of the linear schedule: the caption is needed
only there. At those t the ε-MSE weighs an x₀ error by SNR(t) = ᾱ/(1 − ᾱ) (below 10⁻² for t > 700), so the loss
PixArt trains with (IDDPM's ε-MSE, ``training.diffusion.GaussianDiffusion.training_losses``) gives those timesteps
little gradient. The "v" arm multiplies the same ε-MSE by (1 + 1/SNR): the *value* of v-prediction's loss
(Salimans & Ho 2022, §4: v-MSE = (1 + SNR)·x₀-MSE, ε-MSE = SNR·x₀-MSE) on the same ε-output model, so the sampler
and the model stay PixArt's. It is not v-prediction training: on an ε-output network that weight runs from ~1 at
t = 0 to 2.5·10⁴ at t = 999, so the highest timesteps take most of every clipped update.

It trains in memory, not through ``training.main`` (the trainer has no such weighting; this measures whether one is
worth adding): single-object scenes on plain backgrounds, ``--pool`` of them; toy-VAE posterior mean/std and toy-T5
states computed once, the posterior sampled every step and scaled as the trainer does; 10 % caption dropout
(``force_drop_ids``); the project's model (tiny preset's shape, the trainer's PE for the resolution), ε-MSE + VB
loss and DPM-Solver++ sampler. It differs from the trainer in: AdamW 1e-3 with a 50-step warm-up, grad clip 1.0
(the toy bench's settings, not the trainer's defaults) and scenes drawn uniformly with replacement (the trainer
streams shards through a shuffle buffer).

Held out: the pool never holds 9 of the 54 (colour, position) pairs — one per position, ``HELD_OUT_PAIR`` — and the
32 held-out prompts use only those pairs, so a held-out caption names a colour at a place no training caption put
it (compositional generalisation, not new sizes of seen captions). Every ``--every`` steps both arms sample the
first 32 training prompts and the 32 held-out ones (20 steps, CFG 1 and 4.5, one starting noise for every prompt:
a caption-blind model scores exactly its shuffled level), scored on:

* background: the tile's median grey nearest to the prompt's (5 greys: chance 0.2);
* ``training.adherence`` colour / shape / position / count / overall, beside the same images against shuffled prompts.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from bench.bench_toy_learning import sample_shared_noise, scores_of, to_uint8
from bench.record import write_section
from manifests.buckets import resize_to_cover_and_crop
from manifests.toy import (
    BACKGROUNDS,
    COLOURS,
    MAX_SIZE,
    MIN_SIZE,
    POSITIONS,
    SHAPES,
    Scene,
    ToyObject,
    caption,
    render,
)
from training.adherence import shifted_prompts
from training.diffusion import GaussianDiffusion
from training.encoders import CaptionEncoder
from training.model import ModelConfig, PixArtSigma, pe_params_for_resolution
from training.tiny import TOY_MAX_TOKENS, build_toy_t5
from training.toy_vae import to_pixels

ARMS = ("eps", "v")
NUM_PROMPTS = 32
CFG_SCALES = (1.0, 4.5)


def held_out_pair(colour: str, position: str) -> bool:
    """The 9 (colour, position) pairs never in the pool: colour index + position index ≡ 0 (mod 6), one per position."""
    return (list(COLOURS).index(colour) + POSITIONS.index(position)) % 6 == 0


def single_object_scene(rng: np.random.Generator, *, held_out: bool) -> Scene:
    """One object on one plain grey, its (colour, position) pair held out or not (drawn again until it fits)."""
    while True:
        colour, position = str(rng.choice(list(COLOURS))), POSITIONS[int(rng.integers(len(POSITIONS)))]
        if held_out_pair(colour, position) == held_out:
            break
    obj = ToyObject(colour=colour, shape=str(rng.choice(SHAPES)), position=position,
                    size=float(rng.uniform(MIN_SIZE, MAX_SIZE)), dx=float(rng.uniform(-1, 1)),
                    dy=float(rng.uniform(-1, 1)))  # fmt: skip
    return Scene(objects=(obj,), background=(str(rng.choice(list(BACKGROUNDS))),))


def background_hit(image: np.ndarray, scene: Scene) -> float:
    """1 when the image's median grey is nearest the grey its prompt names (the object covers ≤ 5.4 % of it)."""
    level = float(np.median(image.mean(axis=-1)))
    nearest = min(BACKGROUNDS, key=lambda name: abs(np.mean(BACKGROUNDS[name]) - level))
    return float(nearest == scene.background[0])


def weighted_mse(diffusion: GaussianDiffusion, out: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor, arm: str) -> torch.Tensor:  # fmt: skip
    """Per-sample loss: the trainer's (ε-MSE + VB), the ε-MSE times (1 + 1/SNR(t)) in the "v" arm."""
    terms = diffusion.training_losses(out, x0, t, noise)
    if arm == "eps":
        return terms["loss"]
    snr = (diffusion.alphas_cumprod / (1 - diffusion.alphas_cumprod))[t].float()  # (B,)
    return terms["mse"] * (1 + 1 / snr) + terms["vb"]


class World:
    """The pool's latents (posterior mean, std) and caption states, computed once."""

    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.vae = AutoencoderKL.from_pretrained(args.vae).eval()
        self.scaling = self.vae.config.scaling_factor
        self.factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.text = CaptionEncoder(str(build_toy_t5(root / "models")), max_tokens=TOY_MAX_TOKENS,
                                   device=torch.device("cpu"), cached=False)  # fmt: skip
        self.scenes = [single_object_scene(np.random.default_rng([1000, i]), held_out=False) for i in range(args.pool)]
        self.held_out = [single_object_scene(np.random.default_rng([2000, i]), held_out=True) for i in range(NUM_PROMPTS)]
        side = args.resolution
        means, stds, states, masks = [], [], [], []
        with torch.no_grad():
            for start in range(0, args.pool, 64):
                chunk = self.scenes[start : start + 64]
                pixels = torch.stack([to_pixels(resize_to_cover_and_crop(render(s, 4 * side, 4 * side), (side, side)))
                                      for s in chunk])  # fmt: skip
                posterior = self.vae.encode(pixels).latent_dist
                means.append(posterior.mean)
                stds.append(posterior.std)
                y, mask = self.text.t5.encode_padded([caption(s) for s in chunk])
                states.append(torch.as_tensor(y).float())
                masks.append(torch.as_tensor(mask).bool())
        self.mean, self.std = torch.cat(means), torch.cat(stds)  # (N, 4, h, w) each, unscaled
        self.states, self.masks = torch.cat(states), torch.cat(masks)  # (N, L, C), (N, L)
        self.null = torch.from_numpy(self.text.t5([""])[0].astype(np.float32))  # (L0, C)


@torch.no_grad()
def evaluate(model: PixArtSigma, world: World, side: int) -> dict[str, dict[str, float]]:
    """Scores per (prompts, CFG): the pool's first 32 scenes ("train") and 32 scenes never in the pool ("held-out")."""
    model.eval()
    result = {}
    for split, scenes in (("train", world.scenes[:NUM_PROMPTS]), ("held-out", world.held_out)):
        prompts = [caption(s) for s in scenes]
        y, mask = world.text.encode(prompts)
        for cfg_scale in CFG_SCALES:
            z = sample_shared_noise(model, y, mask, side, cfg_scale=cfg_scale)
            images = to_uint8(world.vae.decode(z / world.scaling).sample)
            scores, chance = scores_of(images, prompts), scores_of(images, shifted_prompts(prompts))
            background = float(np.mean([background_hit(im, s) for im, s in zip(images, scenes, strict=True)]))
            result[f"{split} | {cfg_scale:g}"] = {"background": background, **scores,
                                                  **{f"shuffled {k}": v for k, v in chance.items()}}  # fmt: skip
    model.train()
    return result


def train_arm(arm: str, seed: int, world: World, args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(seed)
    grid = args.resolution // world.factor
    base_size, pe_interpolation = pe_params_for_resolution(args.resolution, vae_downsample=world.factor)
    config = ModelConfig(depth=2, hidden_size=64, num_heads=4, caption_channels=world.states.shape[-1],
                         max_token_length=TOY_MAX_TOKENS, base_size=base_size,
                         pe_interpolation=pe_interpolation)  # fmt: skip
    model = PixArtSigma(config)  # the tiny preset's shape, its caption width the toy T5's
    model.set_null_caption(world.null, torch.ones(world.null.shape[0], dtype=torch.bool))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    diffusion = GaussianDiffusion()
    generator = torch.Generator().manual_seed(seed)
    rows, started = [], time.monotonic()
    for step in range(1, args.steps + 1):
        index = torch.randint(0, len(world.scenes), (args.batch_size,), generator=generator)
        mean, std = world.mean[index], world.std[index]
        x0 = (mean + std * torch.randn(mean.shape, generator=generator)) * world.scaling  # (B, 4, h, w)
        length = int(world.masks[index].sum(dim=1).max())
        y, mask = world.states[index, :length], world.masks[index, :length]
        t = torch.randint(0, diffusion.num_timesteps, (args.batch_size,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        drop = torch.rand(args.batch_size, generator=generator) < config.class_dropout_prob
        out = model(diffusion.q_sample(x0, t, noise).float(), t, y, mask, force_drop_ids=drop)
        loss = weighted_mse(diffusion, out.float(), x0, t, noise, arm).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, step / 50)
        optimizer.step()
        if step % args.every == 0:
            rows.append({"arm": arm, "seed": seed, "step": step, "seconds": time.monotonic() - started,
                         **evaluate(model, world, grid)})  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def markdown(rows: list[dict], command: str, load: tuple[float, float], side: int) -> str:
    lines = [
        f"### Toy world: which timesteps teach the caption (ε-loss vs a v-like weight), {side} px",
        "",
        f"Command: `{command}`. Machine: {platform.machine()}, {os.cpu_count()} cores (load average {load[0]:.1f} "
        f"before, {load[1]:.1f} after), 1 torch thread.",
        "",
        "| arm | seed | step | prompts | CFG | background | colour | shape | position | count | overall "
        "| shuffled colour | shuffled position |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        for key in (k for k in row if " | " in k):
            r = row[key]
            lines.append(
                f"| {row['arm']} | {row['seed']} | {row['step']} | {key} | {r['background']:.3f} | {r['colour']:.3f} | "
                f"{r['shape']:.3f} | {r['position']:.3f} | {r['count']:.3f} | {r['overall']:.3f} | "
                f"{r['shuffled colour']:.3f} | {r['shuffled position']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    parser.add_argument("--vae", default="assets/toy_vae/sd", help="toy VAE folder")
    parser.add_argument("--arm", choices=ARMS, nargs="+", default=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=1000, help="evaluate every this many steps")
    parser.add_argument("--pool", type=int, default=2000, help="distinct training scenes")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--output", type=Path, default=Path("out/probe_toy_loss_weighting"))
    parser.add_argument("--section", default="toy_loss_weighting", help="docs/benchmarks.md section to write")
    parser.add_argument("--no-record", action="store_true", help="print only, leave docs/benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    world = World(args, args.output)
    rows = [row for arm in args.arm for seed in args.seeds for row in train_arm(arm, seed, world, args)]
    command = (f"python -m bench.probe_toy_loss_weighting --vae {args.vae} --arm {' '.join(args.arm)} "
               f"--seeds {' '.join(map(str, args.seeds))} --steps {args.steps} --every {args.every} "
               f"--pool {args.pool} --resolution {args.resolution} --batch-size {args.batch_size} --lr {args.lr}"
        + (f" --section {args.section}" if args.section != "toy_loss_weighting" else ""))  # fmt: skip
    text = markdown(rows, command, (load_before, os.getloadavg()[0]), args.resolution)
    print(text)
    if not args.no_record:
        print(f"wrote {write_section(args.section, text)}")


if __name__ == "__main__":
    main()
