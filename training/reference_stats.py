"""Reference FID statistics: the ``.npz`` of pytorch-fid and clean-fid (``mu``, ``sigma``), with how it was made.

PixArt-Σ's protocol scores 30K generated images against a fixed real set (MJHQ-30K, COCO-30K; arXiv 2403.04692
§4): the real side's Inception statistics are computed once and shipped as ``mu`` (D,) and ``sigma`` (D, D),
float64, the layout pytorch-fid (``--save-stats``) and clean-fid (``fid.get_reference_statistics``) use. We add
extra keys, which both ignore: ``fid_resize`` (how images reached 299²), ``inception_sha256`` (the weights
file), ``num_images`` and ``features``. A file with that record must match this run's resize and weights; a
file without (theirs) is taken as it is, with a warning.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from manifests.io import atomic_write_bytes, file_sha256

log = logging.getLogger(__name__)

STATS_KEYS = ("mu", "sigma")  # pytorch-fid / clean-fid
RECORD_KEYS = ("fid_resize", "inception_sha256", "num_images", "features")  # ours, ignored by them


@dataclass(frozen=True)
class ReferenceStats:
    """The real side of FID: the mean (D,) and covariance (D, D) of its Inception features, and their record."""

    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    fid_resize: str | None = None
    inception_sha256: str | None = None
    num_images: int | None = None

    @property
    def features(self) -> int:
        return int(self.mu.shape[0])


def save_reference_stats(path: str | Path, stats: ReferenceStats) -> Path:
    """Write ``stats`` as an .npz (atomically): mu, sigma in float64, then the record keys."""
    record = {"fid_resize": stats.fid_resize, "inception_sha256": stats.inception_sha256,
              "num_images": stats.num_images, "features": stats.features}  # fmt: skip
    missing = [k for k, v in record.items() if v is None]
    if missing:
        raise ValueError(f"reference statistics to save need their record: {missing} missing")
    buffer = io.BytesIO()
    np.savez(buffer, mu=stats.mu.astype(np.float64), sigma=stats.sigma.astype(np.float64),
             **{k: np.asarray(v) for k, v in record.items()})  # fmt: skip
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def load_reference_stats(path: str | Path) -> ReferenceStats:
    """mu and sigma (and our record, when the file has it) from an .npz; nothing pickled is read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {path} do not exist (make them with --save-reference-stats)")
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in STATS_KEYS if k not in data]
        if missing:
            raise ValueError(f"{path}: no {missing} array: not FID statistics (pytorch-fid's mu, sigma)")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        record = {k: data[k].item() for k in RECORD_KEYS if k in data}
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: mu or sigma holds NaN or inf")
    if not record:
        log.warning("%s has no record of its resize and Inception weights (pytorch-fid / clean-fid layout): "
                    "it is used as it is; its FID is comparable only if it was made as this run's", path)  # fmt: skip
    num_images = record.get("num_images")
    return ReferenceStats(mu, sigma, record.get("fid_resize"), record.get("inception_sha256"),
                          None if num_images is None else int(num_images))  # fmt: skip


def check_reference_stats(
    stats: ReferenceStats, path: str | Path, *, fid_resize: str, inception_sha256: str | None, features: int
) -> None:
    """Refuse statistics made another way than this run's features: their resize, weights or tap."""
    theirs = (stats.fid_resize, stats.inception_sha256)
    ours = (fid_resize, inception_sha256)
    differ = [(name, a, b) for name, a, b in zip(("fid_resize", "inception_sha256"), theirs, ours, strict=True)
              if a is not None and b is not None and a != b]  # fmt: skip
    if differ:
        what = ", ".join(f"{name} {a!r} (this run: {b!r})" for name, a, b in differ)
        raise ValueError(f"{path} was made with {what}: make the reference statistics again with this run's "
                         "--fid-resize and --inception, or pass the ones it was made with")  # fmt: skip
    if stats.features != features:
        raise ValueError(f"{path} holds {stats.features}-d statistics, this run's Inception tap gives "
                         f"{features} (--fid-features)")  # fmt: skip


def describe(path: str | Path, stats: ReferenceStats) -> dict:
    """What metrics.json records of the reference statistics: the file, its sha256 and its record."""
    return {"reference_stats": str(path), "reference_stats_sha256": file_sha256(path),
            "reference_stats_fid_resize": stats.fid_resize,
            "reference_stats_inception_sha256": stats.inception_sha256}  # fmt: skip
