"""Readers that turn `--input` arguments into source records, and read a record's bytes.

An input is a folder, glob or fsspec URI of image files; a WebDataset tar (``.tar``, including
img2dataset output); or a URL list (``.parquet``/``.csv`` with ``url`` and optional ``caption``), which is
downloaded into the run folder by img2dataset shard tasks (``curation.downloads``) and then read as tars.
Listing touches names and tar headers only; image bytes are read by the Ray stages through ``open_source``.

Listing streams in partitions (``plan_listing`` → ``ListingUnit``s → ``list_unit``): a folder is one unit
for its own files plus one per sub-folder, a downloaded URL list one per img2dataset shard; each unit is
listed by one task (``curation.chunks``) that writes its records to Parquet, so no process holds the
whole listing (a flat folder's names are held by its one task).

A source record: ``key``, ``source`` (file URI, or tar URI + ``#`` + member), ``caption_orig``, and where
known ``url``, ``source_key``, ``source_meta``, ``download_status``; ``reason`` when the input is already
a rejection (a failed download); ``tar_offset``/``tar_size`` for tar members; ``data`` for ``memory://``.

Per-entry decisions are small functions that any listing loop calls: ``is_listed`` (which names are
inputs), ``records_of_path`` (one path → its records: a file, or a tar's samples), ``find_files`` and
``unlisted_folder_record`` (a folder that could not be listed, at any depth). Every input they see becomes
a record, kept or already rejected with a reason (``unsupported_format``, ``not_a_regular_file``, ``permission_denied``, ``unreadable_tar``,
``bad_metadata``, ``unreadable_sidecar``); nothing here raises for one bad input.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import re
import stat
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import fsspec
import pyarrow.parquet as pq

from curation import rundir
from curation.config import DownloadConfig
from curation.executor import Executor
from manifests import Rejected
from manifests.imageio import AVIF_SUPPORTED

log = logging.getLogger(__name__)

# Pillow decodes these (HEIC/HEIF through pillow-heif, registered by manifests.imageio).
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif",
) + ((".avif",) if AVIF_SUPPORTED else ())  # fmt: skip
# Image files we recognise by name but do not curate: each becomes an `unsupported_format` row (never a
# silent skip). Vector art has no pixels to score or train on; raw camera files and layered documents
# need their own developer; JPEG XL and JPEG 2000 are formats the shards do not carry.
UNSUPPORTED_IMAGE_EXTENSIONS = (
    ".svg", ".svgz", ".eps", ".psd", ".xcf", ".jxl", ".jp2", ".j2k",
    ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2",
) + (() if AVIF_SUPPORTED else (".avif",))  # fmt: skip
CAPTION_EXTENSION = ".txt"
TAR_EXTENSION = ".tar"
URL_LIST_EXTENSIONS = (".parquet", ".csv")
SUCCESS = "success"  # img2dataset's status of a downloaded row
TAR_MEMBER_KINDS = {
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "character_device",
    tarfile.BLKTYPE: "block_device",
    tarfile.FIFOTYPE: "fifo",
}
# Sidecars (captions, tar JSON) are read whole on the driver; more than this is not a caption.
MAX_SIDECAR_BYTES = 1 << 20
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

    Hex only, so it never contains the dot that WebDataset uses to split key from extension. A file name
    that is not valid UTF-8 arrives as a str with surrogate escapes; its raw bytes are hashed.
    """
    return hashlib.blake2b(source.encode("utf-8", "surrogateescape"), digest_size=10).hexdigest()


