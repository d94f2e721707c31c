"""``pixsigma-verify``: check every committed manifest part and shard of a run against its commit marker.

For each folder with a ``_committed/`` marker folder (manifests, curated, training and eval shards, work
chunks) it checks that every marker has its file, that the file has the size and sha256 the marker
recorded, that a Parquet part's footer reads and holds the recorded row count, that a tar lists the
recorded number of samples, and that no visible file of the kind the folder commits lacks a marker. Then that every
kept row of the ``images`` manifest names a committed shard. Markers of older runs (named after the
part, no ``.committed`` suffix) are reported, and renamed by ``--migrate``.
CLI: ``python -m manifests.verify --input RUN [--fast] [--migrate]``; exit status 1 when a problem is found.
"""

from __future__ import annotations

import argparse
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.checks import InputError, cli, one_line
from manifests.db import connect
from manifests.io import (
    COMMITTED_DIR,
    MARKER_SUFFIX,
    file_sha256,
    legacy_markers,
    marker_info,
    migrate_markers,
)
from manifests.schema import KEPT

DATA_SUFFIXES = (".parquet", ".tar")


@dataclass(frozen=True)
class Finding:
    path: str  # relative to the run folder
    message: str
    problem: bool = True  # False: a note (legacy marker names) that does not fail the check

    def __str__(self) -> str:
        return f"{'PROBLEM' if self.problem else 'note'}: {self.path}: {self.message}"


def marker_folders(root: Path) -> list[Path]:
    """Every folder under ``root`` that has a ``_committed/`` marker folder, sorted."""
    return sorted(p.parent for p in root.rglob(COMMITTED_DIR) if p.is_dir())


def markers(folder: Path) -> dict[str, Path]:
    """Part name → the data file its marker commits (which may not exist), for every marker in ``folder``."""
    parts = {}
    for marker in sorted((folder / COMMITTED_DIR).iterdir()):
        if not marker.is_file() or marker.name.startswith("."):
            continue
        part = marker.name[: -len(MARKER_SUFFIX)] if marker.name.endswith(MARKER_SUFFIX) else marker.name
        info = marker_info(folder, part) or {}
        if info.get("file"):
            parts[part] = folder / info["file"]
        elif part.endswith(DATA_SUFFIXES):  # a shard's marker is named after the whole file name
            parts[part] = folder / part
        else:  # a Parquet part's after its stem
            parts[part] = folder / f"{part}.parquet"
    return parts


def _count_samples(path: Path) -> int:
    """Samples in a WebDataset tar: distinct keys of its regular members (the name up to the first dot)."""
    keys = set()
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if member.isfile():
                name = member.name.rsplit("/", 1)[-1]
                keys.add(member.name[: len(member.name) - len(name)] + name.split(".", 1)[0])
    return len(keys)


def check_file(folder: Path, part: str, path: Path, *, fast: bool) -> str | None:
    """What is wrong with one committed file, or None."""
    if not path.is_file():
        return "commit marker without its file (deleted or moved after it was written)"
    info = marker_info(folder, part) or {}
    size = path.stat().st_size
    if info.get("num_bytes") is not None and size != info["num_bytes"]:
        return f"{size} bytes, its commit marker says {info['num_bytes']}: truncated or replaced"
    if not fast and info.get("sha256") and file_sha256(path) != info["sha256"]:
        return "sha256 differs from its commit marker: the bytes changed after it was written"
    try:
        if path.suffix == ".parquet":
            metadata = pq.ParquetFile(path).metadata
            if info.get("num_rows") is not None and metadata.num_rows != info["num_rows"]:
                return f"{metadata.num_rows} rows, its commit marker says {info['num_rows']}"
            if not fast and not info.get("sha256"):  # a legacy marker: read every page instead
                pq.read_table(path)
        elif path.suffix == ".tar":
            num_samples = _count_samples(path)
            if info.get("num_samples") is not None and num_samples != info["num_samples"]:
                return f"{num_samples} samples, its commit marker says {info['num_samples']}"
    except (OSError, EOFError, tarfile.TarError, pa.ArrowException) as err:
        return f"cannot be read: {type(err).__name__}: {one_line(err)}"
    return None


def check_folder(root: Path, folder: Path, *, fast: bool, pool: ThreadPoolExecutor) -> list[Finding]:
    """Findings for one folder of committed files."""
    rel = lambda p: os.path.relpath(p, root)  # noqa: E731
    parts = markers(folder)
    findings = [
        Finding(rel(path), message)
        for (part, path), message in zip(
            parts.items(),
            pool.map(lambda item: check_file(folder, item[0], item[1], fast=fast), parts.items()),
            strict=True,
        )
        if message
    ]
    committed = set(parts.values())
    kinds = {
        path.suffix for path in committed
    }  # what this folder commits (an index.parquet beside tars is not)
    for path in sorted(folder.iterdir()):
        if (
            path.is_file()
            and path.suffix in kinds
            and not path.name.startswith(".")
            and path not in committed
        ):
            findings.append(
                Finding(rel(path), "no commit marker: left by a killed run; a rerun rewrites or removes it")
            )
    legacy = legacy_markers(folder)
    if legacy:
        findings.append(
            Finding(
                rel(folder / COMMITTED_DIR),
                f"{len(legacy)} commit markers use the old name (no {MARKER_SUFFIX} suffix; "
                f"e.g. {legacy[0].name}, which **/*{legacy[0].suffix or '.*'} globs match): run with --migrate",
                problem=False,
            )
        )
    return findings


def check_shard_references(root: Path) -> list[Finding]:
    """Kept ``images`` rows whose shard does not exist or is not committed."""
    con = connect(root)
    shards = [
        s for (s,) in con.execute(f"SELECT DISTINCT shard FROM images WHERE status = '{KEPT}'").fetchall()
    ]
    findings = []
    for shard in sorted(s for s in shards if s is not None):
        path = root / shard
        if not path.is_file() or not (marker_info(path.parent, path.name) is not None):
            num_rows = con.execute(
                f"SELECT count(*) FROM images WHERE status = '{KEPT}' AND shard = ?", [shard]
            ).fetchone()[0]
            findings.append(
                Finding(shard, f"named by {num_rows} kept images rows, but it is missing or not committed")
            )
    return findings


def verify(root: str | os.PathLike, *, fast: bool = False, num_workers: int = 4) -> list[Finding]:
    """Every finding for the run folder ``root`` (problems and notes), in path order."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"--input {str(root)!r} is not a folder: pass a run folder")
    findings: list[Finding] = []
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        for folder in marker_folders(root):
            findings += check_folder(root, folder, fast=fast, pool=pool)
    if not any(f.problem for f in findings):  # the images view needs every part readable
        findings += check_shard_references(root)
    return findings


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--input", required=True, help="run folder")
    parser.add_argument("--fast", action="store_true", help="sizes and counts only, no sha256")
    parser.add_argument("--migrate", action="store_true", help="rename old-style commit markers first")
    parser.add_argument("--num-workers", type=int, default=4, help="files checked at once")
    args = parser.parse_args(argv)
    root = Path(args.input)
    if args.migrate and root.is_dir():
        moved = sum(migrate_markers(folder) for folder in marker_folders(root))
        print(f"renamed {moved} old-style commit markers")
    findings = verify(root, fast=args.fast, num_workers=args.num_workers)
    for finding in findings:
        print(finding)
    problems = sum(f.problem for f in findings)
    print(f"{root}: {len(marker_folders(root))} folders of committed files checked, {problems} problems")
    if problems:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
