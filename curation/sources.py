"""Readers that turn `--input` arguments into source records (key, source URI, original caption).

Listing happens on the driver and touches only names; bytes are read by the Ray stages.
"""

from __future__ import annotations

import hashlib
import logging
import os

import fsspec

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
CAPTION_EXTENSION = ".txt"


def key_for(source: str) -> str:
    """A stable key from the source URI: same source, same key, whatever the arrival order.

    Hex only, so it never contains the dot that WebDataset uses to split key from extension.
    """
    return hashlib.blake2b(source.encode(), digest_size=10).hexdigest()


def _caption_for(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    sidecar = os.path.splitext(path)[0] + CAPTION_EXTENSION
    if fs.exists(sidecar):
        return fs.cat_file(sidecar).decode("utf-8", errors="replace").strip()
    return None


def list_files(inputs: list[str]) -> list[dict]:
    """Image files under each input (folder, glob or fsspec URI), sorted by key, duplicates removed.

    A file whose extension is not an image extension is listed too when named directly, so that an
    explicit input always ends in the manifest (kept or rejected) rather than vanishing.
    """
    records: dict[str, dict] = {}
    for spec in inputs:
        fs, root = fsspec.core.url_to_fs(spec)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        if fs.isdir(root):
            paths = [p for p in fs.find(root) if p.lower().endswith(IMAGE_EXTENSIONS)]
        elif any(ch in root for ch in "*?["):
            paths = [p for p in fs.glob(root) if p.lower().endswith(IMAGE_EXTENSIONS)]
        elif fs.exists(root):
            paths = [root]
        else:
            raise ValueError(f"input {spec!r} does not exist")
        for path in paths:
            source = fs.unstrip_protocol(path) if protocol != "file" else "file://" + os.path.abspath(path)
            records[source] = {
                "key": key_for(source),
                "source": source,
                "caption_orig": _caption_for(fs, path),
            }
        log.info("input %s: %d files", spec, len(paths))
    return sorted(records.values(), key=lambda r: r["key"])
