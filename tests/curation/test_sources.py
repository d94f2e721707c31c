"""Sources: WebDataset tars (img2dataset layout), fsspec memory://, and URL lists through img2dataset
against a loopback HTTP server serving the demo corpus (plus a 404 and a timeout)."""

from __future__ import annotations

import functools
import http.server
import io
import json
import threading
import time

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

import manifests
from curation.config import CurationConfig, DownloadConfig, ShardConfig
from curation.demo_corpus import write_url_list
from curation.pipeline import run
from curation.sources import key_for, list_sources, list_tar, open_source, read_bytes
from tests.curation.conftest import TINY_CLIP_DEDUP

SLOW_SECONDS = 4
DOWNLOAD_TIMEOUT = 1


def png(size: tuple[int, int], colour: str) -> bytes:
    """A smooth random picture seeded by ``colour`` (solid colours would all share one pHash)."""
    rng = np.random.default_rng(list(colour.encode()))
    image = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
        size, Image.Resampling.BICUBIC
    )
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def webdataset_tar(tmp_path):
    """An img2dataset-shaped tar: jpg + txt + json (with url and status), a png without json, a json-only sample."""
    images = {"000000001": png((1024, 1024), "red"), "000000002": png((64, 64), "blue")}
    path = tmp_path / "00000.tar"
    with wds.TarWriter(str(path)) as sink:
        meta = {"url": "http://example.test/a.png", "status": "success", "key": "000000001"}
        sink.write({"__key__": "000000001", "png": images["000000001"], "txt": "a red square", "json": meta})
        sink.write({"__key__": "000000002", "png": images["000000002"], "txt": "a blue square"})
        sink.write({"__key__": "000000003", "json": {"note": "no image"}})
    return path, images


def test_tar_members_keep_key_caption_meta_and_read_with_one_seek(webdataset_tar):
    path, images = webdataset_tar
    records = {r["source_key"]: r for r in list_tar(fsspec.filesystem("file"), str(path))}
    uri = f"file://{path}"
    first, second, third = records["000000001"], records["000000002"], records["000000003"]
    assert first["key"] == key_for("http://example.test/a.png")  # keyed by its URL
    assert (first["source"], first["caption_orig"], first["url"]) == (
        f"{uri}#000000001.png",
        "a red square",
        "http://example.test/a.png",
    )
    assert json.loads(first["source_meta"])["status"] == first["download_status"] == "success"
    assert second["key"] == key_for(f"{uri}#000000002.png") and second["url"] is None
    assert third["reason"] == "no_image_member"
    for name in ("000000001", "000000002"):
        assert read_bytes(records[name]) == images[name]
        f, num_bytes = open_source(records[name])
        assert num_bytes == len(images[name])


def test_memory_inputs_travel_with_their_bytes():
    fs = fsspec.filesystem("memory")
    fs.pipe("/curation-test/a.png", png((1024, 1024), "green"))
    fs.pipe("/curation-test/a.txt", b"a green square")
    (record,) = list_sources(["memory://curation-test"], download_dir=None, download=DownloadConfig())
    assert record["source"] == "memory:///curation-test/a.png" and record["caption_orig"] == "a green square"
    assert record["data"] == fs.cat_file("/curation-test/a.png") == read_bytes(record)


class CorpusHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the corpus folder; ``/slow.jpg`` answers after the download timeout."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/slow.jpg":
            time.sleep(SLOW_SECONDS)
        return super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_corpus(demo_corpus):
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(CorpusHandler, directory=str(demo_corpus))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_list_tar_and_memory_in_one_run(
    demo_corpus, http_corpus, webdataset_tar, tmp_path, ray_cluster, aesthetic_cfg
):
    url_list = write_url_list(demo_corpus, http_corpus, out=tmp_path / "urls.parquet")
    table = pq.read_table(url_list)
    extra = pa.table(
        {"url": [f"{http_corpus}/missing.jpg", f"{http_corpus}/slow.jpg"], "caption": ["gone", "slow"]}
    )
    pq.write_table(pa.concat_tables([table, extra]), url_list)
    fsspec.filesystem("memory").pipe("/run-test/m.png", png((1024, 1536), "purple"))
    cfg = CurationConfig(
        inputs=[str(url_list), str(webdataset_tar[0]), "memory://run-test"],
        output=str(tmp_path / "out"),
        shards=ShardConfig(samples_per_shard=4),
        aesthetic=aesthetic_cfg,
        download=DownloadConfig(timeout=DOWNLOAD_TIMEOUT, thread_count=4),
        dedup=TINY_CLIP_DEDUP,
        report=False,
    )
    summary = run(cfg)
    con = manifests.connect(cfg.output)
    rows = {url: (status, reason, status_dl, source) for url, status, reason, status_dl, source in con.execute(
        "SELECT url, status, reason, download_status, source FROM images WHERE url LIKE 'http://127.0.0.1%'"
    ).fetchall()}  # fmt: skip
    assert len(rows) == table.num_rows + 2  # every URL lands in the manifest
    missing, slow = rows.pop(f"{http_corpus}/missing.jpg"), rows.pop(f"{http_corpus}/slow.jpg")
    assert missing[:3] == ("rejected", missing[1], "failed_to_download") and missing[1].startswith(
        "download_error: "
    )
    assert "404" in missing[1]
    assert slow[:3] == ("rejected", slow[1], "failed_to_download") and "timed out" in slow[1].lower()
    expected = {
        f"{http_corpus}/{json.loads(line)['path']}": json.loads(line)
        for line in (demo_corpus / "expected.jsonl").read_text().splitlines()
    }
    originals = {e["dup_of"] for e in expected.values() if e.get("dup_of")}
    for url, (status, reason, status_dl, source) in rows.items():
        exp = expected[url]
        if exp["kind"].startswith("duplicate_") or exp["path"] in originals:
            continue  # one keeper of three, by the keeper rule (test_pipeline checks it)
        if status_dl == "success":
            assert "#" in source and source.startswith("file://"), source
        assert (status, (reason or "").split(":")[0]) == (
            exp["expected_status"],
            exp["expected_reason"] or "",
        ), (url, reason)
    # The tar's samples and the in-memory file are curated beside the downloads.
    assert con.execute("SELECT status, tier FROM images WHERE source LIKE '%#000000001.png'").fetchall() == [
        ("kept", "1k")
    ]
    assert con.execute("SELECT reason FROM images WHERE source LIKE '%#000000002.png'").fetchall() == [
        ("too_small",)
    ]
    assert con.execute("SELECT status FROM images WHERE source = 'memory:///run-test/m.png'").fetchall() == [
        ("kept",)
    ]
    assert summary["inputs"] == table.num_rows + 2 + 3 + 1