def text(value: str) -> str:
    """``value`` as valid UTF-8 text: undecodable file-name bytes (surrogate escapes) become ``\\xNN``.

    Arrow strings must be valid UTF-8; a POSIX file name need not be. ``local_path`` reverses this for
    file URIs, so such a file is still read.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return value


def _record(key_source: str, source: str, caption: str | None, **extra) -> dict:
    record = {"key": key_for(key_source), "source": source, "caption_orig": caption}
    record.update({f: extra.get(f) for f in RECORD_FIELDS})
    return {f: text(v) if isinstance(v, str) else v for f, v in record.items()}


def _rejected_record(source: str, reason: str, **extra) -> dict:
    return _record(source, source, None, reason=reason, **extra)


class NotARegularFile(OSError):
    """An input that is a FIFO, socket, device or folder: reading it could block forever or never end.

    Raised as ``NotARegularFile(0, kind, path)``; ``strerror`` is the kind (``fifo``, ``directory``…).
    """


def _file_kind(mode: int) -> str:
    kinds = {stat.S_ISFIFO: "fifo", stat.S_ISSOCK: "socket", stat.S_ISCHR: "character_device"}
    kinds |= {stat.S_ISBLK: "block_device", stat.S_ISDIR: "directory"}
    return next((kind for test, kind in kinds.items() if test(mode)), "special_file")


def _nonblocking(path: str, flags: int) -> int:
    # O_NONBLOCK: opening a FIFO for reading returns at once instead of waiting for a writer.
    return os.open(path, flags | os.O_NONBLOCK)


def open_regular(fs: fsspec.AbstractFileSystem, path: str) -> tuple[BinaryIO, int]:
    """(file object, size) of a regular file; ``NotARegularFile`` for a FIFO, socket, device or folder.

    Local files are opened non-blocking and checked with ``fstat`` on the open descriptor, so a FIFO named
    ``fifo.jpg`` is refused at once, and a file swapped for one after listing is refused too.
    """
    if _protocol(fs) != "file":
        return fs.open(path, "rb"), fs.size(path)
    try:
        f = open(path, "rb", opener=_nonblocking)  # noqa: SIM115 — returned to the caller
    except IsADirectoryError as err:
        raise NotARegularFile(err.errno, "directory", path) from err
    info = os.fstat(f.fileno())
    if not stat.S_ISREG(info.st_mode):
        f.close()
        raise NotARegularFile(0, _file_kind(info.st_mode), path)
    return f, info.st_size


def io_rejection(err: OSError, what: str = "") -> Rejected:
    """The reason for an input that could not be opened or read (``what`` names a sidecar or folder)."""
    detail = f"{what}: " if what else ""
    if isinstance(err, NotARegularFile):
        return Rejected(f"not_a_regular_file: {detail}{err.strerror}")
    if isinstance(err, PermissionError):
        return Rejected(f"permission_denied: {detail}{type(err).__name__}")
    return Rejected(f"io_error: {detail}{type(err).__name__}: {err.strerror or err}")


def _protocol(fs: fsspec.AbstractFileSystem) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def _uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return "file://" + os.path.abspath(path) if _protocol(fs) == "file" else fs.unstrip_protocol(path)


def local_path(source: str) -> str:
    """The local path of a ``file://`` source; undoes ``text``'s ``\\xNN`` escapes when no file has the
    escaped name itself (a literal backslash name wins, so an existing file is never shadowed)."""
    path = source.removeprefix("file://")
    if "\\x" in path and not os.path.lexists(path):
        return re.sub(r"\\x([89a-f][0-9a-f])", lambda m: chr(0xDC00 + int(m[1], 16)), path)
    return path


def read_sidecar(fs: fsspec.AbstractFileSystem, path: str) -> str | None | Rejected:
    """The caption in ``<stem>.txt`` beside an image: None when absent, ``Rejected`` when unreadable."""
    sidecar = os.path.splitext(path)[0] + CAPTION_EXTENSION
    what = f"caption sidecar {text(posixpath.basename(sidecar))}"
    try:
        f, _ = open_regular(fs, sidecar)
        with f:
            data = f.read(MAX_SIDECAR_BYTES + 1)
    except FileNotFoundError:
        return None
    except NotARegularFile as err:
        return Rejected(f"unreadable_sidecar: {what} is a {err.strerror}")
    except PermissionError as err:
        return io_rejection(err, what)
    except OSError as err:
        return Rejected(f"unreadable_sidecar: {what}: {type(err).__name__}")
    if len(data) > MAX_SIDECAR_BYTES:
        return Rejected(f"bad_metadata: {what} is over {MAX_SIDECAR_BYTES} bytes")
    return data.decode("utf-8", errors="replace").strip()


def is_listed(path: str) -> bool:
    """Whether a listed file is an input (an image, a tar, or an image format we name and reject)."""
    return path.lower().endswith(IMAGE_EXTENSIONS + UNSUPPORTED_IMAGE_EXTENSIONS + (TAR_EXTENSION,))


def _unsupported_format(name: str) -> str | None:
    ext = os.path.splitext(name)[1].lower()
    if ext == ".avif" and not AVIF_SUPPORTED:
        return "unsupported_format: avif (this Pillow build has no AVIF decoder)"
    return f"unsupported_format: {ext[1:]}" if ext in UNSUPPORTED_IMAGE_EXTENSIONS else None


def file_record(fs: fsspec.AbstractFileSystem, path: str) -> dict:
    """The record of one listed image file, rejected already when its name or caption sidecar says so.

    The file's type (FIFO, device…) is checked where it is opened (``open_regular``), in the scan tasks.
    """
    raw = _uri(fs, path)
    source = text(raw)
    if reason := _unsupported_format(path):
        return _record(raw, source, None, reason=reason)
    caption = read_sidecar(fs, path)
    if isinstance(caption, Rejected):
        return _record(raw, source, None, reason=caption.reason)
    # memory:// lives in this process only; Ray workers cannot open it, so its bytes travel
    # with the record (meant for tests and small in-memory inputs).
    data = fs.cat_file(path) if _protocol(fs) == "memory" else None
    return _record(raw, source, caption, data=data)


def records_of_path(fs: fsspec.AbstractFileSystem, path: str) -> list[dict]:
    """The records of one listed path: a tar's samples, or the file itself."""
    if path.lower().endswith(TAR_EXTENSION):
        return list_tar(fs, path)
    return [file_record(fs, path)]


