"""Hostile and messy inputs (issue 14, curation): each is generated here and ends as exactly one row,
kept or rejected with a reason, and the run completes. Before these fixes each of them aborted the run,
hung, lost the row silently or gave it the wrong reason."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zlib
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import manifests
from curation.config import CurationConfig, DownloadConfig, ShardConfig
from curation.downloads import DownloadRefused, download_url_list, fetch
from curation.pipeline import run
from curation.sources import (
    downloaded_records,
    io_rejection,
    list_sources,
    open_source,
    read_bytes,
)
from curation.stages import scan_header
from manifests.imageio import AVIF_SUPPORTED
from tests.conftest import REPO
from tests.curation.conftest import TINY_CLIP_DEDUP

LOCAL = fsspec.filesystem("file")
NON_UTF8_NAME = b"caf\xe9.jpg"  # Latin-1 é: what an old Windows archive unpacks to


def write_raw_name(folder: Path, name: bytes, data: bytes) -> None:
    """Write a file whose name is raw bytes (not necessarily valid UTF-8)."""
    with open(os.fsencode(folder) + b"/" + name, "wb") as f:
        f.write(data)


def picture(seed: int, size: tuple[int, int] = (1024, 1024)) -> Image.Image:
    """A smooth random picture (distinct per seed, so dedup keeps every one)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
        size, Image.Resampling.BICUBIC
    )


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def tar_of(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def list_folder(folder: Path) -> dict[str, dict]:
    """Records of a folder by the name after the folder (``x.tar#member`` for tar samples)."""
    records = list_sources([str(folder)], download_dir=None, download=DownloadConfig())
    prefix = f"file://{folder}/"
    return {r["source"].removeprefix(prefix): r for r in records}


# ---- file names -----------------------------------------------------------------------------------


def test_non_utf8_file_name_is_listed_read_and_fits_arrow(tmp_path):
    data = encode(picture(1), "JPEG")
    write_raw_name(tmp_path, NON_UTF8_NAME, data)
    (record,) = list_folder(tmp_path).values()
    assert record["source"] == f"file://{tmp_path}/caf\\xe9.jpg" and record["reason"] is None
    pa.Table.from_pylist([record])  # valid UTF-8 for Arrow (the run aborted with UnicodeEncodeError)
    assert read_bytes(record) == data  # and the escaped source still opens the file


def test_a_literal_backslash_name_is_never_shadowed(tmp_path):
    literal, raw = encode(picture(2), "JPEG"), encode(picture(3), "JPEG")
    (tmp_path / "caf\\xe9.jpg").write_bytes(literal)
    write_raw_name(tmp_path, NON_UTF8_NAME, raw)
    records = list_sources([str(tmp_path)], download_dir=None, download=DownloadConfig())
    assert len({r["key"] for r in records}) == 2  # one row each, keyed by the raw bytes of the name
    assert read_bytes(records[0]) in (literal, raw) and read_bytes(records[1]) in (literal, raw)


def test_double_colon_file_name_is_a_file_not_a_url_chain(tmp_path):
    data = encode(picture(4), "JPEG")
    (tmp_path / "dbl::colon.jpg").write_bytes(data)
    (record,) = list_folder(tmp_path).values()
    assert read_bytes(record) == data  # was FileNotFoundError: fsspec split the name at '::'


def test_reasons_from_real_files_name_no_path(tmp_path):
    (tmp_path / "page.jpg").write_bytes(b"<!DOCTYPE html><html><body>Not Found</body></html>")
    f, num_bytes = open_source(list_folder(tmp_path)["page.jpg"])
    with f:  # the reason must not carry the file object's repr (a path: not reproducible, not short)
        assert (
            scan_header(f, num_bytes=num_bytes).reason
            == "unreadable: UnidentifiedImageError: cannot identify image file"
        )


# ---- special files --------------------------------------------------------------------------------


@pytest.mark.timeout(20)  # the old code blocked forever in open()
def test_fifo_named_jpg_is_rejected_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "fifo.jpg")
    (record,) = list_folder(tmp_path).values()
    with pytest.raises(OSError, match="fifo") as caught:
        open_source(record)
    assert io_rejection(caught.value).reason == "not_a_regular_file: fifo"


@pytest.mark.timeout(20)
def test_fifo_named_tar_is_one_row_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "fifo.tar")  # the tar is opened while listing, on the driver
    assert list_folder(tmp_path)["fifo.tar"]["reason"] == "not_a_regular_file: fifo"


