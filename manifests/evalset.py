"""The held-out eval set: a stratified SQL sample, disjoint from training, as its own shards plus prompts.

PixArt-Σ reports FID and CLIP-score on 30K high-aesthetic images held out from training. Here the
candidates are kept images matching a ``WHERE`` that have a prompt (the VLM caption, else the original)
and share no key, sha256 or pHash group with the excluded training selections. They are stratified by
tier × aesthetic quantile bucket (within the tier; images without a score form their own bucket), each
stratum gets its proportional share of ``num_samples`` (largest remainder), and within a stratum the rows
with the smallest ``md5(key, seed)`` are taken, so the draw depends on neither row order nor machine.

Output: ``selections/<name>/`` (rows + hashes, like any selection), ``eval_shards/<name>/eval-*.tar``
(original bytes and JSON, no features), ``prompts.jsonl`` and ``prompts.txt`` (one prompt a line, by key)
and ``eval.json`` (spec and strata).
CLI: ``python -m manifests.evalset --input OUT --name eval --exclude TRAIN_SELECTION --num-samples 30000``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import duckdb
import pyarrow as pa

from manifests import preflight
from manifests.checks import InputError, check_name, check_where, cli, squeeze
from manifests.db import connect, filter_sql, require_run
from manifests.io import atomic_write_bytes
from manifests.materialize import MaterializeConfig, materialize
from manifests.selection import (
    DEFAULT_PHASH_MAX_DISTANCE,
    VIEW,
    SelectionSpec,
    input_hashes,
    register_excluded,
    write_selection,
)

log = logging.getLogger(__name__)

EVAL_SHARDS_DIR = "eval_shards"
PAPER_EVAL_SIZE = 30_000  # PixArt-Σ: 30K high-aesthetic images for FID / CLIP-score


@dataclass(frozen=True)
class EvalSetSpec:
    """What to hold out: a ``WHERE`` over ``image_captions``, its size, strata and what to stay apart from."""

    name: str = "eval"
    where: str = "true"
    num_samples: int = PAPER_EVAL_SIZE
    exclude: tuple[str, ...] = ()  # training selections the eval set must be disjoint from
    num_aesthetic_buckets: int = 4  # quantile buckets of the aesthetic score within each tier
    prompt: Literal["vlm", "orig"] = "vlm"  # preferred caption for the prompt; the other is the fallback
    seed: int = 0
    phash_max_distance: int = DEFAULT_PHASH_MAX_DISTANCE

    def __post_init__(self) -> None:
        check_name(self.name, flag="--name")
        object.__setattr__(self, "where", check_where(self.where, view=VIEW))
        if self.num_samples < 1:
            raise InputError(f"--num-samples (num_samples) must be ≥ 1, got {self.num_samples}")
        if self.num_aesthetic_buckets < 1:
            raise InputError(
                f"--aesthetic-buckets (num_aesthetic_buckets) must be ≥ 1, got {self.num_aesthetic_buckets}"
            )
        if self.prompt not in ("vlm", "orig"):
            raise InputError(f"--prompt (prompt) must be one of ('vlm', 'orig'), got {self.prompt!r}")
        object.__setattr__(self, "exclude", tuple(self.exclude))
        self.candidates()  # validates the excluded names, the distance and that exclude does not name itself

    def candidates(self) -> SelectionSpec:
        """The selection whose rows, once they have a prompt, are the eval set's candidates."""
        return SelectionSpec(
            self.name, self.where, exclude=self.exclude, phash_max_distance=self.phash_max_distance
        )

    def strata_sql(self, matched: str | None = None) -> str:
        """Candidates with a prompt, their prompt and stratum (tier, aesthetic bucket; bucket 0 = no score).

        ``matched``: the checked ``--where`` subquery (``manifests.db.filter_sql``).
        """
        first, second = (
            ("caption_vlm", "caption_orig") if self.prompt == "vlm" else ("caption_orig", "caption_vlm")
        )
        k = self.num_aesthetic_buckets
        return (
            f"SELECT *, coalesce({first}, {second}) AS prompt, coalesce(tier, '') AS stratum_tier, "
            f"CASE WHEN aesthetic IS NULL THEN 0 ELSE ntile({k}) OVER "
            "(PARTITION BY tier, aesthetic IS NULL ORDER BY aesthetic, key) END AS aesthetic_bucket "
            f"FROM ({self.candidates().candidates_sql(matched)}) "
            "WHERE coalesce(caption_vlm, caption_orig) IS NOT NULL"
        )


def allocate(counts: dict[tuple[str, int], int], num_samples: int) -> dict[tuple[str, int], int]:
    """Proportional quota per stratum by largest remainder (ties to the smaller stratum key)."""
    total = sum(counts.values())
    if total <= num_samples:
        return dict(counts)
    exact = {s: c * num_samples / total for s, c in counts.items()}
    quotas = {s: int(e) for s, e in exact.items()}
    by_remainder = sorted(counts, key=lambda s: (-(exact[s] - quotas[s]), s))
    for stratum in by_remainder[: num_samples - sum(quotas.values())]:
        quotas[stratum] += 1
    return quotas


