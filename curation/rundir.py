"""The run folder belongs to one run: its identity, a lock against concurrent writers, its own temporaries.

- ``curation_run.json`` records the run's inputs (normalised URIs, in order) and, after each run, the
  fingerprint of what they held and the config. A later run into the same folder must name the same
  inputs; anything else is another run and is refused before any work starts. The same inputs with new
  or removed files are the same run: the shards and manifest are brought up to date consistently.
- ``.curation.lock`` is held (``flock``) for the whole run; a second run into the folder is refused at
  once. The kernel drops the lock when its holder dies, so a killed run never leaves a stale lock.
- The output is never read as input: an ``--output`` inside an ``--input`` folder is skipped by the
  listing, and an ``--input`` inside the ``--output`` is refused.
- ``.curation_nonce`` holds a random value the driver writes at the start of each run; every Ray task checks
  it (``RunGuard``) before it writes, so a node that does not mount the run folder fails the run at once with
  one line naming the node and the folder, instead of writing where no reader looks.
- ``remove_stale_temporaries`` deletes only the hidden temporaries our atomic writers create
  (``.<name>.<8 hex>.tmp``, ``manifests.io.temp_path``) in the folders the run writes, never a user's file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from manifests import atomic_write_bytes
from manifests.checks import InputError

log = logging.getLogger(__name__)

RUN_FILE = "curation_run.json"
LOCK_FILE = ".curation.lock"
LEGACY_CONFIG_FILE = "curation_config.json"  # runs written before RUN_FILE existed
# Folders (relative to the run root) whose temporaries are ours; "" is the root's own files.
OWN_FOLDERS = ("", "manifests/images", "manifests/clip_embeddings", "shards/curated", "work", "report")
_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")


class RunFolderError(RuntimeError):
    """The output folder holds another run, or another process is writing it."""


def normalise_input(spec: str) -> str:
    """An input as a URI that does not depend on the working directory (local paths made absolute)."""
    protocol = spec.split("://", 1)[0] if "://" in spec else "file"
    if protocol == "file":
        return "file://" + os.path.abspath(spec.removeprefix("file://"))
    return spec


def local_path(spec: str) -> str | None:
    """The absolute local path of a ``file://`` or plain input, else ``None``."""
    uri = normalise_input(spec)
    return os.path.realpath(uri.removeprefix("file://")) if uri.startswith("file://") else None


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_inputs_outside_output(inputs: list[str], output: Path) -> None:
    """Refuse an input that lies inside the run folder: a run never re-ingests its own output."""
    root = os.path.realpath(output)
    for spec in inputs:
        path = local_path(spec)
        glob_free = path and re.split(r"[*?\[]", path)[0]
        if glob_free and _inside(
            os.path.realpath(glob_free) if os.path.exists(glob_free) else glob_free, root
        ):
            raise ValueError(
                f"--input {spec!r} lies inside --output {str(output)!r}: a run never reads its output"
            )


def excluded_folders(inputs: list[str], output: Path) -> list[str]:
    """The run folder, when it lies inside an input folder: the listing skips it (logged once here)."""
    root = os.path.realpath(output)
    for spec in inputs:
        path = local_path(spec)
        if path and os.path.isdir(path) and _inside(root, path):
            log.warning("--output %s lies inside --input %s: the listing skips it", output, spec)
            return [root]
    return []


def is_excluded(path: str, excluded: list[str]) -> bool:
    """Whether a listed local path lies in an excluded folder."""
    return bool(excluded) and any(_inside(os.path.realpath(path), folder) for folder in excluded)