def test_device_named_jpg_is_not_read(tmp_path):
    os.symlink("/dev/zero", tmp_path / "zero.jpg")  # endless bytes; it was rejected as empty_file
    (record,) = list_folder(tmp_path).values()
    with pytest.raises(OSError) as caught:
        open_source(record)
    assert io_rejection(caught.value).reason == "not_a_regular_file: character_device"


@pytest.mark.timeout(20)
@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_caption_sidecar_that_is_not_a_file_rejects_its_image(tmp_path, kind):
    (tmp_path / "a.jpg").write_bytes(encode(picture(5), "JPEG"))
    (tmp_path / "a.txt").mkdir() if kind == "directory" else os.mkfifo(tmp_path / "a.txt")
    assert (
        list_folder(tmp_path)["a.jpg"]["reason"] == f"unreadable_sidecar: caption sidecar a.txt is a {kind}"
    )


UNPRIVILEGED_LISTING = """
import json, logging, sys
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
from curation.config import DownloadConfig
from curation.sources import list_sources
records = list_sources([sys.argv[1]], download_dir=None, download=DownloadConfig())
print(json.dumps([{k: r[k] for k in ("source", "reason", "caption_orig")} for r in records]))
"""


def list_unprivileged(folder: Path) -> tuple[dict[str, dict], str]:
    """``list_sources`` in a process where mode 000 means unreadable: as root, root without
    CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH (``setpriv``), for whom permission bits apply as to anyone."""
    command = [sys.executable, "-c", UNPRIVILEGED_LISTING, str(folder)]
    if os.geteuid() == 0:
        caps = "-dac_override,-dac_read_search"
        drop = [shutil.which("setpriv") or "setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", "--"]
        probe = subprocess.run([*drop, "true"], capture_output=True)
        if probe.returncode != 0:
            pytest.skip(f"root reads mode-000 files and setpriv cannot drop that here: {probe.stderr!r}")
        command = drop + command
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, check=True)
    prefix = f"file://{folder}/"
    return {r["source"].removeprefix(prefix): r for r in json.loads(result.stdout)}, result.stderr


def test_mode_000_caption_sidecar_is_permission_denied(tmp_path):
    (tmp_path / "a.jpg").write_bytes(encode(picture(6), "JPEG"))
    (tmp_path / "a.txt").write_text("a caption")
    (tmp_path / "a.txt").chmod(0)
    rows, _ = list_unprivileged(tmp_path)
    assert rows["a.jpg"]["reason"] == "permission_denied: caption sidecar a.txt: PermissionError"


def test_unreadable_sub_folder_is_a_row_and_a_warning(tmp_path):
    (tmp_path / "visible.jpg").write_bytes(encode(picture(7), "JPEG"))
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "hidden.jpg").write_bytes(encode(picture(8), "JPEG"))
    locked.chmod(0)
    try:
        rows, stderr = list_unprivileged(tmp_path)
    finally:
        locked.chmod(0o755)
    assert rows["visible.jpg"]["reason"] is None
    assert rows["locked"]["reason"] == "permission_denied: folder not listed: PermissionError"
    assert f"WARNING could not list file://{locked}" in stderr


# ---- formats --------------------------------------------------------------------------------------


