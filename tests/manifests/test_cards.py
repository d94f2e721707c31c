"""HF dataset cards: `load_dataset(folder)` loads every image, JSON field and cached array of our shards."""

from __future__ import annotations

import numpy as np
import pytest

from manifests.cards import CardConfig, Sequence, card_metadata, json_features, ndarray, write_shards_card
from manifests.evalset import main as evalset_main
from manifests.materialize import MaterializeConfig
from manifests.selection import SelectionSpec, select
from manifests.tars import json_bytes, npy_bytes, write_shard
from tests.manifests.factories import jpeg, make_run
from tests.manifests.hf_check import assert_card_loads_every_member


def test_card_yaml_is_what_datasets_reads():
    import datasets

    config = CardConfig(
        "4k", "train", ("4k/*.tar",),
        {"__key__": "string", "jpg": "image", "json": {"key": "string", "b": {"256": Sequence("int64")}},
         "t5.npy": ndarray("float16", 2)},
    )  # fmt: skip
    meta = card_metadata([config])
    assert meta["configs"] == [
        {"config_name": "4k", "data_files": [{"split": "train", "path": ["4k/*.tar"]}]}
    ]
    features = datasets.Features._from_yaml_list(meta["dataset_info"][0]["features"])
    assert features == datasets.Features(
        {
            "__key__": datasets.Value("string"),
            "jpg": datasets.Image(),
            "json": {"key": datasets.Value("string"), "b": {"256": datasets.List(datasets.Value("int64"))}},
            "t5.npy": datasets.List(datasets.List(datasets.Value("float16"))),
        }
    )


def test_unknown_json_field_is_an_error():
    with pytest.raises(ValueError, match=r"JSON fields \['clip_score'\] are no manifest column"):
        json_features(["key", "clip_score"])


def png(height: int, width: int, seed: int) -> bytes:
    import io

    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def test_mixed_members_load_whole(tmp_path):
    """The first shard holds only JPEGs and no t5_vlm: HF's inference would drop the PNGs and t5_vlm."""
    cfg = MaterializeConfig(
        root=str(tmp_path), selection="mixed", t5="t5", vae="vae", vae_resolutions=(32,), resolutions=(256,)
    )
    rng = np.random.default_rng(0)

    def sample(i: int, fmt: str, *, vlm: bool) -> dict:
        image = jpeg(32, 48, i) if fmt == "jpg" else png(48, 32, i)
        meta = {"key": f"{i:04x}", "width": 48, "height": 32, "caption_orig": f"c{i}",
                "caption_vlm": f"v{i}" if vlm else None, "captioner": "vlm@0" if vlm else None, "tier": "1k",
                "buckets": {"256": [192, 320]}}  # fmt: skip
        out = {"__key__": meta["key"], fmt: image, "json": json_bytes(meta)}
        out["t5_orig.npy"] = npy_bytes(rng.standard_normal((3 + i, 8)).astype(np.float16))
        if vlm:
            out["t5_vlm.npy"] = npy_bytes(rng.standard_normal((5, 8)).astype(np.float16))
        out["vae32.npy"] = npy_bytes(rng.standard_normal((2, 4, 4, 4)).astype(np.float16))
        return out

    out = cfg.out_dir()
    write_shard(out / "train-000000.tar", [sample(i, "jpg", vlm=False) for i in range(6)])
    write_shard(out / "train-000001.tar", [sample(6, "png", vlm=True), sample(7, "jpg", vlm=True)])
    card = write_shards_card(cfg, image_formats={"JPEG", "PNG"})
    assert card == out / "README.md" and "configs:" in card.read_text()
    rows = assert_card_loads_every_member(out, None, sorted(out.glob("train-*.tar")), tmp_path / "hf")
    assert rows["0006"]["png"] is not None and rows["0006"]["jpg"] is None


def test_eval_set_writes_its_card(ray_cluster, tmp_path):
    """Through materialize, as training shards are (tests/test_readme.py loads those, cached arrays included)."""
    make_run(tmp_path, num_images=12)
    select(tmp_path, SelectionSpec("train", "aesthetic < 5.5"))
    evalset_main(
        ["--input", str(tmp_path), "--exclude", "train", "--num-samples", "4", "--samples-per-shard", "3"]
    )
    out = tmp_path / "eval_shards" / "eval"
    rows = assert_card_loads_every_member(out, None, sorted(out.glob("eval-*.tar")), tmp_path / "hf")
    assert len(rows) == 4
