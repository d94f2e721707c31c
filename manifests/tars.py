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

# Fixed tar metadata so a rerun writes byte-identical shards.
_TAR_MTIME = 0.0

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


def tar_bytes(samples: list[dict]) -> bytes:
    """A tar of samples; each sample is ``{"__key__": key, "<ext>": bytes, ...}`` with bytes values."""
    import webdataset as wds  # here, not at import: webdataset imports torch (~450 MB in every process)

    buffer = io.BytesIO()
    with wds.TarWriter(buffer, mtime=_TAR_MTIME, user="pixsigma", group="pixsigma") as sink:
        for sample in samples:
            sink.write(sample)
    return buffer.getvalue()


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
