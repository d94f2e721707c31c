"""Readers that turn `--input` arguments into source records, and read a record's bytes.

An input is a folder, glob or fsspec URI of image files; a WebDataset tar (``.tar``, including
img2dataset output); or a URL list (``.parquet``/``.csv`` with ``url`` and optional ``caption``), which is
downloaded through img2dataset into the run folder and then read as tars. Listing happens on the driver
and touches names and tar headers only; image bytes are read by the Ray stages through ``open_source``.

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
from pathlib import Path
from typing import BinaryIO

import fsspec
import pyarrow.csv as pv
import pyarrow.parquet as pq

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


def _expand(spec: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """(filesystem, image and tar paths) of one input; a file named directly is always listed."""
    fs, root = fsspec.core.url_to_fs(spec)
    wanted = IMAGE_EXTENSIONS + (TAR_EXTENSION,)
    if fs.isdir(root):
        paths = [p for p in fs.find(root) if p.lower().endswith(wanted)]
    elif any(ch in root for ch in "*?["):
        paths = [p for p in fs.glob(root) if p.lower().endswith(wanted)]
    elif fs.exists(root):
        paths = [root]
    else:
        raise ValueError(f"input {spec!r} does not exist")
    return fs, sorted(paths)


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


def list_downloaded(out_dir: Path) -> list[dict]:
    """Records of an img2dataset output folder: its tars' samples, plus one rejection per failed row."""
    fs = fsspec.filesystem("file")
    records = [r for tar in sorted(out_dir.glob("*.tar")) for r in list_tar(fs, str(tar))]
    downloaded = {r["url"] for r in records}
    for part in sorted(out_dir.glob("*.parquet")):
        for row in pq.read_table(part).to_pylist():
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


def list_sources(inputs: list[str], *, download_dir: Path, download: DownloadConfig) -> list[dict]:
    """Source records of every input, sorted by key, one per key (the last input wins on a clash)."""
    records: dict[str, dict] = {}
    for spec in inputs:
        found = []
        if spec.lower().endswith(URL_LIST_EXTENSIONS):
            name = f"{Path(spec.split('://')[-1]).stem}-{key_for(spec)[:8]}"
            found = list_downloaded(download_url_list(spec, download_dir / name, download))
        else:
            fs, paths = _expand(spec)
            in_memory = _protocol(fs) == "memory"
            for path in paths:
                if path.lower().endswith(TAR_EXTENSION):
                    found.extend(list_tar(fs, path))
                    continue
                source = _uri(fs, path)
                # memory:// lives in this process only; Ray workers cannot open it, so its bytes travel
                # with the record (meant for tests and small in-memory inputs).
                data = fs.cat_file(path) if in_memory else None
                found.append(_record(source, source, _caption_for(fs, path), data=data))
        records.update((r["key"], r) for r in found)
        log.info("input %s: %d samples", spec, len(found))
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