def test_svg_heic_avif_each_get_a_row(tmp_path):
    (tmp_path / "vector.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>')
    (tmp_path / "phone.heic").write_bytes(encode(picture(9), "HEIF"))
    (tmp_path / "photo.avif").write_bytes(encode(picture(10), "AVIF") if AVIF_SUPPORTED else b"")
    rows = list_folder(tmp_path)
    assert rows["vector.svg"]["reason"] == "unsupported_format: svg"  # was: no row, no log line
    assert rows["phone.heic"]["reason"] is None
    if not AVIF_SUPPORTED:
        assert rows["photo.avif"]["reason"].startswith("unsupported_format: avif")
        del rows["photo.avif"]
    for name, fmt in (("phone.heic", "HEIF"), ("photo.avif", "AVIF")):
        if name in rows:
            assert rows[name]["reason"] is None
            f, num_bytes = open_source(rows[name])
            with f:
                assert scan_header(f, num_bytes=num_bytes)["format"] == fmt


def test_camera_mpo_is_a_still_image():
    data = encode(picture(11), "MPO", save_all=True, append_images=[picture(12, (320, 320))])
    assert Image.open(io.BytesIO(data)).n_frames == 2  # a JPEG plus its preview, as phones write
    assert scan_header(io.BytesIO(data), num_bytes=len(data)) == {
        "format": "MPO",
        "width": 1024,
        "height": 1024,
        "num_bytes": len(data),
    }


def test_image_format_shards_cannot_carry_is_rejected_on_the_header():
    data = encode(picture(13), "PPM")  # a Netpbm image named .jpg: planning its shard raised ValueError
    assert scan_header(io.BytesIO(data), num_bytes=len(data)).reason == "unsupported_format: PPM"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_trailing_exif(idat: bytes, *, size: tuple[int, int], orientation: int) -> bytes:
    """An RGB PNG whose eXIf chunk (orientation only) comes after the pixel data, as PNG allows."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    ihdr = struct.pack(">IIBBBBB", *size, 8, 2, 0, 0, 0)
    chunks = [(b"IHDR", ihdr), (b"IDAT", idat), (b"eXIf", exif.tobytes()), (b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(png_chunk(kind, data) for kind, data in chunks)


def test_png_header_scan_never_inflates_the_pixels():
    # IDAT that is not even zlib: any pixel decode fails, so only a header-only scan can answer.
    # (Pillow's PNG getexif() loads the whole image to look for an eXIf after IDAT.)
    data = png_with_trailing_exif(b"\x00" * 64, size=(2000, 1200), orientation=6)
    assert scan_header(io.BytesIO(data), num_bytes=len(data)) == {
        "format": "PNG",
        "width": 1200,  # the trailing eXIf's orientation 6 is still honoured
        "height": 2000,
        "num_bytes": len(data),
    }


def test_png_trailing_exif_orientation_agrees_with_the_decode():
    pixels = b"".join(b"\x00" + bytes(3 * 40) for _ in range(30))  # filter byte + RGB row
    data = png_with_trailing_exif(zlib.compress(pixels), size=(40, 30), orientation=6)
    header = scan_header(io.BytesIO(data), num_bytes=len(data))
    from manifests.imageio import decode_rgb

    assert (header["width"], header["height"]) == decode_rgb(data).size == (30, 40)


# ---- tars -----------------------------------------------------------------------------------------


def truncated_tar(complete: bytes, cut: bytes) -> bytes:
    """A tar of ``0.jpg`` (whole) and ``1.jpg``, cut in the middle of ``1.jpg``'s data."""
    data = tar_of([("0.jpg", complete), ("1.jpg", cut)])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        offset = tar.getmember("1.jpg").offset_data
    return data[: offset + len(cut) // 2]


def test_truncated_tar_keeps_whole_samples_and_names_the_damage(tmp_path):
    complete, cut = encode(picture(14), "JPEG"), encode(picture(15), "JPEG")
    (tmp_path / "t.tar").write_bytes(truncated_tar(complete, cut))
    rows = list_folder(tmp_path)
    assert rows["t.tar#0.jpg"]["reason"] is None and read_bytes(rows["t.tar#0.jpg"]) == complete
    assert rows["t.tar#1.jpg"]["reason"] == "unreadable_tar: member 1.jpg is truncated"
    assert rows["t.tar"]["reason"] == "unreadable_tar: ReadError: unexpected end of data"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (
            b"<!DOCTYPE html><html><body>Not Found</body></html>",
            "unreadable_tar: ReadError: truncated header",
        ),
        (b"<!DOCTYPE html>" + b" " * 4096, "unreadable_tar: ReadError: bad checksum"),
        (b"", "unreadable_tar: ReadError: empty file"),
    ],
)
def test_a_tar_that_is_not_a_tar_is_one_row(tmp_path, content, reason):
    (tmp_path / "page.tar").write_bytes(content)
    assert {name: r["reason"] for name, r in list_folder(tmp_path).items()} == {"page.tar": reason}


