"""CLI of the curation job: `python curation/run.py --input DIR [--input …] --output OUT`.

Runs in-process (Ray started locally) or under `ray job submit --working-dir . -- python curation/run.py …`.
"""

from __future__ import annotations

import argparse
import json
import logging

from curation.config import CurationConfig, ShardConfig, TierConfig
from curation.pipeline import run


def parse_args(argv: list[str] | None = None) -> CurationConfig:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--input", action="append", required=True, help="folder, glob or fsspec URI; repeatable"
    )
    parser.add_argument("--output", required=True, help="run folder (manifests, shards, report)")
    parser.add_argument("--samples-per-shard", type=int, default=ShardConfig.samples_per_shard)
    parser.add_argument("--max-aspect-ratio", type=float, default=TierConfig.max_aspect_ratio)
    parser.add_argument("--max-pixels", type=int, default=TierConfig.max_pixels)
    args = parser.parse_args(argv)
    return CurationConfig(
        inputs=args.input,
        output=args.output,
        tiers=TierConfig(max_aspect_ratio=args.max_aspect_ratio, max_pixels=args.max_pixels),
        shards=ShardConfig(samples_per_shard=args.samples_per_shard),
    )


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = run(parse_args(argv))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
