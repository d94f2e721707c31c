"""Tiny ``AutoencoderKL``s trained on the toy world (``manifests.toy``), so decode(encode(x)) keeps what the
adherence metric (``training.adherence``) reads: colour, shape, position and count of every object.

Two VAEs stand in for PixArt-Σ's VAE swap (§3: SD VAE → SDXL VAE), both with 4 latent channels and a **4×
downsample** (``block_out_channels`` of 3 entries; the trainer reads the factor from the config, as diffusers'
``vae_scale_factor``), built for the toy run's stage resolutions **64 px and 128 px** (``TRAIN_RESOLUTIONS``:
16×16 and 32×32 latents at the square bucket). Issue 21 item 2, option B: at 8× and these sizes the VAEs did
not keep colour (see "History" below); a 4× VAE at 128 px has the latent cells per object an 8× one has at
256 px and sees 4× more objects per step.

- ``sd`` ("weak", SD-like): the same architecture (SD's and SDXL's VAEs share theirs), trained as SD's was
  against SDXL's: a smaller batch (half the pixels per step), fewer steps, and a 10× KL weight (1e-5) that
  pulls its latents towards N(0, 1), so its scaling factor differs;
- ``sdxl`` ("strong", SDXL-like): SD's KL weight (1e-6, latent-diffusion's kl-f8 config), more steps.

Each one's ``scaling_factor`` is 1 / std of its latents (posterior means) over held-out toy images, the rule
SD's and SDXL's factors come from (0.18215 ≈ 1 / 5.49; latent-diffusion's ``scale_by_std``), so the two
differ as SD's and SDXL's do. The shipped weights live in ``assets/toy_vae/{sd,sdxl}/`` (``save_pretrained``,
loaded with ``AutoencoderKL.from_pretrained(toy_vae_path("sdxl"))`` like real weights) beside
``toy_training.json`` (recipe, seed, library versions, sha256 of the weights, round-trip adherence on 100
held-out scenes at 64 and 128 px); ``python -m training.toy_vae --output assets/toy_vae`` rebuilds them
(seeded: the same weights on the same library versions and CPU). Measured numbers: docs/benchmarks.md "Toy
world".

Training (``train_vae``): whole images, rendered at the corpus sizes (``curation.toy_world``) and resized to
their buckets at ``train_resolutions`` with ``manifests.buckets.resize_to_cover_and_crop`` (the resize
materialize uses), from a pool of ``pool_size`` scenes per resolution; each step one bucket shape, as many
images as fit ``pixels_per_step``, horizontal flips; loss = L1 + MSE on pixels, objects ×3 and edges ×4, + a
tiny KL; Adam with warm-up and cosine decay; 1 torch thread. The posterior's log-variance starts at
``INIT_LOGVAR``.

History (the 8× pair shipped before, 4 blocks at 128/256 px; replaced by this pair): their round trip kept
position and count but not colour (0.27–0.30 against a chance of 0.21), so overall adherence was 0.02–0.11.
Measured then (checkpoints every 250–500 steps, 40 held-out scenes): uniform 48 px crops of 128/256 px images
hold an object in only 17 % of crops; object-centred crops tinted decoded backgrounds (a crop's GroupNorm
statistics differ from a whole image's); with whole images, 1, 2, 4 or 8 GroupNorm groups and edge weight 4 or
1, colour stayed at 0.23–0.42 up to step 1,000–1,800. A 3-block (4×) VAE of the same recipe at 64/128 px
(16/32/32 channels) reached, at 128 px, overall 0.35 / 0.75 / 0.83 and colour 0.70 / 0.93 / 0.95 after 500 /
750 / 1,000 steps: the recipe of this pair. No attention in the mid blocks (``mid_block_add_attention=False``):
on the shared 2-core machine it made a step ~20× slower, and the metric needs local shapes, not global context.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import diffusers
import numpy as np
import PIL
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from PIL import Image

from manifests.buckets import nearest_bucket, resize_to_cover_and_crop
from manifests.toy import caption, render, scene_for
from training.adherence import mean_scores, score_image

log = logging.getLogger(__name__)

# The shipped weights: assets/toy_vae/sd and assets/toy_vae/sdxl in the repository.
ASSETS = Path(__file__).resolve().parents[1] / "assets" / "toy_vae"
# Scenes of the VAEs' training set come from this corpus seed, the held-out ones from the next: toy corpora
# for DiT training use other seeds (curation.toy_world's default is 0), so no picture is shared.
VAE_CORPUS_SEED = 1_000_003
HELD_OUT_SEED = VAE_CORPUS_SEED + 1
# The toy run's stage resolutions (4× VAE → 16×16 and 32×32 latents at the square bucket): the shipped pair's
# ``ToyVaeSpec.train_resolutions``.
TRAIN_RESOLUTIONS = (64, 128)
# (width, height) of toy corpus images, cycled: curation.toy_world.CORPUS_SIZES (training never imports
# curation; tests/training/test_toy_vae.py checks the two agree).
CORPUS_SIZES: tuple[tuple[int, int], ...] = ((1024, 1024), (1920, 1152), (1152, 1920), (2048, 1024), (1024, 2048))
TRAINING_FILE = "toy_training.json"  # beside config.json: how the weights were made
ROUND_TRIP_SCENES = 100  # held-out scenes per resolution whose round-trip adherence toy_training.json records
# The posterior's log-variance starts here (std e^-3 ≈ 0.05) rather than at 0 (std 1). Measured with 0: after
# 500 steps the posterior std was 0.4–1.0 against latent means of std 0.5–4, so the decoder trained on
# latents mostly noise (it had learned one colour axis: blue → cyan, yellow/magenta → red). With this start
# the posterior std stays ~0.06 while the tiny KL weight moves it slowly; colour, though, stayed at 0.3–0.4
# (see the module docstring): the noise was not what held it back.
INIT_LOGVAR = -6.0


@dataclass(frozen=True)
class ToyVaeSpec:
    """One toy VAE: its width, its KL weight and how it trains."""

    name: str
    # 3 entries: a 4× downsample, 4 entries: 8× (diffusers: 2 ** (len(block_out_channels) - 1))
    block_out_channels: tuple[int, ...]
    kl_weight: float
    steps: int
    # Resolutions of the training images (and of the round trips toy_training.json records).
    train_resolutions: tuple[int, ...] = TRAIN_RESOLUTIONS
    # GroupNorm groups. Runs with 1, 2, 4 and 8 groups this session all sat at colour 0.23–0.39 by step
    # 1,000 (40 held-out scenes): the group count is not what limits colour here.
    norm_num_groups: int = 4
    pool_size: int = 400  # distinct training scenes per resolution, rendered once
    lr: float = 1e-3
    warmup: int = 50  # linear lr warm-up steps, then cosine decay to 0
    # Loss weight of object pixels (saturated ones) against background: objects cover ~10 % of a toy image,
    # and with the plain pixel loss the VAEs learned the grey background and greyed the objects out
    # (measured last session: adherence 0.0 after a round trip at 1,000 steps, PSNR 21 dB).
    object_weight: float = 3.0
    pixels_per_step: int = 4 * 128 * 128  # a batch of whole images: 4 at 128 px, 1 at 256 px
    # Stop after this many steps of the ``steps``-long schedule (None: all of them). The shipped weights were
    # cut at their best checkpoint (see WEAK/STRONG below); this field makes that cut reproducible.
    stop_at: int | None = None
    # Loss weight of edge pixels (a 3×3 neighbourhood spanning > EDGE_STEP); 1 = off. The metric reads
    # shapes from corners, which an unweighted loss rounds off (shape 0.3 last session).
    edge_weight: float = 4.0

    def __post_init__(self) -> None:
        if len(self.block_out_channels) not in (3, 4):
            raise ValueError(
                "block_out_channels must have 3 entries (4× downsample) or 4 (8×), "
                f"got {self.block_out_channels}"
            )
        if not self.train_resolutions or any(r % self.downsample for r in self.train_resolutions):
            raise ValueError(
                f"train_resolutions must be non-empty multiples of the {self.downsample}× downsample, "
                f"got {self.train_resolutions}"
            )
        if any(width % self.norm_num_groups for width in self.block_out_channels):
            raise ValueError(
                f"norm_num_groups ({self.norm_num_groups}) must divide every block_out_channels entry, "
                f"got {self.block_out_channels}"
            )
        if self.steps < 1 or self.pool_size < 1 or self.pixels_per_step < 1:
            raise ValueError(
                f"steps, pool_size and pixels_per_step must be ≥ 1, got {self.steps}, {self.pool_size}, "
                f"{self.pixels_per_step}"
            )
        if self.stop_at is not None and not 1 <= self.stop_at <= self.steps:
            raise ValueError(f"stop_at must be None or in [1, steps={self.steps}], got {self.stop_at}")

    @property
    def downsample(self) -> int:
        """Pixels per latent cell, as diffusers computes ``vae_scale_factor``."""
        return 2 ** (len(self.block_out_channels) - 1)


# Both 4× (3 blocks, 16/32/32 channels: the scratch run that reached overall 0.83 / colour 0.95 at 128 px in
# 1,000 steps). SD's and SDXL's VAEs share one architecture; SDXL's was retrained with a larger batch (256 vs 9)
# and EMA (SDXL paper §2.4, "Improved Autoencoder"). So the weak one differs as SD's does: half the pixels per
# step and fewer steps, and a 10× KL weight (SD's is 1e-6, latent-diffusion's kl-f8 config) that pulls its
# latents towards N(0, 1), so the two scaling factors differ as SD's 0.18215 and SDXL's 0.13025 do.
WEAK = ToyVaeSpec("sd", block_out_channels=(16, 32, 32), kl_weight=1e-5, steps=2000, pixels_per_step=2 * 128 * 128)
STRONG = ToyVaeSpec("sdxl", block_out_channels=(16, 32, 32), kl_weight=1e-6, steps=2400)
SPECS = {"sd": WEAK, "sdxl": STRONG}


def toy_vae_path(name: str) -> Path:
    """The shipped toy VAE folder for ``sd`` or ``sdxl`` (load with ``AutoencoderKL.from_pretrained``)."""
    if name not in SPECS:
        raise ValueError(f"toy VAE name must be one of {tuple(SPECS)}, got {name!r}")
    return ASSETS / name


def build_vae(spec: ToyVaeSpec, *, seed: int) -> AutoencoderKL:
    """An untrained SD-layout AutoencoderKL of the spec's width (scaling_factor set after training)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(spec.block_out_channels),
            up_block_types=("UpDecoderBlock2D",) * len(spec.block_out_channels),
            block_out_channels=spec.block_out_channels,
            layers_per_block=1,
            norm_num_groups=spec.norm_num_groups,
            latent_channels=4,
            # with tiling on, diffusers tiles a decode whose latents exceed sample_size / downsample on a side:
            # 2× the largest training resolution keeps every toy bucket (up to 1.375× it a side) in one piece
            sample_size=2 * max(spec.train_resolutions),
            mid_block_add_attention=False,
        )
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels :] = INIT_LOGVAR  # (mean, logvar) = chunk(moments, 2)
    return vae


