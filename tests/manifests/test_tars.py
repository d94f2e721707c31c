"""manifests.tars writes shards itself (no TarWriter in the loop): the bytes must be webdataset's TarWriter's,
and both webdataset and tarfile must read back every member."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from manifests.tars import tar_bytes, write_shard


def _reference(samples: list[dict]) -> bytes:
    """The reference: webdataset's TarWriter with the metadata the shards declare."""
    buffer = io.BytesIO()
    with wds.TarWriter(buffer, mtime=0, user="pixsigma", group="pixsigma") as sink:
        for sample in samples:
            sink.write(sample)
    return buffer.getvalue()


def _samples(seed: int, num: int) -> list[dict]:
    """Random samples: sizes on and around block boundaries, empty members, str values, a skipped meta field."""
    rng = np.random.default_rng(seed)
    sizes = [0, 1, 511, 512, 513, 1024, 10240, 10239]
    out = []
    for i in range(num):
        size = int(rng.choice(sizes)) if rng.random() < 0.5 else int(rng.integers(0, 30_000))
        sample = {"__key__": f"{rng.integers(0, 2**63):016x}{i:04d}", "jpg": rng.bytes(size),
                  "json": f'{{"i": {i}}}'.encode()}  # fmt: skip
        if i % 3 == 0:
            sample["txt"] = f"caption {i} ünïcode"  # str: UTF-8, as TarWriter encodes it
        if i % 4 == 0:
            sample["t5_orig.npy"] = rng.bytes(300)
        if i % 5 == 0:
            sample["__url__"] = "skipped: fields starting with _ are not members"
        out.append(sample)
    return out


ODD_KEYS = [
    "a" * 96,  # name of exactly 100 bytes with ".jpg"
    "b" * 97,  # 101 bytes: tarfile's PAX long-name record
    "dir/sub/" + "c" * 120,
    "clé-ünïcode",  # non-ASCII: PAX record
    "x",
]


@pytest.mark.parametrize("seed,num", [(0, 1), (1, 7), (2, 40), (3, 200)])
def test_tar_bytes_equal_tarwriter(seed: int, num: int) -> None:
    samples = _samples(seed, num)
    assert tar_bytes(samples) == _reference(samples)


def test_tar_bytes_equal_tarwriter_on_odd_names() -> None:
    samples = [{"__key__": key, "jpg": key.encode() * 3, "json": b"{}"} for key in ODD_KEYS]
    assert tar_bytes(samples) == _reference(samples)
    assert tar_bytes([]) == _reference([])


def test_shards_read_back_with_webdataset_and_tarfile(tmp_path: Path) -> None:
    samples = _samples(4, 60)
    path = tmp_path / "shard-000000.tar"
    assert write_shard(path, samples)
    members = lambda s: {k: (v.encode() if isinstance(v, str) else v) for k, v in s.items()  # noqa: E731
                         if not k.startswith("_")}  # fmt: skip

    read = [dict(s) for s in wds.WebDataset(str(path), shardshuffle=False)]
    assert [s["__key__"] for s in read] == [s["__key__"] for s in samples]
    for got, want in zip(read, samples, strict=True):
        assert {k: v for k, v in got.items() if not k.startswith("_")} == members(want)

    with tarfile.open(path) as tar:
        infos = tar.getmembers()
        expected = [
            (f"{s['__key__']}.{ext}", data) for s in samples for ext, data in sorted(members(s).items())
        ]
        assert [i.name for i in infos] == [name for name, _ in expected]
        for info, (_, data) in zip(infos, expected, strict=True):
            assert info.isfile() and info.mtime == 0 and info.mode == 0o444
            assert info.uname == info.gname == "pixsigma" and not info.pax_headers
            assert tar.extractfile(info).read() == data


def test_tar_bytes_refuses_values_that_are_not_bytes() -> None:
    with pytest.raises(ValueError, match="must be bytes or str"):
        tar_bytes([{"__key__": "k", "npy": np.zeros(3)}])
    with pytest.raises(ValueError, match="__key__"):
        tar_bytes([{"jpg": b"x"}])
