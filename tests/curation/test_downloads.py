"""URL lists downloaded as img2dataset shard tasks (issue 18, item 3): real img2dataset against the loopback
server of test_hostile_inputs, in-process and on the shared Ray cluster. The reference is the URL list itself:
every row ends as exactly one record, kept or rejected with the reason its URL calls for."""

from __future__ import annotations

import math
import os
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pv
import pyarrow.parquet as pq
import pytest

from curation import downloads
from curation.config import DownloadConfig
from curation.downloads import download_url_list
from curation.executor import LocalExecutor, RayExecutor
from curation.sources import downloaded_records, read_bytes
from manifests.io import marker_path
from tests.curation.test_hostile_inputs import BIG_BYTES, MAX_BYTES, TIMEOUT, hostile_server  # noqa: F401

PER_SHARD = 3


def url_rows(base: str, local: Path) -> list[tuple[str, str | None]]:
    """The URL list (13 rows: the last shard is partial) as (url, the reason its row must end with; None: kept)."""
    return [
        *[(f"{base}/ok.png", None)] * 7,
        *[(f"{base}/missing-{i}.jpg", "download_error: HTTP Error 404: Not Found") for i in range(3)],
        (local.as_uri(), "unsupported_scheme: file (only http and https are fetched)"),
        (f"{base}/big-declared", f"download_too_large: Content-Length {BIG_BYTES} is over {MAX_BYTES} bytes"),
        (f"{base}/drip.png", f"download_error: timed out after {TIMEOUT} s (total per URL)"),
    ]


def outcome(records: list[dict]) -> Counter:
    """Each record as (url, caption, reason), counted: the list's rows with what became of them."""
    return Counter((r["url"], r["caption_orig"], r["reason"]) for r in records)


def expected_outcome(rows: list[tuple[str, str | None]]) -> Counter:
    return Counter((url, f"caption {i}", reason) for i, (url, reason) in enumerate(rows))


def write_list(path: Path, urls: list[str]) -> Path:
    table = pa.table({"url": urls, "caption": [f"caption {i}" for i in range(len(urls))]})
    pv.write_csv(table, path) if path.suffix == ".csv" else pq.write_table(table, path)
    return path


def records_of(tars: list[Path]) -> list[dict]:
    return [r for tar in tars for r in downloaded_records(tar)]


def config() -> DownloadConfig:
    return DownloadConfig(timeout=TIMEOUT, max_bytes=MAX_BYTES, thread_count=4, samples_per_shard=PER_SHARD)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_every_url_row_lands_once_with_its_reason_across_shards(hostile_server, tmp_path, suffix):  # noqa: F811
    base, _, png = hostile_server
    local = tmp_path / "local.png"
    local.write_bytes(b"a local file")
    rows = url_rows(base, local)
    url_list = write_list(tmp_path / f"urls{suffix}", [url for url, _ in rows])
    tars = download_url_list(str(url_list), tmp_path / "downloads", config())
    assert len(tars) == math.ceil(len(rows) / PER_SHARD)
    records = records_of(tars)
    assert outcome(records) == expected_outcome(rows)  # each row once, none lost or doubled, its caption
    assert [read_bytes(r) for r in records if r["reason"] is None] == [png] * 7
    for tar in tars:  # a shard holds at most its share of the list
        with tarfile.open(tar) as t:
            assert len([m for m in t if m.name.endswith(".json")]) <= PER_SHARD


@pytest.mark.timeout(300)
def test_a_rerun_skips_committed_shards_and_redoes_a_killed_one(hostile_server, tmp_path):  # noqa: F811
    base, sent, _ = hostile_server
    urls = [f"{base}/ok.png"] * 8  # 3 shards: 3 + 3 + 2
    url_list = write_list(tmp_path / "urls.parquet", urls)
    out = tmp_path / "downloads"
    first = records_of(download_url_list(str(url_list), out, config()))
    clean = {p.name: p.read_bytes() for p in out.glob("0000[0-9].tar")}

    before = sent.get("/ok.png", 0)  # the handler counts bytes sent per path
    download_url_list(str(url_list), out, config())
    assert sent.get("/ok.png", 0) == before, "a committed shard was fetched again"

    # A job killed inside shard 1: its marker never written, a half tar and its temporary folder left behind.
    marker_path(out, "00001").unlink()
    (out / "00001.tar").write_bytes(b"half a tar")
    (out / ".00001.deadbeef.tmp").mkdir()
    again = records_of(download_url_list(str(url_list), out, config()))
    assert (sent["/ok.png"] - before) // len(hostile_server[2]) == PER_SHARD  # shard 1 alone, once
    assert outcome(again) == outcome(first) == expected_outcome([(url, None) for url in urls])
    assert sorted(p.name for p in out.glob("0000[0-9].tar")) == sorted(clean)
    with tarfile.open(out / "00001.tar") as t:
        assert len([m for m in t if m.name.endswith(".json")]) == PER_SHARD


