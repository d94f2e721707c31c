"""HF dataset cards beside our WebDataset shards, so standard tools open them without hand-written globs.

``datasets.load_dataset("<run>/shards/curated", "4k")`` (and ``load_dataset("<run>/train_shards/<name>")``,
``load_dataset("<run>/eval_shards/<name>")``) reads the ``README.md`` written here: its YAML ``configs:`` name
the tars of each config, and ``dataset_info:`` declares every member a sample of that config may have. HF's
WebDataset builder otherwise infers the columns from the first five samples of the first tar, and drops
what they lack: the PNG and WebP images of a tier whose first shard is JPEG, or a ``t5_vlm.npy`` that the
first samples happen not to have. With the columns declared, a member a sample lacks is ``None``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pyarrow as pa
import yaml

from manifests.io import atomic_write_bytes
from manifests.schema import CAPTIONS, IMAGES
from manifests.tars import extension_for

CARD_FILE = "README.md"
IMAGE = "image"  # an image member: HF decodes it with Pillow, whatever its extension
# 4k/4k-jpg-<id>.tar; curation names the id after the shard's key range and content (4k-jpg-r0512_9f2c1e0a77)
CURATED_SHARD = re.compile(r"^(?P<tier>[^/]+)/(?P=tier)-(?P<ext>[a-z0-9]+)-[0-9a-z_]+\.tar$")
# The JSON sidecar of a training or eval sample, as manifests.materialize.ShardWriter.sample writes it.
SHARD_JSON_FIELDS = ("key", "width", "height", "caption_orig", "caption_vlm", "captioner", "tier")
SPLITS = {"train": "train", "eval": "test"}  # shard prefix → split name
# WebDataset members that HF's builder adds to every sample: the sample key and the tar it came from.
SAMPLE_FIELDS = {"__key__": "string", "__url__": "string"}


@dataclass(frozen=True)
class Sequence:
    """A list feature (HF ``List``): an ``.npy`` array becomes nested lists, one level per dimension."""

    item: Feature


Feature = str | Sequence | dict  # a dtype name ("string", "int64", "image"…), a list, or a struct


def ndarray(dtype: str, ndim: int) -> Feature:
    feature: Feature = dtype
    for _ in range(ndim):
        feature = Sequence(feature)
    return feature


@dataclass(frozen=True)
class CardConfig:
    """One ``load_dataset(folder, name)`` config: its tars (globs relative to the folder) and columns."""

    name: str
    split: str
    data_files: tuple[str, ...]
    features: dict[str, Feature]
    default: bool = False
    num_shards: int = field(default=0, compare=False)


def _dtype(arrow_type: pa.DataType) -> str:
    """The HF dtype a JSON value of this column decodes to (JSON numbers are int64 or float64)."""
    if pa.types.is_integer(arrow_type):
        return "int64"
    if pa.types.is_floating(arrow_type):
        return "float64"
    if pa.types.is_boolean(arrow_type):
        return "bool"
    if pa.types.is_string(arrow_type):
        return "string"
    raise TypeError(f"no JSON dtype for {arrow_type}")


def json_features(names: Iterable[str]) -> dict[str, Feature]:
    """Struct fields of a JSON sidecar whose keys are manifest columns, typed from the schemas."""
    columns = {f.name: f.type for schema in (CAPTIONS, IMAGES) for f in schema}
    columns["caption_vlm"] = pa.string()  # image_captions' name for the kept caption
    unknown = [name for name in names if name not in columns]
    if unknown:
        raise ValueError(
            f"dataset card: JSON fields {unknown} are no manifest column; declare their type here"
        )
    return {name: _dtype(columns[name]) for name in names}


def _inner(feature: Feature) -> object:
    if isinstance(feature, str):
        return feature
    if isinstance(feature, Sequence):
        return {"list": _inner(feature.item)}
    return [_entry(name, value) for name, value in feature.items()]


def _entry(name: str, feature: Feature) -> dict:
    """One ``features:`` entry in the YAML form of ``datasets.Features._to_yaml_list``."""
    if isinstance(feature, str):
        return {"name": name, "dtype": feature}
    if isinstance(feature, Sequence):
        return {"name": name, "list": _inner(feature.item)}
    return {"name": name, "struct": _inner(feature)}


def card_metadata(configs: list[CardConfig]) -> dict:
    """The card's YAML front matter: ``configs`` (data files per split) and ``dataset_info`` (features)."""
    return {
        "configs": [
            {
                "config_name": c.name,
                "data_files": [{"split": c.split, "path": list(c.data_files)}],
                **({"default": True} if c.default else {}),
            }
            for c in configs
        ],
        "dataset_info": [
            {"config_name": c.name, "features": [_entry(n, f) for n, f in c.features.items()]}
            for c in configs
        ],
    }


