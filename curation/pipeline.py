"""The curation job's wiring: listing → chunks → scan + decode (Ray tasks) → aesthetic (Ray actors) →
committed chunks → thresholds, dedup, shard plan, shards, manifest (partitioned phases) → report.

The stages it wires are pure functions in ``curation.stages`` and callable classes; this module is the
only one here that knows about Ray (with ``curation.executor``). Every listed input ends in the ``images``
manifest, kept or rejected with a reason. The driver holds plans and counts, never rows: URL lists are
downloaded by shard tasks (``curation.downloads``), the listing is written by tasks (``curation.chunks``),
scan + score runs one task per chunk feeding plain scorer actors (``manifests.actors``), which commit each chunk
themselves (the driver's stream carries counts), and every later phase runs over partitions (``curation.phases``).

Resume: scan + score results are committed per chunk (a key range of ≤ ``chunk_size`` inputs, so the
chunks stay put when inputs are added) under ``work/``; a rerun skips committed chunks whose records are
unchanged, and every later phase is a deterministic function of them: a run killed at any point and rerun
produces the same manifest and the same shard bytes as a clean run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation import chunks as chunking
from curation import rundir, stages
from curation.aesthetic import (
    CLIP_INPUT,
    EMBEDDING,
    AestheticScorer,
    clip_image_size,
    clip_model_id,
    resolve_head,
    torch_threads,
)
from curation.auto import choose_executor
from curation.config import AestheticConfig, CurationConfig, DecodeConfig, TierConfig
from curation.executor import Executor, LocalExecutor, RayExecutor, peak_rss_mib, this_node
from curation.phases import (
    EMBEDDING_BYTES_PER_VALUE,
    HOW_TO_READ,
    MAX_EMBEDDING_DIM,
    ROW_BYTES,
    SAMPLE_JSON_FIELDS,
    SCORED,
    SHARDS_DIR,
    PostConfig,
    PostResult,
    ScoredPart,
    post_scoring,
    remove_stale_shards,
    task_memory,
)
from curation.sources import io_rejection, open_source, plan_listing
from manifests import IMAGES, ManifestWriter, Rejected, atomic_write_bytes
from manifests.actors import ActorSpec, run_on_actors
from manifests.cards import write_curated_card
from manifests.imageio import describe
from manifests.io import commit_parquet, migrate_markers, publish, temp_path, unmark_committed
from manifests.progress import ProgressLog
from manifests.schema import KEPT, REJECTED

log = logging.getLogger(__name__)

EMBEDDINGS_DIR = "manifests/clip_embeddings"
DOWNLOADS_DIR = "downloads"
WORK_DIR = "work"
SCRATCH_DIR = "work/run"  # this run's listing, records and phase files; removed when the run ends
WORK_LAYOUT = 2  # chunks are key ranges (curation.keyspace); part of the work-folder name
# What the scan tasks hand to the scorer actors: manifest columns + the CLIP thumbnail (≤ 150 KB).
SCANNED = pa.schema([*IMAGES, pa.field(CLIP_INPUT, pa.binary())])
# A scoring batch's thumbnails: a ViT-L/14 thumbnail is 150 KB, so 256 images are 38 MiB.
MAX_BATCH_BYTES = 64 * 1024**2
# A scan worker before it decodes anything (Python, pyarrow, PIL, the batch): ~170 MiB measured by Ray
# Data's memory issue detector on the demo; declared with headroom so the scheduler counts it.
SCAN_WORKER_BYTES = 256 * 1024**2
# The local executor's scanned batches waiting for the scorer: at most this many bytes of thumbnails (the scan
# processes run ahead while the scorer loads its model, ~6 s of imports on one core).
LOCAL_SCAN_AHEAD_BYTES = 512 * 1024**2
# The local scan processes' niceness: on a small job every batch waits for the scorer's model (open_clip's
# imports, seconds of one core), so its load, in this process, is the critical path; the scan yields it a core
# and takes every other cycle (after the load it is alone). Linux weighs nice within one session (autogroup), so
# this shares the job's CPU differently, it does not hand it to other users' jobs.
LOCAL_SCAN_NICE = 10


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (set by `ray job submit`), else start Ray in-process."""
    import ray

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
            return _reject(row, Rejected(f"internal_error: {describe(err)}"))

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
        "batch_size": cfg.aesthetic.batch_size,  # scores depend on the batch (see ScoreBatches)
        "layout": WORK_LAYOUT,
    }
    digest = hashlib.blake2b(json.dumps(shaping, sort_keys=True).encode(), digest_size=6).hexdigest()
    return root / WORK_DIR / f"scored-{digest}"