@pytest.mark.parametrize(
    ("meta", "reason"),
    [
        (b"{not json", "bad_metadata: json member is not JSON (JSONDecodeError)"),
        (b"[1, 2]", "bad_metadata: json member is a JSON list, not an object"),
        (b'"a string"', "bad_metadata: json member is a JSON str, not an object"),
        (b'{"url": "\xff"}', "bad_metadata: json member is not JSON (UnicodeDecodeError)"),
        (b"[" * 100_000, "bad_metadata: json member is not JSON (RecursionError)"),
    ],
)
def test_tar_sample_with_bad_json_is_bad_metadata(tmp_path, meta, reason):
    good = {"url": "http://example.test/b.jpg", "status": "success"}
    members = [("a.jpg", encode(picture(16), "JPEG")), ("a.json", meta)]
    members += [("b.jpg", encode(picture(17), "JPEG")), ("b.json", json.dumps(good).encode())]
    (tmp_path / "s.tar").write_bytes(tar_of(members))
    rows = list_folder(tmp_path)
    assert rows["s.tar#a.jpg"]["reason"] == reason
    assert rows["s.tar#a.jpg"]["source_meta"] is not None  # kept verbatim for a look
    pa.Table.from_pylist(list(rows.values()))  # every field fits the manifest
    (other,) = [r for name, r in rows.items() if name != "s.tar#a.jpg"]
    assert other["reason"] is None and other["url"] == good["url"]  # its neighbour is untouched


def test_tar_member_names_that_are_not_utf8_or_not_files(tmp_path):
    buffer = io.BytesIO()
    data = encode(picture(18), "JPEG")
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("caf\udce9.jpg")  # raw byte 0xE9 in the member name
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/hostname"
        tar.addfile(link)
    (tmp_path / "s.tar").write_bytes(buffer.getvalue())
    rows = list_folder(tmp_path)
    pa.Table.from_pylist(list(rows.values()))
    assert rows["s.tar#caf\\xe9.jpg"]["reason"] is None and read_bytes(rows["s.tar#caf\\xe9.jpg"]) == data
    assert rows["s.tar#link.jpg"]["reason"] == "not_a_regular_file: tar member is a symlink"


def test_tar_sample_with_only_an_svg_is_unsupported_format(tmp_path):
    (tmp_path / "s.tar").write_bytes(tar_of([("a.svg", b"<svg/>"), ("a.txt", b"caption")]))
    assert list_folder(tmp_path)["s.tar#a"]["reason"] == "unsupported_format: svg"


