"""A tiny curated run built by hand: curated tier shards, an images manifest and a captions manifest."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image

import manifests
from manifests.tars import json_bytes, write_shard

# (height, width): portrait, landscape, square and panoramas, so the samples fall into several buckets.
SIZES = ((48, 64), (64, 48), (32, 96), (64, 64), (96, 32), (40, 64))
VLM = "tiny-vlm@0"


def jpeg(height: int, width: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def make_run(root: Path, *, num_images: int = 12, seed: int = 0, samples_per_shard: int = 4) -> list[dict]:
    """Write a run folder under ``root``; returns the kept image rows (with ``data``) ordered by key.

    Every third image is tier 4k, every fifth has no original caption, every fourth no VLM caption,
    every sixth no pHash; two extra rows are rejected.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num_images):
        height, width = SIZES[i % len(SIZES)]
        data = jpeg(height, width, seed * 1000 + i)
        rows.append(
            {
                "key": f"{seed:02x}{i:06x}",
                "source": f"file:///corpus/{seed}/{i}.jpg",
                "status": "kept",
                "width": width,
                "height": height,
                "format": "JPEG",
                "num_bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "tier": "4k" if i % 3 == 0 else "1k",
                "caption_orig": None if i % 5 == 4 else f"a noisy picture number {i}",
                "aesthetic": float(4 + (i % 7) * 0.5),
                "phash": None if i % 6 == 5 else int(rng.integers(-(2**63), 2**63 - 1, dtype=np.int64)),
                "data": data,
            }
        )
    for tier in ("1k", "4k"):
        in_tier = [r for r in rows if r["tier"] == tier]
        for n, start in enumerate(range(0, len(in_tier), samples_per_shard)):
            shard = f"shards/curated/{tier}/{tier}-{n:06d}.tar"
            chunk = in_tier[start : start + samples_per_shard]
            for r in chunk:
                r["shard"] = shard
            write_shard(
                root / shard,
                [
                    {"__key__": r["key"], "jpg": r["data"], "json": json_bytes({"key": r["key"]})}
                    for r in chunk
                ],
            )
    rejected = [
        {
            "key": f"{seed:02x}ff0001",
            "source": "file:///corpus/bad1.jpg",
            "status": "rejected",
            "reason": "too_small",
        },
        {
            "key": f"{seed:02x}ff0002",
            "source": "file:///corpus/bad2",
            "status": "rejected",
            "reason": "unreadable: x",
        },
    ]
    images = [{k: v for k, v in r.items() if k != "data"} for r in rows] + rejected
    manifests.ManifestWriter(root / "manifests" / "images", "images").write(images, "part-00000")
    captions = [
        {"key": r["key"], "caption": f"a square of coloured noise, {i}", "captioner": VLM, "prompt": "describe",
         "num_tokens": 9, "status": "kept"}
        for i, r in enumerate(rows)
        if i % 4 != 3
    ]  # fmt: skip
    captions.append(
        {"key": rows[0]["key"], "caption": None, "captioner": "zz-other", "prompt": "describe",
         "status": "rejected", "reason": "repetition"}
    )  # fmt: skip
    manifests.ManifestWriter(root / "manifests" / "captions", "captions").write(captions, "part-00000")
    for i, r in enumerate(rows):
        r["caption_vlm"] = f"a square of coloured noise, {i}" if i % 4 != 3 else None
    return sorted(rows, key=lambda r: r["key"])
