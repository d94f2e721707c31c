"""SQL selection: a ``WHERE`` over kept images joined with their captions → a named, hashed selection.

A selection is ``<root>/selections/<name>/rows.parquet`` plus ``selection.json`` that records the query,
the sha256 of every input manifest part and of the rows written, so a training run can name exactly
what it trained on. CLI: ``python -m manifests.selection --root OUT --name NAME --where SQL [--limit N]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.parquet as pq

from manifests.db import connect, manifest_files
from manifests.io import atomic_write_bytes, publish, temp_path

SELECTIONS_DIR = "selections"
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

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"name must be a plain folder name, got {self.name!r}")
        if self.sample_fraction is not None and not 0 < self.sample_fraction <= 1:
            raise ValueError(f"sample_fraction must be in (0, 1], got {self.sample_fraction}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be ≥ 0, got {self.limit}")

    def sql(self) -> str:
        """The full query. Sampling hashes the key with the seed, so it does not depend on row order."""
        columns = ", ".join(SELECTION_COLUMNS)
        query = f"SELECT {columns} FROM image_captions WHERE ({self.where})"
        if self.sample_fraction is not None:
            threshold = int(self.sample_fraction * 2**32)
            query += f" AND ('0x' || left(md5(key || '#{self.seed}'), 8))::UBIGINT < {threshold}"
        query += " ORDER BY key"
        if self.limit is not None:
            query += f" LIMIT {self.limit}"
        return query


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def select(root: str | os.PathLike, spec: SelectionSpec) -> Path:
    """Run the selection over the manifests below ``root``; returns the selection folder."""
    root = Path(root)
    out = root / SELECTIONS_DIR / spec.name
    out.mkdir(parents=True, exist_ok=True)
    con = connect(root)
    query = spec.sql()
    table = con.sql(query).to_arrow_table()
    rows_path = out / "rows.parquet"
    tmp = temp_path(rows_path)
    try:
        pq.write_table(table, tmp, compression="zstd")
        publish(tmp, rows_path)
    finally:
        tmp.unlink(missing_ok=True)
    inputs = {
        name: {str(Path(p).relative_to(root)): file_sha256(p) for p in manifest_files(root, name)}
        for name in ("images", "captions")
    }
    record = {
        "spec": asdict(spec),
        "query": query,
        "query_sha256": hashlib.sha256(query.encode()).hexdigest(),
        "inputs": inputs,
        "num_rows": table.num_rows,
        "keys_sha256": hashlib.sha256("\n".join(table.column("key").to_pylist()).encode()).hexdigest(),
    }
    atomic_write_bytes(out / "selection.json", json.dumps(record, indent=2, sort_keys=True).encode())
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", required=True, help="run folder (or a folder of runs) holding manifests/")
    parser.add_argument("--name", required=True)
    parser.add_argument("--where", default="true", help="DuckDB WHERE over the image_captions view")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--sample-fraction", type=float)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    spec = SelectionSpec(args.name, args.where, args.limit, args.sample_fraction, args.seed)
    out = select(args.root, spec)
    record = json.loads((out / "selection.json").read_text())
    print(f"selection {spec.name}: {record['num_rows']} rows → {out}")


if __name__ == "__main__":
    main()
