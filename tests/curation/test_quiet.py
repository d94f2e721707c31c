"""The curation job's own Ray calls raise no deprecation warning (issue 11: quiet, useful logs).

Ray itself warns about its own settings on first use; only warnings pointing at our code count.
"""

from __future__ import annotations

import warnings

from curation.config import CurationConfig
from curation.pipeline import ChunkPlan, ChunkWork, CommitTarget, _scan_dataset
from tests.conftest import REPO


def test_no_deprecated_ray_remote_args(aesthetic_cfg, ray_cluster):
    cfg = CurationConfig(inputs=["unused"], output="unused", aesthetic=aesthetic_cfg)
    plan = ChunkPlan(
        works=(ChunkWork("chunk-r00", "unused.parquet", 3, "digest"),),
        target=CommitTarget(scored="unused", embeddings=None, batches="unused", batch_size=64),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _scan_dataset(plan, cfg, clip_size=224)  # builds the plan, runs nothing
    ours = [
        w for w in caught if issubclass(w.category, DeprecationWarning) and w.filename.startswith(str(REPO))
    ]
    assert [f"{w.filename}:{w.lineno}: {w.message}" for w in ours] == []
