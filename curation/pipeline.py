"""The curation job's wiring: sources → scan + decode (Ray tasks) → aesthetic (Ray actor pool) → committed
work chunks → aesthetic thresholds → global dedup → shards (Ray tasks) → ``images`` manifest → report.

The stages it wires are pure functions in ``curation.stages`` and callable classes; this module is the
only one here that knows about Ray. Every listed input ends in the ``images`` manifest, kept or
rejected with a reason.

Resume: scan + score results are committed per chunk of ``chunk_size`` inputs (sorted by key) under
``work/``; a rerun skips committed chunks, and every later step is a deterministic function of them, so
a run killed at any point and rerun produces the same manifest and the same shard bytes as a clean run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from curation import stages
from curation.aesthetic import CLIP_INPUT, EMBEDDING, AestheticScorer, clip_image_size, clip_model_id
from curation.config import CurationConfig, DecodeConfig, TierConfig
from curation.dedup import mark_duplicates
from curation.report import write_report
from curation.sources import io_rejection, list_sources, open_source, read_bytes
from manifests import IMAGES, ManifestWriter, Rejected, atomic_write_bytes
from manifests.cards import write_curated_card
from manifests.io import is_committed, unmark_committed
from manifests.progress import ProgressLog
from manifests.schema import KEPT, REJECTED
from manifests.tars import extension_for, json_bytes, write_shard

log = logging.getLogger(__name__)

SHARDS_DIR = "shards/curated"
IMAGES_DIR = "manifests/images"
EMBEDDINGS_DIR = "manifests/clip_embeddings"
DOWNLOADS_DIR = "downloads"
WORK_DIR = "work"
SAMPLE_JSON_FIELDS = (
    "key", "width", "height", "format", "tier", "aesthetic", "caption_orig", "source", "url", "sha256",
)  # fmt: skip

# What the driver hands to the scan tasks: the source record (see curation.sources).
RECORDS = pa.schema(
    [
        ("key", pa.string()), ("source", pa.string()), ("caption_orig", pa.string()), ("url", pa.string()),
        ("source_key", pa.string()), ("source_meta", pa.string()), ("download_status", pa.string()),
        ("reason", pa.string()), ("tar_offset", pa.int64()), ("tar_size", pa.int64()), ("data", pa.binary()),
    ]
)  # fmt: skip
# What the scan tasks hand to the scorer actors: manifest columns + the CLIP thumbnail (≤ 150 KB).
SCANNED = pa.schema([*IMAGES, pa.field(CLIP_INPUT, pa.binary())])


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (set by `ray job submit`), else start Ray in-process."""
    if not ray.is_initialized():
        ray.init(log_to_driver=False, configure_logging=False)


class ScanAndDecode:
    """Pass 1 (header only) and pass 2 (one reduced decode) over a batch of source records.

    One open per file: the header is parsed lazily; only rows that survive it are read whole, hashed
    and decoded once. From that decode come the pHash and the CLIP thumbnail; no full-size pixels leave.
    """

    def __init__(self, tiers: TierConfig, decode: DecodeConfig, *, clip_size: int) -> None:
        if decode.min_side < clip_size:
            raise ValueError(f"decode.min_side ({decode.min_side}) must be ≥ the CLIP input ({clip_size})")
        self.tiers = tiers
        self.decode = decode
        self.clip_size = clip_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist([self.process_or_reject(r) for r in batch.to_pylist()], schema=SCANNED)

    def process_or_reject(self, record: dict) -> dict:
        """``process``, with any unexpected per-row failure (a decoder bug on one odd file) turned into
        ``internal_error: …`` for that row: the row is kept in the manifest and the block never fails."""
        try:
            return self.process(record)
        except Exception as err:  # noqa: BLE001 — per-sample, turned into a reason, logged with its traceback
            log.exception("row %s (%s) failed", record.get("key"), record.get("source"))
            row = {name: record.get(name) for name in IMAGES.names}
            return _reject(row, Rejected(f"internal_error: {stages.describe(err)}"))

    def process(self, record: dict) -> dict:
        row = {name: record.get(name) for name in IMAGES.names} | {"status": KEPT, "reason": None}
        if record.get("reason"):  # rejected before we saw it (a failed download)
            return _reject(row, Rejected(record["reason"]))
        try:
            f, num_bytes = open_source(record)
            with f:
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
        except OSError as err:  # vanished, unreadable or not a regular file: a per-row reason
            return _reject(row, io_rejection(err))
        decoded = stages.reduced_decode(data, min_side=self.decode.min_side)
        if isinstance(decoded, Rejected):
            return _reject(row, decoded)
        row["sha256"] = stages.sha256(data)
        row["phash"] = stages.phash(decoded)
        row[CLIP_INPUT] = stages.clip_thumbnail(decoded, self.clip_size).tobytes()
        return row