def materialized(seed: int, index: int, resolution: int) -> Image.Image:
    """Scene ``index`` of corpus ``seed`` as a training shard at ``resolution`` holds it: rendered at its
    corpus size, resized to its bucket as materialize does."""
    width, height = CORPUS_SIZES[index % len(CORPUS_SIZES)]
    return resize_to_cover_and_crop(render(scene_for(seed, index), width, height), nearest_bucket(height, width, resolution))


def to_pixels(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float pixels in [-1, 1] of an RGB image."""
    return torch.from_numpy(np.array(image, np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def image_pool(seed: int, num: int, resolutions: tuple[int, ...] = TRAIN_RESOLUTIONS) -> list[torch.Tensor]:
    """(3, H, W) uint8 images: scenes 0…num-1 of corpus ``seed`` at each of ``resolutions``."""
    return [
        torch.from_numpy(np.array(materialized(seed, index, resolution))).permute(2, 0, 1).contiguous()
        for resolution in resolutions
        for index in range(num)
    ]


def random_batch(pool: list[torch.Tensor], num_pixels: int, generator: torch.Generator) -> torch.Tensor:
    """(B, 3, H, W) pixels in [-1, 1]: whole pool images of one random shape, half flipped, B = ``num_pixels``
    // (H·W) (at least 1), so every step costs about the same."""
    shapes = sorted({tuple(image.shape) for image in pool})
    shape = shapes[int(torch.randint(len(shapes), (1,), generator=generator))]
    same = [image for image in pool if tuple(image.shape) == shape]
    images = []
    for _ in range(max(1, num_pixels // (shape[1] * shape[2]))):
        image = same[int(torch.randint(len(same), (1,), generator=generator))]
        # Left–right mirrors are still toy scenes (a triangle stays apex up); up–down ones are not.
        images.append(image.flip(-1) if torch.rand((), generator=generator) < 0.5 else image)
    return torch.stack(images).float() / 127.5 - 1.0


def object_mask(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) bool: pixels (B, 3, H, W) in [-1, 1] of saturated colour, i.e. of an object."""
    high, low = pixels.amax(dim=1, keepdim=True), pixels.amin(dim=1, keepdim=True)  # in [-1, 1]
    return (high - low) / (high + 1).clamp(min=1e-3) > 0.45  # HSV saturation of (x + 1) / 2


# A pixel is on an edge when some channel spans more than this (in [-1, 1] units, 0.2 = 25 of 255) over its
# 3×3 neighbourhood: shape borders (palette colour vs grey) span ≥ 0.5, a background gradient < 0.02 per pixel.
EDGE_STEP = 0.2


def loss_weights(pixels: torch.Tensor, *, object_weight: float, edge_weight: float) -> torch.Tensor:
    """(B, 1, H, W) per-pixel loss weights: ×``object_weight`` where the target is saturated (an object),
    ×``edge_weight`` where it has an edge."""
    span = F.max_pool2d(pixels, 3, stride=1, padding=1) + F.max_pool2d(-pixels, 3, stride=1, padding=1)
    edge = span.amax(dim=1, keepdim=True) > EDGE_STEP  # (B, 1, H, W)
    return (1.0 + (object_weight - 1.0) * object_mask(pixels).float()) * (1.0 + (edge_weight - 1.0) * edge.float())


def lr_at(step: int, spec: ToyVaeSpec) -> float:
    """Linear warm-up over ``spec.warmup`` steps, then cosine decay to 0 at ``spec.steps``."""
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_vae(
    spec: ToyVaeSpec, *, seed: int, after_step: Callable[[int, AutoencoderKL], None] | None = None
) -> AutoencoderKL:
    """Train one toy VAE: weighted L1 + MSE on pixels + ``kl_weight`` · KL, Adam, warm-up + cosine, seeded.

    ``after_step(steps_done, vae)`` (checkpoints, evaluation) runs after each step; it must leave the VAE
    in train mode and draw no random numbers from the global generator (the data order stays the seed's)."""
    vae = build_vae(spec, seed=seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=spec.lr)
    pool = image_pool(VAE_CORPUS_SEED, spec.pool_size, spec.train_resolutions)
    generator = torch.Generator().manual_seed(seed)
    vae.train()
    started = time.monotonic()
    num_steps = spec.steps if spec.stop_at is None else spec.stop_at
    for step in range(num_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, spec)
        pixels = random_batch(pool, spec.pixels_per_step, generator)  # (B, 3, H, W)
        posterior = vae.encode(pixels).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample  # (B, 3, H, W)
        weights = loss_weights(pixels, object_weight=spec.object_weight, edge_weight=spec.edge_weight)
        error = (reconstruction - pixels) * weights
        loss = error.abs().mean() + (error**2).mean() + spec.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(step + 1, vae)
        if step % 100 == 0 or step == num_steps - 1:
            log.info("%s step %d/%d: loss %.4f (%.0f s)", spec.name, step, spec.steps, loss.item(),
                     time.monotonic() - started)  # fmt: skip
    return vae.eval()


@torch.no_grad()
def latent_std(vae: AutoencoderKL, pixels: torch.Tensor) -> float:
    """Std of the posterior means over a batch: 1 / the scaling factor (latent-diffusion ``scale_by_std``)."""
    return vae.encode(pixels).latent_dist.mean.std().item()


@torch.no_grad()
def round_trip(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """decode(encode(x)) with the posterior mean, as materialize's cached mean would be decoded."""
    return vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)


def to_image(pixels: torch.Tensor) -> Image.Image:
    """(3, H, W) pixels in [-1, 1] → RGB image, rounded as an exported PNG is."""
    return Image.fromarray(np.rint((pixels.permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8))


def round_trip_adherence(vae: AutoencoderKL, resolution: int, *, seed: int, num: int) -> dict[str, float]:
    """Mean adherence scores (``training.adherence``) of decode(encode(x)) against the captions, over scenes
    0…num-1 of corpus ``seed`` as training shards at ``resolution`` hold them."""
    rows = []
    for index in range(num):
        reconstruction = round_trip(vae, to_pixels(materialized(seed, index, resolution))[None])[0]
        rows.append(score_image(to_image(reconstruction), caption(scene_for(seed, index))))
    return mean_scores(rows)


def held_out(num: int = 32, size: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """(num, 3, H, W) held-out toy images (scenes the VAEs never saw), rendered at 4× and resized."""
    height, width = size
    return torch.stack(
        [to_pixels(resize_to_cover_and_crop(render(scene_for(HELD_OUT_SEED, i), width * 4, height * 4), size))
         for i in range(num)]
    )  # fmt: skip


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), over the whole batch."""
    mse = torch.mean((reference.clamp(-1, 1) - reconstruction.clamp(-1, 1)) ** 2).item()
    return 10.0 * math.log10(4.0 / max(mse, 1e-12))


def build_toy_vae(out_dir: Path, spec: ToyVaeSpec, *, seed: int = 0, num_round_trip: int = ROUND_TRIP_SCENES) -> Path:
    """Train one spec's VAE, set its scaling factor from its latents, save it to ``out_dir/<name>``."""
    started = time.monotonic()
    vae = train_vae(spec, seed=seed)
    return save_toy_vae(
        vae, out_dir, spec, seed=seed, train_seconds=time.monotonic() - started, num_round_trip=num_round_trip
    )


def save_toy_vae(
    vae: AutoencoderKL, out_dir: Path, spec: ToyVaeSpec, *, seed: int, train_seconds: float,
    num_round_trip: int = ROUND_TRIP_SCENES,
) -> Path:
    """Set a trained VAE's scaling factor (1 / latent std on held-out scenes), save it with its
    ``toy_training.json`` (which records round-trip adherence on ``num_round_trip`` held-out scenes)."""
    std = latent_std(vae, held_out(64))
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    vae_dir = Path(out_dir) / spec.name
    vae.save_pretrained(str(vae_dir))
    weights = vae_dir / "diffusion_pytorch_model.safetensors"
    pixels = held_out(16)
    record = {
        "scaling_factor": vae.config.scaling_factor,
        "latent_std": std,
        "params": sum(p.numel() for p in vae.parameters()),
        "spec": asdict(spec),
        "seed": seed,
        "train_resolutions": list(spec.train_resolutions),
        "downsample": spec.downsample,
        "corpus_seed": VAE_CORPUS_SEED,
        "held_out_seed": HELD_OUT_SEED,
        "psnr_held_out_128": round(psnr(pixels, round_trip(vae, pixels)), 3),
        # decode(encode(x)) (posterior mean) scored against the caption, per resolution
        "round_trip_scenes": num_round_trip,
        "round_trip_adherence": {
            str(resolution): {k: round(v, 3) for k, v in round_trip_adherence(
                vae, resolution, seed=HELD_OUT_SEED, num=num_round_trip).items()}
            for resolution in spec.train_resolutions
        },  # fmt: skip
        "train_seconds": round(train_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "numpy": np.__version__,
                     "pillow": PIL.__version__, "python": platform.python_version()},  # fmt: skip
        "sha256": {weights.name: hashlib.sha256(weights.read_bytes()).hexdigest()},
        "command": f"python -m training.toy_vae --output {out_dir} --seed {seed} --vae {spec.name}",
    }
    (vae_dir / TRAINING_FILE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    log.info("%s: %s", spec.name, record)
    return vae_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("assets/toy_vae"), help="folder for sd/ and sdxl/ (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="weights and data-order seed (default: %(default)s)")
    parser.add_argument("--vae", choices=(*SPECS, "both"), default="both", help="which VAE to train (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; 1 is fastest on a shared machine (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    for name in SPECS if args.vae == "both" else (args.vae,):
        build_toy_vae(args.output, SPECS[name], seed=args.seed)


if __name__ == "__main__":
    main()