def eval_rows(con: duckdb.DuckDBPyConnection, spec: EvalSetSpec) -> tuple[pa.Table, str, list[dict]]:
    """The eval rows (ordered by key), the query that drew them, and per-stratum counts and quotas.

    ``con`` needs the views of ``manifests.connect`` and, when ``spec.exclude`` is set, ``excluded``.
    """
    strata = spec.strata_sql(filter_sql(con, VIEW, spec.where))
    counts = {
        (tier, bucket): count
        for tier, bucket, count in con.execute(
            f"SELECT stratum_tier, aesthetic_bucket, count(*) FROM ({strata}) GROUP BY ALL ORDER BY ALL"
        ).fetchall()
    }
    quotas = allocate(counts, spec.num_samples)
    report = [
        {"tier": t or None, "aesthetic_bucket": b, "num_candidates": counts[(t, b)], "num_selected": q}
        for (t, b), q in sorted(quotas.items())
    ]
    if not quotas:
        return (
            con.sql(f"SELECT * EXCLUDE (stratum_tier) FROM ({strata}) LIMIT 0").to_arrow_table(),
            strata,
            report,
        )
    values = ", ".join(
        f"('{t.replace(chr(39), chr(39) * 2)}', {b}, {q})" for (t, b), q in sorted(quotas.items())
    )
    query = (
        f"WITH quota(stratum_tier, aesthetic_bucket, quota) AS (VALUES {values}), "
        f"ranked AS (SELECT *, row_number() OVER (PARTITION BY stratum_tier, aesthetic_bucket "
        f"ORDER BY md5(key || '#{spec.seed}'), key) AS draw FROM ({strata})) "
        "SELECT r.* EXCLUDE (stratum_tier, draw) FROM ranked r JOIN quota q USING (stratum_tier, aesthetic_bucket) "
        "WHERE r.draw <= q.quota ORDER BY key"
    )
    return con.sql(query).to_arrow_table(), query, report


def write_prompts(out: Path, table: pa.Table) -> None:
    """``prompts.jsonl`` (key, prompt, size, tier, aesthetic bucket) and ``prompts.txt``, ordered by key."""
    fields = ("key", "prompt", "width", "height", "tier", "aesthetic", "aesthetic_bucket")
    rows = table.select(list(fields)).to_pylist()
    jsonl = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)
    # One prompt a line for FID / CLIP-score scripts; a newline inside a caption would split it.
    txt = "".join(" ".join(r["prompt"].split()) + "\n" for r in rows)
    atomic_write_bytes(out / "prompts.jsonl", jsonl.encode())
    atomic_write_bytes(out / "prompts.txt", txt.encode())


def build_eval_set(
    root: str | os.PathLike,
    spec: EvalSetSpec,
    *,
    samples_per_shard: int = 1000,
    num_workers: int = 1,
    allow_empty: bool = False,
) -> Path:
    """Select the eval rows, write them as a selection and as shards with prompts; returns the shard folder.

    No candidate at all is an ``InputError`` with the counts unless ``allow_empty``.
    """
    root = require_run(root)
    con = connect(root, restricted=True)
    excluded = register_excluded(con, root, spec.exclude)
    table, query, strata = eval_rows(con, spec)
    if table.num_rows == 0 and not allow_empty:
        one = lambda sql: con.execute(sql).fetchone()[0]  # noqa: E731
        matched = filter_sql(con, VIEW, spec.where)
        raise InputError(
            f"eval set {spec.name!r} has 0 rows ({one(f'SELECT count(*) FROM {VIEW}')} kept images in {VIEW}, "
            f"{one(f'SELECT count(*) FROM ({matched})')} match --where {squeeze(spec.where)!r}, "
            f"{one(f'SELECT count(*) FROM ({spec.candidates().candidates_sql(matched)})')} left after --exclude, "
            "0 of them with a caption to prompt with); pass --allow-empty to write it anyway"
        )
    record = {"spec": asdict(spec), "query": query, "inputs": input_hashes(root, excluded), "strata": strata}
    write_selection(root, spec.name, table, record)
    cfg = MaterializeConfig(
        root=str(root), selection=spec.name, samples_per_shard=samples_per_shard, seed=spec.seed,
        num_workers=num_workers, output_dir=EVAL_SHARDS_DIR, shard_prefix="eval", allow_empty=allow_empty,
    )  # fmt: skip
    out = materialize(cfg)
    write_prompts(out, table)
    atomic_write_bytes(out / "eval.json", json.dumps(record, indent=2, sort_keys=True).encode())
    log.info("eval set %s: %d rows in %d strata → %s", spec.name, table.num_rows, len(strata), out)
    return out


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--input", required=True, help="run folder holding manifests/ and selections/")
    parser.add_argument("--name", default="eval")
    parser.add_argument("--where", default="true", help="DuckDB WHERE over the image_captions view")
    parser.add_argument("--num-samples", type=int, default=PAPER_EVAL_SIZE)
    parser.add_argument(
        "--exclude", action="append", default=[], help="a training selection to stay apart from"
    )
    parser.add_argument("--aesthetic-buckets", type=int, default=4)
    parser.add_argument("--prompt", choices=("vlm", "orig"), default="vlm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phash-max-distance", type=int, default=DEFAULT_PHASH_MAX_DISTANCE)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--allow-empty", action="store_true", help="write an eval set with 0 rows")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = EvalSetSpec(
        name=args.name, where=args.where, num_samples=args.num_samples, exclude=tuple(args.exclude),
        num_aesthetic_buckets=args.aesthetic_buckets, prompt=args.prompt, seed=args.seed,
        phash_max_distance=args.phash_max_distance,
    )  # fmt: skip
    preflight.check_run_folder("--input", args.input)  # before Ray starts an actor (issue 11, preflight)
    out = build_eval_set(
        args.input, spec, samples_per_shard=args.samples_per_shard, num_workers=args.num_workers,
        allow_empty=args.allow_empty,
    )  # fmt: skip
    info = json.loads((out / "eval.json").read_text())
    print(f"eval set {spec.name}: {sum(s['num_selected'] for s in info['strata'])} rows → {out}")


if __name__ == "__main__":
    main()
