"""Ray job: a selection → WebDataset training shards, optionally with cached T5 and VAE features.

Each sample holds the original image bytes, a JSON sidecar (key, size, both captions, the aspect-ratio
bucket per base resolution) and, when configured, ``t5_orig.npy``/``t5_vlm.npy`` (valid tokens only,
float16, each caption cased by ``--prompt-case`` as the trainer and samplers case theirs) and ``vae<res>.npy`` (posterior mean and std stacked, unscaled, float16, at the bucket size after
resize-to-cover + center-crop) so training can resample a latent each step.
Shards follow the selection they are given: each shard's commit marker records the sha256 of its plan (its
rows and the feature settings), so a rerun keeps a shard only if it would write the same one, rewrites the
others and removes shards the new plan no longer has. An empty selection is an error unless ``--allow-empty``.
CLI: ``python -m manifests.materialize --input OUT --selection NAME [--t5 PATH] [--vae PATH --vae-resolution 256]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from PIL import Image

from manifests import preflight
from manifests.actors import ActorSpec, run_on_actors
from manifests.buckets import BUCKET_RULES, BucketRule, nearest_bucket, resize_to_cover_and_crop
from manifests.cards import write_shards_card
from manifests.checks import InputError, check_name, cli, squeeze
from manifests.db import INDEX_FILE, TRAIN_SHARDS_DIR
from manifests.features import (
    DEFAULT_PROMPT_CASE,
    NULL_CAPTION_FILE,
    PROMPT_CASES,
    PromptCase,
    check_prompt_case,
)
from manifests.imageio import decode_rgb
from manifests.io import (
    COMMITTED_DIR,
    MARKER_SUFFIX,
    atomic_write_bytes,
    marker_info,
    migrate_markers,
    publish,
    temp_path,
    unmark_committed,
)
from manifests.progress import quiet_library_bars
from manifests.selection import RECORD_FILE, ROWS_FILE, require_selection
from manifests.tars import extension_for, json_bytes, npy_bytes, read_members, write_shard

log = logging.getLogger(__name__)

DEFAULT_RESOLUTIONS = (256, 512, 1024, 2048, 2880)
VAE_WINDOW_BATCHES = 4  # VAE crops are grouped by bucket size within windows of this many batches of rows


@dataclass
class MaterializeConfig:
    root: str  # run folder holding selections/<selection>/ and the curated shards
    selection: str
    name: str = ""  # output folder under train_shards/; defaults to the selection name
    samples_per_shard: int = 1000
    seed: int = 0
    resolutions: tuple[int, ...] = DEFAULT_RESOLUTIONS  # buckets recorded in each sample's JSON
    bucket_rule: BucketRule = "upstream"  # PixArt-Σ's rounded ratio key, or "exact" (manifests.buckets)
    t5: str | None = None  # HF id or path; caches t5_orig/t5_vlm when set
    # How captions are cased before T5 (manifests.features.PROMPT_CASES); the trainer refuses a cache whose
    # case is not its text.prompt_case (recorded in shards.json, part of each shard's plan hash).
    prompt_case: PromptCase = DEFAULT_PROMPT_CASE
    vae: str | None = None  # HF id or path; caches vae<res> for each of vae_resolutions when set
    vae_resolutions: tuple[int, ...] = ()
    num_workers: int = 1  # actors; each loads the encoders once
    num_gpus: float = 0.0  # per actor
    feature_batch_size: int = 32  # captions or same-size crops per encoder call
    output_dir: str = TRAIN_SHARDS_DIR  # folder under root; the eval set writes to eval_shards/
    shard_prefix: str = "train"  # shards are <prefix>-NNNNNN.tar (the trainer globs train-*.tar)
    allow_empty: bool = False  # an empty selection writes 0 shards instead of failing

    def __post_init__(self) -> None:
        check_name(self.selection, flag="--selection")
        self.name = check_name(self.name or self.selection, flag="--name")
        check_name(self.output_dir, flag="output_dir")
        check_name(self.shard_prefix, flag="shard_prefix")
        if self.vae_resolutions and not self.vae:
            raise ValueError("vae_resolutions is set but vae is not: name the VAE to cache latents with")
        check_prompt_case(self.prompt_case)
        if self.bucket_rule not in BUCKET_RULES:
            raise ValueError(f"bucket_rule must be one of {BUCKET_RULES}, got {self.bucket_rule!r}")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be ≥ 1, got {self.samples_per_shard}")
        if self.feature_batch_size < 1:
            raise ValueError(f"feature_batch_size must be ≥ 1, got {self.feature_batch_size}")
        self.resolutions, self.vae_resolutions = tuple(self.resolutions), tuple(self.vae_resolutions)

    def out_dir(self) -> Path:
        return Path(self.root) / self.output_dir / self.name


def feature_settings(cfg: MaterializeConfig) -> dict:
    """What, besides its rows, decides a shard's bytes (part of each shard's plan hash)."""
    return {
        "resolutions": list(cfg.resolutions),
        "bucket_rule": cfg.bucket_rule,
        "t5": cfg.t5,
        "prompt_case": cfg.prompt_case if cfg.t5 else None,
        "vae": cfg.vae,
        "vae_resolutions": list(cfg.vae_resolutions),
    }


def plan(rows: list[dict], cfg: MaterializeConfig) -> list[dict]:
    """Shuffle the selection with the seed, then cut fixed-size shards; same inputs, same plan.

    Each item carries ``plan_sha256`` (its rows and the feature settings): a committed shard is kept on a
    rerun only when its marker holds the same hash.
    """
    rows = sorted(rows, key=lambda r: r["key"])
    order = np.random.default_rng(cfg.seed).permutation(len(rows))
    shuffled = [rows[i] for i in order]
    size = cfg.samples_per_shard
    features = json.dumps(feature_settings(cfg), sort_keys=True)
    items = []
    for i, start in enumerate(range(0, len(shuffled), size)):
        rows_json = json.dumps(shuffled[start : start + size], default=str)
        digest = hashlib.sha256(f"{rows_json}\0{features}".encode()).hexdigest()
        items.append({"shard": f"{cfg.shard_prefix}-{i:06d}.tar", "rows": rows_json, "plan_sha256": digest})
    return items


class ShardWriter:
    """Writes one training shard per call; holds the encoders (loaded once per Ray actor)."""

    def __init__(self, cfg: MaterializeConfig) -> None:
        from manifests.features import T5Features, VaeFeatures

        self.cfg = cfg
        self.out = cfg.out_dir()
        self.t5 = T5Features(cfg.t5, prompt_case=cfg.prompt_case) if cfg.t5 else None
        self.vae = VaeFeatures(cfg.vae) if cfg.vae else None

    def __call__(self, item: dict) -> dict:
        rows = json.loads(item["rows"])
        buckets = Counter()
        written = False
        # Resume: a shard committed from this very plan is not read again; one from another plan (the
        # selection or the features changed) is rewritten.
        if not self._is_done(item):
            unmark_committed(self.out, item["shard"])
            images = self._read_images(rows)
            samples = [self.sample(row, images[row["key"]]) for row in rows]
            if self.t5:
                self._add_t5(rows, samples)
            if self.vae:
                self._add_vae(rows, samples)
            written = write_shard(
                self.out / item["shard"], samples, info={"plan_sha256": item["plan_sha256"]}
            )
        for row in rows:
            for res in self.cfg.resolutions:
                bucket = nearest_bucket(row["height"], row["width"], res, rule=self.cfg.bucket_rule)
                buckets[f"{res}:{'x'.join(map(str, bucket))}"] += 1
        return {
            "shard": item["shard"],
            "num_samples": len(rows),
            "buckets": json.dumps(dict(sorted(buckets.items()))),
            "written": written,
        }

    def _is_done(self, item: dict) -> bool:
        """Committed from this very plan, and still the size its marker recorded."""
        info = marker_info(self.out, item["shard"]) or {}
        path = self.out / item["shard"]
        return (
            info.get("plan_sha256") == item["plan_sha256"]
            and path.is_file()
            and path.stat().st_size == info.get("num_bytes")
        )

    def _read_images(self, rows: list[dict]) -> dict[str, bytes]:
        """Original bytes per key, reading each curated tar once."""
        by_tar: dict[str, set[str]] = {}
        for row in rows:
            by_tar.setdefault(row["shard"], set()).add(f"{row['key']}.{extension_for(row['format'])}")
        images = {}
        for tar, names in by_tar.items():
            for name, data in read_members(Path(self.cfg.root) / tar, names).items():
                images[name.split(".", 1)[0]] = data
        return images

    def sample(self, row: dict, data: bytes) -> dict:
        """The sample without features: original bytes and the JSON sidecar."""
        buckets = {
            str(res): list(nearest_bucket(row["height"], row["width"], res, rule=self.cfg.bucket_rule))
            for res in self.cfg.resolutions
        }
        meta = {
            k: row[k] for k in ("key", "width", "height", "caption_orig", "caption_vlm", "captioner", "tier")
        }
        return {
            "__key__": row["key"],
            extension_for(row["format"]): data,
            "json": json_bytes({**meta, "buckets": buckets}),
        }

    def _add_t5(self, rows: list[dict], samples: list[dict]) -> None:
        """``t5_orig.npy``/``t5_vlm.npy``: valid tokens only, (num_tokens, D) float16, batched per shard."""
        jobs = [
            (i, f"t5_{name.split('_')[1]}.npy", row[name])
            for i, row in enumerate(rows)
            for name in ("caption_orig", "caption_vlm")
            if row.get(name)
        ]
        step = self.cfg.feature_batch_size
        for start in range(0, len(jobs), step):
            batch = jobs[start : start + step]
            for (i, member, _), features in zip(batch, self.t5([c for _, _, c in batch]), strict=True):
                samples[i][member] = npy_bytes(features)

    def _add_vae(self, rows: list[dict], samples: list[dict]) -> None:
        """``vae<res>.npy``: [mean, std] (2, C, h, w) float16 at the bucket size, same-size crops batched.

        Each crop is made as the trainer makes it on the fly (reduced decode to the bucket's short side,
        resize-to-cover, center-crop), so a cached latent equals the one the trainer would compute.
        """
        step = self.cfg.feature_batch_size
        # A window of rows at a time bounds the crops held in memory (1000 crops at 1024² are 3 GB).
        for window in range(0, len(rows), step * VAE_WINDOW_BATCHES):
            crops: dict[tuple[int, int], list[tuple[int, str, Image.Image]]] = {}
            for i in range(window, min(window + step * VAE_WINDOW_BATCHES, len(rows))):
                row = rows[i]
                data = samples[i][extension_for(row["format"])]
                decoded: dict[int, Image.Image] = {}
                for res in self.cfg.vae_resolutions:
                    bucket = nearest_bucket(row["height"], row["width"], res, rule=self.cfg.bucket_rule)
                    if min(bucket) not in decoded:
                        decoded[min(bucket)] = decode_rgb(data, min_side=min(bucket))
                    crop = resize_to_cover_and_crop(decoded[min(bucket)], bucket)
                    crops.setdefault(bucket, []).append((i, f"vae{res}.npy", crop))
            for bucket in sorted(crops):
                for start in range(0, len(crops[bucket]), step):
                    batch = crops[bucket][start : start + step]
                    posteriors = self.vae([crop for _, _, crop in batch])
                    for (i, member, _), posterior in zip(batch, posteriors, strict=True):
                        samples[i][member] = npy_bytes(posterior)


def shard_writers(cfg: MaterializeConfig, num_plans: int) -> ActorSpec:
    """The ``ShardWriter`` actors: the config is their only constructor argument, whatever the plan's size."""
    return ActorSpec(
        ShardWriter,
        {"cfg": cfg},
        num_actors=max(1, min(cfg.num_workers, num_plans)),
        num_gpus=cfg.num_gpus,
    )


