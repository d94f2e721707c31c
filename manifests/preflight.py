"""Preflight: a job's inputs, output and models checked in seconds, before Ray starts a single actor.

Each check raises ``PreflightError`` (an ``InputError``) with one line that names the flag, what is wrong and
what to pass; a CLI wrapped in ``manifests.checks.cli`` prints that line and exits 1. What a check accepts:

- an input: a local path or glob that matches, or an fsspec URI (``s3://…``) whose backend is installed and
  that exists;
- an output: a local (or mounted) folder that exists or can be created, and is writable;
- a model: a local path, or a hub id that is already in the local HF cache (``hf download ID`` puts it
  there); an open_clip name whose pretrained weights are in that cache, or ``local-dir:PATH``;
- inside a Ray job (``ray job submit``): no relative ``--input``/``--output``. The entrypoint's working
  directory is Ray's temporary copy of ``--working-dir``, so a relative path would read from that copy
  (where ``.rayignore``d folders are missing) and write into it (where nobody finds the results).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from manifests.checks import InputError
from manifests.db import require_run

log = logging.getLogger(__name__)

# Set by Ray's job supervisor in the entrypoint's environment (runtime env + metadata as JSON).
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# A hub id: "name" or "org/name" (letters, digits, '-', '_', '.'); a local path may look the same, so
# the local path is always tried first.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
GLOB_CHARS = "*?["
OPEN_CLIP_LOCAL = "local-dir:"
OPEN_CLIP_HUB = "hf-hub:"
# open_clip's file names on the hub, safetensors first (open_clip.pretrained.download_pretrained_from_hf).
OPEN_CLIP_HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class PreflightError(InputError):
    """A job cannot start: the message is one line naming the flag and the fix."""


@dataclass(frozen=True)
class RayJob:
    """The Ray job this process is the entrypoint of."""

    submission_id: str | None
    working_dir: str | None  # the runtime env's working_dir URI (what --working-dir uploaded)


def ray_job() -> RayJob | None:
    """The Ray job whose entrypoint this process is (``ray job submit … -- python …``), else None."""
    raw = os.environ.get(RAY_JOB_ENV)
    if not raw:
        return None
    config = json.loads(raw)
    metadata = config.get("metadata") or {}
    runtime_env = config.get("runtime_env") or {}
    return RayJob(
        submission_id=metadata.get("job_submission_id") or metadata.get("job_id"),
        working_dir=runtime_env.get("working_dir"),
    )


def is_uri(spec: str) -> bool:
    """A storage URI (``s3://``, ``gs://``, ``memory://``…); ``file://`` counts as a local path."""
    scheme, sep, _ = spec.partition("://")
    return bool(sep) and scheme != "file" and scheme.replace("+", "").isalnum()


def _local(spec: str) -> str:
    return spec.removeprefix("file://")


def check_not_relative_in_job(flag: str, spec: str, *, uri_ok: bool) -> None:
    """Inside a Ray job a relative data path resolves in Ray's copy of the working dir: refuse it."""
    job = ray_job()
    if job is None or is_uri(spec) or os.path.isabs(os.path.expanduser(_local(spec))):
        return
    instead = "an absolute path on storage every node sees" + (" or a storage URI (s3://…)" if uri_ok else "")
    raise PreflightError(
        f"{flag} {spec!r} is a relative path inside a Ray job: the job runs in Ray's temporary copy of "
        f"--working-dir ({os.getcwd()}), which lacks .rayignore'd folders and is deleted after the job; "
        f"pass {instead}"
    )


def check_input(flag: str, spec: str) -> None:
    """An input exists: a local path or matching glob, or a reachable URI whose fsspec backend is installed."""
    check_not_relative_in_job(flag, spec, uri_ok=True)
    if is_uri(spec):
        _check_uri(flag, spec)
        return
    path = os.path.expanduser(_local(spec))
    if any(ch in path for ch in GLOB_CHARS):
        if not glob.glob(path, recursive=True):
            raise PreflightError(
                f"{flag} {spec!r}: the glob matches nothing; pass a pattern that matches files"
            )
    elif not os.path.exists(path):
        raise PreflightError(f"{flag} {spec!r}: no such file or folder; pass an existing path or a URI")


def check_inputs(flag: str, specs: Iterable[str]) -> None:
    for spec in specs:
        check_input(flag, spec)


def _check_uri(flag: str, spec: str) -> None:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(spec)
    except ImportError as err:
        scheme = spec.partition("://")[0]
        raise PreflightError(
            f"{flag} {spec!r}: no fsspec backend for {scheme}:// is installed ({err}); install it "
            f"(s3fs for s3://, gcsfs for gs://, adlfs for az://) or pass a mounted path"
        ) from err
    except ValueError as err:  # fsspec: "Protocol not known"
        raise PreflightError(f"{flag} {spec!r}: {err}; pass a path or an fsspec URI (s3://, gs://…)") from err
    try:
        found = fs.glob(path) if any(ch in path for ch in GLOB_CHARS) else fs.exists(path)
    except Exception as err:  # noqa: BLE001 — any backend failure (credentials, network) is reported, not swallowed
        raise PreflightError(f"{flag} {spec!r} is not reachable: {type(err).__name__}: {err}") from err
    if not found:
        raise PreflightError(f"{flag} {spec!r}: nothing there; pass an existing URI")


def check_output(flag: str, spec: str) -> None:
    """An output is a local (or mounted) folder that exists or can be created, and is writable."""
    if is_uri(spec):
        raise PreflightError(
            f"{flag} {spec!r}: the run folder must be a path on this machine (for a cluster, storage every "
            "node mounts, e.g. /mnt/shared/run1); storage URIs are accepted for inputs only"
        )
    check_not_relative_in_job(flag, spec, uri_ok=False)
    path = Path(os.path.expanduser(_local(spec))).absolute()
    if path.exists() and not path.is_dir():
        raise PreflightError(f"{flag} {spec!r} is a file; pass a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise PreflightError(f"{flag} {spec!r}: {existing} is a file; pass a folder")
    try:  # a real write: os.access says yes to root on read-only mounts and /proc
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise PreflightError(
            f"{flag} {spec!r}: cannot write in {existing} ({err.strerror}); pass a folder you can write to"
        ) from err


def check_run_folder(flag: str, spec: str) -> None:
    """A curation run folder (``manifests.db.require_run``), never relative inside a Ray job."""
    check_not_relative_in_job(flag, spec, uri_ok=False)
    if is_uri(spec):
        raise PreflightError(f"{flag} {spec!r}: a run folder is a path on this machine, not a URI")
    require_run(os.path.expanduser(_local(spec)), flag=flag)


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def cached_snapshot(repo_id: str, revision: str | None = None) -> str | None:
    """The local snapshot folder of a hub repo if it is in the HF cache, else None (never downloads)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, revision=revision, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError):
        return None


def check_model(flag: str, spec: str, *, revision: str | None = None) -> str:
    """A model is a local path or a hub id in the local HF cache; returns where it resolved."""
    path = os.path.expanduser(spec)
    if os.path.exists(path):
        return path
    if HUB_ID.match(spec) and not spec.startswith("."):
        snapshot = cached_snapshot(spec, revision)
        if snapshot is not None:
            log.info("%s %s: hub id, found in the local HF cache (%s)", flag, spec, snapshot)
            return snapshot
        where = f" (revision {revision})" if revision else ""
        raise PreflightError(
            f"{flag} {spec!r} is neither a local path nor a hub id in the local HF cache{where} "
            f"({hf_cache_dir()}); download it first (hf download {spec}) or pass a local folder"
            + _job_hint(spec)
        )
    raise PreflightError(
        f"{flag} {spec!r}: no such file or folder; pass a local model folder" + _job_hint(spec)
    )


def _job_hint(spec: str) -> str:
    if ray_job() is None or os.path.isabs(os.path.expanduser(spec)):
        return ""
    return f" (inside a Ray job a relative path is looked up in Ray's copy of --working-dir, {os.getcwd()})"


def check_open_clip(flag: str, name: str, *, pretrained: str | None, pretrained_flag: str) -> str:
    """An open_clip model resolves without a download: ``local-dir:PATH``, a cached ``hf-hub:`` id, or a
    built-in name whose ``pretrained`` tag's weights are in the HF cache (or a checkpoint file, or none)."""
    if name.startswith(OPEN_CLIP_LOCAL):
        folder = Path(os.path.expanduser(name.removeprefix(OPEN_CLIP_LOCAL)))
        if not (folder / "open_clip_config.json").is_file():
            raise PreflightError(
                f"{flag} {name!r}: {folder} has no open_clip_config.json; pass local-dir: a folder saved by "
                "open_clip (open_clip_config.json + weights)" + _job_hint(str(folder))
            )
        return str(folder)
    if name.startswith(OPEN_CLIP_HUB):
        repo = name.removeprefix(OPEN_CLIP_HUB)
        snapshot = cached_snapshot(repo)
        if snapshot is None:
            raise PreflightError(
                f"{flag} {name!r}: {repo} is not in the local HF cache ({hf_cache_dir()}); download it first "
                f"(hf download {repo}) and pass local-dir:<that folder>"
            )
        return snapshot
    import open_clip

    if name not in open_clip.list_models():
        raise PreflightError(
            f"{flag} {name!r} is not an open_clip model; pass one of open_clip.list_models() "
            "(e.g. ViT-L-14-quickgelu) or local-dir:PATH"
        )
    if not pretrained:
        return name  # random weights: meant for tests
    if os.path.isfile(os.path.expanduser(pretrained)):
        return pretrained
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise PreflightError(
            f"{pretrained_flag} {pretrained!r} is neither a checkpoint file nor a tag of {name}; pass one of {tags}"
        )
    return _cached_open_clip_weights(flag, name, pretrained, cfg, pretrained_flag=pretrained_flag)


def _cached_open_clip_weights(flag: str, name: str, tag: str, cfg: dict, *, pretrained_flag: str) -> str:
    """Where open_clip would load ``name``/``tag`` from without downloading (the hub copy first)."""
    from huggingface_hub import try_to_load_from_cache

    if cfg.get("file"):
        return cfg["file"]
    hub = cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub)
        for candidate in [filename] if filename else list(OPEN_CLIP_HUB_FILES):
            found = try_to_load_from_cache(repo, candidate)
            if isinstance(found, str):
                log.info("%s %s/%s: hub weights in the local HF cache (%s)", flag, name, tag, found)
                return found
        file = filename or OPEN_CLIP_HUB_FILES[0]
        raise PreflightError(
            f"{flag} {name} {pretrained_flag} {tag}: its weights are the hub file {repo}/{file}, not in the "
            f"local HF cache ({hf_cache_dir()}); download it first (hf download {repo} {file}) or pass "
            f"{flag} local-dir:PATH"
        )
    url = cfg.get("url", "")
    cached = Path.home() / ".cache" / "clip" / os.path.basename(url)  # open_clip's own download folder
    if url and cached.is_file():
        return str(cached)
    raise PreflightError(
        f"{flag} {name} {pretrained_flag} {tag}: its weights ({url}) are not downloaded ({cached}); "
        f"download them there or pass {pretrained_flag} /path/to/checkpoint"
    )


def check_file(flag: str, spec: str, *, what: str) -> None:
    if not os.path.isfile(os.path.expanduser(spec)):
        raise PreflightError(f"{flag} {spec!r}: no such file; pass {what}" + _job_hint(spec))
