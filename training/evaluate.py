"""FID and CLIP score of a model (or two, side by side) on a held-out eval set, rank-sharded under torchrun.

    python -m training.evaluate --model RUN --input RUN_DATA/eval_shards/eval --inception weights.pth
    torchrun --nproc_per_node=8 -m training.evaluate --model RUN_A --model RUN_B --input … --output cmp/

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
  mean overall, count, colour, shape and position scores (per row: ``adherence``, ``real_adherence``).

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
from training.adherence import adherence_metrics, is_toy_prompt, score_image
from training.sample import (
    ImageGenerator,
    ImageJob,
    SamplingSettings,
    add_model_arguments,
    add_sampling_arguments,
    default_device,
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
        self.resize, self.weights_sha256 = resize, None
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

    def compute(self) -> float:
        """FID over every rank's updates (torchmetrics sums the statistics across the process group)."""
        return float(self.metric.compute())

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


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> tuple[Dist, torch.device]:
    """torchrun's process group (NCCL on CUDA, gloo on CPU), or a single process."""
    if "RANK" not in os.environ:
        return Dist(), default_device()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world)
    return Dist(rank, world), device


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


def evaluate_generator(
    generator: ImageGenerator,
    rows: list[dict],
    real_bytes: dict[str, bytes],
    *,
    settings: SamplingSettings,
    eval_settings: EvalSettings,
    fid: FidMetric,
    clip: ClipScorer,
    out: Path,
    real_out: Path | None,
    env: Dist,
) -> tuple[float, list[dict]]:
    """Generate this rank's share into ``out/images``, feed FID and CLIP; FID and all rows on every rank."""
    k = eval_settings.num_images_per_prompt
    jobs = plan_jobs(rows, resolution=eval_settings.resolution or generator.resolution, seed=eval_settings.seed,
                     num_images_per_prompt=k, binning=eval_settings.binning)  # fmt: skip
    mine = jobs[env.rank :: env.world_size]
    fid.reset()
    real_scores = {}  # the real image's CLIP score against its prompt: the ceiling the model is read against
    toy = all(is_toy_prompt(r["prompt"]) for r in rows)  # prompts carry toy-world truth: score adherence too
    adherence, real_adherence = {}, {}
    for row, job in list(zip(rows, jobs[::k], strict=True))[
        env.rank :: env.world_size
    ]:  # one real per prompt
        image = real_image(real_bytes[row["key"]], (job.height, job.width))
        fid.update(pil_to_uint8(image)[None], real=True)
        real_scores[row["key"]] = float(clip([image], [row["prompt"]])[0])
        if toy:
            real_adherence[row["key"]] = score_image(image, row["prompt"])
        if real_out is not None:
            atomic_write_bytes(real_out / f"{_safe(row['key'])}.png", _png(image))
    real_scores = _gather_dict(real_scores, env)
    real_adherence = _gather_dict(real_adherence, env)
    scores: dict[int, float] = {}
    cut: dict[int, bool] = {}  # the prompt was longer than CLIP's context: scored on its start only

    def score(job: ImageJob, image: Tensor) -> None:
        pixels = Image.open(io.BytesIO(to_png_bytes(image)))  # exactly what was saved
        fid.update(pil_to_uint8(pixels)[None], real=False)
        scores[job.index] = float(clip([pixels.convert("RGB")], [job.prompt])[0])
        cut[job.index] = clip.is_cut(job.prompt)
        if toy:
            adherence[job.index] = score_image(pixels.convert("RGB"), job.prompt)

    image_rows = write_images(generator, mine, settings, out / "images", on_image=score)
    for row in image_rows:
        key = rows[row["index"] // k]["key"]
        row.update(clip_score=scores[row["index"]], clip_prompt_cut=cut[row["index"]], real_key=key,
                   real_file=f"{_safe(key)}.png", real_clip_score=real_scores[key])  # fmt: skip
        if toy:
            row.update(adherence=adherence[row["index"]], real_adherence=real_adherence[key])
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


def write_report(out: Path, metrics: dict, rows: list[dict], *, real_dir: str, step: int = 0) -> None:
    """metrics.json, clip_scores.parquet, TensorBoard scalars and index.html for one model."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    atomic_write_bytes(out / METRICS_FILE, json.dumps(metrics, indent=2).encode())
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    atomic_write_bytes(out / SCORES_FILE, buffer.getvalue())
    log_tensorboard(out / "tensorboard", metrics, step)
    atomic_write_bytes(out / "index.html", model_page(metrics, rows, real_dir=real_dir).encode())


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


def model_page(metrics: dict, rows: list[dict], *, real_dir: str) -> str:
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
    for title, section in sections:
        body.append(f"<h2>{title}</h2><table><tr><th>generated</th><th>real</th><th>prompt</th></tr>")
        for r in section:
            body.append(
                f"<tr><td><img src='images/{html.escape(r['file'])}'></td>"
                f"<td><img src='{real_dir}/{html.escape(r['real_file'])}'></td>"
                f"<td class='p'>{html.escape(r['prompt'])}<br>CLIP {r['clip_score']:.2f} (real "
                f"{r['real_clip_score']:.2f}) · seed {r['seed']} · "
                f"{r['width']}×{r['height']}</td></tr>"
            )
        body.append("</table>")
    return _page(f"eval {metrics['name']}", body)


def compare_page(all_metrics: list[dict], all_rows: list[list[dict]], labels: list[str]) -> str:
    """Real | model A | model B … per prompt, with each model's CLIP score; the summary table on top."""
    header = "".join(f"<th>{html.escape(label)}</th>" for label in labels)
    body = [f"<h1>Comparison on {html.escape(all_metrics[0]['eval_set'])}</h1>", _summary_table(all_metrics),
            f"<table><tr><th>real</th>{header}</tr>"]  # fmt: skip
    for i, first in enumerate(all_rows[0]):
        cells = [f"<td><img src='real/{html.escape(first['real_file'])}'></td>"]
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
        f"<td>{m['clip_score']:.3f}</td><td>{m['clip_score_real']:.3f}</td><td>{m['num_images']}</td>"
        f"<td>{m['sampling']['sampler']}, "
        f"{m['sampling']['steps']} steps, cfg {m['sampling']['cfg_scale']}</td></tr>"
        for m in all_metrics
    )
    return (
        "<table border=1><tr><th>name</th><th>model</th><th>FID</th><th>CLIP score</th><th>CLIP score (real)</th>"
        "<th>images</th>"
        f"<th>sampling</th></tr>{rows}</table>"
    )


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