def unlisted_folder_record(fs: fsspec.AbstractFileSystem, err: OSError) -> dict:
    """A row for a folder whose listing failed (its images are unknown, so the folder stands for them)."""
    folder = _uri(fs, err.filename) if isinstance(err.filename, str) else f"unlisted folder: {err}"
    log.warning("could not list %s (%s): its files are not curated", text(folder), type(err).__name__)
    return _rejected_record(folder, io_rejection(err, "folder not listed").reason)


def find_files(fs: fsspec.AbstractFileSystem, root: str, *, on_error: Callable[[OSError], None]) -> list[str]:
    """``fs.find(root)`` that reports every folder it cannot list to ``on_error``, at any depth.

    fsspec's ``walk`` silently omits an unlistable folder by default, and passes ``on_error`` to its
    top level only (fsspec 2025.x), so a locked sub-folder of images vanished without a trace. Here each
    folder is walked one level deep with ``on_error`` given.
    """
    found: list[str] = []
    folders = [root]
    while folders:
        for _, dirs, files in fs.walk(folders.pop(), maxdepth=1, on_error=on_error, detail=True):
            found += [info["name"] for info in files.values()]
            folders += [info["name"] for info in dirs.values()]
    return found


def _log_skipped(spec: str, names: list[str]) -> None:
    """Say which files of an input folder are not inputs (sidecars aside), so none vanishes unsaid."""
    skipped = Counter(os.path.splitext(n)[1].lower() or "(none)" for n in names)
    for sidecar in (CAPTION_EXTENSION, ".json"):
        skipped.pop(sidecar, None)
    if skipped:
        examples = ", ".join(f"{ext}: {count}" for ext, count in skipped.most_common(8))
        log.info("input %s: %d files are neither images nor tars (%s)", spec, skipped.total(), examples)


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset convention: the sample key is the member path up to the first dot of its basename."""
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(directory, stem), ext.lower()


def list_tar(fs: fsspec.AbstractFileSystem, path: str) -> list[dict]:
    """One record per sample of a WebDataset tar; reads headers, and the small ``txt``/``json`` members.

    The image member's byte range is recorded so a stage can read it with one seek. A sample whose
    ``json`` names a ``url`` (img2dataset output) is keyed by that URL, so the same picture downloaded
    twice keeps one key; other samples are keyed by tar URI + member. A tar that cannot be opened, or
    not be read to its end (truncated, an HTML page saved as ``.tar``), adds one ``unreadable_tar`` row
    for the tar itself beside the samples read before the damage.
    """
    tar_uri = _uri(fs, path)
    try:
        f, tar_bytes = open_regular(fs, path)
    except OSError as err:
        return [_rejected_record(tar_uri, io_rejection(err).reason)]
    records: list[dict] = []
    with f:
        samples, error = _tar_index(f)
        try:
            for sample_key, members in sorted(samples.items()):
                records.append(_sample_record(f, tar_uri, sample_key, members, tar_bytes=tar_bytes))
        except OSError as err:  # the storage failed under us: what was read stays, the tar row says why
            error = err
    if error is not None:
        log.warning("%s: read stopped after %d samples: %r", text(tar_uri), len(records), error)
        records.append(_rejected_record(tar_uri, f"unreadable_tar: {type(error).__name__}: {error}"))
    return records


def _tar_index(f: BinaryIO) -> tuple[dict[str, dict[str, tarfile.TarInfo]], Exception | None]:
    """Members by sample key and extension (folders left out), and the error that stopped the read."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if not member.isdir():
                    sample_key, ext = _split_member(member.name)
                    samples.setdefault(sample_key, {})[ext] = member
    except (tarfile.TarError, OSError) as err:
        return samples, err
    return samples, None