def write_card(folder: str | os.PathLike, configs: list[CardConfig], *, title: str, body: str) -> Path:
    """Write ``folder/README.md``: YAML front matter for ``load_dataset``, then a short human description."""
    front = yaml.safe_dump(card_metadata(configs), sort_keys=False, allow_unicode=True)
    usage = "\n".join(
        f'load_dataset("path/to/this/folder", "{c.name}")  # split "{c.split}", {c.num_shards} shard(s)'
        for c in configs
    )
    text = (
        f"---\n{front}---\n\n# {title}\n\n{body.strip()}\n\n"
        f"```python\nfrom datasets import load_dataset\n\n{usage}\n```\n\n"
        "Columns are declared in `dataset_info` above: a member a sample lacks loads as `None`.\n"
    )
    path = Path(folder) / CARD_FILE
    atomic_write_bytes(path, text.encode())
    return path


def write_curated_card(shards_dir: str | os.PathLike, *, json_fields: Iterable[str]) -> Path | None:
    """Card of ``<run>/shards/curated``: one config per tier with all its image formats, and ``all``."""
    shards_dir = Path(shards_dir)
    formats: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    for tar in sorted(shards_dir.glob("*/*.tar")):
        match = CURATED_SHARD.match(tar.relative_to(shards_dir).as_posix())
        if match is None:
            raise ValueError(f"{tar}: not a curated shard name (<tier>/<tier>-<ext>-<id>.tar)")
        formats.setdefault(match["tier"], set()).add(match["ext"])
        counts[match["tier"]] = counts.get(match["tier"], 0) + 1
    if not formats:
        (shards_dir / CARD_FILE).unlink(missing_ok=True)  # a card must not name tars that are gone
        return None
    sidecar = json_features(json_fields)

    def columns(exts: set[str]) -> dict[str, Feature]:
        return {**SAMPLE_FIELDS, **dict.fromkeys(sorted(exts), IMAGE), "json": sidecar}

    configs = [
        CardConfig(tier, "train", (f"{tier}/*.tar",), columns(exts), num_shards=counts[tier])
        for tier, exts in sorted(formats.items())
    ]
    every = set().union(*formats.values())
    configs.append(
        CardConfig(
            "all", "train", ("*/*.tar",), columns(every), default=True, num_shards=sum(counts.values())
        )
    )
    body = (
        "Curated images per resolution tier, original bytes (no re-encode): each sample is `<key>.<ext>` "
        "and `<key>.json` (key, size, format, tier, aesthetic score, original caption, source, sha256). "
        "Each shard holds one tier and one format. Configs: one per tier, and `all`."
    )
    return write_card(shards_dir, configs, title="Curated shards", body=body)


class ShardFolder(Protocol):
    """What a shard card reads of ``manifests.materialize.MaterializeConfig`` (named here, not imported:
    materialize imports this module)."""

    selection: str
    name: str
    resolutions: tuple[int, ...]
    t5: str | None
    prompt_case: str
    vae_resolutions: tuple[int, ...]
    shard_prefix: str

    def out_dir(self) -> Path: ...


def write_shards_card(cfg: ShardFolder, *, image_formats: Iterable[str | None]) -> Path | None:
    """Card of a training or eval shard folder (``manifests.materialize``): one config, every member."""
    out = cfg.out_dir()
    tars = sorted(out.glob(f"{cfg.shard_prefix}-*.tar"))
    if not tars:
        (out / CARD_FILE).unlink(
            missing_ok=True
        )  # an empty selection (--allow-empty): no card naming no tars
        return None
    buckets = {str(res): Sequence("int64") for res in cfg.resolutions}
    columns: dict[str, Feature] = {
        **SAMPLE_FIELDS,
        **dict.fromkeys(sorted({extension_for(f) for f in image_formats}), IMAGE),
        "json": {**json_features(SHARD_JSON_FIELDS), "buckets": buckets},
    }
    if cfg.t5:
        columns.update({"t5_orig.npy": ndarray("float16", 2), "t5_vlm.npy": ndarray("float16", 2)})
    for res in cfg.vae_resolutions:
        columns[f"vae{res}.npy"] = ndarray("float16", 4)  # (2, C, h, w): posterior mean and std
    split = SPLITS.get(cfg.shard_prefix, "train")
    config = CardConfig("default", split, (f"{cfg.shard_prefix}-*.tar",), columns, num_shards=len(tars))
    features = (
        [f"cached T5 features (`t5_orig.npy`, `t5_vlm.npy`: valid tokens × D; captions cased `{cfg.prompt_case}`)"]
        if cfg.t5 else []
    )  # fmt: skip
    features += [f"VAE posteriors at {res} px (`vae{res}.npy`: mean and std)" for res in cfg.vae_resolutions]
    body = (
        f"Selection `{cfg.selection}` as WebDataset shards: each sample is `<key>.<ext>` (original bytes) and "
        "`<key>.json` (size, both captions, aspect-ratio bucket per base resolution)"
        + (f", with {' and '.join(features)}" if features else "")
        + ". A sample without an original or a VLM caption has no T5 member for it."
    )
    return write_card(out, [config], title=f"{cfg.name}: {split} shards", body=body)