def score_summary(fid_value: float, image_rows: list[dict]) -> dict:
    """FID, the mean (and spread) of the CLIP scores, and the real images' own mean CLIP score."""
    scores = np.array([r["clip_score"] for r in image_rows])
    real_scores = np.array(list({r["real_key"]: r["real_clip_score"] for r in image_rows}.values()))
    summary = {
        "num_images": len(image_rows), "num_real_images": len(real_scores), "num_generated_images": len(image_rows),
        "fid": fid_value, "fid_small_n": small_fid(len(real_scores), len(image_rows)), "clip_score": float(scores.mean()),
        "clip_score_std": float(scores.std()), "clip_score_real": float(real_scores.mean()),
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


def evaluate(args: argparse.Namespace) -> dict:
    """Evaluate each --model on the eval set; returns the metrics (a list of them in compare mode)."""
    env, device = init_distributed()
    if args.device != "auto":
        device = torch.device(args.device)
    name = args.name or Path(args.input).name
    out = Path(args.output) if args.output else default_output(args.model[0], name)
    rows = read_eval_set(args.input, num_samples=args.num_samples)
    if len(rows) < 2:
        raise ValueError(
            f"{args.input}: FID needs at least 2 prompts, the eval set (or --num-samples) gives {len(rows)}"
        )
    check_fid_counts(len(rows), len(rows) * args.num_images_per_prompt, allow_small=args.allow_small_fid)
    real_bytes = read_real_images(args.input, {r["key"] for r in rows})
    fid = FidMetric(device=device, inception=args.inception, features=args.fid_features, resize=args.fid_resize)
    clip = ClipScorer(args.clip_model, args.clip_pretrained, device=device)
    settings = settings_from_args(args)
    eval_settings = EvalSettings(args.num_images_per_prompt, args.seed, args.resolution, args.binning)
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
            **score_summary(fid_value, image_rows), "fid_features": args.fid_features, "clip_model": clip.name,
            "inception": str(args.inception or default_inception_path()), "inception_sha256": fid.weights_sha256,
            "fid_resize": args.fid_resize, "resolution": generator.resolution, "binning": args.binning,
            "sampling": dataclasses.asdict(settings), "seed": args.seed, "world_size": env.world_size,
            "seconds": time.perf_counter() - started,
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
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return results[0][0] if not compare else {"labels": labels, "models": [m for m, _ in results]}


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
    run_dir: Path,
    global_step: int,
    device: torch.device,
    writer=None,
) -> dict:
    """FID and CLIP score of the live model on the first ``section.num_samples`` eval prompts (one process).

    ``section`` is the config's ``evaluation`` section; ``encode`` maps prompts to (T5 states, mask) and
    ``decode`` scaled latents to images in [-1, 1], as the trainer holds them. Images go to
    ``run_dir/eval/in_training/<step>/``, the scalars to ``eval/in_training.jsonl`` and, given a
    TensorBoard ``writer``, to ``eval/fid`` and ``eval/clip_score`` (and ``eval/adherence/<score>`` when every
    prompt is a toy-world caption). On fewer than 2048 images (the usual
    in-training subset) FID is logged as ``eval/fid_trend_small_n`` and marked ``fid_small_n`` in the JSONL:
    a trend within the run, not a number to compare with papers.
    """
    rows, real_bytes, fid, clip = training_evaluator(
        section.eval_set, section.num_samples, section.inception, section.fid_features, section.clip_model,
        section.clip_pretrained, str(device),
    )  # fmt: skip
    generator = ImageGenerator(
        model, encode, lambda z, tile: (decode(z).float() + 1) / 2, name=f"step {global_step}",
        resolution=resolution, device=device, vae_tiling="off",
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
        for name, value in values.get("adherence", {}).items():  # toy-world prompts (training.adherence)
            writer.add_scalar(f"eval/adherence/{name}", value, global_step)
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
            run_dir=Path(cfg.run_dir), global_step=global_step, device=env.device, writer=metrics.writer,
        )  # fmt: skip
    if env.world_size > 1:
        dist.barrier()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pixsigma-evaluate", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--model", action="append", required=True,
                        help="a model as training.sample takes it; twice to compare two models side by side")  # fmt: skip
    parser.add_argument("--input", required=True, help="eval set folder (eval-*.tar + prompts.jsonl)")
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
    if len(args.model) > 2:
        parser.error("compare mode takes two models")
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


if __name__ == "__main__":
    main()
