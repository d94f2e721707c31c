"""DuckDB views over committed manifest parts.

``connect(root)`` accepts a run's ``--output`` folder (it holds ``manifests/``) or a folder whose direct
sub-folders are runs. Only those runs' own ``manifests/<name>/`` folders contribute their committed parts
to the view ``<name>``: a copy of ``manifests/`` further down (a backup inside the run) is never read.
A connection made with ``restricted=True`` may read the run's manifest files and nothing else (DuckDB
external access off, configuration locked), which is how the jobs run a user's ``--where``.
"""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import pyarrow as pa

from manifests.checks import InputError, check_where, one_line, squeeze, where_subquery
from manifests.io import committed_parts, read_committed_schema
from manifests.schema import KEPT, REJECTED, SCHEMAS

MANIFESTS_DIR = "manifests"
TRAIN_SHARDS_DIR = "train_shards"  # written by manifests.materialize
INDEX_FILE = "index.parquet"
SELECTIONS_DIR = "selections"  # written by manifests.selection: <name>/rows.parquet
SELECTION_ROWS_FILE = "rows.parquet"

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


def run_dirs(root: str | os.PathLike) -> list[Path]:
    """The run folders ``connect`` reads: ``root`` if it holds ``manifests/``, else its direct sub-folders
    that do (a folder of runs). Never deeper: a backup copy inside a run is not a run of its own."""
    root = Path(root).absolute()
    if (root / MANIFESTS_DIR).is_dir():
        return [root]
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / MANIFESTS_DIR).is_dir())


def manifest_dirs(root: str | os.PathLike, name: str) -> list[Path]:
    """The ``manifests/<name>`` folder of each run ``connect(root)`` reads, sorted."""
    return [d for run in run_dirs(root) if (d := run / MANIFESTS_DIR / name).is_dir()]


def manifest_files(root: str | os.PathLike, name: str) -> list[str]:
    """Committed Parquet parts (absolute paths) of manifest ``name`` in the runs of ``root``."""
    return [str(p) for d in manifest_dirs(root, name) for p in committed_parts(d)]


def train_shard_indexes(root: str | os.PathLike) -> list[str]:
    """``train_shards/<name>/index.parquet`` of each run of ``root``."""
    return sorted(str(p) for run in run_dirs(root) for p in run.glob(f"{TRAIN_SHARDS_DIR}/*/{INDEX_FILE}"))


def selection_files(root: str | os.PathLike) -> list[str]:
    """``selections/<name>/rows.parquet`` of each run of ``root`` (what an ``excluded`` view may read)."""
    return sorted(
        str(p) for run in run_dirs(root) for p in run.glob(f"{SELECTIONS_DIR}/*/{SELECTION_ROWS_FILE}")
    )


def require_run(root: str | os.PathLike, *, flag: str = "--input") -> Path:
    """``root`` as a Path if it holds a committed ``images`` manifest; else an ``InputError`` saying why.

    Jobs call this first, so ``--input /nonexistent`` fails in a second instead of finishing with 0 rows.
    """
    path = Path(root)
    if not path.is_dir():
        raise InputError(f"{flag} {str(root)!r} is not a folder: pass the --output folder of a curation run")
    if not run_dirs(path):
        raise InputError(
            f"{flag} {str(root)!r} holds no {MANIFESTS_DIR}/ folder (nor do its sub-folders): "
            "pass the --output folder of a curation run"
        )
    if not manifest_files(path, "images"):
        raise InputError(
            f"{flag} {str(root)!r} has no committed images manifest part under {MANIFESTS_DIR}/images: "
            "the curation run did not finish; rerun it with the same --output"
        )
    return path


def _sql_list(files: list[str]) -> str:
    return "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"


def _view_sql(name: str, files: list[str]) -> str:
    schema = SCHEMAS[name]
    if files:
        # union_by_name: parts written before a nullable column was added still read; a column that no
        # part has yet (read from the Parquet footers only) becomes a typed null.
        present = {column for f in files for column in read_committed_schema(f).names}
        columns = ", ".join(
            f'"{f.name}"' if f.name in present else f'CAST(NULL AS {_duckdb_type(f.type)}) AS "{f.name}"'
            for f in schema
        )
        return f"SELECT {columns} FROM read_parquet({_sql_list(files)}, union_by_name = true)"
    nulls = ", ".join(f'CAST(NULL AS {_duckdb_type(f.type)}) AS "{f.name}"' for f in schema)
    return f"SELECT {nulls} WHERE false"


def connect(
    root: str | os.PathLike, *, database: str | os.PathLike = ":memory:", restricted: bool = False
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with views ``images``, ``captions``, ``rejects``, ``image_captions``, ``shards``.

    ``images`` has every input row (kept and rejected); ``rejects`` the rejected ones; ``image_captions``
    each kept image with its original caption and one kept VLM caption (the first by captioner, prompt);
    ``shards`` one row per curated shard and tier with its sample count and bytes; ``train_shards`` one row
    per training shard (from each ``train_shards/<name>/index.parquet``) with its count and bucket histogram.
    A committed part that is truncated or unreadable raises ``CorruptPartError`` naming it.
    ``restricted``: the connection may read only these files and the run's selections (see ``restrict``).
    """
    con = duckdb.connect(str(database))
    files = {name: manifest_files(root, name) for name in SCHEMAS}
    for name in SCHEMAS:
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {_view_sql(name, files[name])}")
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
    indexes = train_shard_indexes(root)
    con.execute(f"CREATE OR REPLACE VIEW train_shards AS {_train_shards_sql(indexes)}")
    if restricted:
        restrict(con, [f for parts in files.values() for f in parts] + indexes + selection_files(root))
    return con


def restrict(con: duckdb.DuckDBPyConnection, readable: list[str]) -> None:
    """From now on ``con`` may touch the files ``readable`` and no other file.

    DuckDB's ``enable_external_access = false`` with ``allowed_paths``, then ``lock_configuration`` so no
    later statement can turn it back on. The views keep working (they read only those files); a
    ``read_csv('/etc/passwd')`` or a ``COPY … TO`` anywhere else raises a permission error. DuckDB has no
    read-only flag per path, so a ``COPY`` statement could still overwrite an allowed file: that is why a
    user's filter is also checked to be one expression (``manifests.checks.check_where``), never a statement.
    """
    if readable:
        con.execute(f"SET allowed_paths = {_sql_list(sorted(set(readable)))}")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def filter_sql(con: duckdb.DuckDBPyConnection, view: str, where: str, *, flag: str = "--where") -> str:
    """The checked ``SELECT * FROM <view> WHERE (<where>)``, bound once on ``con`` so an unknown column or a
    type error is an ``InputError`` naming ``flag`` before anything runs. Embed it whole as a subquery."""
    subquery = where_subquery(view, check_where(where, view=view, flag=flag))
    try:
        con.execute(f"EXPLAIN {subquery}")
    except duckdb.Error as err:
        raise InputError(
            f"{flag} {squeeze(where)!r} is not a valid filter over the {view} view: {one_line(err)}"
        ) from err
    return subquery


def _train_shards_sql(indexes: list[str]) -> str:
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