@contextmanager
def run_lock(root: Path) -> Iterator[None]:
    """Hold ``root/.curation.lock`` for the block; raise ``RunFolderError`` if another process holds it."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise RunFolderError(
                f"{root} is being written by another curation run (pid {holder}); "
                "wait for it or use another --output"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def recorded_inputs(root: Path) -> list[str] | None:
    """The inputs of the run that already lives in ``root``, ``None`` for a fresh folder."""
    run_file, legacy = root / RUN_FILE, root / LEGACY_CONFIG_FILE
    if run_file.is_file():
        return json.loads(run_file.read_text())["inputs"]
    if legacy.is_file():
        return [normalise_input(spec) for spec in json.loads(legacy.read_text())["inputs"]]
    return None


def claim(root: Path, inputs: list[str]) -> list[str]:
    """Make ``root`` this run's folder, or refuse when it holds a run of other inputs. Returns the
    normalised inputs. Call with the lock held."""
    normalised = [normalise_input(spec) for spec in inputs]
    previous = recorded_inputs(root)
    if previous is not None and previous != normalised:
        raise RunFolderError(
            f"{root} holds a curation run of other inputs ({previous}); this run's inputs are {normalised}. "
            "Use another --output (or delete that run)."
        )
    if previous is None:
        atomic_write_bytes(root / RUN_FILE, json.dumps({"inputs": normalised}, indent=2).encode())
    return normalised


def record(root: Path, inputs: list[str], *, fingerprint: dict, config: dict) -> None:
    """Record what the run just curated: its inputs, their fingerprint (records and digest) and config."""
    body = {"inputs": inputs, "inputs_fingerprint": fingerprint, "config": config}
    atomic_write_bytes(root / RUN_FILE, json.dumps(body, indent=2, sort_keys=True).encode())


def is_own_temporary(path: Path, root: Path) -> bool:
    """A hidden ``.<name>.<8 hex>.tmp`` file in one of the folders the run writes (see ``OWN_FOLDERS``)."""
    if not _TEMPORARY.match(path.name):
        return False
    folder = path.parent.relative_to(root).as_posix()
    folder = "" if folder == "." else folder
    if folder.endswith("/_committed") or folder == "_committed":
        folder = folder.removesuffix("_committed").rstrip("/")
    return any(folder == own or (own and folder.startswith(own + "/")) for own in OWN_FOLDERS)


def remove_stale_temporaries(root: Path) -> int:
    """Delete the temporaries a killed run left behind (ours only; the caller holds the lock)."""
    stale = [
        p
        for folder in OWN_FOLDERS
        if (root / folder).is_dir()
        for p in ((root / folder).glob(".*.tmp") if folder == "" else (root / folder).rglob(".*.tmp"))
        if p.is_file() and is_own_temporary(p, root)
    ]
    for path in stale:
        path.unlink()
    return len(stale)


# ----------------------------------------------------------------------------------------------------
# Every node must see the run folder (issue 18): a node without the shared mount would write phase files to
# its own disk, where the readers' globs never look, and duplicates would pass silently.

NONCE_FILE = ".curation_nonce"
# A missing nonce is read again NONCE_READS times, NONCE_RETRY_SECONDS apart, before the task fails: an NFS
# client caches "no such file" for a moment (its negative lookup cache), so a node can miss for a moment a
# file the driver has just written; a node that lacks the mount still fails within seconds.
NONCE_READS = 3
NONCE_RETRY_SECONDS = 1.0


class RunFolderNotShared(InputError):
    """A task's node does not see the run folder the driver writes (``--output`` is not on shared storage)."""


def write_nonce(root: Path) -> str:
    """Write a fresh random nonce into the run folder (driver, lock held); tasks compare it before writing."""
    nonce = uuid.uuid4().hex
    atomic_write_bytes(root / NONCE_FILE, nonce.encode())
    return nonce


@dataclass(frozen=True)
class RunGuard:
    """What a task checks before it writes: the run folder holds this run's nonce, as the driver sees it."""

    root: str
    nonce: str

    def verify(self, *, node: str) -> None:
        """Raise ``RunFolderNotShared`` (one line naming ``node`` and the folder) unless the nonce matches;
        a missing nonce file is read ``NONCE_READS`` times before failing."""
        found = None
        for read in range(NONCE_READS):
            if read:
                time.sleep(NONCE_RETRY_SECONDS)
            try:
                found = (Path(self.root) / NONCE_FILE).read_text()
                break
            except FileNotFoundError:
                continue
        if found != self.nonce:
            what = f"no {NONCE_FILE} there" if found is None else f"its {NONCE_FILE} is another run's"
            raise RunFolderNotShared(
                f"{node} does not see the run folder {self.root} ({what}): --output must be on storage "
                "that every Ray node mounts at the same path"
            )


def find_not_shared(err: BaseException) -> RunFolderNotShared | None:
    """The ``RunFolderNotShared`` inside a (Ray-wrapped) exception chain, if any."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if type(err) is RunFolderNotShared:  # not Ray's RayTaskError subclass, whose text is a traceback
            return err
        cause = getattr(err, "cause", None)  # ray.exceptions.RayTaskError keeps the task's exception here
        err = cause if isinstance(cause, BaseException) else (err.__cause__ or err.__context__)
    return None