def test_a_list_without_url_column_is_refused(tmp_path):
    url_list = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"link": ["http://127.0.0.1/x.jpg"]}), url_list)
    with pytest.raises(ValueError, match="needs a 'url' column"):
        download_url_list(str(url_list), tmp_path / "downloads", config())


@pytest.mark.timeout(300)
def test_ray_tasks_fetch_the_shards_and_the_driver_never_reads_the_list(
    hostile_server,  # noqa: F811
    tmp_path,
    ray_cluster,
    monkeypatch,
):
    base, _, _ = hostile_server
    local = tmp_path / "local.png"
    local.write_bytes(b"a local file")
    rows = url_rows(base, local)
    url_list = write_list(tmp_path / "urls.parquet", [url for url, _ in rows])

    def no_rows_here(*args, **kwargs):
        raise AssertionError("the driver read the URL rows")

    # Patched in this (driver) process only: the Ray workers import the module afresh.
    monkeypatch.setattr(downloads, "_url_batches", no_rows_here)
    monkeypatch.setattr(downloads.BoundedDownloader, "download_shard", no_rows_here)
    tars = download_url_list(str(url_list), tmp_path / "downloads", config(), RayExecutor())
    monkeypatch.undo()
    assert outcome(records_of(tars)) == expected_outcome(rows)
    with pytest.raises(AssertionError, match="driver read"):  # the same hook does catch an in-driver read
        monkeypatch.setattr(downloads, "_url_batches", no_rows_here)
        download_url_list(str(url_list), tmp_path / "again", config(), LocalExecutor())


@pytest.mark.timeout(300)
def test_a_row_img2dataset_drops_is_rejected_not_lost(hostile_server, tmp_path, monkeypatch):  # noqa: F811
    base, _, _ = hostile_server
    rows = [(f"{base}/ok.png", None)] * 2 + [(f"{base}/missing-x.jpg", None)] + [(f"{base}/ok.png", None)]

    class FailsOnMissing(downloads.WebDatasetSampleWriter):
        """A writer that raises for one sample: img2dataset logs it and writes no status row for it."""

        def write(self, img_str, key, caption, meta):
            if meta["url"].endswith("missing-x.jpg"):
                raise OSError("planted writer failure")
            return super().write(img_str, key, caption, meta)

    monkeypatch.setattr(downloads, "WebDatasetSampleWriter", FailsOnMissing)
    url_list = write_list(tmp_path / "urls.parquet", [url for url, _ in rows])
    records = records_of(download_url_list(str(url_list), tmp_path / "downloads", config()))
    reason = "download_error: img2dataset wrote no status row for it (see the download task's log)"
    assert outcome(records) == expected_outcome(
        [(url, reason if "missing" in url else None) for url, _ in rows]
    )


@pytest.mark.parametrize("change", ["longer", "same size, newer"])
def test_a_changed_url_list_at_the_same_path_is_planned_again(tmp_path, change):
    """The prepared list is reused only for the same path, size and mtime: an edited list is re-read."""
    url_list = write_list(tmp_path / "urls.parquet", [f"http://127.0.0.1/{i}.png" for i in range(5)])
    task = {"spec": str(url_list), "out_dir": str(tmp_path / "downloads"), "samples_per_shard": PER_SHARD}
    first = downloads.prepare_url_list(task)
    prepared = Path(first["urls"])
    written = prepared.stat().st_mtime_ns
    assert downloads.prepare_url_list(task) == first and prepared.stat().st_mtime_ns == written  # reused

    stat = url_list.stat()
    urls = [f"http://127.0.0.1/{i}.png" for i in range(7 if change == "longer" else 5)][::-1]
    write_list(url_list, urls)
    if change != "longer":
        assert url_list.stat().st_size == stat.st_size  # the edit alone does not change the size
        os.utime(url_list, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    again = downloads.prepare_url_list(task)
    assert pq.read_table(again["urls"])["url"].to_pylist() == urls  # the edited list, not the first one
    assert again["num_rows"] == len(urls) and again["sha256"] != first["sha256"]


@pytest.mark.timeout(300)
def test_download_tasks_declare_memory_from_their_config(hostile_server, tmp_path):  # noqa: F811
    """Issue 18 item 3: the prepare task and every shard task declare ``memory=``; more fetch threads or a
    larger body cap declare more."""
    from curation.executor import TASK_BASE_BYTES
    from tests.curation.test_scale import RecordingExecutor

    base, _, _ = hostile_server
    url_list = write_list(tmp_path / "urls.parquet", [f"{base}/ok.png"] * 4)
    executor = RecordingExecutor()
    download_url_list(str(url_list), tmp_path / "downloads", config(), executor)
    assert set(executor.declared) == {"prepare_url_list", "download_shard"}
    assert all((m or 0) > TASK_BASE_BYTES for m in executor.declared.values()), executor.declared
    more = DownloadConfig(thread_count=64, max_bytes=2 * MAX_BYTES, samples_per_shard=PER_SHARD)
    assert downloads.download_memory(more) > downloads.download_memory(config())
