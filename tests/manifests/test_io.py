"""Schemas, atomic writers and the DuckDB views."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import textwrap
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import manifests
from manifests import io
from manifests.io import committed_parts, read_manifest
from manifests.schema import conform


def image_row(key: str, **fields) -> dict:
    return {"key": key, "source": f"file:///data/{key}.jpg", "status": "kept", **fields}


def test_round_trip_keeps_schema_and_rows(tmp_path):
    writer = manifests.ManifestWriter(tmp_path / "images", "images")
    writer.write(
        [
            image_row("a", width=1024, height=2048, tier="1k"),
            image_row("b", status="rejected", reason="too_small"),
        ],
        "part-00000",
    )
    table = read_manifest(tmp_path / "images", "images")
    assert table.schema.equals(manifests.IMAGES, check_metadata=False)
    assert table.column("key").to_pylist() == ["a", "b"]
    assert table.column("width").to_pylist() == [1024, None]
    metadata = pq.read_schema(tmp_path / "images" / "part-00000.parquet").metadata
    assert metadata[b"pixsigma.schema"] == b"images"
    assert metadata[b"pixsigma.version"] == str(manifests.SCHEMA_VERSION).encode()


def test_rewrite_gives_identical_bytes(tmp_path):
    writer = manifests.ManifestWriter(tmp_path / "images", "images")
    rows = [image_row(k, width=i) for i, k in enumerate("abc")]
    first = writer.write(rows, "part-00000").read_bytes()
    assert writer.write(rows, "part-00000").read_bytes() == first


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"key": "a", "source": "s", "status": "kept", "colour": "red"}], "unknown columns"),
        ([{"key": "a", "status": "kept"}], "required column 'source'"),
        ([{"key": "a", "source": "s", "status": "maybe"}], "status must be one of"),
    ],
)
def test_writer_rejects_rows_outside_the_schema(tmp_path, rows, message):
    writer = manifests.ManifestWriter(tmp_path / "images", "images")
    with pytest.raises(ValueError, match=message):
        writer.write(rows, "part-00000")
    assert committed_parts(tmp_path / "images") == []


def test_writer_checks_schema_name_on_construction(tmp_path):
    with pytest.raises(ValueError, match="schema_name must be one of"):
        manifests.ManifestWriter(tmp_path / "x", "imagez")


def test_conform_null_in_required_column():
    table = pa.table({"key": ["a", None], "source": ["s", "t"], "status": ["kept", "kept"]})
    with pytest.raises(ValueError, match="'key' has 1 nulls"):
        conform(table, manifests.IMAGES)


def test_writer_killed_mid_write_leaves_no_visible_file(tmp_path):
    # The child process dies (SIGKILL) after writing the temporary file, just before the rename.
    code = textwrap.dedent(
        f"""
        import os, signal
        import manifests.io as mio
        def die(tmp, path):
            os.kill(os.getpid(), signal.SIGKILL)
        mio.publish = die
        w = mio.ManifestWriter({str(tmp_path / "images")!r}, "images")
        w.write([{{"key": "a", "source": "s", "status": "kept"}}], "part-00000")
        """
    )
    result = subprocess.run([sys.executable, "-c", code])
    assert result.returncode == -9
    directory = tmp_path / "images"
    assert list(directory.glob("*.parquet")) == []
    assert committed_parts(directory) == []
    assert manifests.connect(tmp_path).execute("SELECT count(*) FROM images").fetchall() == [(0,)]


def test_uncommitted_part_is_invisible_to_views(tmp_path):
    writer = manifests.ManifestWriter(tmp_path / "run" / "manifests" / "images", "images")
    writer.write([image_row("a")], "part-00000")
    # A complete file without its marker (crash between rename and marker) is not read.
    pq.write_table(
        conform(pa.Table.from_pylist([image_row("b")]), manifests.IMAGES), writer.path("part-00001")
    )
    con = manifests.connect(tmp_path)
    assert con.execute("SELECT key FROM images").fetchall() == [("a",)]


def test_views_span_several_runs_and_join_captions(tmp_path):
    for run, keys in (("r1", "ab"), ("r2", "c")):
        manifests.ManifestWriter(tmp_path / run / "manifests" / "images", "images").write(
            [image_row(k, caption_orig=f"orig {k}") for k in keys]
            + [image_row(f"x{run}", status="rejected", reason="too_small: 10x10")],
            "part-00000",
        )
    manifests.ManifestWriter(tmp_path / "r1" / "manifests" / "captions", "captions").write(
        [
            {"key": "a", "caption": "vlm a", "captioner": "m", "prompt": "p", "status": "kept"},
            {
                "key": "b",
                "caption": "",
                "captioner": "m",
                "prompt": "p",
                "status": "rejected",
                "reason": "empty",
            },
        ],
        "part-00000",
    )
    con = manifests.connect(tmp_path)
    assert con.execute("SELECT count(*) FROM images").fetchall() == [(5,)]
    assert sorted(con.execute("SELECT key, reason FROM rejects").fetchall()) == [
        ("xr1", "too_small: 10x10"),
        ("xr2", "too_small: 10x10"),
    ]
    rows = con.execute("SELECT key, caption_orig, caption_vlm FROM image_captions ORDER BY key").fetchall()
    assert rows == [("a", "orig a", "vlm a"), ("b", "orig b", None), ("c", "orig c", None)]


def test_empty_root_has_typed_empty_views(tmp_path):
    con = manifests.connect(tmp_path)
    assert con.execute("SELECT count(*) FROM image_captions").fetchall() == [(0,)]
    columns = [c[0] for c in con.execute("DESCRIBE images").fetchall()]
    assert columns == manifests.IMAGES.names


def test_duckdb_file_database(tmp_path):
    manifests.ManifestWriter(tmp_path / "manifests" / "images", "images").write(
        [image_row("a")], "part-00000"
    )
    con = manifests.connect(tmp_path, database=tmp_path / "pixsigma.duckdb")
    assert con.execute("SELECT key FROM images").fetchall() == [("a",)]
    con.close()
    assert (tmp_path / "pixsigma.duckdb").exists()


@pytest.mark.parametrize("num_captioners", [1, 2])
def test_image_captions_has_one_row_per_kept_image(tmp_path, num_captioners):
    manifests.ManifestWriter(tmp_path / "manifests" / "images", "images").write(
        [image_row("a"), image_row("b")], "part-00000"
    )
    captions = [{"key": "a", "caption": "by m1", "captioner": "m1", "prompt": "p", "status": "kept"}]
    if num_captioners == 2:  # a second captioner for the same key: the view picks the first by captioner
        captions.append({"key": "a", "caption": "by m0", "captioner": "m0", "prompt": "p", "status": "kept"})
    manifests.ManifestWriter(tmp_path / "manifests" / "captions", "captions").write(captions, "part-00000")
    rows = (
        manifests.connect(tmp_path)
        .execute("SELECT key, caption_vlm, captioner FROM image_captions ORDER BY key")
        .fetchall()
    )
    expected_a = ("a", "by m1", "m1") if num_captioners == 1 else ("a", "by m0", "m0")
    assert rows == [expected_a, ("b", None, None)]


def legacy_folder(tmp_path, num_parts: int):
    """Parts committed the old way: marker ``_committed/<part>`` (no suffix), holding its JSON."""
    folder = tmp_path / "clip_embeddings"
    (folder / io.COMMITTED_DIR).mkdir(parents=True)
    for i in range(num_parts):
        (folder / io.COMMITTED_DIR / f"chunk-{i}").write_text(json.dumps({"num_rows": i}))
    return folder


def migrated(folder, num_parts: int) -> bool:
    markers = sorted(p.name for p in (folder / io.COMMITTED_DIR).iterdir())
    return markers == sorted(f"chunk-{i}.committed" for i in range(num_parts)) and all(
        io.marker_info(folder, f"chunk-{i}") == {"num_rows": i} for i in range(num_parts)
    )


def test_two_workers_migrating_the_same_legacy_markers_both_succeed(tmp_path, monkeypatch):
    """Worker B listed the legacy markers before worker A renamed them (every scorer that commits a chunk
    opens a ManifestWriter, which migrates): B must find its work done, not fail."""
    folder = legacy_folder(tmp_path, 3)
    listing = io.legacy_markers(folder)  # B's listing
    assert io.migrate_markers(folder) == 3  # A
    monkeypatch.setattr(io, "legacy_markers", lambda directory: listing)
    io.migrate_markers(folder)  # B, on its stale listing
    assert migrated(folder, 3)
    # B checked that the new marker was absent, then A renamed the legacy one before B's own rename.
    monkeypatch.undo()
    folder = legacy_folder(tmp_path / "again", 3)
    replace = os.replace

    def a_renames_first(src, dst):
        replace(src, dst)  # A's rename
        replace(dst, dst)  # (the same file: A is done)
        raise FileNotFoundError(2, "No such file or directory", str(src))  # B's rename finds no source

    monkeypatch.setattr(io.os, "replace", a_renames_first)
    io.migrate_markers(folder)
    monkeypatch.undo()
    assert migrated(folder, 3)


def test_migrating_in_threads_keeps_every_marker(tmp_path):
    folder = legacy_folder(tmp_path, 200)
    barrier = threading.Barrier(4)

    def worker() -> None:
        barrier.wait()
        manifests.ManifestWriter(folder, "clip_embeddings")  # migrates, as each scorer's writer does

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for future in [pool.submit(worker) for _ in range(4)]:
            future.result()
    assert migrated(folder, 200)
