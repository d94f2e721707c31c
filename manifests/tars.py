"""WebDataset tars: the atomic shard writer, and reading members without trusting their paths.

Shards hold the original bytes (no re-encode) and a JSON sidecar per sample. Members are read by name
into memory; nothing is ever extracted to disk, so a member named ``../../etc/passwd`` or an absolute
path can do no harm.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from manifests.io import is_committed, mark_committed, publish, temp_path

FORMAT_EXTENSIONS = {
    "JPEG": "jpg",
    "MPO": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tif",
    "HEIF": "heic",  # pillow-heif's format name (see manifests.imageio)
    "AVIF": "avif",
}


def extension_for(image_format: str | None) -> str:
    """The WebDataset member extension for a Pillow format name."""
    if image_format not in FORMAT_EXTENSIONS:
        raise ValueError(f"no shard extension for image format {image_format!r}")
    return FORMAT_EXTENSIONS[image_format]


# What webdataset's ``TarWriter(mtime=0, user="pixsigma", group="pixsigma")`` writes (mode 0o444, tarfile's
# default PAX format, stream mode "w|"): a 512-byte header per member, the member's bytes padded to 512, two
# zero blocks, the whole padded to tarfile's 10240-byte record. Shards are written here directly because
# TarWriter (via ``tarfile.addfile``, ~40 µs of header Python a member, ~85 µs with the float mtime this
# module used to pass, which made every member carry a PAX ``mtime=0.0`` header) was half of a curation run
# at 1M–8M rows (docs/benchmarks.md, "Curation at scale"); tests/manifests/test_tars.py checks the bytes
# against TarWriter's.
_TAR_MTIME = 0  # int: a float mtime makes tarfile add a PAX header to every member
_TAR_OWNER = "pixsigma"
_TAR_MODE = 0o444  # TarWriter's default
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_NAME = slice(0, 100)  # ustar header fields that change per member (POSIX.1-1988 ustar layout)
_SIZE = slice(124, 136)
_CHKSUM = slice(148, 156)
_MAX_FAST_SIZE = 8**11  # 11 octal digits; larger members need tarfile's PAX size record


def _header_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, _TAR_MTIME, _TAR_MODE
    info.uname = info.gname = _TAR_OWNER
    return info


def _template() -> tuple[bytes, int]:
    """A member header with an empty name and size 0, and its checksum without the name and size fields."""
    header = _header_info("", 0).tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
    fixed = (
        header[: _CHKSUM.start] + b" " * 8 + header[_CHKSUM.stop :]
    )  # the checksum counts itself as spaces
    return header, sum(fixed) - sum(header[_NAME]) - sum(header[_SIZE])


_HEADER, _HEADER_SUM = _template()


def member_header(name: str, size: int) -> bytes:
    """The tar header ``tarfile`` writes for a member of ``TarWriter``'s metadata; an ASCII name of ≤ 100
    bytes and a size below 8 GiB (every shard member) patch a fixed template, anything else is tarfile's."""
    encoded = name.encode("ascii", "surrogateescape") if name.isascii() else b""
    if not encoded or len(encoded) > 100 or size >= _MAX_FAST_SIZE:
        return _header_info(name, size).tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
    size_field = b"%011o\0" % size
    checksum = _HEADER_SUM + sum(encoded) + sum(size_field)
    return b"".join(
        (
            encoded,
            bytes(100 - len(encoded)),
            _HEADER[_NAME.stop : _SIZE.start],
            size_field,
            _HEADER[_SIZE.stop : _CHKSUM.start],
            b"%06o\0 " % checksum,
            _HEADER[_CHKSUM.stop :],
        )
    )


def tar_bytes(samples: list[dict]) -> bytes:
    """A tar of samples, byte for byte what webdataset's TarWriter writes; each sample is ``{"__key__": key,
    "<ext>": bytes, ...}`` (str values as UTF-8), members ``<key>.<ext>`` in sorted ``ext`` order."""
    chunks, offset = [], 0
    for sample in samples:
        if "__key__" not in sample:
            raise ValueError(f"a sample needs a __key__, got fields {sorted(sample)}")
        key = sample["__key__"]
        for ext in sorted(sample):
            if ext.startswith("_"):
                continue
            data = sample[ext]
            if isinstance(data, str):
                data = data.encode("utf-8")
            if not isinstance(data, bytes):
                raise ValueError(f"sample {key!r}: {ext!r} must be bytes or str, got {type(data).__name__}")
            size = len(data)
            header = member_header(f"{key}.{ext}", size)
            padding = -size % _BLOCK
            chunks += [header, data, bytes(padding)]
            offset += len(header) + size + padding
    end = offset + 2 * _BLOCK
    chunks.append(bytes(2 * _BLOCK + (-end % _RECORD)))
    return b"".join(chunks)


def write_shard(path: str | os.PathLike, samples: list[dict], *, info: dict | None = None) -> bool:
    """Write a shard atomically and commit it; returns False when it was already committed.

    The commit marker records the shard's size, sha256 and sample count, plus ``info``.
    """
    path = Path(path)
    if is_committed(path.parent, path.name):
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    data = tar_bytes(samples)
    tmp = temp_path(path)
    try:
        tmp.write_bytes(data)
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    record = {"file": path.name, "num_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    mark_committed(path.parent, path.name, {**(info or {}), **record, "num_samples": len(samples)})
    return True


def json_bytes(record: dict) -> bytes:
    """Deterministic JSON for a sidecar member."""
    return json.dumps(record, sort_keys=True, ensure_ascii=False).encode()


def read_members(tar_path: str | os.PathLike, names: set[str]) -> dict[str, bytes]:
    """Bytes of the regular-file members named in ``names``; raises ``KeyError`` for a missing one."""
    found: dict[str, bytes] = {}
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            if member.name in names and member.isfile():
                found[member.name] = tar.extractfile(member).read()
    missing = names - found.keys()
    if missing:
        raise KeyError(f"{tar_path}: members not found: {sorted(missing)[:5]}")
    return found


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
