"""SQL selection: a ``WHERE`` over kept images joined with their captions → a named, hashed selection.

A selection is ``<root>/selections/<name>/rows.parquet`` plus ``selection.json`` that records the query,
the sha256 of every input manifest part and of the rows written, so a training run can name exactly
what it trained on. A selection can exclude other selections (an eval set, say): no row shares a key, a
sha256 or a pHash group (Hamming distance ≤ ``phash_max_distance``) with a row of an excluded one.
The ``WHERE`` is one boolean expression, checked (``manifests.checks.check_where``) and run on a
connection that can read the manifests and nothing else. A selection with 0 rows is an error that shows
the counts, unless ``--allow-empty``.
CLI: ``python -m manifests.selection --input OUT --name NAME --where SQL [--limit N] [--exclude EVAL]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from manifests.checks import InputError, check_name, check_where, cli, squeeze
from manifests.db import SELECTION_ROWS_FILE, SELECTIONS_DIR, connect, filter_sql, manifest_files, require_run
from manifests.io import atomic_write_bytes, file_sha256, publish, temp_path

ROWS_FILE = SELECTION_ROWS_FILE
RECORD_FILE = "selection.json"
VIEW = "image_captions"  # the view a selection's WHERE filters
PHASH_BITS = 64
# Two 64-bit pHashes this close count as one image: ≤ 4 of 64 bits is a common near-duplicate cut-off
# (resize, re-encode, small crops), tight enough that unrelated images almost never meet it.
DEFAULT_PHASH_MAX_DISTANCE = 4
SELECTION_COLUMNS = (
    "key", "source", "shard", "width", "height", "format", "tier", "sha256", "phash", "aesthetic",
    "caption_orig", "caption_vlm", "captioner",
)  # fmt: skip


@dataclass(frozen=True)
class SelectionSpec:
    """What to select: a DuckDB ``WHERE`` over the ``image_captions`` view, optional sample and limit."""

    name: str
    where: str = "true"
    limit: int | None = None
    sample_fraction: float | None = None  # keep each row with this probability, decided by hash(key, seed)
    seed: int = 0
    exclude: tuple[str, ...] = ()  # selections this one must be disjoint from (by key, sha256, pHash group)
    phash_max_distance: int = DEFAULT_PHASH_MAX_DISTANCE

    def __post_init__(self) -> None:
        check_name(self.name, flag="--name")
        for excluded in self.exclude:
            check_name(excluded, flag="--exclude")
        object.__setattr__(self, "where", check_where(self.where, view=VIEW))
        if self.sample_fraction is not None and not 0 < self.sample_fraction <= 1:
            raise InputError(
                f"--sample-fraction (sample_fraction) must be in (0, 1], got {self.sample_fraction}"
            )
        if self.limit is not None and self.limit < 0:
            raise InputError(f"--limit must be ≥ 0, got {self.limit}")
        if not 0 <= self.phash_max_distance < PHASH_BITS // 2:
            raise InputError(
                f"--phash-max-distance (phash_max_distance) must be in [0, {PHASH_BITS // 2}), got {self.phash_max_distance}"
            )
        if self.name in self.exclude:
            raise InputError(f"--exclude must not name the selection itself ({self.name!r})")
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def candidates_sql(self, matched: str | None = None) -> str:
        """Rows matching ``where`` (and the sample), minus excluded ones; unordered, no limit.

        ``matched`` is the checked ``SELECT * FROM image_captions WHERE (<where>)`` (``filter_sql``); the
        user's expression lives only inside it, so it cannot reach the sample or exclusion conditions.
        Sampling hashes the key with the seed, so it does not depend on row order. Exclusion reads the
        view ``excluded`` (key, sha256, phash of the excluded selections; see ``register_excluded``).
        """
        matched = matched or f"SELECT * FROM {VIEW} WHERE ({self.where})"
        columns = ", ".join(SELECTION_COLUMNS)
        query = f"SELECT {columns} FROM (\n{matched}\n) AS matched"
        if self.sample_fraction is not None:
            threshold = int(self.sample_fraction * 2**32)
            query += f" WHERE ('0x' || left(md5(key || '#{self.seed}'), 8))::UBIGINT < {threshold}"
        if not self.exclude:
            return query
        near = near_duplicates_sql("candidates", "excluded", self.phash_max_distance)
        return (
            f"WITH candidates AS ({query}), near AS ({near}) "
            "SELECT * FROM candidates WHERE key NOT IN (SELECT key FROM excluded) "
            "AND (sha256 IS NULL OR sha256 NOT IN (SELECT sha256 FROM excluded WHERE sha256 IS NOT NULL)) "
            "AND key NOT IN (SELECT key FROM near)"
        )

    def sql(self, matched: str | None = None) -> str:
        """The full query: the candidates ordered by key, then the limit."""
        query = f"SELECT * FROM ({self.candidates_sql(matched)}) ORDER BY key"
        if self.limit is not None:
            query += f" LIMIT {self.limit}"
        return query


def phash_bands(column: str, max_distance: int) -> list[str]:
    """SQL for ``max_distance + 1`` disjoint bit bands of a 64-bit pHash column.

    Pigeonhole: two hashes within ``max_distance`` differing bits agree exactly on at least one band, so
    an equi-join per band finds every near pair without comparing all pairs.
    """
    num_bands = max_distance + 1
    bands, shift = [], 0
    for band in range(num_bands):
        bits = PHASH_BITS // num_bands + (band < PHASH_BITS % num_bands)
        bands.append(column if bits == PHASH_BITS else f"(({column} >> {shift}) & {(1 << bits) - 1})")
        shift += bits
    return bands


def near_duplicates_sql(candidates: str, excluded: str, max_distance: int) -> str:
    """Keys of ``candidates`` whose pHash lies within ``max_distance`` bits of one in ``excluded``.

    Rows with a null pHash (the perceptual pass did not run) never match here; key and sha256 still apply.
    """
    joins = [
        f"SELECT c.key FROM {candidates} c JOIN {excluded} x ON {band_c} = {band_x} "
        f"WHERE bit_count(xor(c.phash, x.phash)) <= {max_distance}"
        for band_c, band_x in zip(
            phash_bands("c.phash", max_distance), phash_bands("x.phash", max_distance), strict=True
        )
    ]
    return " UNION ".join(joins)


def selection_dir(root: str | os.PathLike, name: str) -> Path:
    return Path(root) / SELECTIONS_DIR / check_name(name)


def selection_names(root: str | os.PathLike) -> list[str]:
    """Names of the selections written under ``root`` (those with a ``selection.json``)."""
    return sorted(p.parent.name for p in (Path(root) / SELECTIONS_DIR).glob(f"*/{RECORD_FILE}"))


def require_selection(root: str | os.PathLike, name: str, *, flag: str = "--selection") -> Path:
    """The folder of selection ``name``; an ``InputError`` naming the fix when there is none."""
    folder = Path(root) / SELECTIONS_DIR / check_name(name, flag=flag)
    if not (folder / RECORD_FILE).is_file() or not (folder / ROWS_FILE).is_file():
        have = ", ".join(selection_names(root)) or "none"
        raise InputError(
            f"{flag} {name!r}: no selection of that name in {Path(root) / SELECTIONS_DIR} (have: {have}); "
            f"write it first: python -m manifests.selection --input {root} --name {name} --where '…'"
        )
    return folder


def register_excluded(
    con: duckdb.DuckDBPyConnection, root: str | os.PathLike, names: tuple[str, ...]
) -> dict:
    """Create the view ``excluded`` over the named selections; returns each one's ``keys_sha256``."""
    paths, hashes = [], {}
    for name in names:
        folder = require_selection(root, name, flag="--exclude")
        paths.append(str((folder / ROWS_FILE).absolute()))
        hashes[name] = json.loads((folder / RECORD_FILE).read_text())["keys_sha256"]
    if paths:
        files = "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"
        con.execute(
            f"CREATE OR REPLACE VIEW excluded AS SELECT key, sha256, phash FROM read_parquet({files})"
        )
    return hashes