def remove_stale_shards(out: Path, plans: list[dict], prefix: str) -> int:
    """Delete ``<prefix>-*.tar`` shards (and markers) the plan does not have: an earlier, larger selection's."""
    planned = {p["shard"] for p in plans}
    stale = [p for p in sorted(out.glob(f"{prefix}-*.tar")) if p.name not in planned]
    for path in stale:
        unmark_committed(out, path.name)
        path.unlink()
    for marker in sorted(out.glob(f"{COMMITTED_DIR}/{prefix}-*.tar{MARKER_SUFFIX}")):  # markers left alone
        if marker.name.removesuffix(MARKER_SUFFIX) not in planned:
            marker.unlink()
    return len(stale)


def load_selection(root: Path, cfg: MaterializeConfig) -> tuple[list[dict], dict]:
    """The selection's rows and record; an ``InputError`` when it is missing, or empty without allow_empty."""
    folder = require_selection(root, cfg.selection)
    record = json.loads((folder / RECORD_FILE).read_text())
    rows = pq.read_table(folder / ROWS_FILE).to_pylist()
    if not rows and not cfg.allow_empty:
        where = record.get("spec", {}).get("where")
        raise InputError(
            f"selection {cfg.selection!r} has 0 rows (selected with --where {squeeze(str(where))!r}, "
            f"see {folder / RECORD_FILE}): nothing to materialise; select again with another --where, "
            "or pass --allow-empty to write 0 shards"
        )
    return rows, record