def _read_member(f: BinaryIO, member: tarfile.TarInfo | None, *, tar_bytes: int) -> bytes | None | Rejected:
    """A small member's bytes (a caption or JSON sidecar); None when absent or not a regular member."""
    if member is None or not member.isfile():
        return None
    if member.size > MAX_SIDECAR_BYTES:
        return Rejected(f"bad_metadata: member {text(member.name)} is over {MAX_SIDECAR_BYTES} bytes")
    if member.offset_data + member.size > tar_bytes:
        return Rejected(f"unreadable_tar: member {text(member.name)} is truncated")
    f.seek(member.offset_data)
    return f.read(member.size)


def _parse_meta(meta_bytes: bytes | None) -> dict | Rejected:
    """A sample's JSON sidecar as a dict; ``bad_metadata`` when it is not JSON or not an object."""
    if not meta_bytes:
        return {}
    try:
        meta = json.loads(meta_bytes)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, absurd nesting
        return Rejected(f"bad_metadata: json member is not JSON ({type(err).__name__})")
    if not isinstance(meta, dict):
        return Rejected(f"bad_metadata: json member is a JSON {type(meta).__name__}, not an object")
    return meta


def _sample_record(
    f: BinaryIO, tar_uri: str, sample_key: str, members: dict[str, tarfile.TarInfo], *, tar_bytes: int
) -> dict:
    """The record of one tar sample: its image member's byte range, caption and metadata, or the reason."""
    image = next((m for ext, m in sorted(members.items()) if "." + ext in IMAGE_EXTENSIONS), None)
    source = f"{tar_uri}#{image.name if image else sample_key}"
    caption = _read_member(f, members.get("txt"), tar_bytes=tar_bytes)
    meta_bytes = _read_member(f, members.get("json"), tar_bytes=tar_bytes)
    meta = _parse_meta(meta_bytes) if not isinstance(meta_bytes, Rejected) else meta_bytes
    url = meta.get("url") if isinstance(meta, dict) and isinstance(meta.get("url"), str) else None
    status = meta.get("status") if url else None
    extra = {
        "url": url,
        "source_key": posixpath.basename(sample_key),
        "source_meta": meta_bytes.decode("utf-8", "replace") if isinstance(meta_bytes, bytes) else None,
        "download_status": status if isinstance(status, str) else None,
    }
    caption_text = caption.decode("utf-8", "replace") if isinstance(caption, bytes) else None
    reason = _sample_problem(image, members, caption, meta, tar_bytes=tar_bytes)
    if reason is None:
        extra.update(tar_offset=image.offset_data, tar_size=image.size)
    return _record(url or source, source, caption_text, reason=reason, **extra)