def input_hashes(root: Path, excluded: dict[str, str]) -> dict:
    """sha256 of every committed manifest part below ``root``, and the keys hash of each excluded selection."""
    root = Path(root).absolute()
    inputs = {
        name: {str(Path(p).relative_to(root)): file_sha256(p) for p in manifest_files(root, name)}
        for name in ("images", "captions")
    }
    inputs["excluded_selections"] = excluded
    return inputs


def write_selection(root: Path, name: str, table: pa.Table, record: dict) -> Path:
    """Write ``rows.parquet`` then ``selection.json`` (with the row count and keys hash added)."""
    out = selection_dir(root, name)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / ROWS_FILE
    tmp = temp_path(rows_path)
    try:
        pq.write_table(table, tmp, compression="zstd")
        publish(tmp, rows_path)
    finally:
        tmp.unlink(missing_ok=True)
    record = {
        **record,
        "query_sha256": hashlib.sha256(record["query"].encode()).hexdigest(),
        "inputs_sha256": hashlib.sha256(json.dumps(record["inputs"], sort_keys=True).encode()).hexdigest(),
        "num_rows": table.num_rows,
        "keys_sha256": hashlib.sha256("\n".join(table.column("key").to_pylist()).encode()).hexdigest(),
    }
    atomic_write_bytes(out / RECORD_FILE, json.dumps(record, indent=2, sort_keys=True).encode())
    return out


