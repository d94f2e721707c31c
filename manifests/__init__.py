"""The contract between pixsigma's stages: Arrow schemas, atomic writes, DuckDB views.

The names below load on first use (PEP 562): importing a light module of the package — ``manifests.features``
from ``training.model``, on a GPU machine with torch but no DuckDB or pyarrow (bench/gpu_*.py) — does not
import DuckDB and pyarrow with it. ``from manifests import connect`` works as before.
"""

from importlib import import_module

_HOMES = {
    "connect": "manifests.db",
    "ManifestWriter": "manifests.io",
    "atomic_write_bytes": "manifests.io",
    "committed_parts": "manifests.io",
    "CAPTIONS": "manifests.schema",
    "IMAGES": "manifests.schema",
    "SCHEMAS": "manifests.schema",
    "SCHEMA_VERSION": "manifests.schema",
    "Rejected": "manifests.schema",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'manifests' has no attribute {name!r}")
