"""FID and CLIP score of a model (or two, side by side) on a held-out eval set, rank-sharded under torchrun.

    python -m training.evaluate --model RUN --input RUN_DATA/eval_shards/eval --inception weights.pth
    torchrun --nproc_per_node=8 -m training.evaluate --model RUN_A --model RUN_B --input … --output cmp/
    python -m training.evaluate --save-reference-stats real.npz --input REAL_IMAGES/ --inception weights.pth
    torchrun --nproc_per_node=8 -m training.evaluate --images SAMPLES/ --reference-stats real.npz --inception …

The 30K protocol (PixArt-Σ §4): reference statistics of the real set saved once (``training.reference_stats``,
pytorch-fid's ``mu``/``sigma`` .npz with how it was made), a ``pixsigma-sample`` folder (``--images``) or a prompt
file (``--input prompts.jsonl`` with ``--model``) scored against them; Inception and CLIP run
``--feature-batch-size`` images per forward.

For each prompt of the eval set (``prompts.jsonl`` from ``manifests.evalset``) the model generates
``--num-images-per-prompt`` images with fixed seeds (``--seed`` + index) in the bucket nearest to the real
image's aspect ratio; the real image is resized-to-cover and center-cropped to the same bucket. Rank r
generates prompts r, r + world, …; the FID statistics are sums, so torchmetrics all-reduces them and the
result does not depend on the number of ranks.

- FID: torchmetrics' ``FrechetInceptionDistance`` on torch-fidelity's Inception-v3 (the TF FID network;
  2048-d pool features by default), weights by local path (``--inception``) or torch's hub cache, never
  downloaded here; images reach 299² by the TF graph's bilinear resize as torch-fidelity does (the standard
  FID; ``--fid-resize clean``: clean-fid's PIL bicubic). ``metrics.json`` records the resize, the image
  count per side and the weights' sha256. Below 2048 images per side FID is refused, or with
  ``--allow-small-fid`` computed and marked ``fid_small_n`` (a trend, not a reportable number). PixArt-Σ reports FID on 30K held-out images (arXiv 2403.04692 §4).
- CLIP score: open_clip (ViT-L/14 by default), 100 · max(cos(image, prompt), 0) per image, as torchmetrics'
  ``CLIPScore`` defines it (Hessel et al. 2021 with w = 100), scored on the 8-bit PNG that is saved; CLIP reads
  77 tokens, so ``clip_prompts_cut`` counts the images whose prompt it saw only the start of (per row:
  ``clip_prompt_cut``).
- Adherence, when every prompt is a toy-world caption (``manifests.toy``): ``training.adherence`` scores each
  saved image and each real one against the caption's objects; ``adherence`` / ``adherence_real`` hold the
  mean overall, count, colour, shape and position scores (per row: ``adherence``, ``real_adherence``), and
  ``adherence_shifted`` the same images scored against another row's prompt (``shifted_adherence``): the chance
  level of those images, which a model that ignores its prompts reaches.

Writes ``metrics.json``, ``clip_scores.parquet`` (one row per image), TensorBoard scalars (``tensorboard/``)
and ``index.html`` (generated next to real, prompt and score under each, worst and best CLIP rows) to
``--output`` (default ``<run>/eval/<name>``); with two models each gets a subfolder and ``compare.json`` +
``index.html`` put them side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import html
import io
import json
import logging
import os
import re
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor

from manifests.buckets import resize_to_cover_and_crop
from manifests.imageio import decode_rgb
from manifests.io import atomic_write_bytes
from manifests.progress import quiet_library_bars, quiet_root_info
from training.adherence import adherence_metrics, is_toy_prompt, score_against, shifted_prompts
from training.ranks import Dist, close_distributed, exit_torchrun_worker, init_distributed
from training.reference_stats import (
    ReferenceStats,
    check_reference_stats,
    describe,
    load_reference_stats,
    save_reference_stats,
)
from training.sample import (
    IMAGES_FILE,
    RUN_FILE,
    ImageGenerator,
    ImageJob,
    SamplingSettings,
    add_model_arguments,
    add_sampling_arguments,
    bucket_resolution,
    generator_from_args,
    plan_jobs,
    read_prompts,
    settings_from_args,
    to_png_bytes,
    write_images,
    write_rows,
)

log = logging.getLogger(__name__)

INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's release file
FID_FEATURES = (64, 192, 768, 2048)  # Inception taps torchmetrics supports; 2048 is the standard FID
FID_INPUT_SIZE = 299  # the TF FID Inception's input side
CLIP_SCORE_WEIGHT = 100.0  # torchmetrics CLIPScore: 100 · max(cos, 0)
METRICS_FILE = "metrics.json"
SCORES_FILE = "clip_scores.parquet"
NUM_EXTREME_ROWS = 8  # worst / best CLIP-score rows on the HTML page
FEATURE_BATCH_SIZE = 64  # images per Inception / CLIP forward (--feature-batch-size)
IMAGE_EXTENSIONS = {"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"}


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def default_inception_path() -> Path:
    """Where torch-fidelity caches the FID Inception weights (``torch.hub`` checkpoints folder)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_NAME


def check_inception_weights(path: str | Path) -> Path:
    """A readable, tensors-only Inception-v3 state dict (torch-fidelity later loads it with pickle)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found at {path}: pass --inception PATH to torch-fidelity's "
            f"{INCEPTION_WEIGHTS_NAME} (nothing is downloaded here)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)  # refuses pickled code
    if not isinstance(state, dict) or "Mixed_7c.branch_pool.conv.weight" not in state:
        raise ValueError(
            f"{path}: not torch-fidelity's Inception-v3 state dict (FeatureExtractorInceptionV3)"
        )
    return path


FID_RESIZE = ("tf", "clean")
# Below this many images per side the 2048 × 2048 covariance is rank-deficient (rank ≤ N - 1) and FID is
# biased upwards by an N-dependent amount (Chong & Forsyth 2020): a number to watch as a trend, not to report.
MIN_FID_IMAGES = 2048
SMALL_FID_LABEL = f"trend only: fewer than {MIN_FID_IMAGES} images per side"
FID_TREND_TAG = "eval/fid_trend_small_n"  # TensorBoard tag of a small-N FID (in-training evaluation)


def small_fid(num_real: int, num_generated: int) -> bool:
    """Whether FID on these counts is a small-N trend rather than a reportable number."""
    return min(num_real, num_generated) < MIN_FID_IMAGES


@functools.cache
def file_sha256(path: str) -> str:
    """sha256 of a file (the Inception weights named in metrics.json), read once per process."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def clean_resize(images: Tensor) -> Tensor:
    """(B, 3, H, W) uint8 → (B, 3, 299, 299) uint8 by clean-fid's resize: PIL bicubic on each channel in float
    (``make_resizer("PIL", False, "bicubic", (299, 299))``), clipped to [0, 255], rounded to 8 bits (clean-fid
    keeps the float: ≤ 0.5/255 per pixel apart)."""
    out = []
    for image in images.cpu().numpy():  # (3, H, W)
        channels = [
            np.asarray(Image.fromarray(c.astype(np.float32), mode="F").resize(
                (FID_INPUT_SIZE, FID_INPUT_SIZE), resample=Image.BICUBIC))
            for c in image
        ]  # fmt: skip
        out.append(np.stack(channels).clip(0, 255).round().astype(np.uint8))
    return torch.from_numpy(np.stack(out))


