"""The curation job's wiring: sources → scan + decode (Ray Data) → tiers → shards (Ray tasks) → manifest.

The stages it wires are pure functions in ``curation.stages``; this module is the only one here that
knows about Ray. Every listed input ends in the ``images`` manifest, kept or rejected with a reason.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from pathlib import Path

import fsspec
import pyarrow as pa
import ray

from curation import stages
from curation.config import CurationConfig, DecodeConfig, TierConfig
from curation.dedup import mark_exact_duplicates
from curation.sources import list_files
from manifests import IMAGES, ManifestWriter, Rejected, atomic_write_bytes
from manifests.io import COMMITTED_DIR
from manifests.schema import KEPT, REJECTED
from manifests.tars import extension_for, json_bytes, write_shard

log = logging.getLogger(__name__)

SHARDS_DIR = "shards/curated"
IMAGES_DIR = "manifests/images"
SAMPLE_JSON_FIELDS = ("key", "width", "height", "format", "tier", "caption_orig", "source", "sha256")


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (set by `ray job submit`), else start Ray in-process."""
    if not ray.is_initialized():
        ray.init(log_to_driver=False, configure_logging=False)


class ScanAndDecode:
    """Pass 1 (header only) and pass 2 (one reduced decode) over a batch of source records.

    One open per file: the header is parsed lazily; only rows that survive it are read whole, hashed
    and decoded. Only manifest fields leave this stage, never pixels.
    """

    def __init__(self, tiers: TierConfig, decode: DecodeConfig) -> None:
        self.tiers = tiers
        self.decode = decode

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self.process(row) for row in batch.to_pylist()]
        return pa.Table.from_pylist(rows, schema=IMAGES)

    def process(self, record: dict) -> dict:
        row = {**record, "status": KEPT, "reason": None}
        try:
            fs, path = fsspec.core.url_to_fs(record["source"])
            num_bytes = fs.size(path)
            with fs.open(path, "rb") as f:
                header = stages.scan_header(f, num_bytes=num_bytes)
                if isinstance(header, Rejected):
                    return _reject(row, header)
                row.update(header)
                tier = stages.assign_tier(row["width"], row["height"], self.tiers)
                if isinstance(tier, Rejected):
                    return _reject(row, tier)
                row["tier"] = tier
                f.seek(0)
                data = f.read()
        except OSError as err:  # vanished or unreadable source: a per-row reason, not a failed block
            return _reject(row, Rejected(f"io_error: {stages.describe(err)}"))
        decoded = stages.reduced_decode(data, min_side=self.decode.min_side)
        if isinstance(decoded, Rejected):
            return _reject(row, decoded)
        row["sha256"] = stages.sha256(data)
        return row


def _reject(row: dict, rejected: Rejected) -> dict:
    return {**row, "status": REJECTED, "reason": rejected.reason, "tier": None}


def scan(records: list[dict], cfg: CurationConfig) -> pa.Table:
    """Run pass 1 + 2 over all records on Ray Data; returns manifest rows sorted by key."""
    if not records:
        return IMAGES.empty_table()
    ds = ray.data.from_items(records, override_num_blocks=max(1, min(len(records) // cfg.batch_size, 200)))
    # Stateless, so plain Ray tasks (an instance, not the class); the model-holding scorer uses actors.
    ds = ds.map_batches(
        ScanAndDecode(cfg.tiers, cfg.decode), batch_size=cfg.batch_size, batch_format="pyarrow"
    )
    table = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    return table.sort_by("key")


def plan_shards(kept: list[dict], samples_per_shard: int) -> list[dict]:
    """Deterministic shard plan: per tier, rows sorted by key, cut every ``samples_per_shard``."""
    plans = []
    for tier in sorted({r["tier"] for r in kept}):
        rows = sorted((r for r in kept if r["tier"] == tier), key=lambda r: r["key"])
        for index, start in enumerate(range(0, len(rows), samples_per_shard)):
            plans.append(
                {
                    "shard": f"{SHARDS_DIR}/{tier}/{tier}-{index:06d}.tar",
                    "rows": rows[start : start + samples_per_shard],
                }
            )
    return plans


@ray.remote
def _write_shard_task(root: str, plan: dict) -> bool:
    """Read each row's original bytes and write the shard; the bytes must still hash as scanned."""
    samples = []
    for row in plan["rows"]:
        with fsspec.open(row["source"], "rb") as f:
            data = f.read()
        if stages.sha256(data) != row["sha256"]:
            raise ValueError(f"source changed between scan and shard write: {row['source']}")
        samples.append(
            {
                "__key__": row["key"],
                extension_for(row["format"]): data,
                "json": json_bytes({f: row[f] for f in SAMPLE_JSON_FIELDS}),
            }
        )
    return write_shard(Path(root) / plan["shard"], samples)


def write_manifest(table: pa.Table, root: Path, rows_per_part: int) -> list[Path]:
    """Write the ``images`` manifest as deterministic parts and drop stale parts of a larger earlier run."""
    writer = ManifestWriter(root / IMAGES_DIR, "images")
    num_parts = max(1, -(-table.num_rows // rows_per_part))
    paths = [
        writer.write(table.slice(i * rows_per_part, rows_per_part), f"part-{i:05d}") for i in range(num_parts)
    ]
    for stale in sorted(writer.directory.glob("part-*.parquet"))[num_parts:]:
        (writer.directory / COMMITTED_DIR / stale.stem).unlink(missing_ok=True)
        stale.unlink()
    return paths


def run(cfg: CurationConfig) -> dict:
    """Run the whole curation job; returns the summary that is also written to the run folder."""
    started = time.time()
    root = Path(cfg.output)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(root / "curation_config.json", json.dumps(dataclasses.asdict(cfg), indent=2).encode())
    init_ray()

    records = list_files(cfg.inputs)
    log.info("curation: %d inputs", len(records))
    table = scan(records, cfg)
    assert table.num_rows == len(records), "every input must produce exactly one manifest row"

    rows = mark_exact_duplicates(table.to_pylist())
    table = pa.Table.from_pylist(rows, schema=IMAGES)
    kept = [r for r in rows if r["status"] == KEPT]
    plans = plan_shards(kept, cfg.shards.samples_per_shard)
    written = ray.get([_write_shard_task.remote(str(root), plan) for plan in plans])
    shard_of = {r["key"]: plan["shard"] for plan in plans for r in plan["rows"]}
    table = table.set_column(
        IMAGES.get_field_index("shard"),
        "shard",
        pa.array([shard_of.get(k) for k in table.column("key").to_pylist()], pa.string()),
    )
    write_manifest(table, root, cfg.manifest_rows_per_part)

    summary = {
        "inputs": len(rows),
        "kept": len(kept),
        "kept_per_tier": dict(sorted(Counter(r["tier"] for r in kept).items())),
        "rejected_per_reason": dict(
            sorted(Counter(r["reason"].split(":")[0] for r in rows if r["status"] == REJECTED).items())
        ),
        "shards": len(plans),
        "shards_written": sum(written),
        "seconds": round(time.time() - started, 2),
        "output": str(root),
    }
    atomic_write_bytes(root / "curation_summary.json", json.dumps(summary, indent=2).encode())
    return summary
