"""Readers that turn `--input` arguments into source records, and read a record's bytes.

An input is a folder, glob or fsspec URI of image files; a WebDataset tar (``.tar``, including
img2dataset output); or a URL list (``.parquet``/``.csv`` with ``url`` and optional ``caption``), which is
downloaded through img2dataset into the run folder and then read as tars. Listing touches names and tar
headers only; image bytes are read by the Ray stages through ``open_source``.

Listing streams in partitions (``plan_listing`` → ``ListingUnit``s → ``list_unit``): a folder is one unit
for its own files plus one per sub-folder, a downloaded URL list one per img2dataset shard; each unit is
listed by a Ray task that writes its records to Parquet, so no process ever holds the whole listing.
``records_of_path`` turns one listed path into its records (one image, or every sample of a tar): the
place where a new kind of input file is handled.

A source record: ``key``, ``source`` (file URI, or tar URI + ``#`` + member), ``caption_orig``, and where
known ``url``, ``source_key``, ``source_meta``, ``download_status``; ``reason`` when the input is already
a rejection (a failed download); ``tar_offset``/``tar_size`` for tar members; ``data`` for ``memory://``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import fsspec
import pyarrow.csv as pv
import pyarrow.parquet as pq

from curation import rundir
from curation.config import DownloadConfig

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
CAPTION_EXTENSION = ".txt"
TAR_EXTENSION = ".tar"
URL_LIST_EXTENSIONS = (".parquet", ".csv")
SUCCESS = "success"  # img2dataset's status of a downloaded row
RECORD_FIELDS = (
    "url",
    "source_key",
    "source_meta",
    "download_status",
    "reason",
    "tar_offset",
    "tar_size",
    "data",
)


def key_for(source: str) -> str:
    """A stable key from the source URI: same source, same key, whatever the arrival order.

    Hex only, so it never contains the dot that WebDataset uses to split key from extension.
    """
    return hashlib.blake2b(source.encode(), digest_size=10).hexdigest()


def _record(key_source: str, source: str, caption: str | None, **extra) -> dict:
    record = {"key": key_for(key_source), "source": source, "caption_orig": caption}
    record.update({f: extra.get(f) for f in RECORD_FIELDS})
    return record


def _protocol(fs: fsspec.AbstractFileSystem) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def _uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return "file://" + os.path.abspath(path) if _protocol(fs) == "file" else fs.unstrip_protocol(path)


def _caption_for(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    sidecar = os.path.splitext(path)[0] + CAPTION_EXTENSION
    if fs.exists(sidecar):
        return fs.cat_file(sidecar).decode("utf-8", errors="replace").strip()
    return None


def is_listed(path: str) -> bool:
    """Whether a path found in an input folder or glob is an input (image or tar)."""
    return path.lower().endswith(IMAGE_EXTENSIONS + (TAR_EXTENSION,))


def records_of_path(fs: fsspec.AbstractFileSystem, path: str) -> list[dict]:
    """The source records of one listed path: every sample of a tar, or the image itself."""
    if path.lower().endswith(TAR_EXTENSION):
        return list_tar(fs, path)
    source = _uri(fs, path)
    # memory:// lives in this process only; Ray workers cannot open it, so its bytes travel with the
    # record (meant for tests and small in-memory inputs; such inputs are listed in the driver).
    data = fs.cat_file(path) if _protocol(fs) == "memory" else None
    return [_record(source, source, _caption_for(fs, path), data=data)]


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset convention: the sample key is the member path up to the first dot of its basename."""
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(directory, stem), ext.lower()


