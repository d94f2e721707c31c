"""Bounded HTTP fetches for URL lists: http/https only, a total deadline per URL, a size cap, bodies
streamed to a temporary file. img2dataset still does everything else (sharding, threads, processes,
incremental reruns, the WebDataset tars and its per-row status Parquet).

Why a wrapper and not an img2dataset option: img2dataset 1.47 has none for this. Its ``timeout`` is
urllib's per-socket-read timeout (a server dripping 1 byte/s never trips it), it reads every body whole
into memory (``r.read()``) with no cap, and ``urllib.request.urlopen`` fetches ``file://`` and ``ftp://``
rows too. It has no hook for the fetch either: ``Downloader.download_shard`` calls the module function
``img2dataset.downloader.download_image`` by name, in worker processes that img2dataset spawns itself.

So ``BoundedDownloader`` subclasses img2dataset's ``Downloader`` and, in each worker process, points that
one module name at ``fetch_for_img2dataset`` (same signature, same ``(key, stream, error)`` result) before
running the unchanged ``download_shard``. ``bounded_downloads`` makes ``img2dataset.main.download``
build a ``BoundedDownloader`` for the duration of one call. Two names are replaced and nothing else is
copied; a test runs real img2dataset against a loopback server to hold them to that (tests/curation/
test_hostile_inputs.py), and ``_check_img2dataset`` fails loudly if a future img2dataset renames them.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import importlib
import socket
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from email.message import Message
from typing import BinaryIO
from urllib.parse import urlsplit

import img2dataset.downloader

# `img2dataset.main` is shadowed by the package's `main` function; this is the module.
img2dataset_main = importlib.import_module("img2dataset.main")

ALLOWED_SCHEMES = ("http", "https")
CHUNK_BYTES = 64 * 1024
SPOOL_BYTES = 1 << 20  # a body above this spills from memory to a temporary file while it downloads
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
        # Runs in img2dataset's worker process (spawned for it alone), where download_shard's threads
        # look `download_image` up as a module global on each call.
        img2dataset.downloader.download_image = functools.partial(
            fetch_for_img2dataset, max_bytes=self.max_bytes
        )
        return super().download_shard(row)


def _check_img2dataset() -> None:
    """The two names ``bounded_downloads`` replaces must exist, or the limits would silently not apply."""
    for module, name in ((img2dataset.downloader, "download_image"), (img2dataset_main, "Downloader")):
        if not callable(getattr(module, name, None)):
            raise RuntimeError(
                f"img2dataset changed: {module.__name__}.{name} is gone; update curation.downloads"
            )


@contextlib.contextmanager
def bounded_downloads(*, max_bytes: int) -> Iterator[None]:
    """While open, ``img2dataset.download`` fetches through ``fetch`` with a ``max_bytes`` cap (its
    ``timeout`` becomes the total deadline per URL). For the driver process only, one call at a time."""
    _check_img2dataset()
    original = img2dataset_main.Downloader
    img2dataset_main.Downloader = functools.partial(BoundedDownloader, max_bytes=max_bytes)
    try:
        yield
    finally:
        img2dataset_main.Downloader = original
