"""DuckDB views over committed manifest parts.

``connect(root)`` accepts a run's ``--output`` folder or any folder holding several runs: every
``manifests/<name>/`` folder below ``root`` contributes its committed parts to the view ``<name>``.
"""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import pyarrow as pa

from manifests.io import committed_parts
from manifests.schema import KEPT, REJECTED, SCHEMAS

MANIFESTS_DIR = "manifests"

_DUCKDB_TYPES = {
    pa.string(): "VARCHAR",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.float32(): "FLOAT",
    pa.float64(): "DOUBLE",
    pa.bool_(): "BOOLEAN",
}


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
        # union_by_name: parts written before a nullable column was added still read.
        columns = ", ".join(f'"{f.name}"' for f in schema)
        return f"SELECT {columns} FROM read_parquet({_sql_list(files)}, union_by_name = true)"
    nulls = ", ".join(f'CAST(NULL AS {_DUCKDB_TYPES[f.type]}) AS "{f.name}"' for f in schema)
    return f"SELECT {nulls} WHERE false"


def connect(
    root: str | os.PathLike, *, database: str | os.PathLike = ":memory:"
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with views ``images``, ``captions``, ``rejects`` and ``image_captions``.

    ``images`` has every input row (kept and rejected); ``rejects`` the rejected ones; ``image_captions``
    each kept image with its original caption and one kept VLM caption (the first by captioner, prompt).
    """
    con = duckdb.connect(str(database))
    for name in SCHEMAS:
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {_view_sql(name, manifest_files(root, name))}")
    con.execute(
        f"CREATE OR REPLACE VIEW rejects AS SELECT key, source, reason, width, height, format "
        f"FROM images WHERE status = '{REJECTED}'"
    )
    con.execute(
        f"""
        CREATE OR REPLACE VIEW image_captions AS
        WITH vlm AS (
            SELECT key, arg_min(caption, captioner || chr(0) || prompt) AS caption_vlm,
                   arg_min(captioner, captioner || chr(0) || prompt) AS captioner
            FROM captions WHERE status = '{KEPT}' GROUP BY key
        )
        SELECT i.*, vlm.caption_vlm, vlm.captioner
        FROM images i LEFT JOIN vlm USING (key)
        WHERE i.status = '{KEPT}'
        """
    )
    return con
