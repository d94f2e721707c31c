"""URL lists fetched as shard tasks across the cluster, each fetch bounded: http/https only, a total
deadline per URL, a size cap, bodies streamed to a temporary file.

Fan-out (``download_url_list``): one task (``prepare_url_list``) streams the URL list into
``<out>/urls.parquet`` with one row group per shard (``download.samples_per_shard`` rows; a CSV is converted
on the way); the driver then holds one ``DownloadShard`` plan per row group (a row range, never the URLs)
and runs ``download_shard`` for each shard not yet committed, as Ray tasks (or in-process with
``LocalExecutor``). A shard task is img2dataset's own ``Downloader.download_shard`` (what its ``ray``
distributor runs per shard, img2dataset 1.47 ``distributor.py``) writing into a private temporary folder;
its tar, status Parquet and stats are then renamed into ``<out>/`` and a commit marker is written, so a
killed job leaves no half shard and its rerun skips every committed one.

Why a wrapper around the fetch and not an img2dataset option: img2dataset 1.47 has none for this. Its
``timeout`` is urllib's per-socket-read timeout (a server dripping 1 byte/s never trips it), it reads every
body whole into memory (``r.read()``) with no cap, and ``urllib.request.urlopen`` fetches ``file://`` and
``ftp://`` rows too. It has no hook for the fetch either: ``Downloader.download_shard`` calls the module
function ``img2dataset.downloader.download_image`` by name.

So ``BoundedDownloader`` subclasses img2dataset's ``Downloader`` and, in the process that runs the shard,
points that one module name at ``fetch_for_img2dataset`` (same signature, same ``(key, stream, error)``
result) before running the unchanged ``download_shard``. One name is replaced and nothing else is copied; a
test runs real img2dataset against a loopback server to hold it to that (tests/curation/
test_hostile_inputs.py), and ``_check_img2dataset`` fails loudly if a future img2dataset renames it.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import logging
import math
import shutil
import socket
import tempfile
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

import fsspec
import img2dataset.downloader
import pyarrow as pa
import pyarrow.csv as pv
import pyarrow.parquet as pq
from img2dataset.resizer import Resizer
from img2dataset.writer import WebDatasetSampleWriter

from curation.config import DownloadConfig
from curation.executor import TASK_BASE_BYTES, Executor, LocalExecutor
from manifests.io import file_sha256, mark_committed, marker_info, publish, temp_path

log = logging.getLogger(__name__)

ALLOWED_SCHEMES = ("http", "https")
CHUNK_BYTES = 64 * 1024
SPOOL_BYTES = 1 << 20  # a body above this spills from memory to a temporary file while it downloads
# Declared task memory (``memory=``), from the shard plan and DownloadConfig:
URL_ROW_BYTES = 2_048  # one URL-list row (url + caption strings) as Arrow, and the copy a concat or slice makes
IMG2DATASET_BYTES = 256 << 20  # img2dataset, cv2 and albumentations imported into the worker
# img2dataset decodes each body once (cv2, to read its size) before writing it: the pixels of one image, up to a
# 13k × 13k RGB picture; a larger one costs more than declared for its moment.
DECODED_BYTES = 512 << 20
# img2dataset's browser user agent, so servers answer us as they answer img2dataset.
USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
# Reasons of our own; list_downloaded keeps them as the row's reason (other errors are `download_error`).
UNSUPPORTED_SCHEME = "unsupported_scheme"
DOWNLOAD_TOO_LARGE = "download_too_large"
OWN_REASONS = (UNSUPPORTED_SCHEME, DOWNLOAD_TOO_LARGE)


class DownloadRefused(Exception):
    """A URL we do not fetch, or a body we stop reading; the message starts with the reason word."""


class _Deadline:
    """Shuts the sockets of one download down when its total time is up.

    A blocked read then returns at once (EOF), whichever phase it is in (status line, headers, body), so
    the whole download ends within ``seconds`` however slowly the server drips.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shut(sock)

    def cancel(self) -> None:
        self._timer.cancel()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    # socket.socket.shutdown on the descriptor itself, also for an SSLSocket (whose own shutdown would
    # tear down its TLS state under a reading thread).
    with contextlib.suppress(OSError):  # already closed by its owner: nothing left to stop
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Watched:
    """A connection whose socket the deadline watches once connected (for HTTPS: once the TLS handshake is
    done; the handshake itself has the per-read timeout)."""

    def __init__(self, *args, deadline: _Deadline, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._deadline = deadline

    def connect(self) -> None:
        super().connect()
        self._deadline.watch(self.sock)


class _HTTPConnection(_Watched, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_Watched, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self._deadline = deadline

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_HTTPConnection, req, deadline=self._deadline)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self._deadline = deadline

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_HTTPSConnection, req, context=self._context, deadline=self._deadline)