def list_tar(fs: fsspec.AbstractFileSystem, path: str) -> list[dict]:
    """One record per sample of a WebDataset tar; reads headers, and the small ``txt``/``json`` members.

    The image member's byte range is recorded so a stage can read it with one seek. A sample whose
    ``json`` names a ``url`` (img2dataset output) is keyed by that URL, so the same picture downloaded
    twice keeps one key; other samples are keyed by tar URI + member.
    """
    tar_uri = _uri(fs, path)
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    records = []
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            if member.isfile():
                sample_key, ext = _split_member(member.name)
                samples.setdefault(sample_key, {})[ext] = member
        for sample_key, members in sorted(samples.items()):
            caption = (
                tar.extractfile(members["txt"]).read().decode("utf-8", "replace")
                if "txt" in members
                else None
            )
            meta_bytes = tar.extractfile(members["json"]).read() if "json" in members else None
            meta = json.loads(meta_bytes) if meta_bytes else {}
            image = next((m for ext, m in sorted(members.items()) if "." + ext in IMAGE_EXTENSIONS), None)
            source = f"{tar_uri}#{image.name if image else sample_key}"
            url = meta.get("url") if isinstance(meta.get("url"), str) else None
            extra = {
                "url": url,
                "source_key": posixpath.basename(sample_key),
                "source_meta": meta_bytes.decode("utf-8", "replace") if meta_bytes else None,
                "download_status": meta.get("status") if url else None,
            }
            if image is None:
                extra["reason"] = "no_image_member"
            else:
                extra.update(tar_offset=image.offset_data, tar_size=image.size)
            records.append(_record(url or source, source, caption, **extra))
    return records