# ---- the whole run --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_folder(tmp_path_factory) -> Path:
    """One of each hostile kind in one input folder (plus good images beside them)."""
    folder = tmp_path_factory.mktemp("hostile")
    (folder / "good.jpg").write_bytes(encode(picture(20), "JPEG"))
    write_raw_name(folder, NON_UTF8_NAME, encode(picture(21), "JPEG"))
    (folder / "dbl::colon.jpg").write_bytes(encode(picture(22), "JPEG"))
    os.mkfifo(folder / "fifo.jpg")
    (folder / "vector.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    (folder / "phone.heic").write_bytes(encode(picture(23), "HEIF"))
    if AVIF_SUPPORTED:
        (folder / "photo.avif").write_bytes(encode(picture(24), "AVIF"))
    mpo = encode(picture(25), "MPO", save_all=True, append_images=[picture(26, (320, 320))])
    (folder / "camera.jpg").write_bytes(mpo)
    (folder / "netpbm.jpg").write_bytes(encode(picture(27), "PPM"))
    (folder / "sidecar.jpg").write_bytes(encode(picture(28), "JPEG"))
    (folder / "sidecar.txt").mkdir()
    (folder / "truncated.tar").write_bytes(
        truncated_tar(encode(picture(30), "JPEG"), encode(picture(29), "JPEG"))
    )
    (folder / "page.tar").write_bytes(b"<!DOCTYPE html><html><body>Not Found</body></html>")
    meta = [("a.jpg", encode(picture(31), "JPEG")), ("a.json", b"{not json")]
    meta += [("b.jpg", encode(picture(32), "JPEG")), ("b.json", b"[1, 2]")]
    (folder / "meta.tar").write_bytes(tar_of(meta))
    return folder


HOSTILE_OUTCOMES = {
    "good.jpg": ("kept", None),
    "caf\\xe9.jpg": ("kept", None),
    "dbl::colon.jpg": ("kept", None),
    "fifo.jpg": ("rejected", "not_a_regular_file: fifo"),
    "vector.svg": ("rejected", "unsupported_format: svg"),
    "phone.heic": ("kept", None),
    "camera.jpg": ("kept", None),
    "netpbm.jpg": ("rejected", "unsupported_format: PPM"),
    "sidecar.jpg": ("rejected", "unreadable_sidecar: caption sidecar sidecar.txt is a directory"),
    "truncated.tar#0.jpg": ("kept", None),
    "truncated.tar#1.jpg": ("rejected", "unreadable_tar: member 1.jpg is truncated"),
    "truncated.tar": ("rejected", "unreadable_tar: ReadError: unexpected end of data"),
    "page.tar": ("rejected", "unreadable_tar: ReadError: truncated header"),
    "meta.tar#a.jpg": ("rejected", "bad_metadata: json member is not JSON (JSONDecodeError)"),
    "meta.tar#b.jpg": ("rejected", "bad_metadata: json member is a JSON list, not an object"),
} | ({"photo.avif": ("kept", None)} if AVIF_SUPPORTED else {})


@pytest.mark.timeout(300)
def test_hostile_folder_runs_to_the_end_with_one_row_each(
    hostile_folder, tmp_path, ray_cluster, aesthetic_cfg
):
    cfg = CurationConfig(
        inputs=[str(hostile_folder)],
        output=str(tmp_path / "out"),
        shards=ShardConfig(samples_per_shard=4),
        aesthetic=aesthetic_cfg,
        dedup=TINY_CLIP_DEDUP,
        report=False,
    )
    summary = run(cfg)
    con = manifests.connect(cfg.output)
    prefix = f"file://{hostile_folder}/"
    rows = {
        source.removeprefix(prefix): (status, reason, fmt, shard)
        for source, status, reason, fmt, shard in con.execute(
            "SELECT source, status, reason, format, shard FROM images"
        ).fetchall()
    }
    assert {name: row[:2] for name, row in rows.items()} == HOSTILE_OUTCOMES
    assert summary["inputs"] == len(HOSTILE_OUTCOMES)
    # Kept rows are in the shard the manifest names, original bytes, with the format's extension.
    formats = {name: row[2] for name, row in rows.items() if row[0] == "kept"}
    assert formats["camera.jpg"] == "MPO" and formats["phone.heic"] == "HEIF"
    for name, (_, _, _, shard) in rows.items():
        if rows[name][0] == "kept":
            key = con.execute("SELECT key, sha256 FROM images WHERE source = ?", [prefix + name]).fetchone()
            members = {m.name: m for m in tarfile.open(Path(cfg.output) / shard)}
            ext = {"MPO": "jpg", "HEIF": "heic", "AVIF": "avif", "JPEG": "jpg"}[rows[name][2]]
            with tarfile.open(Path(cfg.output) / shard) as tar:
                data = tar.extractfile(members[f"{key[0]}.{ext}"]).read()
            assert hashlib.sha256(data).hexdigest() == key[1], name


# ---- URL lists ------------------------------------------------------------------------------------

DRIP_SECONDS = 30  # the drip would take this long; the deadline must cut it far earlier
TIMEOUT = 2
MAX_BYTES = 1 << 20
BIG_BYTES = 64 << 20


class HostileHandler(http.server.BaseHTTPRequestHandler):
    """``/ok.png``; ``/drip.png`` (1 byte/s); ``/big-declared`` and ``/big-streamed`` (64 MiB, with and
    without Content-Length); ``/to-file`` (a redirect to file://). Records bytes sent per path."""

    sent: dict[str, int]
    body: bytes

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.sent.setdefault(self.path, 0)
        if self.path == "/ok.png":
            self._send(200, {"Content-Length": str(len(self.body))}, [self.body])
        elif self.path == "/drip.png":
            self._send(
                200, {"Content-Length": str(DRIP_SECONDS)}, (b"x" for _ in range(DRIP_SECONDS)), pause=1
            )
        elif self.path.startswith("/big"):
            length = {"Content-Length": str(BIG_BYTES)} if self.path == "/big-declared" else {}
            self._send(200, length, (bytes(1 << 16) for _ in range(BIG_BYTES >> 16)))
        elif self.path == "/to-file":
            self._send(302, {"Location": "file:///etc/hostname", "Content-Length": "0"}, [])
        else:
            self._send(404, {"Content-Length": "0"}, [])

    def _send(self, code, headers, chunks, pause=0.0):
        self.send_response(code)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        try:
            for chunk in chunks:
                self.wfile.write(chunk)
                self.wfile.flush()
                self.sent[self.path] += len(chunk)
                time.sleep(pause)
        except OSError:  # the client hung up: that is what the limits are for
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def hostile_server():
    sent: dict[str, int] = {}
    handler = type("Handler", (HostileHandler,), {"sent": sent, "body": encode(picture(40), "PNG")})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", sent, handler.body
    server.shutdown()
    server.server_close()


def test_fetch_refuses_other_schemes_before_any_io(tmp_path):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"local")
    for url in (secret.as_uri(), "ftp://127.0.0.1/x.jpg", "data:image/png;base64,AAAA", "/etc/hostname"):
        with pytest.raises(DownloadRefused, match="^unsupported_scheme: "):
            fetch(url, timeout=TIMEOUT, max_bytes=MAX_BYTES, headers={})