def _sample_problem(
    image: tarfile.TarInfo | None, members: dict, caption: object, meta: object, *, tar_bytes: int
) -> str | None:
    """Why a tar sample cannot be curated (its sidecars, its image member), or None."""
    for read in (caption, meta):
        if isinstance(read, Rejected):
            return read.reason
    if image is None:
        unsupported = [ext for ext in sorted(members) if "." + ext in UNSUPPORTED_IMAGE_EXTENSIONS]
        return f"unsupported_format: {unsupported[0]}" if unsupported else "no_image_member"
    if not image.isfile():
        return f"not_a_regular_file: tar member is a {TAR_MEMBER_KINDS.get(image.type, 'special member')}"
    if image.offset_data + image.size > tar_bytes:
        return f"unreadable_tar: member {text(image.name)} is truncated"
    return None


def downloaded_records(tar: Path) -> list[dict]:
    """Records of one img2dataset shard: its tar's samples, plus one rejection per row of its status
    Parquet that was not downloaded (a URL listed twice keeps its downloaded record, see
    ``curation.chunks.sort_records``)."""
    records = list_tar(fsspec.filesystem("file"), str(tar))
    downloaded = {r["url"] for r in records}
    status = tar.with_suffix(".parquet")
    for row in pq.read_table(status).to_pylist() if status.is_file() else []:
        if row["status"] == SUCCESS or (row["url"] and row["url"] in downloaded):
            continue
        records.append(failed_download_record(row, tar.parent))
    return records


def failed_download_record(row: dict, out_dir: Path) -> dict:
    """The rejection of a URL-list row img2dataset did not download (its status Parquet row)."""
    from curation.downloads import OWN_REASONS

    error = row.get("error_message") or row["status"]
    # Our own refusals (scheme, size cap) keep their reason word; anything else is a download error.
    reason = error if error.split(":")[0] in OWN_REASONS else f"download_error: {error}"
    source = row["url"] or f"{out_dir.as_uri()}#row-{row.get('key')}"  # a row with no URL at all
    return _record(
        source,
        source,
        row.get("caption"),
        url=row["url"],
        source_key=row.get("key"),
        download_status=row["status"],
        reason=reason,
    )


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
    """The immediate sub-folders of ``root`` (a local folder is scanned without listing its files); none when
    ``root`` cannot be listed (its ``files`` unit reports that as a row)."""
    try:
        if _protocol(fs) == "file":
            with os.scandir(root) as entries:
                return sorted(e.path for e in entries if e.is_dir(follow_symlinks=False))
        return sorted(e["name"] for e in fs.ls(root, detail=True) if e["type"] == "directory")
    except OSError:
        return []


def download_dir_name(spec: str) -> str:
    """The folder (under the run's downloads/) of one URL list's img2dataset output."""
    return f"{Path(spec.split('://')[-1]).stem}-{key_for(spec)[:8]}"


def plan_listing(
    inputs: list[str],
    *,
    download_dir: Path | None,
    download: DownloadConfig,
    excluded: list[str] = (),
    executor: Executor | None = None,
) -> list[ListingUnit]:
    """The listing units of every input, in input order. URL lists are downloaded first, as shard tasks on
    ``executor`` (``curation.downloads``; in-process by default): one unit per downloaded shard."""
    units = []
    for index, spec in enumerate(inputs):
        if spec.lower().endswith(URL_LIST_EXTENSIONS):
            from curation.downloads import download_url_list  # imports img2dataset (cv2 and friends): lazily

            tars = download_url_list(spec, download_dir / download_dir_name(spec), download, executor)
            units += [ListingUnit(index, spec, "downloaded", str(t)) for t in tars]
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


