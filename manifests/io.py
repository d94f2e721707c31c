"""Atomic writes: temporary name → fsync → rename → commit marker. Readers see committed files only.

A part file ``<dir>/<part>.parquet`` is visible once renamed (rename is atomic on POSIX), and counts as
committed once ``<dir>/_committed/<part>`` exists. A crash between the two leaves a complete file
without a marker; the rerun rewrites it with the same bytes. Temporary files start with ``.`` and end
with ``.tmp`` so no glob of ``*.parquet`` or ``*.tar`` ever matches them.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.schema import SCHEMAS, conform

COMMITTED_DIR = "_committed"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """A unique hidden temporary name beside ``path`` (same folder, so rename stays atomic)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def publish(tmp: Path, path: Path) -> None:
    """fsync ``tmp``, rename it onto ``path`` and fsync the folder."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        tmp.write_bytes(data)
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def mark_committed(directory: Path, part: str, info: dict | None = None) -> None:
    """Write the commit marker of ``part`` (a small JSON with whatever the writer wants to remember)."""
    atomic_write_bytes(directory / COMMITTED_DIR / part, json.dumps(info or {}, sort_keys=True).encode())


def is_committed(directory: str | os.PathLike, part: str) -> bool:
    return (Path(directory) / COMMITTED_DIR / part).exists()


def committed_parts(directory: str | os.PathLike, suffix: str = ".parquet") -> list[Path]:
    """Files ``<directory>/*<suffix>`` that have a commit marker, sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(f"*{suffix}") if is_committed(directory, p.name[: -len(suffix)]))


class ManifestWriter:
    """Writes Parquet parts of one manifest (``images``, ``captions``, …) atomically.

    The schema is looked up and checked once here; every ``write`` conforms the table to it.
    """

    def __init__(self, directory: str | os.PathLike, schema_name: str) -> None:
        if schema_name not in SCHEMAS:
            raise ValueError(f"schema_name must be one of {sorted(SCHEMAS)}, got {schema_name!r}")
        self.schema: pa.Schema = SCHEMAS[schema_name]
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, part: str) -> Path:
        return self.directory / f"{part}.parquet"

    def is_committed(self, part: str) -> bool:
        return is_committed(self.directory, part)

    def write(self, table: pa.Table | list[dict], part: str) -> Path:
        """Write ``table`` as ``<part>.parquet`` and commit it. Returns the final path."""
        if isinstance(table, list):
            table = pa.Table.from_pylist(table, schema=_loose(self.schema, table))
        table = conform(table, self.schema)
        path = self.path(part)
        tmp = temp_path(path)
        try:
            # Fixed writer options so reruns produce the same bytes.
            pq.write_table(table, tmp, compression="zstd", write_statistics=True)
            publish(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        mark_committed(self.directory, part, {"num_rows": table.num_rows})
        return path


def _loose(schema: pa.Schema, rows: list[dict]) -> pa.Schema:
    """The sub-schema of the columns that ``rows`` actually use (the rest are filled by ``conform``)."""
    used = {k for row in rows for k in row}
    unknown = used - set(schema.names)
    if unknown:
        name = schema.metadata[b"pixsigma.schema"].decode()
        raise ValueError(f"{name}: unknown columns {sorted(unknown)}; schema has {schema.names}")
    return pa.schema([f for f in schema if f.name in used])


def read_manifest(directory: str | os.PathLike, schema_name: str) -> pa.Table:
    """All committed parts of one manifest folder as one table (empty table when there are none)."""
    schema = SCHEMAS[schema_name]
    parts = committed_parts(directory)
    if not parts:
        return schema.empty_table()
    return pa.concat_tables([conform(pq.read_table(p), schema) for p in parts])