def test_fetch_does_not_follow_a_redirect_to_file(hostile_server):
    base, _, _ = hostile_server
    with pytest.raises(OSError, match="file"):
        fetch(f"{base}/to-file", timeout=TIMEOUT, max_bytes=MAX_BYTES, headers={})


@pytest.mark.timeout(DRIP_SECONDS)  # cut at the deadline, never by the drip's end
def test_fetch_deadline_is_total_not_per_read(hostile_server):
    base, sent, _ = hostile_server
    before = sent.get("/drip.png", 0)
    with pytest.raises(TimeoutError, match="total per URL"):
        fetch(f"{base}/drip.png", timeout=TIMEOUT, max_bytes=MAX_BYTES, headers={})
    assert sent["/drip.png"] - before < DRIP_SECONDS


@pytest.mark.parametrize("path", ["/big-declared", "/big-streamed"])
def test_fetch_stops_a_body_at_the_cap(hostile_server, path):
    base, sent, _ = hostile_server
    before = sent.get(path, 0)
    with pytest.raises(DownloadRefused, match="^download_too_large: "):
        fetch(base + path, timeout=60, max_bytes=MAX_BYTES, headers={})
    time.sleep(1)  # the server notices the hang-up at its next write
    assert sent[path] - before < BIG_BYTES // 4  # stopped near the cap, not downloaded whole


def test_fetch_streams_the_body_to_a_spooled_file(hostile_server):
    base, _, png = hostile_server
    body, headers = fetch(f"{base}/ok.png", timeout=TIMEOUT, max_bytes=MAX_BYTES, headers={})
    with body:
        assert isinstance(body, tempfile.SpooledTemporaryFile)  # spills to disk past SPOOL_BYTES
        assert body.read() == png and headers["Content-Length"] == str(len(png))


@pytest.mark.timeout(300)
def test_url_list_through_img2dataset_is_bounded(hostile_server, tmp_path):
    base, sent, png = hostile_server
    local = tmp_path / "local.png"
    local.write_bytes(encode(picture(41), "PNG"))
    urls = {
        f"{base}/ok.png": None,
        local.as_uri(): "unsupported_scheme: file (only http and https are fetched)",
        f"{base}/drip.png": "download_error: timed out after 2 s (total per URL)",
        f"{base}/big-declared": f"download_too_large: Content-Length {BIG_BYTES} is over {MAX_BYTES} bytes",
        f"{base}/big-streamed": f"download_too_large: body is over {MAX_BYTES} bytes",
    }
    url_list = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": list(urls), "caption": [f"c{i}" for i in range(len(urls))]}), url_list)
    cfg = DownloadConfig(timeout=TIMEOUT, max_bytes=MAX_BYTES, thread_count=8)
    before = dict(sent)
    tars = download_url_list(str(url_list), tmp_path / "downloads", cfg)
    records = [r for tar in tars for r in downloaded_records(tar)]
    assert {r["url"]: r["reason"] for r in records} == urls
    assert [read_bytes(r) for r in records if r["reason"] is None] == [png]
    assert sent["/drip.png"] - before.get("/drip.png", 0) < DRIP_SECONDS
    assert sent["/big-streamed"] - before.get("/big-streamed", 0) < BIG_BYTES // 4
    # The local file never reached the download tars.
    for tar in (tmp_path / "downloads").glob("*.tar"):
        with tarfile.open(tar) as t:
            assert all(t.extractfile(m).read() != local.read_bytes() for m in t if m.isfile())


def test_download_limits_are_cli_flags():
    from curation.run import parse_args

    cfg = parse_args(
        ["--input", "u.parquet", "--output", "o", "--download-timeout", "3", "--download-max-bytes", "1000"]
    )
    assert (cfg.download.timeout, cfg.download.max_bytes) == (3, 1000)
    with pytest.raises(ValueError, match="max_bytes"):
        DownloadConfig(max_bytes=0)