def _url_list_columns(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    with fs.open(path, "rb") as f:
        if path.lower().endswith(".parquet"):
            return pq.read_schema(f).names
        return pv.read_csv(f).column_names


def download_url_list(spec: str, out_dir: Path, cfg: DownloadConfig) -> Path:
    """Download a URL list with img2dataset as a library (WebDataset output, original bytes, no resize).

    img2dataset's incremental mode skips shards it finished before, so a rerun downloads only what is
    missing. Returns the output folder.
    """
    from img2dataset import download

    fs, path = fsspec.core.url_to_fs(spec)
    columns = _url_list_columns(fs, path)
    if "url" not in columns:
        raise ValueError(f"URL list {spec!r} needs a 'url' column, has {columns}")
    out_dir.mkdir(parents=True, exist_ok=True)
    download(
        url_list=spec,
        output_folder=str(out_dir),
        input_format="parquet" if path.lower().endswith(".parquet") else "csv",
        url_col="url",
        caption_col="caption" if "caption" in columns else None,
        output_format="webdataset",
        resize_mode="no",
        skip_reencode=True,
        disable_all_reencoding=True,  # the original bytes, so our sha256 and shards match the origin
        processes_count=cfg.processes_count,
        thread_count=cfg.thread_count,
        timeout=cfg.timeout,
        retries=cfg.retries,
        number_sample_per_shard=cfg.samples_per_shard,
        incremental_mode="incremental",
        enable_wandb=False,
        extract_exif=False,
        disallowed_header_directives=[],  # the list's owner chose these URLs; robots headers are theirs
    )
    return out_dir


def downloaded_records(tar: Path) -> list[dict]:
    """Records of one img2dataset shard: its tar's samples, plus one rejection per row that failed."""
    records = list_tar(fsspec.filesystem("file"), str(tar))
    downloaded = {r["url"] for r in records}
    status = tar.with_suffix(".parquet")
    rows = pq.read_table(status).to_pylist() if status.is_file() else []
    for row in rows:
        if row["status"] == SUCCESS or row["url"] in downloaded:
            continue
        records.append(
            _record(
                row["url"],
                row["url"],
                row.get("caption"),
                url=row["url"],
                source_key=row.get("key"),
                download_status=row["status"],
                reason=f"download_error: {row.get('error_message') or row['status']}",
            )
        )
    return records


def list_downloaded(out_dir: Path) -> list[dict]:
    """Records of a whole img2dataset output folder (see ``downloaded_records``)."""
    return [r for tar in sorted(out_dir.glob("*.tar")) for r in downloaded_records(tar)]


@dataclass(frozen=True)
class ListingUnit:
    """One partition of the listing: what a single task lists.

    ``kind``: ``tree`` (every file below ``path``), ``files`` (the files directly in ``path``), ``glob``
    (``path`` is a pattern), ``path`` (one file named directly), ``downloaded`` (one img2dataset shard).
    """

    input_index: int
    spec: str
    kind: str
    path: str

    @property
    def in_driver(self) -> bool:
        """memory:// exists only in this process, so its units cannot run in Ray workers."""
        return self.spec.startswith("memory://")


def _subfolders(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """The immediate sub-folders of ``root`` (a local folder is scanned without listing its files)."""
    if _protocol(fs) == "file":
        with os.scandir(root) as entries:
            return sorted(e.path for e in entries if e.is_dir(follow_symlinks=False))
    return sorted(e["name"] for e in fs.ls(root, detail=True) if e["type"] == "directory")


def _download_dir_name(spec: str) -> str:
    return f"{Path(spec.split('://')[-1]).stem}-{key_for(spec)[:8]}"


def plan_listing(
    inputs: list[str], *, download_dir: Path | None, download: DownloadConfig, excluded: list[str] = ()
) -> list[ListingUnit]:
    """The listing units of every input, in input order. URL lists are downloaded here first."""
    units = []
    for index, spec in enumerate(inputs):
        if spec.lower().endswith(URL_LIST_EXTENSIONS):
            out = download_url_list(spec, download_dir / _download_dir_name(spec), download)
            units += [ListingUnit(index, spec, "downloaded", str(t)) for t in sorted(out.glob("*.tar"))]
            continue
        fs, root = fsspec.core.url_to_fs(spec)
        if fs.isdir(root):
            units.append(ListingUnit(index, spec, "files", root))
            units += [
                ListingUnit(index, spec, "tree", sub)
                for sub in _subfolders(fs, root)
                if not (_protocol(fs) == "file" and rundir.is_excluded(sub, list(excluded)))
            ]
        elif any(ch in root for ch in "*?["):
            units.append(ListingUnit(index, spec, "glob", root))
        elif fs.exists(root):
            units.append(ListingUnit(index, spec, "path", root))
        else:
            raise ValueError(f"input {spec!r} does not exist")
    return units


def unit_paths(unit: ListingUnit, excluded: list[str] = ()) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """(filesystem, the input paths of one unit, sorted); a file named directly is always listed."""
    fs, _ = fsspec.core.url_to_fs(unit.spec)
    if unit.kind == "tree":
        paths = [p for p in fs.find(unit.path) if is_listed(p)]
    elif unit.kind == "files":
        # As fs.find would: every entry that is not a folder (a symlinked folder is not followed).
        entries = fs.ls(unit.path, detail=True)
        paths = [e["name"] for e in entries if e["type"] != "directory" and is_listed(e["name"])]
    elif unit.kind == "glob":
        paths = [p for p in fs.glob(unit.path) if is_listed(p)]
    else:
        paths = [unit.path]
    if excluded and _protocol(fs) == "file":
        paths = [p for p in paths if not rundir.is_excluded(p, list(excluded))]
    return fs, sorted(paths)


def list_unit(unit: ListingUnit, excluded: list[str] = ()) -> Iterator[dict]:
    """The source records of one listing unit, streamed path by path."""
    if unit.kind == "downloaded":
        yield from downloaded_records(Path(unit.path))
        return
    fs, paths = unit_paths(unit, excluded)
    for path in paths:
        yield from records_of_path(fs, path)


def list_sources(
    inputs: list[str], *, download_dir: Path | None, download: DownloadConfig, excluded: list[str] = ()
) -> list[dict]:
    """Source records of every input in memory, sorted by key, one per key (the last input wins on a clash).

    For small inputs and tests; the job lists the same units in partitions (``curation.pipeline``).
    """
    records: dict[str, dict] = {}
    for unit in plan_listing(inputs, download_dir=download_dir, download=download, excluded=excluded):
        found = list(list_unit(unit, excluded))
        records.update((r["key"], r) for r in found)
        log.info("input %s (%s %s): %d samples", unit.spec, unit.kind, unit.path, len(found))
    return sorted(records.values(), key=lambda r: r["key"])


def open_source(record: dict) -> tuple[BinaryIO, int]:
    """A readable file object of the record's image bytes, and their length."""
    if record.get("data") is not None:
        return io.BytesIO(record["data"]), len(record["data"])
    if record.get("tar_offset") is not None:
        tar_uri = record["source"].rsplit("#", 1)[0]
        with fsspec.open(tar_uri, "rb") as f:
            f.seek(record["tar_offset"])
            data = f.read(record["tar_size"])
        return io.BytesIO(data), len(data)
    fs, path = fsspec.core.url_to_fs(record["source"])
    return fs.open(path, "rb"), fs.size(path)


def read_bytes(record: dict) -> bytes:
    """The record's whole image bytes (for hashing and shard writing)."""
    f, _ = open_source(record)
    with f:
        return f.read()
