"""CLI of the curation job: `python curation/run.py --input DIR [--input …] --output OUT [flags]`.

Runs in-process (Ray started locally) or under `ray job submit --working-dir . -- python curation/run.py …`.
Flags override fields of ``CurationConfig``; the resolved config is written to OUT/curation_config.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging

from curation.config import (
    BUILTIN_HEAD,
    TIERS,
    AestheticConfig,
    CurationConfig,
    DedupConfig,
    DownloadConfig,
    ShardConfig,
    TierConfig,
)
from curation.pipeline import run
from curation.rundir import find_not_shared
from manifests import preflight
from manifests.checks import cli
from manifests.progress import quiet_root_info


def parse_min_aesthetic(values: list[str] | None) -> dict[str, float]:
    """``--min-aesthetic`` values → per-tier thresholds: ``none``, ``5.0`` (every tier) or ``4k=6.0``."""
    if not values:
        return AestheticConfig().min_score
    thresholds: dict[str, float] = {}
    for value in values:
        if value.lower() == "none":
            thresholds = {}
        elif "=" in value:
            tier, _, score = value.partition("=")
            if tier not in TIERS:
                raise ValueError(f"--min-aesthetic: tier must be one of {TIERS}, got {tier!r}")
            thresholds[tier] = float(score)
        else:
            thresholds = dict.fromkeys(TIERS, float(value))
    return thresholds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add = parser.add_argument
    add(
        "--input",
        action="append",
        required=True,
        help="folder, glob, fsspec URI, .tar, or URL list; repeatable",
    )
    add("--output", required=True, help="run folder (manifests, shards, report)")
    add("--samples-per-shard", type=int, default=ShardConfig.samples_per_shard)
    add("--max-aspect-ratio", type=float, default=TierConfig.max_aspect_ratio)
    add("--max-pixels", type=int, default=TierConfig.max_pixels)
    add(
        "--clip-model",
        default=AestheticConfig.clip_model,
        help="open_clip name (the --clip-pretrained weights are a hub download) or local-dir:PATH",
    )
    add(
        "--clip-pretrained",
        default=AestheticConfig.pretrained,
        help="tag or checkpoint path ('none': random)",
    )
    add("--aesthetic-head", default=AestheticConfig.head, help="LAION aesthetic v2 head (.pth state dict)")
    add(
        "--min-aesthetic",
        action="append",
        help="'none', a score for every tier, or TIER=SCORE (repeatable); default 5.0 for 4k and 1k",
    )
    add("--aesthetic-batch-size", type=int, default=AestheticConfig.batch_size)
    add(
        "--num-workers",
        type=int,
        default=AestheticConfig.num_actors,
        help="aesthetic scorer actors (model replicas)",
    )
    add("--num-gpus", type=float, default=AestheticConfig.num_gpus, help="GPUs per scorer actor")
    add(
        "--save-embeddings",
        action=argparse.BooleanOptionalAction,
        default=AestheticConfig.save_embeddings,
        help="write fp16 CLIP embeddings to manifests/clip_embeddings (1.5 KiB per scored row)",
    )
    add(
        "--max-hamming",
        type=int,
        default=DedupConfig.max_hamming,
        help="pHash near-duplicate distance (bits)",
    )
    add(
        "--phash-splits",
        type=lambda v: None if v.lower() == "exact" else int(v),
        default=DedupConfig.phash_splits,
        help="pHash search: 'exact', or k splits into 32-bit bands (near-linear; exact up to 5 bits)",
    )
    semantic = parser.add_mutually_exclusive_group()
    semantic.add_argument(
        "--semantic-dedup",
        dest="semantic",
        action="store_const",
        const=True,
        default=None,
        help="CLIP-embedding near-duplicates, SemDeDup (default: on whenever embeddings are saved)",
    )
    semantic.add_argument(
        "--no-semantic-dedup",
        dest="semantic",
        action="store_const",
        const=False,
        help="off: for a random CLIP (tests, the demo), whose embeddings all look alike",
    )
    add(
        "--semantic-threshold",
        type=float,
        default=DedupConfig.semantic_threshold,
        help="cosine similarity above which two embeddings are one picture",
    )
    add("--chunk-size", type=int, default=CurationConfig.chunk_size, help="inputs per committed work chunk")
    add(
        "--download-timeout",
        type=int,
        default=DownloadConfig.timeout,
        help="seconds in all per URL, redirects and body included (URL lists)",
    )
    add(
        "--download-max-bytes",
        type=int,
        default=DownloadConfig.max_bytes,
        help="a body over this is stopped and rejected as download_too_large (URL lists)",
    )
    add("--no-report", action="store_true", help="skip OUT/report/index.html")
    add(
        "--executor",
        choices=("auto", "ray", "local"),
        default=CurationConfig.executor,
        help="auto: Ray with RAY_ADDRESS or above --auto-local-max-inputs input files, else in-process; "
        "local: no Ray at all",
    )
    add(
        "--auto-local-max-inputs",
        type=int,
        default=CurationConfig.auto_local_max_inputs,
        help="--executor auto runs in-process up to this many input files (no RAY_ADDRESS)",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> CurationConfig:
    args = build_parser().parse_args(argv)
    pretrained = None if (args.clip_pretrained or "").lower() in ("", "none") else args.clip_pretrained
    return CurationConfig(
        inputs=args.input,
        output=args.output,
        tiers=TierConfig(max_aspect_ratio=args.max_aspect_ratio, max_pixels=args.max_pixels),
        shards=ShardConfig(samples_per_shard=args.samples_per_shard),
        aesthetic=AestheticConfig(
            clip_model=args.clip_model,
            pretrained=pretrained,
            head=args.aesthetic_head,
            min_score=parse_min_aesthetic(args.min_aesthetic),
            batch_size=args.aesthetic_batch_size,
            num_actors=args.num_workers,
            num_gpus=args.num_gpus,
            save_embeddings=args.save_embeddings,
        ),
        dedup=DedupConfig(
            max_hamming=args.max_hamming,
            phash_splits=args.phash_splits,
            semantic=args.semantic,
            semantic_threshold=args.semantic_threshold,
        ),
        download=DownloadConfig(timeout=args.download_timeout, max_bytes=args.download_max_bytes),
        chunk_size=args.chunk_size,
        report=not args.no_report,
        executor=args.executor,
        auto_local_max_inputs=args.auto_local_max_inputs,
    )


@cli  # a bad flag, input, output or model: one line on stderr, exit status 1
def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_root_info()  # open_clip's model-load lines, printed in-process by the local executor's scorer
    cfg = parse_args(argv)
    # Before Ray starts an actor: inputs, output and models (issue 11, preflight).
    preflight.check_inputs("--input", cfg.inputs)
    preflight.check_output("--output", cfg.output)
    score = cfg.aesthetic
    preflight.check_open_clip(
        "--clip-model", score.clip_model, pretrained=score.pretrained, pretrained_flag="--clip-pretrained"
    )
    if score.head != BUILTIN_HEAD:
        preflight.check_file("--aesthetic-head", score.head, what="'builtin' or a .safetensors/.pth file")
    try:
        summary = run(cfg)
    except Exception as err:
        # A node without the run folder: its one line (from inside Ray's wrapping), exit 1.
        if (not_shared := find_not_shared(err)) is not None:
            raise not_shared from None
        raise
    print(json.dumps(summary, indent=2))
    # The process ends here: its final garbage collections would walk the objects torch, transformers and timm
    # created at import (open_clip's), ~0.4 s of one core on a small job's critical path (issue 18, item 8).
    gc.freeze()


if __name__ == "__main__":
    main()
