"""Load a shard folder through its dataset card with HF ``datasets`` and compare with the tars member by member."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np


def tar_samples(tars: list[Path]) -> dict[str, dict[str, bytes]]:
    """Every sample of the tars: key → member extension → bytes (WebDataset naming, key up to the first dot)."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar in tars:
        with tarfile.open(tar) as f:
            for member in f:
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = f.extractfile(member).read()
    return samples


def assert_card_loads_every_member(
    folder: Path, config: str | None, tars: list[Path], cache_dir: Path
) -> dict:
    """``load_dataset(folder, config)`` yields exactly the tars' samples, every image byte for byte, every JSON
    field and every array; members a sample lacks are None. Returns the loaded split's rows by key."""
    import datasets

    expected = tar_samples(tars)
    loaded = datasets.load_dataset(str(folder), config, cache_dir=str(cache_dir))
    assert len(loaded) == 1, loaded
    (split,) = loaded.values()
    images = [name for name, f in split.features.items() if isinstance(f, datasets.Image)]
    split = split.cast(
        datasets.Features({**split.features, **{name: datasets.Image(decode=False) for name in images}})
    )
    rows = {row["__key__"]: row for row in split}
    assert rows.keys() == expected.keys()
    members = set().union(*(sample.keys() for sample in expected.values()))
    assert members <= set(split.features), f"members without a column: {members - set(split.features)}"
    for key, sample in expected.items():
        row = rows[key]
        for name in set(split.features) - {"__key__", "__url__"}:
            value = row[name]
            if name not in sample:
                assert value is None, (key, name)
            elif name in images:
                assert value["bytes"] == sample[name], (key, name)
            elif name == "json":
                fields = json.loads(sample[name])
                assert fields.keys() <= value.keys(), f"JSON fields dropped: {fields.keys() - value.keys()}"
                assert {k: value[k] for k in fields} == fields, key
            elif name.endswith(".npy"):
                array = np.load(io.BytesIO(sample[name]), allow_pickle=False)
                np.testing.assert_array_equal(np.asarray(value, dtype=array.dtype), array)
            else:
                raise AssertionError(f"unexpected column {name}")
    return rows