def _reject(row: dict, rejected: Rejected) -> dict:
    return {**row, "status": REJECTED, "reason": rejected.reason, "tier": None, CLIP_INPUT: None}


def work_dir(root: Path, cfg: CurationConfig) -> Path:
    """Committed scan + score chunks live under a name derived from every setting that shapes them."""
    shaping = {
        "tiers": dataclasses.asdict(cfg.tiers),
        "decode": dataclasses.asdict(cfg.decode),
        "clip": clip_model_id(cfg.aesthetic),
        "head": Path(cfg.aesthetic.head).name,
        "chunk_size": cfg.chunk_size,
        "batch_size": cfg.aesthetic.batch_size,  # scores depend on the batch (see _dataset)
    }
    digest = hashlib.blake2b(json.dumps(shaping, sort_keys=True).encode(), digest_size=6).hexdigest()
    return root / WORK_DIR / f"scored-{digest}"


def _committed_chunk(directory: Path, part: str, keys: list[str]) -> pa.Table | None:
    """The committed chunk ``part`` if it holds exactly ``keys`` (inputs may have changed since)."""
    if not is_committed(directory, part):
        return None
    table = pq.read_table(directory / f"{part}.parquet")
    return table if table.column("key").to_pylist() == keys else None


def scan_and_score(records: list[dict], cfg: CurationConfig, root: Path) -> pa.Table:
    """Pass 1 + 2 and the aesthetic score over all records, committed per chunk; rows sorted by key."""
    chunks_dir = work_dir(root, cfg)
    chunks = [records[i : i + cfg.chunk_size] for i in range(0, len(records), cfg.chunk_size)]
    parts = [f"chunk-{i:06d}" for i in range(len(chunks))]
    done: dict[int, pa.Table] = {}
    for i, chunk in enumerate(chunks):
        table = _committed_chunk(chunks_dir, parts[i], [r["key"] for r in chunk])
        embeddings_ok = not cfg.aesthetic.save_embeddings or is_committed(root / EMBEDDINGS_DIR, parts[i])
        if table is not None and embeddings_ok:
            done[i] = table
    pending = [i for i in range(len(chunks)) if i not in done]
    log.info("scan + score: %d chunks committed, %d to do", len(done), len(pending))
    if pending:
        done.update(_run_chunks([chunks[i] for i in pending], pending, parts, cfg, root, chunks_dir))
    if not done:
        return IMAGES.empty_table()
    return pa.concat_tables([done[i] for i in sorted(done)]).sort_by("key")


def _dataset(chunks: list[list[dict]], cfg: CurationConfig) -> ray.data.Dataset:
    """The Ray Data pipeline: scan tasks, then the scorer actor pool, resources from config.

    Blocks are fixed slices of ``aesthetic.batch_size`` rows within each chunk, and both stages take a
    whole block as their batch: a CLIP forward's float result depends on its batch, so a chunk scored
    in a rerun must see exactly the batches a clean run would have.
    """
    size = cfg.aesthetic.batch_size
    blocks = [
        pa.Table.from_pylist(chunk[i : i + size], schema=RECORDS)
        for chunk in chunks
        for i in range(0, len(chunk), size)
    ]
    ds = ray.data.from_arrow(blocks)
    # Stateless, so plain Ray tasks (an instance, not the class).
    clip_size = clip_image_size(cfg.aesthetic.clip_model)
    # Retries are Ray Data's defaults (a task whose worker died is retried; passing max_retries is
    # deprecated). The declared memory, the worst-case decode (RGB at tiers.max_pixels), also keeps the scan
    # in its own task pool: Ray fuses a task stage into the next actor pool when their settings match.
    ds = ds.map_batches(
        ScanAndDecode(cfg.tiers, cfg.decode, clip_size=clip_size),
        batch_size=None,
        batch_format="pyarrow",
        memory=3 * cfg.tiers.max_pixels,
    )
    score = cfg.aesthetic
    return ds.map_batches(
        AestheticScorer,
        fn_constructor_kwargs={"cfg": score},
        compute=ray.data.ActorPoolStrategy(size=score.num_actors),
        num_gpus=score.num_gpus,
        num_cpus=score.num_cpus,
        batch_size=None,
        batch_format="pyarrow",
    )  # a crashed actor is replaced and its batch retried: Ray Data's defaults (max_restarts=-1)


