"""The contract between pixsigma's stages: Arrow schemas, atomic writes, DuckDB views."""

from manifests.db import connect
from manifests.io import ManifestWriter, atomic_write_bytes, committed_parts
from manifests.schema import CAPTIONS, IMAGES, SCHEMA_VERSION, SCHEMAS, Rejected

__all__ = [
    "CAPTIONS",
    "IMAGES",
    "SCHEMAS",
    "SCHEMA_VERSION",
    "ManifestWriter",
    "Rejected",
    "atomic_write_bytes",
    "committed_parts",
    "connect",
]