# ----------------------------------------------------------------------------------------------------
# Listing and chunks


def list_inputs(cfg: CurationConfig, root: Path, scratch: Path, executor: Executor) -> tuple[str, int]:
    """List every input in partitions, then one record per key sorted into ``records.parquet``."""
    excluded = rundir.excluded_folders(cfg.inputs, root)
    units = plan_listing(
        cfg.inputs,
        download_dir=root / DOWNLOADS_DIR,
        download=cfg.download,
        excluded=excluded,
        executor=executor,
    )
    tasks = [
        {
            "unit": unit,
            "index": i,
            "out": str(scratch / "listing" / f"unit-{i:06d}.parquet"),
            "excluded": excluded,
        }
        for i, unit in enumerate(units)
    ]
    # memory:// inputs exist in this process only.
    counts = LocalExecutor().map(chunking.write_listing_unit, [t for t in tasks if t["unit"].in_driver])
    remote = [t for t in tasks if not t["unit"].in_driver]
    counts += executor.map(chunking.write_listing_unit, remote, memory=chunking.LISTING_TASK_BYTES)
    log.info("listing: %d units, %d records", len(units), sum(counts))
    records = str(scratch / "records.parquet")
    if not units:
        pq.write_table(chunking.RECORDS.empty_table(), records)
        return records, 0
    sort = {"listing": [t["out"] for t in tasks], "out": records, "temp": str(scratch / "duckdb")}
    return records, executor.map(chunking.sort_records, [sort], memory=chunking.SORT_TASK_BYTES)[0]


def plan_work(
    cfg: CurationConfig, records: str, num_records: int, scored: Path, scratch: Path, executor: Executor
) -> list[chunking.Chunk]:
    """Chunk ranges over the records; which are pending; pending chunks' records files."""
    ranges = chunking.plan_chunks(records, num_records, cfg.chunk_size, executor)
    common = {
        "records": records,
        "scored": str(scored),
        "embeddings": str(Path(cfg.output) / EMBEDDINGS_DIR) if cfg.aesthetic.save_embeddings else None,
        "chunks": str(scratch / "chunks"),
        "batch_size": cfg.aesthetic.batch_size,
        "chunk_size": cfg.chunk_size,
    }
    tasks = chunking.chunk_tasks(ranges, cfg.manifest_rows_per_part, common)
    # A split task reads its ranges' records at once: at most chunk_size keys per range.
    largest = max((len(t["ranges"]) for t in tasks), default=0) * cfg.chunk_size
    memory = task_memory(min(largest, num_records), chunking.RECORD_BYTES)
    return [chunking.Chunk(**c) for r in executor.map(chunking.split_chunks, tasks, memory=memory) for c in r]


# ----------------------------------------------------------------------------------------------------
# Scan + score


@dataclass(frozen=True)
class ChunkWork:
    """One pending chunk as the workers see it: its records file (row group ``j`` is scoring batch ``j``)."""

    name: str
    records: str
    num_rows: int
    digest: str  # of its records, kept in the commit marker (see curation.chunks.split_chunks)


