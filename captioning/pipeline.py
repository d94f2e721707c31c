"""The captioning job's wiring: ``images`` (DuckDB WHERE) → shard reads → captioner actors → manifest parts.

The model-holding stages live in ``captioning.captioner`` and the guards in ``captioning.guards``; this
module is the only one here that knows about Ray. The transformers captioner runs on plain Ray actors fed by
read tasks (``manifests.actors``); the vLLM backend stays on Ray Data LLM's processor. Every selected row ends in the ``captions`` manifest,
kept or rejected with a reason. Resume: keys already captioned by the same captioner and prompt are
skipped, and a part is visible only once committed, so a killed run loses at most its uncommitted parts
and a rerun writes exactly those rows again. Rows rejected for a reason outside the image (``shard_error``,
``missing_in_shard``, ``generate_error``) are captioned again on a rerun (``retry_failed``; a shard failure
once the shard is back and holds the key) and replace their old rows in place: the part that held them is
rewritten under its own name, atomically, so there is still one row per (key, captioner, prompt). The
``--where`` runs as a checked expression on a connection that reads only the run's manifests.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

import manifests
from captioning import vllm_engine
from captioning.captioner import (
    GENERATE_ERROR,
    Captioner,
    CaptionGuard,
    captioner_id,
    check_tokenizer,
    load_processor,
    processor_min_side,
)
from captioning.config import CaptioningConfig
from captioning.reader import MISSING_IN_SHARD, SHARD_ERROR, ReadImages, available_keys
from manifests import CAPTIONS, ManifestWriter, atomic_write_bytes
from manifests.actors import ActorSpec, run_on_actors
from manifests.checks import InputError, one_line, squeeze
from manifests.db import filter_sql, require_run
from manifests.io import committed_parts, is_committed, read_committed_table
from manifests.progress import ProgressLog, quiet_ray_data
from manifests.schema import KEPT, REJECTED

log = logging.getLogger(__name__)

CAPTIONS_DIR = "manifests/captions"
CONFIG_FILE = "captioning_config.json"
SUMMARY_FILE = "captioning_summary.json"
# Rejections that say nothing about the image: the shard was missing or unreadable, or generate failed
# (out of memory). A rerun captions these rows again unless told to keep them.
RETRYABLE_REASONS = frozenset({SHARD_ERROR, MISSING_IN_SHARD, GENERATE_ERROR})
SUMMARY_COLUMNS = ["key", "status", "reason", "num_tokens", "truncated", "seconds"]


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (set by `ray job submit`), else start Ray in-process."""
    quiet_ray_data()  # our ProgressLog line says what Ray Data's INFO blocks would
    if not ray.is_initialized():
        ray.init(log_to_driver=False, configure_logging=False)


def select_rows(root: Path, where: str) -> list[dict]:
    """Distinct (key, shard) of the ``images`` rows matching ``where`` that have a curated shard.

    ``where`` runs as a checked expression on a connection that may read the manifests and nothing else.
    """
    con = manifests.connect(root, restricted=True)
    try:
        matched = filter_sql(con, "images", where)
        rows = con.execute(
            f"SELECT key, any_value(shard) AS shard, count(shard) AS num_with_shard FROM (\n{matched}\n) "
            "GROUP BY key ORDER BY key"
        ).fetchall()
    except duckdb.Error as err:
        raise InputError(f"--where {squeeze(where)!r} failed over the images view: {one_line(err)}") from err
    finally:
        con.close()
    without_shard = sum(1 for _, _, n in rows if n == 0)
    if without_shard:
        log.warning(
            "%d selected rows have no curated shard (rejected images?) and are not captioned", without_shard
        )
    return [{"key": key, "shard": shard} for key, shard, n in rows if n > 0]


def is_retryable(reason: str | None) -> bool:
    """A rejection whose cause lies outside the image (``shard_error: …``, ``missing_in_shard``, …)."""
    return reason is not None and reason.split(":", 1)[0] in RETRYABLE_REASONS


def previous_rows(root: Path, captioner: str, prompt: str) -> list[tuple[str, str, str | None, str]]:
    """(key, status, reason, part path) of the committed caption rows for this captioner and prompt."""
    parts = [str(p) for p in committed_parts(root / CAPTIONS_DIR)]
    if not parts:
        return []
    con = duckdb.connect()
    try:
        return con.execute(
            "SELECT key, status, reason, filename FROM read_parquet(?, filename = true) "
            "WHERE captioner = ? AND prompt = ?",
            [parts, captioner, prompt],
        ).fetchall()
    finally:
        con.close()