def _run_chunks(
    chunks: list[list[dict]], indices: list[int], parts: list[str], cfg: CurationConfig, root: Path, out: Path
) -> dict[int, pa.Table]:
    """Stream all pending chunks through one dataset; commit each chunk as soon as its rows are back."""
    chunk_of = {r["key"]: i for i, chunk in zip(indices, chunks, strict=True) for r in chunk}
    expected = {i: len(chunk) for i, chunk in zip(indices, chunks, strict=True)}
    buffers: dict[int, list[pa.Table]] = {i: [] for i in indices}
    counts = Counter()
    written: dict[int, pa.Table] = {}
    writer = ManifestWriter(out, "images")
    progress = ProgressLog("scan + score", sum(expected.values()), logger=log)  # rate and ETA every 30 s
    for batch in _dataset(chunks, cfg).iter_batches(batch_format="pyarrow", batch_size=None):
        progress.update(batch.num_rows)
        owner = [chunk_of[k] for k in batch.column("key").to_pylist()]
        for i in sorted(set(owner)):
            mask = pa.array([o == i for o in owner])
            buffers[i].append(batch.filter(mask))
            counts[i] += buffers[i][-1].num_rows
            if counts[i] == expected[i]:
                written[i] = _commit_chunk(
                    pa.concat_tables(buffers.pop(i)).sort_by("key"), parts[i], writer, root
                )
    assert len(written) == len(indices), "every pending chunk must come back whole"
    return written


def _commit_chunk(table: pa.Table, part: str, writer: ManifestWriter, root: Path) -> pa.Table:
    """Embeddings first, then the chunk itself: a committed chunk implies its embeddings exist."""
    if EMBEDDING in table.column_names:
        scored = table.filter(pc.is_valid(table.column("aesthetic")))
        embeddings = scored.select(["key", "clip_model", EMBEDDING])
        ManifestWriter(root / EMBEDDINGS_DIR, "clip_embeddings").write(embeddings, part)
        table = table.drop_columns([EMBEDDING])
    writer.write(table, part)
    return pq.read_table(writer.path(part))


def apply_aesthetic_thresholds(rows: list[dict], min_score: dict[str, float]) -> list[dict]:
    """Kept rows below their tier's threshold become ``low_aesthetic`` rejections."""
    out = []
    for row in rows:
        if row["status"] == KEPT:
            assert row["aesthetic"] is not None, f"kept row {row['key']} was never scored"
            gate = stages.aesthetic_gate(row["tier"], row["aesthetic"], min_score)
            if isinstance(gate, Rejected):
                row = {**row, "status": REJECTED, "reason": gate.reason, "tier": None}
        out.append(row)
    return out


def plan_shards(kept: list[dict], samples_per_shard: int) -> list[dict]:
    """Deterministic shard plan: per tier and image format, rows sorted by key, cut every ``samples_per_shard``.

    One format per shard keeps every sample of a shard with the same members (``<key>.jpg`` + ``<key>.json``),
    which HF ``datasets``' WebDataset loader requires; WebDataset readers do not care either way.
    """
    plans = []
    groups = sorted({(r["tier"], extension_for(r["format"])) for r in kept})
    for tier, ext in groups:
        rows = sorted(
            (r for r in kept if (r["tier"], extension_for(r["format"])) == (tier, ext)),
            key=lambda r: r["key"],
        )
        for index, start in enumerate(range(0, len(rows), samples_per_shard)):
            plans.append(
                {
                    "shard": f"{SHARDS_DIR}/{tier}/{tier}-{ext}-{index:06d}.tar",
                    "rows": rows[start : start + samples_per_shard],
                }
            )
    return plans


def write_shard_plan(root: str, plan: dict) -> bool:
    """Read each row's original bytes and write the shard; the bytes must still hash as scanned."""
    samples = []
    for row in plan["rows"]:
        data = read_bytes(row)
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


_write_shard_task = ray.remote(max_retries=3)(write_shard_plan)


