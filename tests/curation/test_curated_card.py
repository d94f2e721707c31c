"""The curated shards' dataset card: `load_dataset(<run>/shards/curated, "4k")` loads every format and field."""

from __future__ import annotations

import pytest

from tests.manifests.hf_check import assert_card_loads_every_member


@pytest.mark.parametrize("config", ["4k", "1k", "all"])
def test_curated_card_loads_every_image_and_field(curated, tmp_path, config):
    out, summary = curated
    shards = out / "shards" / "curated"
    tars = sorted(shards.glob("*/*.tar" if config == "all" else f"{config}/*.tar"))
    rows = assert_card_loads_every_member(shards, config, tars, tmp_path / "hf")
    if config == "all":
        assert len(rows) == summary["kept"]
        assert {ext for row in rows.values() for ext in ("jpg", "png", "webp") if row[ext]} == {
            "jpg",
            "png",
            "webp",
        }
    else:
        assert len(rows) == summary["kept_per_tier"][config]