def done_keys(root: Path, captioner: str, prompt: str) -> set[str]:
    """Keys that already have a committed caption row (kept or rejected) for this captioner and prompt."""
    return {key for key, *_ in previous_rows(root, captioner, prompt)}


def failed_rows(root: Path, captioner: str, prompt: str) -> dict[str, tuple[str, Path]]:
    """Keys rejected for a retryable reason: (reason, the committed part that holds the row) per key."""
    return {
        key: (reason, Path(part))
        for key, status, reason, part in previous_rows(root, captioner, prompt)
        if status == REJECTED and is_retryable(reason)
    }


def worth_retrying(failed: dict[str, tuple[str, Path]], selected: list[dict], root: Path) -> set[str]:
    """The failed keys (still selected) to caption again: a ``generate_error`` always; a shard failure only
    once the shard is back, readable and holding the key (read on the driver, tar headers only)."""
    shard_of = {r["key"]: r["shard"] for r in selected if r["key"] in failed}
    retry = {k for k in shard_of if failed[k][0].split(":", 1)[0] == GENERATE_ERROR}
    by_shard: dict[str, list[str]] = defaultdict(list)
    for key in sorted(shard_of.keys() - retry):
        by_shard[shard_of[key]].append(key)
    for shard, keys in sorted(by_shard.items()):
        present = available_keys(root / shard)
        if present is not None:
            retry.update(k for k in keys if k in present)
    return retry


def replace_rows(writer: ManifestWriter, parts: dict[str, tuple[str, Path]], retried: pa.Table) -> int:
    """Rewrite each part holding a retried key with the new rows in place of the old; returns how many.

    A part keeps its keys, so it keeps its name (``part_name``) and the rewrite is one atomic replace:
    a run killed here leaves every part either old or new, never a key twice.
    """
    new_rows = {row["key"]: row for row in retried.to_pylist()}
    by_part: dict[Path, set[str]] = defaultdict(set)
    for key in new_rows:
        by_part[parts[key][1]].add(key)
    for part in sorted(by_part):
        old = read_committed_table(part).to_pylist()
        rows = [new_rows.get(row["key"], row) if row["key"] in by_part[part] else row for row in old]
        writer.write(pa.Table.from_pylist(rows, schema=CAPTIONS), part.stem)
    return len(by_part)


def remove_uncommitted_parts(directory: Path) -> int:
    """Delete parts renamed into place but never committed (a crash between rename and marker), so a plain
    ``read_parquet('…/captions/*.parquet')`` never sees rows the rerun writes again. This is why two
    captioning runs must not write into the same output folder at the same time."""
    removed = 0
    for path in sorted(directory.glob("part-*.parquet")):
        if not is_committed(directory, path.stem):
            log.warning("removing uncommitted part %s (left by a killed run)", path)
            path.unlink()
            removed += 1
    return removed


def plan_reads(rows: list[dict], root: Path, chunk_size: int) -> list[dict]:
    """Read tasks grouped by shard (each opens one tar), at most ``chunk_size`` keys each, in key order."""
    by_shard: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        by_shard[row["shard"]].append(row["key"])
    return [
        {"shard": str(root / shard), "keys": keys[i : i + chunk_size]}
        for shard, keys in sorted(by_shard.items())
        for i in range(0, len(keys), chunk_size)
    ]


def part_name(captioner: str, prompt: str, keys: list[str]) -> str:
    """Deterministic part name: the same rows for the same captioner and prompt get the same name."""
    digest = hashlib.sha256("\0".join([captioner, prompt, *sorted(keys)]).encode()).hexdigest()
    return f"part-{digest[:16]}"


def resolve_min_side(cfg: CaptioningConfig) -> int:
    """The reduced-decode target: the config's, else the short side the model's processor resizes to."""
    if cfg.decode_min_side is not None:
        return cfg.decode_min_side
    min_side = processor_min_side(load_processor(cfg.model))
    if min_side is None:
        raise ValueError(f"cannot read an input size from {cfg.model.model}'s processor: set decode_min_side")
    return min_side


# What a read task hands a captioner actor: one batch of reader rows (``captioning.reader.pixels_row``).
READ_ROWS = pa.schema(
    [("key", pa.string()), ("pixels", pa.binary()), ("width", pa.int64()), ("height", pa.int64()),
     ("reason", pa.string())]
)  # fmt: skip