def empty_report(con: duckdb.DuckDBPyConnection, spec: SelectionSpec, matched: str) -> str:
    """One line with the row counts at each step, for a selection that came out empty."""
    one = lambda sql: con.execute(sql).fetchone()[0]  # noqa: E731
    num_kept = one(f"SELECT count(*) FROM {VIEW}")
    num_matched = one(f"SELECT count(*) FROM ({matched})")
    steps = f"{num_kept} kept images in {VIEW}, {num_matched} match --where {squeeze(spec.where)!r}"
    if spec.sample_fraction is not None or spec.exclude:
        num_left = one(f"SELECT count(*) FROM ({spec.candidates_sql(matched)})")
        steps += f", {num_left} left after --sample-fraction/--exclude"
    if spec.limit == 0:
        steps += ", --limit 0"
    return f"selection {spec.name!r} has 0 rows ({steps}); pass --allow-empty to write it anyway"


def select(root: str | os.PathLike, spec: SelectionSpec, *, allow_empty: bool = False) -> Path:
    """Run the selection over the manifests of ``root``; returns the selection folder.

    0 rows is an ``InputError`` with the counts per step unless ``allow_empty``.
    """
    root = require_run(root)
    con = connect(root, restricted=True)
    excluded = register_excluded(con, root, spec.exclude)
    matched = filter_sql(con, VIEW, spec.where)
    query = spec.sql(matched)
    table = con.sql(query).to_arrow_table()
    if table.num_rows == 0 and not allow_empty:
        raise InputError(empty_report(con, spec, matched))
    record = {"spec": asdict(spec), "query": query, "inputs": input_hashes(root, excluded)}
    return write_selection(root, spec.name, table, record)


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--input", required=True, help="run folder (or a folder of runs) holding manifests/")
    parser.add_argument("--name", required=True)
    parser.add_argument("--where", default="true", help="DuckDB WHERE over the image_captions view")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--sample-fraction", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exclude", action="append", default=[], help="a selection to stay disjoint from")
    parser.add_argument("--phash-max-distance", type=int, default=DEFAULT_PHASH_MAX_DISTANCE)
    parser.add_argument("--allow-empty", action="store_true", help="write a selection with 0 rows")
    args = parser.parse_args(argv)
    spec = SelectionSpec(
        args.name, args.where, args.limit, args.sample_fraction, args.seed,
        exclude=tuple(args.exclude), phash_max_distance=args.phash_max_distance,
    )  # fmt: skip
    out = select(args.input, spec, allow_empty=args.allow_empty)
    record = json.loads((out / RECORD_FILE).read_text())
    print(f"selection {spec.name}: {record['num_rows']} rows → {out}")


if __name__ == "__main__":
    main()