def _opener(deadline: _Deadline) -> urllib.request.OpenerDirector:
    """urllib's default chain minus the file, FTP and data handlers: a redirect to ``file://`` or
    ``ftp://`` fails as an unknown URL type instead of being followed."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        _HTTPHandler(deadline),
        _HTTPSHandler(deadline),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPRedirectHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def fetch(url: str, *, timeout: float, max_bytes: int, headers: dict[str, str]) -> tuple[BinaryIO, Message]:
    """The body of ``url`` (a spooled temporary file at position 0) and the response headers.

    Raises ``DownloadRefused`` for a scheme other than http/https (before any I/O) and for a body over
    ``max_bytes`` (by its Content-Length, or as soon as the bytes read pass it); ``TimeoutError`` when
    the whole download, redirects included, takes longer than ``timeout`` seconds; urllib's errors
    (``HTTPError``, ``URLError``, ``http.client.HTTPException``) otherwise. DNS lookup is the one step
    outside the deadline (``getaddrinfo`` cannot be interrupted).
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise DownloadRefused(f"{UNSUPPORTED_SCHEME}: {scheme or 'none'} (only http and https are fetched)")
    deadline = _Deadline(timeout)
    body = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 — returned to the caller
    try:
        request = urllib.request.Request(url, headers=headers)
        with _opener(deadline).open(request, timeout=timeout) as response:
            _read_capped(response, body, max_bytes=max_bytes)
            response_headers = response.headers
    except BaseException as err:
        body.close()
        if deadline.expired and isinstance(err, (OSError, http.client.HTTPException)):
            raise TimeoutError(f"timed out after {timeout} s (total per URL)") from err
        raise
    finally:
        deadline.cancel()
    if deadline.expired:  # the shutdown ended the body early as a clean EOF
        body.close()
        raise TimeoutError(f"timed out after {timeout} s (total per URL)")
    body.seek(0)
    return body, response_headers


def _read_capped(response: http.client.HTTPResponse, body: BinaryIO, *, max_bytes: int) -> None:
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise DownloadRefused(f"{DOWNLOAD_TOO_LARGE}: Content-Length {declared} is over {max_bytes} bytes")
    num_bytes = 0
    # read1: at most one socket read per call, so the cap and the deadline act between reads.
    while chunk := response.read1(CHUNK_BYTES):
        num_bytes += len(chunk)
        if num_bytes > max_bytes:
            raise DownloadRefused(f"{DOWNLOAD_TOO_LARGE}: body is over {max_bytes} bytes")
        body.write(chunk)
    if declared.isdigit() and num_bytes != int(declared):
        raise http.client.IncompleteRead(b"", int(declared) - num_bytes)


def fetch_for_img2dataset(
    row: tuple[int, str],
    timeout: int,
    user_agent_token: str | None,
    disallowed_header_directives: set[str] | None,
    *,
    max_bytes: int,
) -> tuple[int, BinaryIO | None, str | None]:
    """img2dataset's ``download_image`` contract: ``(key, stream, None)`` or ``(key, None, error)``."""
    key, url = row
    user_agent = USER_AGENT
    if user_agent_token:
        user_agent += f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
    try:
        body, headers = fetch(url, timeout=timeout, max_bytes=max_bytes, headers={"User-Agent": user_agent})
    except (DownloadRefused, OSError, http.client.HTTPException, ValueError) as err:
        # One URL's failure is that row's status and error message (img2dataset's own contract).
        return key, None, str(err) or type(err).__name__
    if disallowed_header_directives and img2dataset.downloader.is_disallowed(
        headers, user_agent_token, disallowed_header_directives
    ):
        body.close()
        return key, None, "Use of image disallowed by X-Robots-Tag directive"
    return key, body, None