def read_batches(plan: dict, min_side: int, batch_size: int) -> Iterator[pa.Table]:
    """Read task over one plan (a shard's keys): its rows, pixels or a reason, in the captioner's batches."""
    rows = ReadImages(min_side=min_side)(plan)
    for start in range(0, len(rows), batch_size):
        yield pa.Table.from_pylist(rows[start : start + batch_size], schema=READ_ROWS)


def captioners(cfg: CaptioningConfig, *, captioner: str) -> ActorSpec:
    """The ``Captioner`` actors (one model replica each): configs are their only constructor arguments."""
    res = cfg.resources
    kwargs = {"model": cfg.model, "prompt": cfg.prompt.text, "generation": cfg.generation, "guards": cfg.guards,
              "captioner": captioner}  # fmt: skip
    return ActorSpec(Captioner, kwargs, num_actors=res.num_actors, num_cpus=res.num_cpus, num_gpus=res.num_gpus)


def caption_batches(
    plans: list[dict], cfg: CaptioningConfig, *, captioner: str, min_side: int
) -> Iterator[pa.Table]:
    """Read tasks → captioner actors (or the vLLM processor + guard actors) → batches of ``captions`` rows."""
    res = cfg.resources
    if cfg.model.backend == "transformers":
        # Plain actors (manifests.actors), no Ray Data pool: no `E … constructor arguments` line (issue 18).
        yield from run_on_actors(
            captioners(cfg, captioner=captioner), plans, read=read_batches, read_args=(min_side, res.batch_size),
            reads_ahead=2 * res.num_actors,
        )  # fmt: skip
        return
    # vLLM: Ray Data LLM's processor owns the engine replicas and their batching; its guard pool stays on
    # Ray Data with it (and so prints Ray's constructor-argument line once, README).
    ds = ray.data.from_items(plans, override_num_blocks=len(plans))
    ds = ds.flat_map(ReadImages(min_side=min_side))  # stateless, so plain Ray tasks (an instance, not the class)
    if res.num_gpus == 0:
        log.warning("resources.num_gpus is ignored by the vllm backend: each engine replica takes one GPU")
    ds = vllm_engine.build_processor(cfg, prompt=cfg.prompt.text)(ds)
    yield from ds.map_batches(
        CaptionGuard,
        fn_constructor_kwargs={
            "guards": cfg.guards,
            "prompt": cfg.prompt.text,
            "captioner": captioner,
            "gen_params": vllm_engine.sampling_params(cfg.generation),
        },
        batch_size=256,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=1,
    ).iter_batches(batch_format="pyarrow", batch_size=None)


def write_parts(
    batches: Iterable[pa.Table],
    writer: ManifestWriter,
    *,
    captioner: str,
    prompt: str,
    rows_per_part: int,
    hold: frozenset[str] | set[str] = frozenset(),
    held: list[pa.Table] | None = None,
    total: int | None = None,
) -> pa.Table | None:
    """Stream caption batches into committed parts of ``rows_per_part`` rows; returns the small columns.

    Rows whose key is in ``hold`` (retried keys, whose old row lives in an existing part) are not written
    as new parts but appended to ``held``, for ``replace_rows``.
    """
    pending: list[pa.Table] = []
    written: list[pa.Table] = []
    progress = ProgressLog("captions", total, logger=log)  # rate and ETA every 30 s

    def flush() -> None:
        table = pa.concat_tables(pending)
        pending.clear()
        writer.write(table, part_name(captioner, prompt, table.column("key").to_pylist()))
        written.append(table.select(SUMMARY_COLUMNS))
        log.info("captions: %d rows committed", sum(t.num_rows for t in written))

    for batch in batches:
        progress.update(batch.num_rows)
        if hold:
            mask = pa.array([key in hold for key in batch.column("key").to_pylist()])
            if held is not None:
                held.append(batch.filter(mask))
            written.append(batch.filter(mask).select(SUMMARY_COLUMNS))
            batch = batch.filter(pc.invert(mask))
        pending.append(batch)
        while sum(t.num_rows for t in pending) >= rows_per_part:
            table = pa.concat_tables(pending)
            pending[:] = [table.slice(0, rows_per_part)]
            rest = table.slice(rows_per_part)
            flush()
            if rest.num_rows:
                pending.append(rest)
    if sum(t.num_rows for t in pending):
        flush()
    return pa.concat_tables(written) if written else None