def _pending_plans(plans: list[dict], records: list[dict], root: Path) -> list[dict]:
    """Uncommitted shard plans, each row joined with how to read its bytes (tar range, inline data)."""
    how_to_read = {r["key"]: {f: r.get(f) for f in ("tar_offset", "tar_size", "data")} for r in records}
    todo = [p for p in plans if not is_committed((root / p["shard"]).parent, Path(p["shard"]).name)]
    return [{**plan, "rows": [{**row, **how_to_read[row["key"]]} for row in plan["rows"]]} for plan in todo]


def write_shards(plans: list[dict], records: list[dict], root: Path) -> int:
    """Write every uncommitted shard as a Ray task; returns how many were written now."""
    return sum(
        ray.get([_write_shard_task.remote(str(root), p) for p in _pending_plans(plans, records, root)])
    )


def write_shards_local(plans: list[dict], records: list[dict], root: Path) -> int:
    """The same shard writes in this process (benchmarks, debugging)."""
    return sum(write_shard_plan(str(root), p) for p in _pending_plans(plans, records, root))


def write_manifest(table: pa.Table, root: Path, rows_per_part: int) -> list[Path]:
    """Write the ``images`` manifest as deterministic parts and drop stale parts of a larger earlier run."""
    writer = ManifestWriter(root / IMAGES_DIR, "images")
    num_parts = max(1, -(-table.num_rows // rows_per_part))
    paths = [
        writer.write(table.slice(i * rows_per_part, rows_per_part), f"part-{i:05d}") for i in range(num_parts)
    ]
    for stale in sorted(writer.directory.glob("part-*.parquet"))[num_parts:]:
        unmark_committed(writer.directory, stale.stem)
        stale.unlink()
    return paths


def remove_stale_temporaries(root: Path) -> int:
    """Delete temporary files a killed run left behind (hidden ``.*.tmp``; never visible as parts)."""
    stale = [p for p in root.rglob(".*.tmp") if p.is_file()]
    for path in stale:
        path.unlink()
    return len(stale)


def summarize(rows: list[dict], *, num_shards: int, shards_written: int, started: float, root: Path) -> dict:
    """The run's counts: inputs, kept per tier, rejected per reason (the part before the colon)."""
    kept = [r for r in rows if r["status"] == KEPT]
    return {
        "inputs": len(rows),
        "kept": len(kept),
        "kept_per_tier": dict(sorted(Counter(r["tier"] for r in kept).items())),
        "rejected_per_reason": dict(
            sorted(Counter(r["reason"].split(":")[0] for r in rows if r["status"] == REJECTED).items())
        ),
        "shards": num_shards,
        "shards_written": shards_written,
        "seconds": round(time.time() - started, 2),
        "output": str(root),
    }


def run(cfg: CurationConfig) -> dict:
    """Run the whole curation job; returns the summary that is also written to the run folder."""
    started = time.time()
    root = Path(cfg.output)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(root / "curation_config.json", json.dumps(dataclasses.asdict(cfg), indent=2).encode())
    if removed := remove_stale_temporaries(root):
        log.info("removed %d temporary files of an interrupted run", removed)
    init_ray()

    records = list_sources(cfg.inputs, download_dir=root / DOWNLOADS_DIR, download=cfg.download)
    log.info("curation: %d inputs", len(records))
    table = scan_and_score(records, cfg, root)
    assert table.num_rows == len(records), "every input must produce exactly one manifest row"

    rows = apply_aesthetic_thresholds(table.to_pylist(), cfg.aesthetic.min_score)
    rows = mark_duplicates(rows, max_hamming=cfg.dedup.max_hamming)
    kept = [r for r in rows if r["status"] == KEPT]
    plans = plan_shards(kept, cfg.shards.samples_per_shard)
    shards_written = write_shards(plans, records, root)
    shard_of = {r["key"]: plan["shard"] for plan in plans for r in plan["rows"]}
    rows = [{**r, "shard": shard_of.get(r["key"])} for r in rows]
    write_manifest(pa.Table.from_pylist(rows, schema=IMAGES), root, cfg.manifest_rows_per_part)

    if cfg.report:
        write_report(root)
    # Issue 11 (ootb): an HF dataset card beside the shards, so load_dataset(<run>/shards/curated, "4k")
    # loads every image format and JSON field of the tier.
    write_curated_card(root / SHARDS_DIR, json_fields=SAMPLE_JSON_FIELDS)
    summary = summarize(
        rows, num_shards=len(plans), shards_written=shards_written, started=started, root=root
    )
    atomic_write_bytes(root / "curation_summary.json", json.dumps(summary, indent=2).encode())
    return summary