class BoundedDownloader(img2dataset.downloader.Downloader):
    """img2dataset's ``Downloader`` whose fetches go through ``fetch`` (see the module docstring)."""

    def __init__(self, *args, max_bytes: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_bytes = max_bytes

    def download_shard(self, row: tuple) -> None:
        # Runs in the process of the shard's task, where download_shard's threads look `download_image` up as
        # a module global on each call.
        img2dataset.downloader.download_image = functools.partial(
            fetch_for_img2dataset, max_bytes=self.max_bytes
        )
        return super().download_shard(row)


def _check_img2dataset() -> None:
    """The name ``BoundedDownloader`` replaces must exist, or the limits would silently not apply."""
    if not callable(getattr(img2dataset.downloader, "download_image", None)):
        raise RuntimeError(
            "img2dataset changed: img2dataset.downloader.download_image is gone; update curation.downloads"
        )


# ----------------------------------------------------------------------------------------------------
# Shards: the plan the driver holds, and the tasks that fetch them

URLS_PART = "urls"  # <out>/urls.parquet: the URL list, one row group per shard
URL_LIST_BATCH = 65_536  # rows read at a time while the list is streamed into shards
# img2dataset's shard and sample key widths (its defaults): shard 12 is 00012.tar, its samples 000120000…
OOM_SHARD_COUNT = 5


@dataclass(frozen=True)
class DownloadShard:
    """One shard of a URL list: row group ``shard_id`` of ``urls`` (rows ``start``–``stop``), fetched into
    ``out_dir/<shard_id:05d>.tar`` + ``.parquet`` (img2dataset's per-row status)."""

    urls: str
    urls_sha256: str
    has_caption: bool
    shard_id: int
    start: int
    stop: int
    out_dir: str
    cfg: DownloadConfig

    @property
    def name(self) -> str:
        return f"{self.shard_id:0{OOM_SHARD_COUNT}d}"

    @property
    def tar(self) -> Path:
        return Path(self.out_dir) / f"{self.name}.tar"

    @property
    def marker(self) -> dict:
        """What the commit marker must say for the shard to count as done (same list, same rows)."""
        return {"urls_sha256": self.urls_sha256, "rows": [self.start, self.stop]}


def _source_identity(spec: str) -> dict:
    """What a prepared list is reused for: the same path, size and modification time (an edited list at the
    same path is prepared again; hashing it instead would read a 33M-row list on every run)."""
    fs, path = fsspec.core.url_to_fs(spec)
    info = fs.info(path)
    changed = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    return {"source": spec, "size": info.get("size"), "mtime": str(changed)}


def _url_columns(f: BinaryIO, path: str) -> list[str]:
    if path.lower().endswith(".parquet"):
        return pq.ParquetFile(f).schema_arrow.names
    return pv.open_csv(f).schema.names


def _url_batches(f: BinaryIO, path: str, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The ``url`` (and ``caption``) columns of a Parquet or CSV URL list, streamed, as strings."""
    if path.lower().endswith(".parquet"):
        yield from pq.ParquetFile(f).iter_batches(batch_size=URL_LIST_BATCH, columns=columns)
        return
    convert = pv.ConvertOptions(include_columns=columns, column_types={c: pa.string() for c in columns})
    yield from pv.open_csv(f, convert_options=convert)


def prepare_memory(samples_per_shard: int) -> int:
    """``prepare_url_list``'s memory: one read batch of the list and up to two shards' rows being cut."""
    return TASK_BASE_BYTES + (URL_LIST_BATCH + 2 * samples_per_shard) * URL_ROW_BYTES


def download_memory(cfg: DownloadConfig) -> int:
    """A shard task's memory. img2dataset's threads each hold a body in memory up to ``SPOOL_BYTES`` (beyond it
    spills to disk, ``fetch``) and it queues at most twice ``thread_count`` fetched bodies; the one it writes is
    read whole (≤ ``max_bytes``, copied once by the decoder) and decoded; the shard's rows and status table."""
    in_flight = 2 * cfg.thread_count * SPOOL_BYTES
    written = 2 * cfg.max_bytes + DECODED_BYTES
    return TASK_BASE_BYTES + IMG2DATASET_BYTES + in_flight + written + 2 * cfg.samples_per_shard * URL_ROW_BYTES


def prepare_url_list(task: dict) -> dict:
    """Task: the URL list as ``<out>/urls.parquet``, ``samples_per_shard`` rows per row group (streamed; skipped
    when committed from the same list and shard size). Returns the plan's inputs: path, sha256, row count,
    whether there are captions. ``ValueError`` when the list has no ``url`` column."""
    spec, out_dir, per_shard = task["spec"], Path(task["out_dir"]), task["samples_per_shard"]
    identity = {**_source_identity(spec), "samples_per_shard": per_shard}
    info = marker_info(out_dir, URLS_PART)
    if info is not None and info.get("identity") == identity:
        return {k: info[k] for k in ("urls", "sha256", "num_rows", "has_caption")}
    fs, source = fsspec.core.url_to_fs(spec)
    with fs.open(source, "rb") as f:
        columns = _url_columns(f, source)
    if "url" not in columns:
        raise ValueError(f"URL list {spec!r} needs a 'url' column, has {columns}")
    has_caption = "caption" in columns
    schema = pa.schema([("url", pa.string())] + ([("caption", pa.string())] if has_caption else []))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{URLS_PART}.parquet"
    tmp = temp_path(path)
    num_rows, pending = 0, []
    try:
        with fs.open(source, "rb") as f, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for batch in _url_batches(f, source, schema.names):
                pending.append(pa.Table.from_batches([batch]).cast(schema))
                num_rows += batch.num_rows
                buffered = pa.concat_tables(pending)
                while buffered.num_rows >= per_shard:  # one write per row group: shard i is row group i
                    writer.write_table(buffered.slice(0, per_shard), row_group_size=per_shard)
                    buffered = buffered.slice(per_shard)
                pending = [buffered]
            if pending and pending[0].num_rows:
                writer.write_table(pending[0], row_group_size=per_shard)
        sha256 = file_sha256(tmp)
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    result = {"urls": str(path), "sha256": sha256, "num_rows": num_rows, "has_caption": has_caption}
    mark_committed(out_dir, URLS_PART, {**result, "identity": identity})
    return result


def plan_shards(prepared: dict, out_dir: Path, cfg: DownloadConfig) -> list[DownloadShard]:
    """The shard plans of a prepared URL list (row ranges only)."""
    per_shard = cfg.samples_per_shard
    return [
        DownloadShard(
            urls=prepared["urls"],
            urls_sha256=prepared["sha256"],
            has_caption=prepared["has_caption"],
            shard_id=i,
            start=i * per_shard,
            stop=min(prepared["num_rows"], (i + 1) * per_shard),
            out_dir=str(out_dir),
            cfg=cfg,
        )
        for i in range(math.ceil(prepared["num_rows"] / per_shard))
    ]


def is_downloaded(shard: DownloadShard) -> bool:
    """Whether ``shard`` was committed from the same URL list and rows."""
    info = marker_info(shard.out_dir, shard.name)
    return info is not None and all(info.get(k) == v for k, v in shard.marker.items())


def _downloader(shard: DownloadShard, output_folder: str, column_list: list[str]) -> BoundedDownloader:
    """img2dataset's downloader as ``img2dataset.download`` builds it for WebDataset output of the original
    bytes (no resize, no re-encode: our sha256 and shards match the origin), bounded by ``shard.cfg``."""
    resizer = Resizer(
        image_size=256,  # unused: resize_mode "no"
        resize_mode="no",
        resize_only_if_bigger=False,
        upscale_interpolation="lanczos",
        downscale_interpolation="area",
        encode_quality=95,
        encode_format="jpg",
        skip_reencode=True,
        disable_all_reencoding=True,
        min_image_size=0,
        max_image_area=float("inf"),
        max_aspect_ratio=float("inf"),
        blurrer=None,
    )
    return BoundedDownloader(
        sample_writer_class=WebDatasetSampleWriter,
        resizer=resizer,
        thread_count=shard.cfg.thread_count,
        save_caption=shard.has_caption,
        extract_exif=False,
        output_folder=output_folder,
        column_list=column_list,
        timeout=shard.cfg.timeout,
        number_sample_per_shard=shard.cfg.samples_per_shard,
        oom_shard_count=OOM_SHARD_COUNT,
        compute_hash="sha256",
        verify_hash_type=None,
        encode_format="jpg",
        retries=shard.cfg.retries,
        user_agent_token=None,
        disallowed_header_directives=None,  # the list's owner chose these URLs; robots headers are theirs
        max_bytes=shard.cfg.max_bytes,
    )


def download_shard(shard: DownloadShard) -> dict:
    """Task: fetch one shard with img2dataset into a private temporary folder, rename its files into
    ``out_dir`` and commit it. Skipped when already committed. Returns counts: ``{"urls", "success"}``."""
    _check_img2dataset()
    if is_downloaded(shard):
        return {
            "urls": shard.stop - shard.start,
            "success": marker_info(shard.out_dir, shard.name)["success"],
        }
    out_dir = Path(shard.out_dir)
    work = out_dir / f".{shard.name}.{uuid.uuid4().hex[:8]}.tmp"  # hidden: no glob of the folder sees it
    work.mkdir(parents=True)
    try:
        column_list = (["caption"] if shard.has_caption else []) + ["url"]
        rows = pq.ParquetFile(shard.urls).read_row_group(shard.shard_id, columns=column_list)
        if rows.num_rows != shard.stop - shard.start:
            raise RuntimeError(
                f"{shard.urls} row group {shard.shard_id} has {rows.num_rows} rows, planned "
                f"{shard.stop - shard.start}: the URL list changed under the job"
            )
        feather = work / f"{shard.name}.feather"
        with pa.OSFile(str(feather), "wb") as sink, pa.ipc.new_file(sink, rows.schema) as writer:
            writer.write_table(rows)
        _downloader(shard, str(work), column_list).download_shard((shard.shard_id, str(feather)))
        status = _status_of_every_row(work / f"{shard.name}.parquet", rows, shard)["status"]
        success = sum(1 for s in status.to_pylist() if s == "success")
        for suffix in (".tar", ".parquet", "_stats.json"):
            publish(work / f"{shard.name}{suffix}", out_dir / f"{shard.name}{suffix}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mark_committed(out_dir, shard.name, {**shard.marker, "success": success})
    return {"urls": rows.num_rows, "success": success}


def _status_of_every_row(path: Path, rows: pa.Table, shard: DownloadShard) -> pa.Table:
    """img2dataset's status Parquet, plus a ``failed_to_download`` row for every input row it wrote none for.

    ``Downloader.download_shard`` logs and skips a sample whose handling raised (img2dataset 1.47, its
    ``except Exception`` per sample): without this, that URL row would vanish from the manifest.
    """
    status = pq.read_table(path)
    digits = math.ceil(math.log10(shard.cfg.samples_per_shard))  # img2dataset's key: shard id + row index
    keys = [f"{shard.shard_id * 10**digits + i:0{digits + OOM_SHARD_COUNT}d}" for i in range(rows.num_rows)]
    written = set(status["key"].to_pylist())
    missing = [i for i, key in enumerate(keys) if key not in written]
    if not missing:
        return status
    log.warning(
        "shard %s: img2dataset wrote no status for %d rows; they are rejected", shard.name, len(missing)
    )
    extra = [
        {**{c: rows[c][i].as_py() for c in rows.column_names}, "key": keys[i], "status": "failed_to_download",
         "error_message": "img2dataset wrote no status row for it (see the download task's log)"}
        for i in missing
    ]  # fmt: skip
    status = pa.concat_tables([status, pa.Table.from_pylist(extra, schema=status.schema)])
    tmp = temp_path(path)
    pq.write_table(status, tmp)
    publish(tmp, path)
    return status


def download_url_list(
    spec: str, out_dir: Path, cfg: DownloadConfig, executor: Executor | None = None
) -> list[Path]:
    """Download a URL list into ``out_dir`` as shard tasks on ``executor`` (in-process by default); returns
    every shard's tar, in shard order. The driver holds shard plans only; committed shards are skipped."""
    executor = executor or LocalExecutor()
    if cfg.processes_count != 1:
        log.warning(
            "download.processes_count (%d) is ignored: each shard is its own task", cfg.processes_count
        )
    task = {"spec": spec, "out_dir": str(out_dir), "samples_per_shard": cfg.samples_per_shard}
    prepared = executor.map(prepare_url_list, [task], memory=prepare_memory(cfg.samples_per_shard))[0]
    shards = plan_shards(prepared, out_dir, cfg)
    pending = [s for s in shards if not is_downloaded(s)]
    counts = executor.map(download_shard, pending, memory=download_memory(cfg))
    log.info(
        "download %s: %d URLs in %d shards of ≤ %d, %d fetched now by %d %s tasks (%d downloaded)",
        spec, prepared["num_rows"], len(shards), cfg.samples_per_shard, sum(c["urls"] for c in counts),
        len(pending), executor.name, sum(c["success"] for c in counts),
    )  # fmt: skip
    return [s.tar for s in shards]