class FidMetric:
    """torchmetrics' FID: sums of features and their outer products, all-reduced at ``compute``.

    ``resize="tf"`` (the standard FID): the TF FID Inception graph's bilinear resize to 299, as torch-fidelity
    and pytorch-fid's TF port do it (torchmetrics' ``antialias=False``; its default antialiased resize gives
    another number: 162.48 vs 158.89 on the same 12 + 12 images, issue 19). ``resize="clean"``: clean-fid's PIL
    bicubic resize first (Parmar et al. 2022), then the same network.
    """

    def __init__(self, *, device: torch.device, inception: str | Path | None = None, features: int = 2048,
                 extractor: torch.nn.Module | None = None, sync: bool = True, resize: str = "tf") -> None:  # fmt: skip
        from torchmetrics.image.fid import FrechetInceptionDistance

        if resize not in FID_RESIZE:
            raise ValueError(f"FID resize must be one of {FID_RESIZE}, got {resize!r}")
        self.resize, self.weights_sha256, self.sync = resize, None, sync
        self.num_features = features if extractor is None else extractor.num_features
        self.reference: ReferenceStats | None = None  # the real side, when it comes from a statistics file
        if extractor is None:
            if features not in FID_FEATURES:
                raise ValueError(f"FID features must be one of {FID_FEATURES}, got {features}")
            path = check_inception_weights(inception or default_inception_path())
            self.weights_sha256 = file_sha256(str(path))
            self.metric = FrechetInceptionDistance(
                feature=features, feature_extractor_weights_path=str(path), sync_on_compute=sync, antialias=False
            )
        else:  # fixed features in tests: any module with num_features
            self.metric = FrechetInceptionDistance(feature=extractor, sync_on_compute=sync)
        self.metric = self.metric.to(device)  # the statistics stay float64 (torchmetrics' states)
        self.device = device

    def update(self, images: Tensor, *, real: bool) -> None:
        """images (B, 3, H, W) uint8 (or features, with a fixed extractor)."""
        if self.resize == "clean" and images.dtype == torch.uint8:
            images = clean_resize(images)  # 299 × 299: the TF resize inside is then the identity
        self.metric.update(images.to(self.device), real=real)

    def update_images(self, images: list[Tensor], *, real: bool, batch_size: int) -> None:
        """(3, H, W) uint8 images of any sizes, fed in batches of one size of at most ``batch_size``."""
        by_size: dict[tuple, list[Tensor]] = {}
        for image in images:
            by_size.setdefault(tuple(image.shape), []).append(image)
        for group in by_size.values():
            for start in range(0, len(group), batch_size):
                self.update(torch.stack(group[start : start + batch_size]), real=real)  # (B, 3, H, W)

    def use_reference(self, stats: ReferenceStats, path: str | Path) -> None:
        """Take the real side from ``stats`` (refused when made with another resize, weights or tap)."""
        check_reference_stats(stats, path, fid_resize=self.resize, inception_sha256=self.weights_sha256,
                              features=self.num_features)  # fmt: skip
        self.reference = stats

    def statistics(self, *, real: bool) -> tuple[Tensor, Tensor, int]:
        """One side's feature mean (D,), covariance (D, D) (float64, N - 1 as pytorch-fid's ``np.cov``) and
        image count, over every rank's updates."""
        side = "real" if real else "fake"
        with self.metric.sync_context(should_sync=self.sync):  # all-reduce the sums under torchrun
            num = int(getattr(self.metric, f"{side}_features_num_samples"))
            total = getattr(self.metric, f"{side}_features_sum").double().cpu()  # (D,)
            outer = getattr(self.metric, f"{side}_features_cov_sum").double().cpu()  # (D, D)
        if num < 2:
            raise ValueError(f"FID statistics need at least 2 images, the {side} side has {num}")
        mean = total / num
        return mean, (outer - num * torch.outer(mean, mean)) / (num - 1), num

    def reference_stats(self) -> ReferenceStats:
        """The real side's statistics with their record, to save (``--save-reference-stats``)."""
        mean, cov, num = self.statistics(real=True)
        return ReferenceStats(mean.numpy(), cov.numpy(), self.resize, self.weights_sha256, num)

    def compute(self) -> float:
        """FID over every rank's updates (torchmetrics sums the statistics across the process group); the real
        side from the reference statistics when given."""
        if self.reference is None:
            return float(self.metric.compute())
        from torchmetrics.image.fid import _compute_fid  # the Fréchet distance torchmetrics' compute uses

        mean, cov, _ = self.statistics(real=False)
        ref = self.reference
        return float(_compute_fid(torch.from_numpy(ref.mu), torch.from_numpy(ref.sigma), mean, cov))

    def reset(self) -> None:
        """Forget both sides (each model is compared with real images cropped to its own buckets)."""
        self.metric.reset()


def clip_score(image_embeddings: Tensor, text_embeddings: Tensor) -> Tensor:
    """100 · max(cos(image_i, text_i), 0) per row (B,); embeddings need not be normalised."""
    image_embeddings = image_embeddings / image_embeddings.norm(dim=-1, keepdim=True)
    text_embeddings = text_embeddings / text_embeddings.norm(dim=-1, keepdim=True)
    return CLIP_SCORE_WEIGHT * (image_embeddings * text_embeddings).sum(dim=-1).clamp(min=0)