@dataclass(frozen=True)
class CommitTarget:
    """Where workers put scored rows: scored batch parts (scratch), then committed chunks and embeddings."""

    scored: str  # the work folder (``work_dir``)
    embeddings: str | None  # manifests/clip_embeddings, when embeddings are kept
    batches: str  # scratch: <chunk>/<batch>.parquet, the scored batches of chunks not yet whole
    batch_size: int

    def num_batches(self, work: ChunkWork) -> int:
        return -(-work.num_rows // self.batch_size)

    def is_committed(self, work: ChunkWork) -> bool:
        """Committed from ``work``'s records: a marker from other records (the chunk's key range gained or
        lost inputs) is an older commit, not this one (the digest is in both markers: ``commit_chunk``)."""
        folders = [self.scored] + ([self.embeddings] if self.embeddings is not None else [])
        return all(chunking.committed_digest(Path(f), work.name) == work.digest for f in folders)

    def unmark(self, work: ChunkWork) -> None:
        """Forget an older commit of ``work``'s chunk before it is scored again."""
        unmark_committed(self.scored, work.name)
        if self.embeddings is not None:
            unmark_committed(self.embeddings, work.name)


@dataclass(frozen=True)
class ChunkPlan:
    """The pending chunks (a few fields each, never their rows) and where their results go."""

    works: tuple[ChunkWork, ...]
    target: CommitTarget


def chunk_plan(pending: list[chunking.Chunk], cfg: CurationConfig, root: Path, scratch: Path) -> ChunkPlan:
    """The plan the scan tasks and scorer actors share (built on the driver from chunk counts)."""
    embeddings = str(root / EMBEDDINGS_DIR) if cfg.aesthetic.save_embeddings else None
    return ChunkPlan(
        works=tuple(
            ChunkWork(c.name, str(scratch / "chunks" / f"{c.name}.parquet"), c.num_rows, c.digest)
            for c in pending
        ),
        target=CommitTarget(
            scored=str(work_dir(root, cfg)),
            embeddings=embeddings,
            batches=str(scratch / "batches"),
            batch_size=cfg.aesthetic.batch_size,
        ),
    )


@dataclass(frozen=True)
class ScannedBatch:
    """What a scan task yields per scoring batch: the batch as a whole (one object, never sliced: a CLIP forward
    must see the batch a clean run saw), its chunk and its place in it."""

    work: ChunkWork
    batch: int
    scanned: pa.Table  # SCANNED + HOW_TO_READ (how to read each row's bytes again, for the shard writer)


@dataclass(frozen=True)
class BatchCount:
    """What a scorer returns per scored batch: counts, never rows (a retried call may send one twice)."""

    chunk: str
    batch: int
    num_rows: int
    committed: bool


class ScanChunk:
    """Scan tasks, one per chunk (``chunk_size`` inputs): each of its scoring batches (a row group of its records
    file) through ``ScanAndDecode``, yielded as one ``ScannedBatch``."""

    def __init__(
        self, tiers: TierConfig, decode: DecodeConfig, *, clip_size: int, guard: rundir.RunGuard | None = None
    ) -> None:
        self.scan = ScanAndDecode(tiers, decode, clip_size=clip_size)
        self.guard = guard  # checked on the worker: this node sees the run folder

    def __call__(self, work: ChunkWork) -> Iterator[ScannedBatch]:
        if self.guard is not None:
            self.guard.verify(node=this_node())
        records = pq.ParquetFile(work.records)
        for batch in range(records.num_row_groups):
            yield ScannedBatch(work, batch, self.scan_batch(records.read_row_group(batch)))

    def one_batch(self, work: ChunkWork, batch: int) -> ScannedBatch:
        """Scoring batch ``batch`` of ``work`` alone (the local executor's scan processes)."""
        return ScannedBatch(work, batch, self.scan_batch(pq.ParquetFile(work.records).read_row_group(batch)))

    def scan_batch(self, records: pa.Table) -> pa.Table:
        scanned = self.scan(records)
        for field in HOW_TO_READ:
            scanned = scanned.append_column(field, records[field.name])
        return scanned


class ScoreAndCommit:
    """Scorer actors: one forward per scoring batch; each scored batch is written to the scratch folder, and the
    worker that completes a chunk commits it. Returns counts only (``BatchCount``).

    A CLIP forward's floats depend on the batch it runs in, so a chunk rescored after a kill must see exactly
    the batches a clean run saw: a scan task yields each batch whole, and its size is checked here. A call is
    idempotent (atomic writes of the same rows; the commit is claimed once), so a lost actor's calls are retried.
    """

    def __init__(
        self,
        cfg: AestheticConfig,
        target: CommitTarget,
        guard: rundir.RunGuard | None = None,
        *,
        scorer: AestheticScorer | None = None,
    ) -> None:
        # The local executor hands in its scorer, loading since the job's start; an actor loads its own.
        self.scorer = scorer if scorer is not None else AestheticScorer(cfg)
        self.target = target
        self.guard = guard  # this actor writes scored batches and commits chunks into the run folder

    def __call__(self, item: ScannedBatch) -> BatchCount:
        if self.guard is not None:
            self.guard.verify(node=this_node())
        work, batch, scanned, target = item.work, item.batch, item.scanned, self.target
        expected = min(target.batch_size, work.num_rows - batch * target.batch_size)
        if scanned.num_rows != expected:
            raise RuntimeError(f"{work.name} batch {batch}: {scanned.num_rows} rows, not {expected}")
        scored = self.scorer(scanned)
        columns = SCORED.names + ([EMBEDDING] if EMBEDDING in scored.column_names else [])
        write_scored_batch(scored.select(columns), work, batch, target)
        return BatchCount(work.name, batch, scanned.num_rows, commit_if_whole(work, target))


def _batch_folder(work: ChunkWork, target: CommitTarget) -> Path:
    return Path(target.batches) / work.name


def write_scored_batch(table: pa.Table, work: ChunkWork, batch: int, target: CommitTarget) -> None:
    """One scored batch, written atomically (a retried task rewrites the same bytes)."""
    folder = _batch_folder(work, target)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{batch:06d}.parquet"
    tmp = temp_path(path)
    try:
        pq.write_table(table, tmp, compression="lz4")
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def commit_if_whole(work: ChunkWork, target: CommitTarget) -> bool:
    """Commit ``work``'s chunk when all its scored batches are written and this worker is the first to see it.

    Whoever writes a chunk's last batch sees every batch (the others were written before it looked), so some
    worker always claims it; the claim (an exclusive create) keeps two from committing at once. A chunk left
    unclaimed (a listing that lagged on a network file system) is committed by ``commit_chunks`` at the end.
    """
    folder = _batch_folder(work, target)
    if len(list(folder.glob("*.parquet"))) < target.num_batches(work):
        return False
    try:
        os.close(os.open(folder / ".claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    commit_batches(work, target)
    return True


def commit_batches(work: ChunkWork, target: CommitTarget) -> int:
    """Task: a chunk's scored batches, read back, sorted by key and committed (``commit_chunk``). Returns rows."""
    paths = [_batch_folder(work, target) / f"{b:06d}.parquet" for b in range(target.num_batches(work))]
    table = pa.concat_tables([pq.read_table(p) for p in paths]).sort_by("key")
    if table.num_rows != work.num_rows:
        raise RuntimeError(f"{work.name}: {table.num_rows} scored rows, expected {work.num_rows}")
    commit_chunk(table, work, target)
    return table.num_rows


def commit_chunk(table: pa.Table, work: ChunkWork, target: CommitTarget) -> None:
    """Embeddings first, then the chunk itself: a committed chunk implies its embeddings exist."""
    if target.embeddings is not None:
        scored = table.filter(pc.is_valid(table["aesthetic"]))
        embeddings = scored.select(["key", "clip_model", EMBEDDING])
        ManifestWriter(target.embeddings, "clip_embeddings").write(
            embeddings, work.name, {"records_digest": work.digest}
        )
    table = table.select(SCORED.names).cast(SCORED)
    Path(target.scored).mkdir(parents=True, exist_ok=True)
    commit_parquet(table, target.scored, work.name, {"records_digest": work.digest})


def scan_chunk(work: ChunkWork, scan: ScanChunk) -> Iterator[ScannedBatch]:
    """Ray task (a streaming generator): one chunk's scoring batches, scanned."""
    yield from scan(work)


def scorers(target: CommitTarget, cfg: CurationConfig, guard: rundir.RunGuard | None = None) -> ActorSpec:
    """The scorer actors: configs, the commit target and the guard are their only constructor arguments (never
    the chunk plan: it grows with the run, and Ray would put it in the object store, see manifests.actors)."""
    score = cfg.aesthetic
    return ActorSpec(
        ScoreAndCommit, {"cfg": score, "target": target, "guard": guard},
        num_actors=score.num_actors, num_cpus=score.num_cpus, num_gpus=score.num_gpus,
    )  # fmt: skip


def _scan_on_ray(
    plan: ChunkPlan, cfg: CurationConfig, clip_size: int, guard: rundir.RunGuard | None = None
) -> Iterator[BatchCount]:
    """One scan task per chunk feeding the scorer actors, which commit (``manifests.actors.run_on_actors``)."""
    import ray

    # The declared memory: a scan worker's own footprint, the worst-case decode (RGB at tiers.max_pixels) and the
    # batches it holds (the one it scans, READ_BACKPRESSURE ones waiting for the driver). A task whose worker
    # died is retried (Ray's default for tasks; a streaming task resends only what the driver has not taken).
    memory = SCAN_WORKER_BYTES + 3 * cfg.tiers.max_pixels + 3 * MAX_BATCH_BYTES
    # As many scan tasks as the cluster has CPUs (what Ray Data ran), each holding a few batches at most.
    reads_ahead = max(1, int(ray.cluster_resources().get("CPU", 1)))
    scan = ScanChunk(cfg.tiers, cfg.decode, clip_size=clip_size, guard=guard)
    yield from run_on_actors(
        scorers(plan.target, cfg, guard), plan.works,
        read=scan_chunk, read_args=(scan,), read_resources={"memory": memory}, reads_ahead=reads_ahead,
    )  # fmt: skip


def local_scan_processes(cfg: CurationConfig) -> int:
    """How many scan processes the local executor starts (``cfg.local_scan_processes``; 0: one per core)."""
    return cfg.local_scan_processes or len(os.sched_getaffinity(0))


def load_scorer_in_background(cfg: AestheticConfig) -> Future[AestheticScorer]:
    """The local executor's scorer, loaded by a thread from the job's start (issue 18, item 8): open_clip's
    imports (torch, torchvision, transformers, timm: seconds of one core, the longest step of a small job) overlap
    the listing, the chunk plan and the scan pool's start, whose DuckDB, file and forkserver waits release the
    GIL. Only the load runs there; every forward runs in the thread that scores (``_scan_local``)."""
    loader = ThreadPoolExecutor(1, thread_name_prefix="scorer-load")
    try:
        return loader.submit(AestheticScorer, cfg)
    finally:
        loader.shutdown(wait=False)  # the thread ends with its one load


def _scan_local(
    plan: ChunkPlan, cfg: CurationConfig, clip_size: int, scorer: Future[AestheticScorer]
) -> Iterator[BatchCount]:
    """The same stages as on Ray, without it: batches scanned by a pool of processes (one per core) that starts
    while ``scorer`` loads, so model load and scan overlap; scored and committed in order, here. With one process
    (``local_scan_processes=1``) every batch is scanned in this process instead."""
    scan = ScanChunk(cfg.tiers, cfg.decode, clip_size=clip_size)
    items = [(work, b) for work in plan.works for b in range(plan.target.num_batches(work))]
    num_processes = min(local_scan_processes(cfg), len(items))
    if num_processes <= 1:
        loaded = scorer.result()
        with torch_threads(int(cfg.aesthetic.num_cpus)):  # as in a Ray actor with that many CPUs
            score = ScoreAndCommit(cfg.aesthetic, plan.target, scorer=loaded)
            yield from (score(scan.one_batch(work, b)) for work, b in items)
        return
    batch_bytes = clip_size * clip_size * 3 * cfg.aesthetic.batch_size
    ahead = max(2 * num_processes, LOCAL_SCAN_AHEAD_BYTES // batch_bytes)
    # forkserver: fresh workers that import what the scan needs; never a fork of a process whose DuckDB,
    # Arrow or torch threads may hold a lock. Started before this thread touches torch: the scan is not delayed
    # by torch's import.
    pool = ProcessPoolExecutor(
        num_processes, mp_context=get_context("forkserver"), initializer=os.nice, initargs=(LOCAL_SCAN_NICE,)
    )
    try:
        todo, pending = iter(items), deque[Future]()

        def submit() -> None:
            for work, b in todo:
                pending.append(pool.submit(scan.one_batch, work, b))
                if len(pending) >= ahead:
                    return

        submit()
        loaded = scorer.result()  # loading while the pool scans
        with torch_threads(int(cfg.aesthetic.num_cpus)):  # as in a Ray actor with that many CPUs
            score = ScoreAndCommit(cfg.aesthetic, plan.target, scorer=loaded)
            while pending:
                scanned = pending.popleft().result()
                submit()
                yield score(scanned)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def scan_and_score(
    chunks: list[chunking.Chunk],
    cfg: CurationConfig,
    root: Path,
    scratch: Path,
    executor: Executor,
    *,
    scorer: Future[AestheticScorer] | None = None,
) -> int:
    """Pass 1 + 2 and the aesthetic score of every pending chunk, each committed by the worker that completes
    it; the driver sees counts only. ``scorer``: the local executor's model, already loading
    (``load_scorer_in_background``); the Ray executor's actors load their own."""
    pending = [c for c in chunks if c.pending]
    log.info("scan + score: %d chunks committed, %d to do", len(chunks) - len(pending), len(pending))
    if not pending:
        return 0
    clip_size = clip_image_size(cfg.aesthetic.clip_model)
    if clip_size * clip_size * 3 * cfg.aesthetic.batch_size > MAX_BATCH_BYTES:
        raise ValueError(
            f"aesthetic.batch_size {cfg.aesthetic.batch_size} makes batches over {MAX_BATCH_BYTES >> 20} MiB"
        )
    plan = chunk_plan(pending, cfg, root, scratch)
    shutil.rmtree(plan.target.batches, ignore_errors=True)  # an interrupted run's batches: rescored whole
    if plan.target.embeddings is not None:
        migrate_markers(plan.target.embeddings)  # once, on the driver: the scorers' ManifestWriters find none
    for work in plan.works:  # a pending chunk's old markers: only this run's commit may count
        plan.target.unmark(work)
    if executor.name == "local":
        stream = _scan_local(plan, cfg, clip_size, scorer or load_scorer_in_background(cfg.aesthetic))
    else:
        stream = _scan_on_ray(plan, cfg, clip_size, getattr(executor, "guard", None))
    rows: dict[tuple[str, int], int] = {}  # (chunk, batch) → rows: a batch sent twice counts once
    progress = ProgressLog("scan + score", sum(c.num_rows for c in pending), logger=log)  # rate, ETA
    with contextlib.closing(stream):  # an error here releases the actors (and their GPUs) now, not at GC
        for count in stream:
            if not isinstance(count, BatchCount):  # the scored stream carries counts, never rows
                raise RuntimeError(f"scan + score: the stream sent {type(count).__name__}, not counts")
            if (count.chunk, count.batch) not in rows:
                progress.update(count.num_rows)
            rows[count.chunk, count.batch] = count.num_rows
    per_chunk: Counter = Counter()
    for (name, _), num_rows in rows.items():
        per_chunk[name] += num_rows
    if short := [w.name for w in plan.works if per_chunk[w.name] != w.num_rows]:
        raise RuntimeError(
            f"scan + score: {len(short)} chunks did not come back whole: {', '.join(short[:10])}"
            f"{' …' if len(short) > 10 else ''}"
        )
    commit_chunks(plan, executor)
    shutil.rmtree(plan.target.batches, ignore_errors=True)
    return len(pending)


def commit_chunks(plan: ChunkPlan, executor: Executor) -> None:
    """Commit, as tasks, the chunks whose batches are all scored but that no worker claimed (see
    ``commit_if_whole``); none on a healthy run."""
    left = [w for w in plan.works if not plan.target.is_committed(w)]
    if left:
        log.info("scan + score: committing %d chunks no scorer claimed", len(left))
        # A commit task holds its chunk's scored rows twice (concatenated, then sorted), embeddings included.
        per_row = 2 * (ROW_BYTES + EMBEDDING_BYTES_PER_VALUE * MAX_EMBEDDING_DIM)
        memory = task_memory(max(w.num_rows for w in left), per_row)
        executor.map(_commit_task, [(w, plan.target) for w in left], memory=memory)
    if missing := [w.name for w in plan.works if not plan.target.is_committed(w)]:
        raise RuntimeError(
            f"scan + score: {len(missing)} chunks are not committed after their commit tasks: "
            f"{', '.join(missing[:10])}{' …' if len(missing) > 10 else ''}; rerun to score them again"
        )


def _commit_task(item: tuple[ChunkWork, CommitTarget]) -> int:
    return commit_batches(*item)


# ----------------------------------------------------------------------------------------------------
# The job


def make_executor(cfg: CurationConfig, guard: rundir.RunGuard) -> Executor:
    """The executor ``cfg.executor`` names (``auto``: ``curation.auto``); Ray tasks check ``guard`` first."""
    name, why = choose_executor(cfg)
    log.info("executor: %s (%s)", name, why)
    if name == "local":
        return LocalExecutor()
    init_ray()
    return RayExecutor(guard=guard)


def post_config(cfg: CurationConfig) -> PostConfig:
    return PostConfig(
        min_score=cfg.aesthetic.min_score,
        max_hamming=cfg.dedup.max_hamming,
        phash_splits=cfg.dedup.phash_splits,
        semantic_threshold=cfg.dedup.semantic_threshold if cfg.semantic_dedup else None,
        semantic_cluster_size=cfg.dedup.semantic_cluster_size,
        samples_per_shard=cfg.shards.samples_per_shard,
        rows_per_partition=cfg.manifest_rows_per_part,
    )


def remove_stale_embeddings(root: Path, chunks: list[chunking.Chunk]) -> int:
    """Embedding parts of chunks that are no longer in the plan (their range was split or emptied)."""
    folder = root / EMBEDDINGS_DIR
    names = {c.name for c in chunks}
    stale = [p for p in sorted(folder.glob("*.parquet")) if p.stem not in names] if folder.is_dir() else []
    for path in stale:
        unmark_committed(folder, path.stem)
        path.unlink()
    return len(stale)


def check_before_start(cfg: CurationConfig) -> None:
    """Fail in seconds, before any listing or actor: the scorer's files must exist."""
    resolve_head(cfg.aesthetic.head)
    clip_image_size(cfg.aesthetic.clip_model)


def scored_parts(chunks: list[chunking.Chunk], cfg: CurationConfig, root: Path) -> list[ScoredPart]:
    """The committed chunks, in key order, as the input of the post-scoring phases."""
    embeddings = root / EMBEDDINGS_DIR if cfg.aesthetic.save_embeddings else None
    return [
        ScoredPart(
            path=str(work_dir(root, cfg) / f"{c.name}.parquet"),
            lo=c.range.lo,
            hi=c.range.hi,
            num_rows=c.num_rows,
            embeddings=str(embeddings / f"{c.name}.parquet") if embeddings else None,
        )
        for c in chunks
    ]


def prepare_run_folder(cfg: CurationConfig, root: Path) -> tuple[list[str], dict, Path]:
    """Under the run lock: claim the folder for these inputs, write the resolved config, clear what an
    interrupted run left (temporaries, scratch). Returns (claimed inputs, config as written, scratch folder)."""
    inputs = rundir.claim(root, cfg.inputs)
    config = dataclasses.asdict(cfg)
    atomic_write_bytes(root / "curation_config.json", json.dumps(config, indent=2).encode())
    if removed := rundir.remove_stale_temporaries(root):
        log.info("removed %d temporary files of an interrupted run", removed)
    scratch = root / SCRATCH_DIR
    shutil.rmtree(scratch, ignore_errors=True)
    if reason := cfg.semantic_dedup_off_reason:
        log.info("semantic dedup off: %s", reason)
    return inputs, config, scratch


class PhaseClock:
    """Seconds per phase of the job, for its summary: ``lap(name)`` closes the phase that ran since the last lap."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name], self._start = round(now - self._start, 3), now


def finish_outputs(cfg: CurationConfig, root: Path, post: PostResult, chunks: list[chunking.Chunk]) -> int:
    """After the manifest: stale shards and embeddings removed, the report and the dataset card written.
    Returns how many stale shards were removed."""
    removed_shards = remove_stale_shards(root, post.shards)
    remove_stale_embeddings(root, chunks)
    if cfg.report:
        from curation.report import write_report  # matplotlib: imported only for a report

        write_report(root)
    # An HF dataset card beside the shards, so load_dataset(<run>/shards/curated, "4k") loads every
    # image format and JSON field of the tier.
    write_curated_card(root / SHARDS_DIR, json_fields=SAMPLE_JSON_FIELDS)
    return removed_shards


def job_summary(post: PostResult, *, removed_shards: int, clock: PhaseClock, seconds: float, executor: Executor,
                root: Path) -> dict:  # fmt: skip
    """The summary printed by the CLI and written to ``curation_summary.json``."""
    return {
        **{k: v for k, v in post.counts.items() if k != "dedup"},
        "shards": len(post.shards),
        "shards_written": post.shards_written,
        "shards_removed": removed_shards,
        "seconds": round(seconds, 2),
        "seconds_per_phase": {**clock.seconds, **post.seconds},
        "dedup": post.counts["dedup"],
        "semantic_dim": post.semantic_dim,  # the embeddings' width (None: no semantic dedup)
        "driver_peak_rss_mib": round(peak_rss_mib(), 1),
        "worker_peak_rss_mib": round(post.worker_peak_rss_mib, 1),
        "executor": executor.name,
        "tasks_per_node": dict(getattr(executor, "task_nodes", {})),  # Ray node id → phase tasks
        "output": str(root),
    }


def run(cfg: CurationConfig) -> dict:
    """Run the whole curation job; returns the summary that is also written to the run folder."""
    started = time.time()
    root = Path(cfg.output)
    rundir.check_inputs_outside_output(cfg.inputs, root)
    check_before_start(cfg)
    with rundir.run_lock(root):
        inputs, config, scratch = prepare_run_folder(cfg, root)
        clock = PhaseClock()
        executor = make_executor(cfg, rundir.RunGuard(str(root), rundir.write_nonce(root)))
        # In-process, the scorer's imports and model load are the small job's longest step: started now, beside
        # the listing (when nothing is left to score the load is wasted: the process waits for it at exit).
        scorer = load_scorer_in_background(cfg.aesthetic) if executor.name == "local" else None
        clock.lap("start")
        records, num_records = list_inputs(cfg, root, scratch, executor)
        chunks = plan_work(cfg, records, num_records, work_dir(root, cfg), scratch, executor)
        clock.lap("listing")
        scan_and_score(chunks, cfg, root, scratch, executor, scorer=scorer)
        clock.lap("scan_score")
        parts = scored_parts(chunks, cfg, root)
        post = post_scoring(parts, post_config(cfg), root=root, scratch=scratch / "post", executor=executor)
        if post.counts["inputs"] != num_records:
            raise RuntimeError(
                f"{post.counts['inputs']} manifest rows for {num_records} inputs: every input must produce one"
            )
        clock.lap("post_scoring")
        removed_shards = finish_outputs(cfg, root, post, chunks)
        clock.lap("cleanup_report")
        digest = hashlib.blake2b("".join(c.digest for c in chunks).encode(), digest_size=12).hexdigest()
        rundir.record(root, inputs, fingerprint={"records": num_records, "digest": digest}, config=config)
        shutil.rmtree(scratch, ignore_errors=True)
        summary = job_summary(post, removed_shards=removed_shards, clock=clock, seconds=time.time() - started,
                              executor=executor, root=root)  # fmt: skip
        atomic_write_bytes(root / "curation_summary.json", json.dumps(summary, indent=2).encode())
    return summary