def _vae_scaling_factor(vae: str) -> float:
    """The VAE's own scaling_factor, from its config.json (no weights loaded)."""
    from diffusers import AutoencoderKL

    return float(AutoencoderKL.load_config(vae)["scaling_factor"])


def materialize(cfg: MaterializeConfig) -> Path:
    """Write the training shards of a selection and their index; returns the output folder."""
    root = Path(cfg.root)
    if not root.is_dir():
        raise InputError(f"--input {cfg.root!r} is not a folder: pass the run folder that holds selections/")
    rows, selection_record = load_selection(root, cfg)
    out = cfg.out_dir()
    out.mkdir(parents=True, exist_ok=True)
    migrate_markers(out)
    plans = plan(rows, cfg)
    previous = out / "shards.json"
    if previous.is_file():
        before = json.loads(previous.read_text()).get("selection_keys_sha256")
        if before != selection_record["keys_sha256"]:
            log.warning(
                "%s holds shards of another version of selection %r: rewriting them", out, cfg.selection
            )
            previous.unlink()  # nothing describes the folder until it is consistent again
            (out / INDEX_FILE).unlink(missing_ok=True)
    removed = remove_stale_shards(out, plans, cfg.shard_prefix)
    if removed:
        log.info("removed %d shards the selection no longer fills", removed)
    results = []
    if plans:
        if not ray.is_initialized():
            ray.init(log_to_driver=False, configure_logging=False)
        # Plain actors (manifests.actors): each loads the encoders once; a shard plan is a method argument.
        results = sorted(run_on_actors(shard_writers(cfg, len(plans)), plans), key=lambda r: r["shard"])
    index = pa.table(
        {
            "shard": [r["shard"] for r in results],
            "num_samples": pa.array([r["num_samples"] for r in results], pa.int64()),
            "buckets": [r["buckets"] for r in results],  # JSON: "<res>:<h>x<w>" → count
        }
    )
    tmp = temp_path(out / INDEX_FILE)
    try:
        pq.write_table(index, tmp)
        publish(tmp, out / INDEX_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    if cfg.t5:
        # T5("") for the trainer's null caption, so a run on cached features never loads T5 at all.
        from manifests.features import T5Features

        atomic_write_bytes(out / NULL_CAPTION_FILE, npy_bytes(T5Features(cfg.t5, prompt_case=cfg.prompt_case)([""])[0]))
    info = {
        "config": dataclasses.asdict(cfg),
        "selection_keys_sha256": selection_record["keys_sha256"],
        "num_samples": len(rows),
        "num_shards": len(plans),
        "features": {
            "t5": cfg.t5,
            "prompt_case": cfg.prompt_case if cfg.t5 else None,  # the trainer's text.prompt_case must match
            "vae": cfg.vae,
            "vae_resolutions": list(cfg.vae_resolutions),
            # The trainer checks its stages' vae_scaling_factor against this (a wrong one trains silently).
            "vae_scaling_factor": _vae_scaling_factor(cfg.vae) if cfg.vae else None,
        },
    }
    atomic_write_bytes(out / "shards.json", json.dumps(info, indent=2, sort_keys=True).encode())
    write_shards_card(cfg, image_formats={r["format"] for r in rows})  # HF dataset card (issue 11)
    log.info("materialised %d samples into %d shards at %s", len(rows), len(plans), out)
    return out


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--input", required=True, help="run folder holding selections/")
    parser.add_argument("--selection", required=True)
    parser.add_argument("--name", default="")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--t5")
    parser.add_argument("--prompt-case", choices=PROMPT_CASES, default=DEFAULT_PROMPT_CASE,
                        help="captions cased before T5 as the trainer's text.prompt_case: lower = what "
                        "PixArtSigmaPipeline encodes; as_written = PixArt-Σ's own feature extraction")  # fmt: skip
    parser.add_argument("--vae")
    parser.add_argument("--vae-resolution", type=int, action="append", default=[])
    parser.add_argument("--bucket-rule", choices=BUCKET_RULES, default="upstream",
                        help="upstream: PixArt-Σ's nearest rounded ratio key; exact: nearest bucket h/w")  # fmt: skip
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--num-gpus", type=float, default=0.0)
    parser.add_argument("--feature-batch-size", type=int, default=32)
    parser.add_argument("--allow-empty", action="store_true", help="an empty selection writes 0 shards")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_library_bars()  # no \r bars (T5's "Loading weights") in a log file
    cfg = MaterializeConfig(
        root=args.input, selection=args.selection, name=args.name, samples_per_shard=args.samples_per_shard,
        seed=args.seed, t5=args.t5, prompt_case=args.prompt_case, vae=args.vae, vae_resolutions=tuple(args.vae_resolution),
        num_workers=args.num_workers, num_gpus=args.num_gpus, feature_batch_size=args.feature_batch_size,
        allow_empty=args.allow_empty,
    )  # fmt: skip
    # Before Ray starts an actor: the run folder and the encoders (issue 11, preflight).
    preflight.check_run_folder("--input", cfg.root)
    for flag, model in (("--t5", cfg.t5), ("--vae", cfg.vae)):
        if model:
            preflight.check_model(flag, model)
    out = materialize(cfg)
    print(f"training shards → {out}")


if __name__ == "__main__":
    main()