def unit_paths(
    unit: ListingUnit, excluded: list[str] = ()
) -> tuple[fsspec.AbstractFileSystem, list[str], list[OSError]]:
    """(filesystem, the input paths of one unit sorted, folders whose listing failed); a file named
    directly is always listed."""
    fs, _ = fsspec.core.url_to_fs(unit.spec)
    unlisted: list[OSError] = []
    if unit.kind in ("tree", "files"):
        if unit.kind == "tree":
            files = find_files(fs, unit.path, on_error=unlisted.append)
        else:  # the folder's own files; its sub-folders are units of their own
            walked = fs.walk(unit.path, maxdepth=1, on_error=unlisted.append, detail=True)
            files = [info["name"] for _, _, entries in walked for info in entries.values()]
        paths = [p for p in files if is_listed(p)]
        _log_skipped(unit.spec, [p for p in files if not is_listed(p)])
    elif unit.kind == "glob":
        paths = [p for p in fs.glob(unit.path) if is_listed(p)]
    else:
        paths = [unit.path]
    if excluded and _protocol(fs) == "file":
        paths = [p for p in paths if not rundir.is_excluded(p, list(excluded))]
    return fs, sorted(paths), unlisted


def list_unit(unit: ListingUnit, excluded: list[str] = ()) -> Iterator[dict]:
    """The source records of one listing unit, streamed path by path."""
    if unit.kind == "downloaded":
        yield from downloaded_records(Path(unit.path))
        return
    fs, paths, unlisted = unit_paths(unit, excluded)
    for err in unlisted:
        yield unlisted_folder_record(fs, err)
    for path in paths:
        yield from records_of_path(fs, path)


def list_sources(
    inputs: list[str], *, download_dir: Path | None, download: DownloadConfig, excluded: list[str] = ()
) -> list[dict]:
    """Source records of every input in memory, sorted by key, one per key (the last input wins on a clash).

    For small inputs and tests; the job lists the same units in partitions (``curation.chunks``).
    """
    records: dict[str, dict] = {}
    for unit in plan_listing(inputs, download_dir=download_dir, download=download, excluded=excluded):
        found = list(list_unit(unit, excluded))
        # As curation.chunks.sort_records: a failed download never replaces a downloaded sample.
        records.update(
            (r["key"], r)
            for r in found
            if not (r.get("download_status") and r.get("reason") and r["key"] in records)
        )
        log.info("input %s (%s %s): %d samples", unit.spec, unit.kind, text(unit.path), len(found))
    return sorted(records.values(), key=lambda r: r["key"])


def open_source(record: dict) -> tuple[BinaryIO, int]:
    """A readable file object of the record's image bytes, and their length.

    ``NotARegularFile`` (an ``OSError``) for a FIFO, socket or device; see ``io_rejection``.
    """
    if record.get("data") is not None:
        return io.BytesIO(record["data"]), len(record["data"])
    if record.get("tar_offset") is not None:
        f, _ = _open_uri(_tar_uri(record["source"]))
        with f:
            f.seek(record["tar_offset"])
            data = f.read(record["tar_size"])
        return io.BytesIO(data), len(data)
    return _open_uri(record["source"])


def _tar_uri(source: str) -> str:
    """The tar of a member source ``<tar uri>#<member>``; the member name may itself hold a ``#``."""
    match = re.match(r"(.*?\.tar)#", source, flags=re.IGNORECASE)
    if match is None:
        raise ValueError(f"not a tar member source: {source!r}")
    return match[1]


def _open_uri(uri: str) -> tuple[BinaryIO, int]:
    """Open a source URI without fsspec's URL chaining: ``dbl::colon.jpg`` is a file name, not two URLs."""
    protocol, _ = fsspec.core.split_protocol(uri)
    if protocol in (None, "file"):
        return open_regular(fsspec.filesystem("file"), local_path(uri))
    return open_regular(fsspec.filesystem(protocol), uri)  # fs.open strips its own protocol


def read_bytes(record: dict) -> bytes:
    """The record's whole image bytes (for hashing and shard writing)."""
    f, _ = open_source(record)
    with f:
        return f.read()