class ClipScorer:
    """open_clip image and text towers; ``local-dir:`` models, built-in names with a tag or weights file."""

    def __init__(self, model: str, pretrained: str | None, *, device: torch.device) -> None:
        import open_clip

        if model.startswith("local-dir:"):
            pretrained = None  # the weights live in the folder
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model, pretrained=pretrained or None, device=device
        )
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model)
        self.device = device
        self.name = model if pretrained is None else f"{model}/{pretrained}"

    def is_cut(self, prompt: str) -> bool:
        """Whether CLIP sees only the start of ``prompt``: its tokens (start and end included, after the
        tokenizer's own cleaning) exceed the context length (77); PixArt-Σ captions run to 300 T5 tokens."""
        context = self.tokenizer.context_length
        tokens = self.tokenizer([prompt], context_length=context * 64)  # (1, L): zero-padded, not cut
        return int((tokens != 0).sum()) > context

    def score_batched(self, images: list[Image.Image], prompts: list[str], *, batch_size: int) -> Tensor:
        """CLIP scores (N,) of any number of pairs, ``batch_size`` pairs per forward (any image sizes: each is
        preprocessed to CLIP's input on its own)."""
        if not images:
            return torch.zeros(0)
        return torch.cat([self(images[i : i + batch_size], prompts[i : i + batch_size])
                          for i in range(0, len(images), batch_size)])  # fmt: skip

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], prompts: list[str]) -> Tensor:
        """CLIP score per (image, prompt) pair, (B,) float on the CPU."""
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        tokens = self.tokenizer(prompts).to(self.device)  # truncated to the context length (77)
        image_features = self.model.encode_image(pixels).float()
        text_features = self.model.encode_text(tokens).float()
        return clip_score(image_features, text_features).cpu()


# --------------------------------------------------------------------------------------------------
# The eval set
# --------------------------------------------------------------------------------------------------


def read_eval_set(folder: str | Path, *, num_samples: int | None = None) -> list[dict]:
    """``prompts.jsonl`` rows (key, prompt, width, height, …), ordered by key as written, first N."""
    folder = Path(folder)
    prompts = folder / "prompts.jsonl"
    if not prompts.is_file():
        raise FileNotFoundError(
            f"{prompts} is missing: --input must be an eval set (python -m manifests.evalset)"
        )
    rows = read_prompts(prompts)
    missing = [r for r in rows if "key" not in r]
    if missing:
        raise ValueError(f"{prompts}: rows without a key: {missing[:2]}")
    return rows[:num_samples] if num_samples is not None else rows


def read_real_images(folder: str | Path, keys: set[str]) -> dict[str, bytes]:
    """Image bytes for ``keys`` from the eval shards; members are read into memory, never extracted."""
    found: dict[str, bytes] = {}
    for shard in sorted(Path(folder).glob("*.tar")):
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                key, _, ext = Path(member.name).name.partition(".")
                if member.isfile() and key in keys and ext.lower() in IMAGE_EXTENSIONS:
                    found[key] = tar.extractfile(member).read()
    missing = keys - found.keys()
    if missing:
        raise KeyError(f"{folder}: no image in the shards for keys {sorted(missing)[:5]}")
    return found


def real_image(data: bytes, size: tuple[int, int]) -> Image.Image:
    """The real image at the generated image's bucket: one reduced decode, resize to cover, center crop."""
    return resize_to_cover_and_crop(decode_rgb(data, min_side=min(size)), size)


def pil_to_uint8(image: Image.Image) -> Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W)


# --------------------------------------------------------------------------------------------------
# One model
# --------------------------------------------------------------------------------------------------


def gather_rows(rows: list[dict], env: Dist) -> list[dict]:
    """Every rank's rows on every rank, ordered by image index."""
    if env.world_size > 1:
        parts: list = [None] * env.world_size
        dist.all_gather_object(parts, rows)
        rows = [row for part in parts for row in part]
    return sorted(rows, key=lambda r: r["index"])


@dataclass(frozen=True)
class EvalSettings:
    """What every model in one evaluation shares."""

    num_images_per_prompt: int = 1
    seed: int = 0
    resolution: int | None = None  # default: each model's training resolution
    binning: str = "pixart"  # bucket tables (training.sample.BINNINGS), the same for sampling and evaluation
    feature_batch_size: int = FEATURE_BATCH_SIZE  # images per Inception / CLIP forward


class FeaturePass:
    """Images scored in batches of ``batch_size``: Inception features into FID, CLIP score against the prompt,
    the CLIP cut flag, and toy-world adherence; per-image results by index."""

    def __init__(self, fid: FidMetric, clip: ClipScorer, *, batch_size: int, real: bool, toy: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"feature batch size must be >= 1, got {batch_size}")
        self.fid, self.clip, self.batch_size, self.real, self.toy = fid, clip, batch_size, real, toy
        self.pending: list[tuple[int | str, str, Image.Image]] = []
        self.scores: dict = {}
        self.cut: dict = {}
        self.adherence: dict = {}
        self.shifted_adherence: dict = {}

    def add(self, index: int | str, prompt: str, image: Image.Image, shifted_prompt: str | None = None) -> None:
        """Queue one RGB image (and another row's prompt, to score its chance level against); a full batch is scored
        at once."""
        self.pending.append((index, prompt, image, shifted_prompt))
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        """Score what is queued (call once more at the end)."""
        if not self.pending:
            return
        indices, prompts, images, shifted = zip(*self.pending, strict=True)
        self.pending = []
        if not (self.real and self.fid.reference is not None):  # a reference file replaces the real images
            self.fid.update_images([pil_to_uint8(im) for im in images], real=self.real, batch_size=self.batch_size)
        scores = self.clip.score_batched(list(images), list(prompts), batch_size=self.batch_size)
        for index, prompt, image, other, score in zip(indices, prompts, images, shifted, scores.tolist(), strict=True):
            self.scores[index], self.cut[index] = score, self.clip.is_cut(prompt)
            if self.toy:  # one segmentation, scored against the prompt (and the shifted one)
                self.adherence[index], *chance = score_against(image, [prompt] + ([other] if other else []))
                if chance:
                    self.shifted_adherence[index] = chance[0]


