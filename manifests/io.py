"""Atomic writes: temporary name → fsync → rename → commit marker. Readers see committed files only.

A part file ``<dir>/<part>.parquet`` (or a shard ``<dir>/<name>.tar``) is visible once renamed (rename is
atomic on POSIX), and counts as committed once its marker ``<dir>/_committed/<part>.committed`` exists. A
crash between the two leaves a complete file without a marker; the rerun rewrites it with the same bytes.
The marker is a small JSON: the file's name, size and sha256 plus what its writer wants to remember, so a
reader can tell a truncated or replaced file from the committed one (``manifests.verify`` checks all).
Markers end in ``.committed``, never in a data extension, so no glob of ``**/*.tar`` or ``**/*.parquet``
matches one. Runs written before that named the marker after the part itself (``_committed/<shard>.tar``):
such legacy markers still count, and ``migrate_markers`` (or ``pixsigma-verify --migrate``) renames them.
Temporary files start with ``.`` and end with ``.tmp`` so no glob of ``*.parquet`` or ``*.tar`` ever
matches them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.checks import InputError, one_line
from manifests.schema import SCHEMAS, conform

log = logging.getLogger(__name__)

COMMITTED_DIR = "_committed"
MARKER_SUFFIX = ".committed"
_HASH_BLOCK = 1 << 20


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


def marker_path(directory: str | os.PathLike, part: str) -> Path:
    """Where the commit marker of ``part`` lives: ``<directory>/_committed/<part>.committed``."""
    return Path(directory) / COMMITTED_DIR / f"{part}{MARKER_SUFFIX}"


def _legacy_marker_path(directory: str | os.PathLike, part: str) -> Path:
    """The marker name of runs written before markers had their own suffix (``_committed/<part>``)."""
    return Path(directory) / COMMITTED_DIR / part


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: str | os.PathLike, sha256: str | None = None) -> dict:
    """What a marker records about its file: name, size and sha256 (computed unless given)."""
    path = Path(path)
    return {"file": path.name, "num_bytes": path.stat().st_size, "sha256": sha256 or file_sha256(path)}


def mark_committed(directory: str | os.PathLike, part: str, info: dict | None = None) -> None:
    """Write the commit marker of ``part`` (a small JSON with whatever the writer wants to remember)."""
    atomic_write_bytes(marker_path(directory, part), json.dumps(info or {}, sort_keys=True).encode())
    legacy = _legacy_marker_path(directory, part)
    if legacy.is_file():
        legacy.unlink(missing_ok=True)  # another process may remove it first


def unmark_committed(directory: str | os.PathLike, part: str) -> None:
    """Remove the commit marker of ``part`` (new and legacy name): the file no longer counts as written."""
    marker_path(directory, part).unlink(missing_ok=True)
    legacy = _legacy_marker_path(directory, part)
    if legacy.is_file():
        legacy.unlink(missing_ok=True)  # another process may remove it first


def is_committed(directory: str | os.PathLike, part: str) -> bool:
    return marker_path(directory, part).exists() or _legacy_marker_path(directory, part).is_file()


def marker_info(directory: str | os.PathLike, part: str) -> dict | None:
    """The JSON a committed part's marker holds (``{}`` for an empty legacy marker); None if uncommitted."""
    for path in (marker_path(directory, part), _legacy_marker_path(directory, part)):
        if path.is_file():
            text = path.read_bytes()
            return json.loads(text) if text.strip() else {}
    return None


def legacy_markers(directory: str | os.PathLike) -> list[Path]:
    """Markers under ``<directory>/_committed`` still named the old way (no ``.committed`` suffix)."""
    markers = Path(directory) / COMMITTED_DIR
    if not markers.is_dir():
        return []
    return sorted(
        p
        for p in markers.iterdir()
        if p.is_file() and not p.name.endswith(MARKER_SUFFIX) and not p.name.startswith(".")
    )