def summarize(table: pa.Table | None, *, budget: int, seconds: float) -> dict:
    """Tokens per kept caption (mean, p50, p95, max), share over budget, share rejected per reason, images/s."""
    rows = table.to_pylist() if table is not None else []
    kept = [r for r in rows if r["status"] == KEPT]
    tokens = np.array([r["num_tokens"] for r in kept], dtype=np.float64)
    reasons = Counter(r["reason"].split(":")[0] for r in rows if r["status"] == REJECTED)
    stats = {
        "mean": round(float(tokens.mean()), 1),
        "p50": float(np.percentile(tokens, 50)),
        "p95": float(np.percentile(tokens, 95)),
        "max": int(tokens.max()),
    } if len(tokens) else None  # fmt: skip
    return {
        "captioned": len(rows),
        "kept": len(kept),
        "rejected": len(rows) - len(kept),
        "tokens_per_caption": stats,
        "token_budget": budget,
        "share_over_budget": round(sum(bool(r["truncated"]) for r in kept) / len(kept), 4) if kept else 0.0,
        "rejected_per_reason": dict(sorted(reasons.items())),
        "share_rejected_per_reason": {k: round(v / len(rows), 4) for k, v in sorted(reasons.items())},
        "images_per_s": round(len(rows) / seconds, 3) if seconds > 0 and rows else 0.0,
    }


def run(cfg: CaptioningConfig) -> dict:
    """Run the whole captioning job; returns the summary that is also written to the run folder.

    Inputs are checked before anything is written or Ray starts: the run folder, the tokenizer (T5),
    the ``--where``.
    """
    started = time.time()
    root, out = require_run(cfg.input).resolve(), Path(cfg.output).resolve()
    check_tokenizer(cfg.guards.tokenizer, training_config=cfg.training_config)
    selected = select_rows(root, cfg.where)
    if Path(cfg.model.model).is_dir():  # actors may run elsewhere than the driver's working directory
        cfg.model.model = str(Path(cfg.model.model).resolve())
    captioner, prompt = captioner_id(cfg.model), cfg.prompt.text
    min_side = resolve_min_side(cfg)
    resolved = {**cfg.to_dict(), "captioner": captioner, "prompt_text": prompt, "decode_min_side": min_side}
    atomic_write_bytes(out / CONFIG_FILE, json.dumps(resolved, indent=2).encode())

    writer = ManifestWriter(out / CAPTIONS_DIR, "captions")
    removed = remove_uncommitted_parts(writer.directory)
    failed = failed_rows(out, captioner, prompt) if cfg.retry_failed else {}
    retry = worth_retrying(failed, selected, root)
    done = done_keys(out, captioner, prompt) - retry
    todo = [r for r in selected if r["key"] not in done]
    log.info(
        "captioning: %d selected, %d already captioned by %s, %d to do (%d of them retried)",
        len(selected),
        len(selected) - len(todo),
        captioner,
        len(todo),
        len(retry),
    )

    table, caption_seconds, retried = None, 0.0, []
    if todo:
        init_ray()
        plans = plan_reads(todo, root, cfg.resources.read_chunk_size)
        caption_started = time.time()
        # closing: a writer error releases the actors (and their GPUs) now, not when the traceback is collected
        with contextlib.closing(caption_batches(plans, cfg, captioner=captioner, min_side=min_side)) as batches:
            table = write_parts(
                batches, writer, captioner=captioner, prompt=prompt, rows_per_part=cfg.resources.rows_per_part,
                hold=retry, held=retried, total=len(todo),
            )  # fmt: skip
        if retry:
            replace_rows(writer, failed, pa.concat_tables(retried))
        caption_seconds = time.time() - caption_started
        assert table is not None and sorted(table.column("key").to_pylist()) == [r["key"] for r in todo], (
            "every selected key must produce exactly one caption row"
        )

    summary = {
        "captioner": captioner,
        "prompt": prompt,
        "selected": len(selected),
        "skipped_already_captioned": len(selected) - len(todo),
        "retried_failed": len(retry),
        "uncommitted_parts_removed": removed,
        **summarize(table, budget=cfg.guards.token_budget, seconds=caption_seconds),
        "seconds": round(time.time() - started, 2),
        "output": str(out / CAPTIONS_DIR),
    }
    atomic_write_bytes(out / SUMMARY_FILE, json.dumps(summary, indent=2).encode())
    log.info("captioning summary: %s", json.dumps(summary))
    return summary