def evaluate_generator(
    generator: ImageGenerator,
    rows: list[dict],
    real_bytes: dict[str, bytes] | None,
    *,
    settings: SamplingSettings,
    eval_settings: EvalSettings,
    fid: FidMetric,
    clip: ClipScorer,
    out: Path,
    real_out: Path | None,
    env: Dist,
) -> tuple[float, list[dict]]:
    """Generate this rank's share into ``out/images``, feed FID and CLIP in batches; FID and all rows on every
    rank. Without ``real_bytes`` (a prompt file) the real side is the FID metric's reference statistics."""
    k = eval_settings.num_images_per_prompt
    resolution = bucket_resolution(generator, eval_settings.resolution, eval_settings.binning)
    jobs = plan_jobs(rows, resolution=resolution, seed=eval_settings.seed,
                     num_images_per_prompt=k, binning=eval_settings.binning)  # fmt: skip
    mine = jobs[env.rank :: env.world_size]
    fid.reset()
    # prompts carry toy-world truth: score adherence too (read against the real images' own, so only with them)
    toy = real_bytes is not None and all(is_toy_prompt(r["prompt"]) for r in rows)
    batch = eval_settings.feature_batch_size
    # the real image's CLIP score against its prompt: the ceiling the model is read against
    reals = FeaturePass(fid, clip, batch_size=batch, real=True, toy=toy)
    if real_bytes is not None:
        for row, job in list(zip(rows, jobs[::k], strict=True))[env.rank :: env.world_size]:  # one per prompt
            image = real_image(real_bytes[row["key"]], (job.height, job.width))
            reals.add(row["key"], row["prompt"], image)
            if real_out is not None:
                atomic_write_bytes(real_out / f"{_safe(row['key'])}.png", _png(image))
        reals.flush()
    real_scores = _gather_dict(reals.scores, env)
    real_adherence = _gather_dict(reals.adherence, env)
    generated = FeaturePass(fid, clip, batch_size=batch, real=False, toy=toy)
    # each image against another row's prompt too: the chance level of these very images (training.adherence)
    shifted = shifted_prompts([r["prompt"] for r in rows]) if toy and len(rows) > 1 else None

    def score(job: ImageJob, image: Tensor) -> None:
        pixels = Image.open(io.BytesIO(to_png_bytes(image))).convert("RGB")  # exactly what was saved
        generated.add(job.index, job.prompt, pixels, shifted[job.index // k] if shifted else None)

    image_rows = write_images(generator, mine, settings, out / "images", on_image=score)
    generated.flush()
    for row in image_rows:
        i = row["index"]
        row.update(clip_score=generated.scores[i], clip_prompt_cut=generated.cut[i])
        if real_bytes is not None:
            key = rows[i // k]["key"]
            row.update(real_key=key, real_file=f"{_safe(key)}.png", real_clip_score=real_scores[key])
        if toy:
            row.update(adherence=generated.adherence[i], real_adherence=real_adherence[rows[i // k]["key"]])
            if shifted is not None:
                row["shifted_adherence"] = generated.shifted_adherence[i]
    return fid.compute(), gather_rows(image_rows, env)


def _gather_dict(values: dict, env: Dist) -> dict:
    """The union of every rank's dict, on every rank."""
    if env.world_size == 1:
        return values
    parts: list = [None] * env.world_size
    dist.all_gather_object(parts, values)
    return {k: v for part in parts for k, v in part.items()}


def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", key)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------


def write_report(
    out: Path, metrics: dict, rows: list[dict], *, real_dir: str, step: int = 0, images_dir: str = "images"
) -> None:
    """metrics.json, clip_scores.parquet, TensorBoard scalars and index.html for one model."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    atomic_write_bytes(out / METRICS_FILE, json.dumps(metrics, indent=2).encode())
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    atomic_write_bytes(out / SCORES_FILE, buffer.getvalue())
    log_tensorboard(out / "tensorboard", metrics, step)
    atomic_write_bytes(out / "index.html", model_page(metrics, rows, real_dir=real_dir, images_dir=images_dir).encode())


def log_tensorboard(folder: Path, metrics: dict, step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    writer.add_scalar(FID_TREND_TAG if metrics.get("fid_small_n") else "eval/fid", metrics["fid"], step)
    writer.add_scalar("eval/clip_score", metrics["clip_score"], step)
    writer.close()


_STYLE = (
    "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}td{padding:4px;vertical-align:top;"
    "max-width:260px}img{max-width:256px;max-height:256px;display:block}.p{font-size:12px;color:#333}"
    "th{text-align:left}"
)


def model_page(metrics: dict, rows: list[dict], *, real_dir: str, images_dir: str = "images") -> str:
    """Generated next to real, the prompt and CLIP score under each; worst and best CLIP rows first."""
    ranked = sorted(rows, key=lambda r: r["clip_score"])
    k = min(NUM_EXTREME_ROWS, len(rows))
    sections = [
        (f"Worst {k} CLIP scores", ranked[:k]),
        (f"Best {k} CLIP scores", ranked[::-1][:k]),
        (f"All {len(rows)} images", rows),
    ]
    body = [
        f"<h1>Evaluation: {html.escape(metrics['name'])}</h1>",
        _summary_table([metrics]),
    ]
    real = bool(rows) and "real_file" in rows[0]  # no real images with reference statistics and a prompt file
    for title, section in sections:
        body.append(f"<h2>{title}</h2><table><tr><th>generated</th>{'<th>real</th>' if real else ''}"
                    "<th>prompt</th></tr>")  # fmt: skip
        for r in section:
            real_cell = f"<td><img src='{real_dir}/{html.escape(r['real_file'])}'></td>" if real else ""
            real_score = f" (real {r['real_clip_score']:.2f})" if real else ""
            body.append(
                f"<tr><td><img src='{images_dir}/{html.escape(r['file'])}'></td>{real_cell}"
                f"<td class='p'>{html.escape(r['prompt'])}<br>CLIP {r['clip_score']:.2f}{real_score} · "
                f"seed {r['seed']} · {r['width']}×{r['height']}</td></tr>"
            )
        body.append("</table>")
    return _page(f"eval {metrics['name']}", body)


def compare_page(all_metrics: list[dict], all_rows: list[list[dict]], labels: list[str]) -> str:
    """Real | model A | model B … per prompt, with each model's CLIP score; the summary table on top."""
    header = "".join(f"<th>{html.escape(label)}</th>" for label in labels)
    body = [f"<h1>Comparison on {html.escape(all_metrics[0]['eval_set'])}</h1>", _summary_table(all_metrics),
            f"<table><tr><th>real</th>{header}</tr>"]  # fmt: skip
    for i, first in enumerate(all_rows[0]):
        cells = [f"<td><img src='real/{html.escape(first['real_file'])}'></td>" if "real_file" in first else "<td></td>"]
        for label, rows in zip(labels, all_rows, strict=True):
            r = rows[i]
            cells.append(f"<td><img src='{label}/images/{html.escape(r['file'])}'><span class='p'>"
                         f"CLIP {r['clip_score']:.2f}</span></td>")  # fmt: skip
        body.append(f"<tr>{''.join(cells)}</tr><tr><td colspan='{len(labels) + 1}' class='p'>"
                    f"{html.escape(first['prompt'])}</td></tr>")  # fmt: skip
    body.append("</table>")
    return _page("comparison", body)


def _summary_table(all_metrics: list[dict]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(m['name'])}</td><td>{html.escape(m['model'])}</td><td>{m['fid']:.3f}"
        f"{'<br>(' + SMALL_FID_LABEL + ')' if m.get('fid_small_n') else ''}</td>"
        f"<td>{m['clip_score']:.3f}</td><td>{_number(m['clip_score_real'])}</td><td>{m['num_images']}</td>"
        f"<td>{m['sampling']['sampler']}, "
        f"{m['sampling']['steps']} steps, cfg {m['sampling']['cfg_scale']}</td></tr>"
        for m in all_metrics
    )
    return (
        "<table border=1><tr><th>name</th><th>model</th><th>FID</th><th>CLIP score</th><th>CLIP score (real)</th>"
        "<th>images</th>"
        f"<th>sampling</th></tr>{rows}</table>"
    )


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _page(title: str, body: list[str]) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body>{''.join(body)}</body></html>\n"
    )


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------


def model_labels(models: list[str]) -> list[str]:
    """Short unique folder names for compared models: the last two path parts, numbered on a clash."""
    labels = [_safe("_".join(Path(m.rstrip("/")).parts[-2:])) for m in models]
    if len(set(labels)) < len(labels):
        labels = [f"{i}_{label}" for i, label in enumerate(labels)]
    return labels


def default_output(model: str, name: str) -> Path:
    """``<run>/eval/<name>`` when the model is a run folder or one of its exports; else --output is needed."""
    path = Path(model)
    for run in (path, path.parent, path.parent.parent):
        if (run / "checkpoints").is_dir() or (run / "final").is_dir() or (run / "final_ema").is_dir():
            return run / "eval" / name
    raise ValueError(f"{model} is not inside a run folder: pass --output")


def score_summary(fid_value: float, image_rows: list[dict], *, reference: ReferenceStats | None = None) -> dict:
    """FID, the mean (and spread) of the CLIP scores, and the real images' own mean CLIP score (when there are
    real images: with reference statistics the real side is the file's, its count the one it records)."""
    scores = np.array([r["clip_score"] for r in image_rows])
    real_scores = np.array(list({r["real_key"]: r["real_clip_score"] for r in image_rows if "real_key" in r}.values()))
    num_real = reference.num_images if reference is not None else len(real_scores)
    summary = {
        "num_images": len(image_rows), "num_real_images": num_real, "num_generated_images": len(image_rows),
        "fid": fid_value, "fid_small_n": small_fid(len(image_rows) if num_real is None else num_real, len(image_rows)),
        "clip_score": float(scores.mean()), "clip_score_std": float(scores.std()),
        "clip_score_real": float(real_scores.mean()) if len(real_scores) else None,
        "clip_prompts_cut": sum(bool(r.get("clip_prompt_cut")) for r in image_rows),
        **adherence_metrics(image_rows),  # toy-world eval sets only (training.adherence)
    }  # fmt: skip
    if summary["fid_small_n"]:
        summary["fid_note"] = SMALL_FID_LABEL
    return summary


def check_fid_counts(num_real: int, num_generated: int, *, allow_small: bool) -> None:
    """Refuse an FID on fewer than 2048 images per side (before any model loads) unless asked for."""
    if small_fid(num_real, num_generated) and not allow_small:
        raise ValueError(
            f"FID on {num_real} real and {num_generated} generated images: below {MIN_FID_IMAGES} per side the "
            "2048-d covariance is rank-deficient and FID is not comparable (PixArt-Σ reports 30K); use more "
            "prompts or --num-images-per-prompt, or pass --allow-small-fid to get it marked as a trend"
        )


def _device(args: argparse.Namespace) -> tuple[Dist, torch.device]:
    env, device = init_distributed()
    return env, device if args.device == "auto" else torch.device(args.device)


def _fid_metric(args: argparse.Namespace, device: torch.device, reference: ReferenceStats | None) -> FidMetric:
    """The FID metric as the flags say, the real side from ``--reference-stats`` when given (checked here)."""
    fid = FidMetric(device=device, inception=args.inception, features=args.fid_features, resize=args.fid_resize)
    if reference is not None:
        fid.use_reference(reference, args.reference_stats)
    return fid


def evaluate(args: argparse.Namespace) -> dict:
    """Evaluate each --model on the eval set or prompt file, score a sampled folder (--images), or save
    reference statistics; returns the metrics (compare mode: a list of them)."""
    if args.save_reference_stats:
        return save_reference(args)
    if args.images:
        return evaluate_images(args)
    env, device = _device(args)
    prompt_file = Path(args.input).is_file()  # COCO-30K / MJHQ-30K prompts: no real images, reference statistics
    name = args.name or (Path(args.input).stem if prompt_file else Path(args.input).name)
    out = Path(args.output) if args.output else default_output(args.model[0], name)
    if prompt_file and not args.reference_stats:
        raise ValueError(f"{args.input} is a prompt file, with no real images: pass --reference-stats PATH.npz")
    rows = read_prompts(args.input)[: args.num_samples] if prompt_file else read_eval_set(
        args.input, num_samples=args.num_samples)  # fmt: skip
    if len(rows) < 2:
        raise ValueError(
            f"{args.input}: FID needs at least 2 prompts, the eval set (or --num-samples) gives {len(rows)}"
        )
    reference = load_reference_stats(args.reference_stats) if args.reference_stats else None
    num_generated = len(rows) * args.num_images_per_prompt
    num_real = (reference.num_images or num_generated) if reference is not None else len(rows)
    check_fid_counts(num_real, num_generated, allow_small=args.allow_small_fid)
    real_bytes = None if prompt_file else read_real_images(args.input, {r["key"] for r in rows})
    fid = _fid_metric(args, device, reference)
    clip = ClipScorer(args.clip_model, args.clip_pretrained, device=device)
    settings = settings_from_args(args)
    eval_settings = EvalSettings(args.num_images_per_prompt, args.seed, args.resolution, args.binning,
                                 args.feature_batch_size)  # fmt: skip
    compare = len(args.model) > 1
    labels = model_labels(args.model) if compare else [""]
    results = []
    for index, (model, label) in enumerate(zip(args.model, labels, strict=True)):
        started = time.perf_counter()
        generator = generator_from_args(args, model, device)
        model_out = out / label if compare else out
        fid_value, image_rows = evaluate_generator(
            generator, rows, real_bytes, settings=settings, eval_settings=eval_settings, fid=fid, clip=clip,
            out=model_out, real_out=out / "real" if index == 0 else None, env=env,
        )  # fmt: skip
        metrics = {
            "name": name, "model": model, "eval_set": str(args.input), "num_prompts": len(rows),
            **score_summary(fid_value, image_rows, reference=reference), "fid_features": args.fid_features,
            "clip_model": clip.name, **(describe(args.reference_stats, reference) if reference else {}),
            "inception": str(args.inception or default_inception_path()), "inception_sha256": fid.weights_sha256,
            "fid_resize": args.fid_resize, "resolution": generator.resolution, "binning": args.binning,
            "sampling": dataclasses.asdict(settings), "seed": args.seed, "world_size": env.world_size,
            **generator_record(generator.identity()), "seconds": time.perf_counter() - started,
        }  # fmt: skip
        if env.is_main:
            write_report(model_out, metrics, image_rows, real_dir="../real" if compare else "real")
            write_rows(model_out / "images.jsonl", image_rows)
            small = f" [{SMALL_FID_LABEL}]" if metrics["fid_small_n"] else ""
            print(f"{label or name}: FID {fid_value:.3f}{small}  CLIP score {metrics['clip_score']:.3f}  "
                  f"({metrics['num_real_images']} real, {len(image_rows)} generated images) → "
                  f"{model_out / METRICS_FILE}")  # fmt: skip
        results.append((metrics, image_rows))
        del generator
    if compare and env.is_main:
        summary = {"labels": labels, "models": [m for m, _ in results]}
        atomic_write_bytes(out / "compare.json", json.dumps(summary, indent=2).encode())
        atomic_write_bytes(out / "index.html",
                           compare_page([m for m, _ in results], [r for _, r in results], labels).encode())  # fmt: skip
    close_distributed()
    return results[0][0] if not compare else {"labels": labels, "models": [m for m, _ in results]}


# --------------------------------------------------------------------------------------------------
# The 30K protocol: reference statistics once, a sampled folder scored against them
# --------------------------------------------------------------------------------------------------


def real_image_sources(folder: str | Path, env: Dist) -> tuple[int, list[tuple[str, bytes]]]:
    """Every image of a folder (its files, recursively, or the members of its ``*.tar`` shards), in name order:
    the total count and this rank's (name, bytes) share (image i on rank i % world_size)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of real images or of .tar shards")
    shards = sorted(folder.glob("*.tar"))
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix[1:].lower() in IMAGE_EXTENSIONS)
    if shards and files:  # one kind is read: the other would be left out without a word
        raise ValueError(f"{folder} holds both .tar shards ({len(shards)}) and image files ({len(files)}, e.g. "
                         f"{files[0]}): give a folder of one kind")  # fmt: skip
    mine: list[tuple[str, bytes]] = []
    count = 0
    if shards:
        for shard in shards:
            with tarfile.open(shard, "r:") as tar:
                for member in tar:
                    if member.isfile() and member.name.rpartition(".")[2].lower() in IMAGE_EXTENSIONS:
                        if count % env.world_size == env.rank:
                            mine.append((f"{shard.name}/{member.name}", tar.extractfile(member).read()))
                        count += 1
        return count, mine
    return len(files), [(str(p), p.read_bytes()) for p in files[env.rank :: env.world_size]]


def fidelity_rgb(data: bytes) -> Image.Image:
    """An image as torch-fidelity (``ImagesPathDataset``), pytorch-fid and clean-fid read a folder's files:
    ``Image.open(…).convert("RGB")`` at full size, with no EXIF rotation (``manifests.imageio.decode_rgb`` applies
    it: a JPEG tagged rotated would enter the statistics turned, another image than theirs)."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def save_reference(args: argparse.Namespace) -> dict:
    """``--save-reference-stats``: the Inception statistics of the real images in --input, with their record."""
    env, device = _device(args)
    fid = _fid_metric(args, device, None)
    count, mine = real_image_sources(args.input, env)
    check_fid_counts(count, count, allow_small=args.allow_small_fid)
    batch = args.feature_batch_size
    for start in range(0, len(mine), batch):  # decoded a batch at a time: 30K images never sit in memory
        images = [pil_to_uint8(fidelity_rgb(data)) for _, data in mine[start : start + batch]]  # their own size
        fid.update_images(images, real=True, batch_size=batch)
    stats = fid.reference_stats()
    if env.is_main:
        save_reference_stats(args.save_reference_stats, stats)
        print(f"reference statistics of {stats.num_images} images ({stats.features}-d, resize {stats.fid_resize}) "
              f"→ {args.save_reference_stats}")  # fmt: skip
    close_distributed()
    return {"reference_stats": str(args.save_reference_stats), "num_images": stats.num_images,
            "fid_resize": stats.fid_resize, "inception_sha256": stats.inception_sha256}  # fmt: skip


def read_sampling_run(folder: Path) -> dict:
    """pixsigma-sample's ``sampling_run.json`` (its plan digest and generator), or {} for a folder without it."""
    path = folder / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def generator_record(identity: dict | None) -> dict:
    """What metrics.json records of the generator: the prompt case its T5 saw (a model sampled with another
    ``--prompt-case`` than it was trained with is another number) and its identity (weights sha256, T5/VAE…)."""
    if identity is None:
        return {"prompt_case": None, "generator": None}  # a folder sampled by something else
    return {"prompt_case": identity["prompt_case"], "generator": identity}


def read_sampled_rows(folder: Path) -> list[dict]:
    """pixsigma-sample's ``images.jsonl`` rows (file, prompt, seed, size, sampler…), every file present."""
    path = folder / IMAGES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: --images takes a finished pixsigma-sample folder")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    missing = [r["file"] for r in rows if not (folder / r["file"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: {len(missing)} images of {IMAGES_FILE} are missing, e.g. {missing[:3]}")
    return rows


def evaluate_images(args: argparse.Namespace) -> dict:
    """``--images``: FID of a sampled folder against ``--reference-stats`` and each image's CLIP score against its
    prompt, in batches, rank-sharded (image i on rank i % world_size)."""
    env, device = _device(args)
    folder = Path(args.images)
    rows = read_sampled_rows(folder)[: args.num_samples]
    reference = load_reference_stats(args.reference_stats)
    check_fid_counts(reference.num_images or len(rows), len(rows), allow_small=args.allow_small_fid)
    started = time.perf_counter()
    fid = _fid_metric(args, device, reference)
    clip = ClipScorer(args.clip_model, args.clip_pretrained, device=device)
    generated = FeaturePass(fid, clip, batch_size=args.feature_batch_size, real=False)
    mine = rows[env.rank :: env.world_size]
    for row in mine:
        with Image.open(folder / row["file"]) as image:
            generated.add(row["index"], row["prompt"], image.convert("RGB"))
    generated.flush()
    image_rows = gather_rows([{**r, "clip_score": generated.scores[r["index"]],
                               "clip_prompt_cut": generated.cut[r["index"]]} for r in mine], env)  # fmt: skip
    fid_value = fid.compute()
    out = Path(args.output) if args.output else folder / "eval"
    first, sampling_run = rows[0], read_sampling_run(folder)
    metrics = {
        "name": args.name or folder.name, "model": first.get("model", ""), "images": str(folder),
        "num_prompts": len({r["prompt"] for r in rows}), **score_summary(fid_value, image_rows, reference=reference),
        "fid_features": args.fid_features, "clip_model": clip.name, "inception": str(args.inception or default_inception_path()),
        "inception_sha256": fid.weights_sha256, "fid_resize": args.fid_resize, **describe(args.reference_stats, reference),
        "sampling": {k: first.get(k) for k in ("sampler", "steps", "cfg_scale", "negative_prompt")},
        # None: a folder sampled by something else, or by a pixsigma-sample older than the record
        "binning": sampling_run.get("binning"),
        **generator_record(sampling_run.get("generator")), "world_size": env.world_size,
        "seconds": time.perf_counter() - started,
    }  # fmt: skip
    if env.is_main:
        write_report(out, metrics, image_rows, real_dir="", images_dir=os.path.relpath(folder, out))
        small = f" [{SMALL_FID_LABEL}]" if metrics["fid_small_n"] else ""
        print(f"{metrics['name']}: FID {fid_value:.3f}{small}  CLIP score {metrics['clip_score']:.3f}  "
              f"({len(image_rows)} images against {args.reference_stats}) → {out / METRICS_FILE}")  # fmt: skip
    close_distributed()
    return metrics


# --------------------------------------------------------------------------------------------------
# During training
# --------------------------------------------------------------------------------------------------


@functools.cache
def training_evaluator(
    eval_set: str, num_samples: int, inception: str, fid_features: int, clip_model: str, clip_pretrained: str,
    device: str,
) -> tuple[list[dict], dict[str, bytes], FidMetric, ClipScorer]:  # fmt: skip
    """The eval subset, its real images, FID and CLIP models: loaded once per training process."""
    rows = read_eval_set(eval_set, num_samples=num_samples)
    real_bytes = read_real_images(eval_set, {r["key"] for r in rows})
    # Rank 0 alone evaluates: no all-reduce of the statistics (the other ranks wait at a barrier).
    fid = FidMetric(
        device=torch.device(device), inception=inception or None, features=fid_features, sync=False
    )
    return rows, real_bytes, fid, ClipScorer(clip_model, clip_pretrained or None, device=torch.device(device))


def training_eval_prompts(section) -> list[str]:
    """Every prompt in-training evaluation encodes: the subset's, and the empty negative prompt."""
    return [r["prompt"] for r in read_eval_set(section.eval_set, num_samples=section.num_samples)] + [""]


def evaluate_during_training(
    model: torch.nn.Module,
    section,
    *,
    encode,
    decode,
    resolution: int,
    vae_downsample: int,
    run_dir: Path,
    global_step: int,
    device: torch.device,
    writer=None,
) -> dict:
    """FID and CLIP score of the live model on the first ``section.num_samples`` eval prompts (one process).

    ``section`` is the config's ``evaluation`` section; ``encode`` maps prompts to (T5 states, mask) and
    ``decode`` scaled latents to images in [-1, 1], as the trainer holds them. Images go to
    ``run_dir/eval/in_training/<step>/``, the scalars to ``eval/in_training.jsonl`` and, given a
    TensorBoard ``writer``, to ``eval/fid`` and ``eval/clip_score`` (and ``eval/adherence/<score>`` with its
    chance level ``eval/adherence_shifted/<score>`` when every prompt is a toy-world caption). On fewer than 2048 images (the usual
    in-training subset) FID is logged as ``eval/fid_trend_small_n`` and marked ``fid_small_n`` in the JSONL:
    a trend within the run, not a number to compare with papers.
    """
    rows, real_bytes, fid, clip = training_evaluator(
        section.eval_set, section.num_samples, section.inception, section.fid_features, section.clip_model,
        section.clip_pretrained, str(device),
    )  # fmt: skip
    generator = ImageGenerator(
        model, encode, lambda z, tile: (decode(z).float() + 1) / 2, name=f"step {global_step}",
        resolution=resolution, vae_downsample=vae_downsample, device=device, vae_tiling="off",
    )  # fmt: skip
    settings = SamplingSettings(
        steps=section.steps, cfg_scale=section.cfg_scale, batch_size=section.batch_size
    )
    out = Path(run_dir) / "eval"
    was_training = model.training
    model.eval()
    try:
        fid_value, image_rows = evaluate_generator(
            generator, rows, real_bytes, settings=settings, eval_settings=EvalSettings(1, section.seed, resolution),
            fid=fid, clip=clip, out=out / "in_training" / f"{global_step:08d}", real_out=None, env=Dist(),
        )  # fmt: skip
    finally:
        model.train(was_training)
    values = {"global_step": global_step, **score_summary(fid_value, image_rows)}
    with open(out / "in_training.jsonl", "a") as f:
        f.write(json.dumps(values) + "\n")
    fid_tag = FID_TREND_TAG if values["fid_small_n"] else "eval/fid"
    if writer is not None:
        writer.add_scalar(fid_tag, fid_value, global_step)
        writer.add_scalar("eval/clip_score", values["clip_score"], global_step)
        for kind in ("adherence", "adherence_shifted"):  # toy-world prompts (training.adherence): score, chance
            for name, value in values.get(kind, {}).items():
                writer.add_scalar(f"eval/{kind}/{name}", value, global_step)
    small = f" ({SMALL_FID_LABEL})" if values["fid_small_n"] else ""
    toy = "".join(f", adherence {k} {v:.3f}" for k, v in values.get("adherence", {}).items())
    log.info("step %d: FID %.3f%s, CLIP score %.3f%s on %d eval prompts", global_step, fid_value, small,
             values["clip_score"], toy, len(image_rows))  # fmt: skip
    return values


def evaluate_in_training(model, cfg, stage, text, latents, env, metrics, global_step: int) -> None:
    """The trainer's call: rank 0 evaluates ``model`` (the raw weights the stage trains), the others wait.

    ``text`` holds the prompts' T5 states computed at the start (``training_eval_prompts``; T5 is not
    loaded here), ``latents.decode`` gives images, ``metrics.writer`` is the TensorBoard writer.
    """
    if env.is_main:

        def encode(prompts: list[str]) -> tuple[Tensor, Tensor]:
            y, mask = text.prompt_batch(prompts)  # (P, L, C), (P, L)
            return y.to(env.device), mask.to(env.device)

        evaluate_during_training(
            model, cfg.evaluation, encode=encode, decode=latents.decode, resolution=stage.resolution,
            vae_downsample=latents.downsample, run_dir=Path(cfg.run_dir), global_step=global_step, device=env.device, writer=metrics.writer,
        )  # fmt: skip
    if env.world_size > 1:
        dist.barrier()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pixsigma-evaluate", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--model", action="append",
                        help="a model as training.sample takes it; twice to compare two models side by side")  # fmt: skip
    parser.add_argument("--input", help="eval set folder (eval-*.tar + prompts.jsonl), or a prompt file (JSONL, "
                        "MJHQ meta_data.json; with --reference-stats); with --save-reference-stats: real images "
                        "(a folder of files or of .tar shards)")  # fmt: skip
    parser.add_argument("--images", help="score a finished pixsigma-sample folder (images.jsonl + PNGs) against "
                        "--reference-stats instead of generating (the 30K protocol's second step)")  # fmt: skip
    parser.add_argument("--reference-stats", help="FID's real side from this .npz (mu, sigma: pytorch-fid / "
                        "clean-fid layout) instead of the real images")  # fmt: skip
    parser.add_argument("--save-reference-stats", metavar="PATH.npz", help="compute the real images' (--input) "
                        "Inception statistics with this run's --inception and --fid-resize, save them, and stop")  # fmt: skip
    parser.add_argument("--feature-batch-size", type=int, default=FEATURE_BATCH_SIZE,
                        help="images per Inception / CLIP forward (--batch-size is the sampler's)")  # fmt: skip
    parser.add_argument("--output", help="default: <run>/eval/<name> for a model inside a run folder")
    parser.add_argument("--name", help="evaluation name; default: the eval set's folder name")
    parser.add_argument("--num-samples", type=int, help="only the first N prompts (a quick subset)")
    parser.add_argument(
        "--inception", help=f"FID Inception weights; default: torch hub cache {INCEPTION_WEIGHTS_NAME}"
    )
    parser.add_argument("--fid-features", type=int, default=2048, choices=FID_FEATURES,
                        help="Inception feature tap (2048: standard FID)")  # fmt: skip
    parser.add_argument("--allow-small-fid", action="store_true",
                        help=f"compute FID on fewer than {MIN_FID_IMAGES} images per side, marked as a trend")  # fmt: skip
    parser.add_argument("--fid-resize", choices=FID_RESIZE, default="tf",
                        help="to Inception's 299²: tf = the TF FID graph's bilinear (torch-fidelity, the standard "
                        "FID); clean = clean-fid's PIL bicubic")  # fmt: skip
    parser.add_argument("--clip-model", default="ViT-L-14-quickgelu",
                        help="open_clip model name (OpenAI's ViT-L/14 uses QuickGELU) or local-dir:PATH")  # fmt: skip
    parser.add_argument(
        "--clip-pretrained", default="openai", help="open_clip tag or weights file (ignored for local-dir:)"
    )
    add_sampling_arguments(parser)
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    modes = [flag for flag, value in (("--model", args.model), ("--images", args.images),
                                      ("--save-reference-stats", args.save_reference_stats)) if value]  # fmt: skip
    if len(modes) != 1:
        parser.error(f"give one of --model, --images, --save-reference-stats (got {modes or 'none'})")
    if args.model and len(args.model) > 2:
        parser.error("compare mode takes two models")
    if (args.model or args.save_reference_stats) and not args.input:
        parser.error(f"{modes[0]} needs --input")
    if args.images and args.input:
        parser.error("--images scores the sampled folder's own prompts: --input is not used")
    if (args.images or args.save_reference_stats) and args.prompt_case is not None:
        parser.error(f"{modes[0]} samples nothing: --prompt-case applies where images are sampled "
                     "(pixsigma-sample, or --model here); metrics.json records the case the images were sampled with")  # fmt: skip
    if args.images and not args.reference_stats:
        parser.error("--images needs --reference-stats (the real side of FID)")
    if args.save_reference_stats and args.reference_stats:
        parser.error("--save-reference-stats and --reference-stats do not go together")
    if args.feature_batch_size < 1:
        parser.error("--feature-batch-size must be >= 1")
    return args


def run(argv: list[str] | None = None) -> dict:
    """Parse the flags and evaluate; returns the metrics (compare mode: labels and each model's metrics)."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    quiet_library_bars()  # no \r bars (T5's "Loading weights") in a log file
    quiet_root_info()  # open_clip's model-loading chatter
    return evaluate(args)


def main(argv: list[str] | None = None) -> None:
    """Console script ``pixsigma-evaluate`` (returns None: a console script's return value is its exit status)."""
    run(argv)
    exit_torchrun_worker()  # finished on every rank: no interpreter shutdown racing gloo's threads


if __name__ == "__main__":
    main()
