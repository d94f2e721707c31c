"""DuckDB views over committed manifest parts.

``connect(root)`` accepts a run's ``--output`` folder or any folder holding several runs: every
``manifests/<name>/`` folder below ``root`` contributes its committed parts to the view ``<name>``.
"""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from manifests.io import committed_parts
from manifests.schema import KEPT, REJECTED, SCHEMAS

MANIFESTS_DIR = "manifests"
TRAIN_SHARDS_DIR = "train_shards"  # written by manifests.materialize
INDEX_FILE = "index.parquet"

_DUCKDB_TYPES = {
    pa.string(): "VARCHAR",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.float32(): "FLOAT",
    pa.float64(): "DOUBLE",
    pa.bool_(): "BOOLEAN",
    pa.float16(): "FLOAT",  # DuckDB has no half type; it reads Parquet float16 as FLOAT
}


def _duckdb_type(arrow_type: pa.DataType) -> str:
    if pa.types.is_list(arrow_type):
        return _duckdb_type(arrow_type.value_type) + "[]"
    return _DUCKDB_TYPES[arrow_type]


def manifest_dirs(root: str | os.PathLike, name: str) -> list[Path]:
    """Every ``manifests/<name>`` folder at or below ``root``, sorted."""
    root = Path(root)
    return sorted(p for p in root.glob(f"**/{MANIFESTS_DIR}/{name}") if p.is_dir())


def manifest_files(root: str | os.PathLike, name: str) -> list[str]:
    """Committed Parquet parts of manifest ``name`` below ``root``."""
    return [str(p) for d in manifest_dirs(root, name) for p in committed_parts(d)]


def _sql_list(files: list[str]) -> str:
    return "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"


def _view_sql(name: str, files: list[str]) -> str:
    schema = SCHEMAS[name]
    if files:
        # union_by_name: parts written before a nullable column was added still read; a column that no
        # part has yet (read from the Parquet footers only) becomes a typed null.
        present = {column for f in files for column in pq.read_schema(f).names}
        columns = ", ".join(
            f'"{f.name}"' if f.name in present else f'CAST(NULL AS {_duckdb_type(f.type)}) AS "{f.name}"'
            for f in schema
        )
        return f"SELECT {columns} FROM read_parquet({_sql_list(files)}, union_by_name = true)"
    nulls = ", ".join(f'CAST(NULL AS {_duckdb_type(f.type)}) AS "{f.name}"' for f in schema)
    return f"SELECT {nulls} WHERE false"


def connect(
    root: str | os.PathLike, *, database: str | os.PathLike = ":memory:"
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with views ``images``, ``captions``, ``rejects``, ``image_captions``, ``shards``.

    ``images`` has every input row (kept and rejected); ``rejects`` the rejected ones; ``image_captions``
    each kept image with its original caption and one kept VLM caption (the first by captioner, prompt);
    ``shards`` one row per curated shard and tier with its sample count and bytes; ``train_shards`` one row
    per training shard (from each ``train_shards/<name>/index.parquet``) with its count and bucket histogram.
    """
    con = duckdb.connect(str(database))
    for name in SCHEMAS:
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {_view_sql(name, manifest_files(root, name))}")
    con.execute(
        f"CREATE OR REPLACE VIEW rejects AS SELECT key, source, reason, width, height, format "
        f"FROM images WHERE status = '{REJECTED}'"
    )
    con.execute(f"CREATE OR REPLACE VIEW image_captions AS {_image_captions_sql(con, root)}")
    con.execute(
        f"""
        CREATE OR REPLACE VIEW shards AS
        SELECT shard, tier, count(*) AS num_samples, sum(num_bytes) AS num_bytes
        FROM images WHERE status = '{KEPT}' AND shard IS NOT NULL
        GROUP BY shard, tier
        """
    )
    con.execute(f"CREATE OR REPLACE VIEW train_shards AS {_train_shards_sql(root)}")
    return con


def _train_shards_sql(root: str | os.PathLike) -> str:
    indexes = sorted(str(p) for p in Path(root).glob(f"**/{TRAIN_SHARDS_DIR}/*/{INDEX_FILE}"))
    if not indexes:
        return (
            "SELECT CAST(NULL AS VARCHAR) AS name, CAST(NULL AS VARCHAR) AS shard, "
            "CAST(NULL AS BIGINT) AS num_samples, CAST(NULL AS VARCHAR) AS buckets WHERE false"
        )
    # The folder name is the training set's name: …/train_shards/<name>/index.parquet.
    return (
        "SELECT split_part(filename, '/', -2) AS name, shard, num_samples, buckets "
        f"FROM read_parquet({_sql_list(indexes)}, filename = true)"
    )


def _image_captions_sql(con: duckdb.DuckDBPyConnection, root: str | os.PathLike) -> str:
    """Kept images with one kept VLM caption each (the first by captioner, then prompt).

    The captioning job writes at most one row per (key, captioner, prompt) in a run folder, so when the
    captions come from one run folder and one (captioner, prompt) pair — the usual case, checked here on two
    dictionary-encoded columns in milliseconds — a plain join is exact, and 2–3× faster on 10M rows than
    picking one caption per key first (docs/benchmarks.md, selection).
    """
    pairs = con.execute(
        f"SELECT count(*) FROM (SELECT DISTINCT captioner, prompt FROM captions WHERE status = '{KEPT}')"
    )
    unique = pairs.fetchall()[0][0] <= 1 and len(manifest_dirs(root, "captions")) <= 1
    if unique:
        vlm = f"SELECT key, caption AS caption_vlm, captioner FROM captions WHERE status = '{KEPT}'"
    else:
        vlm = f"""
            SELECT key, arg_min(caption, captioner || chr(0) || prompt) AS caption_vlm,
                   arg_min(captioner, captioner || chr(0) || prompt) AS captioner
            FROM captions WHERE status = '{KEPT}' GROUP BY key"""
    return f"""
        WITH vlm AS ({vlm})
        SELECT i.*, vlm.caption_vlm, vlm.captioner
        FROM images i LEFT JOIN vlm USING (key)
        WHERE i.status = '{KEPT}'"""