def migrate_markers(directory: str | os.PathLike) -> int:
    """Rename the legacy markers of ``directory`` to ``<part>.committed``; returns how many were renamed.

    Safe to run from several processes at once (each scorer's ``ManifestWriter`` runs it): a legacy marker
    that another process renamed or removed since this one listed it is done, not an error.
    """
    moved = 0
    for legacy in legacy_markers(directory):
        new = legacy.with_name(legacy.name + MARKER_SUFFIX)
        try:
            if new.exists():
                legacy.unlink(missing_ok=True)
            else:
                os.replace(legacy, new)
        except FileNotFoundError:
            if not new.exists():  # neither name: not a rename by another process
                raise
        moved += 1
    if moved:
        _fsync_dir(Path(directory) / COMMITTED_DIR)
        log.info("renamed %d legacy commit markers in %s", moved, Path(directory) / COMMITTED_DIR)
    return moved


def committed_parts(directory: str | os.PathLike, suffix: str = ".parquet") -> list[Path]:
    """Files ``<directory>/*<suffix>`` that have a commit marker, sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(f"*{suffix}") if is_committed(directory, p.name[: -len(suffix)]))


class CorruptPartError(InputError):
    """A committed file that no longer matches its commit marker (truncated, replaced) or cannot be read."""


def check_committed_file(path: str | os.PathLike, part: str | None = None) -> None:
    """Raise ``CorruptPartError`` naming ``path`` if its size differs from what its marker recorded.

    Cheap (one stat and the small marker): readers call it on every part; ``manifests.verify`` also
    compares the sha256.
    """
    path = Path(path)
    part = part if part is not None else path.stem
    info = marker_info(path.parent, part) or {}
    expected = info.get("num_bytes")
    if expected is not None and path.stat().st_size != expected:
        raise CorruptPartError(
            f"committed part {path} is {path.stat().st_size} bytes but its commit marker says {expected}: "
            "it was truncated or replaced after it was written; restore it or rerun the stage that wrote it "
            "(python -m manifests.verify --input RUN lists every such file)"
        )


def commit_parquet(
    table: pa.Table, directory: str | os.PathLike, part: str, info: dict | None = None
) -> Path:
    """Write ``table`` as ``directory/<part>.parquet`` atomically, then commit it: the marker records the file's
    size and sha256, its row count and ``info``. Fixed writer options, so a rerun writes the same bytes."""
    path = Path(directory) / f"{part}.parquet"
    tmp = temp_path(path)
    try:
        pq.write_table(table, tmp, compression="zstd", write_statistics=True)
        record = file_record(tmp)
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    mark_committed(directory, part, {**record, "file": path.name, "num_rows": table.num_rows, **(info or {})})
    return path


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
        migrate_markers(self.directory)

    def path(self, part: str) -> Path:
        return self.directory / f"{part}.parquet"

    def is_committed(self, part: str) -> bool:
        return is_committed(self.directory, part)

    def write(self, table: pa.Table | list[dict], part: str, info: dict | None = None) -> Path:
        """Write ``table`` as ``<part>.parquet`` and commit it (``info`` goes in its marker). Returns the path."""
        if isinstance(table, list):
            table = pa.Table.from_pylist(table, schema=_loose(self.schema, table))
        return commit_parquet(conform(table, self.schema), self.directory, part, info)


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
    return pa.concat_tables([conform(read_committed_table(p), schema) for p in parts])


def read_committed_table(path: str | os.PathLike) -> pa.Table:
    """A committed Parquet part; a truncated or unreadable one raises ``CorruptPartError`` naming it."""
    return _read_committed(path, pq.read_table)


def read_committed_schema(path: str | os.PathLike) -> pa.Schema:
    """The Arrow schema of a committed Parquet part (its footer), naming the part if it cannot be read."""
    return _read_committed(path, pq.read_schema)


def _read_committed(path: str | os.PathLike, read):
    check_committed_file(path)
    try:
        return read(path)
    except (OSError, pa.ArrowException) as err:
        raise CorruptPartError(
            f"cannot read committed part {path}: {type(err).__name__}: {one_line(err)}"
        ) from err
