"""Arrow schemas of every manifest, declared once.

A manifest is a folder of Parquet parts (``<root>/manifests/<name>/part-*.parquet``). Each part carries
the schema name and version in its Arrow metadata so a reader can refuse files it does not understand.
Bump ``SCHEMA_VERSION`` when a column changes meaning or type; adding a nullable column is compatible.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

SCHEMA_VERSION = 1

KEPT = "kept"
REJECTED = "rejected"
STATUSES = (KEPT, REJECTED)


@dataclass(frozen=True)
class Rejected:
    """A record that a stage refused, with the reason that goes to the manifest's ``reason`` column."""

    reason: str


def _schema(name: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={"pixsigma.schema": name, "pixsigma.version": str(SCHEMA_VERSION)})


# One row per input image, kept or rejected. Columns after `caption_orig` are filled by the deeper
# curation passes (aesthetic score, perceptual hash, dedup) and stay null where a pass did not run.
IMAGES = _schema(
    "images",
    [
        pa.field(
            "key", pa.string(), nullable=False
        ),  # stable id derived from the source, never arrival order
        pa.field("source", pa.string(), nullable=False),  # file URI, or tar URI + "#" + member
        pa.field("status", pa.string(), nullable=False),  # "kept" | "rejected"
        pa.field("reason", pa.string()),  # null when kept
        pa.field("width", pa.int32()),  # after EXIF orientation
        pa.field("height", pa.int32()),
        pa.field("format", pa.string()),  # Pillow format name: JPEG, PNG, WEBP, ...
        pa.field("num_bytes", pa.int64()),
        pa.field("sha256", pa.string()),
        pa.field("tier", pa.string()),  # "4k" | "1k" | null
        pa.field("shard", pa.string()),  # curated shard path relative to the run root, kept rows only
        pa.field("caption_orig", pa.string()),  # alt text / sidecar caption as found
        pa.field("aesthetic", pa.float32()),
        pa.field("aesthetic_model", pa.string()),
        pa.field("clip_model", pa.string()),
        pa.field("phash", pa.int64()),  # 64-bit perceptual hash, bit pattern stored as signed int64
        pa.field("dup_of", pa.string()),  # the kept row a "duplicate: <test> <value>" matches directly
        pa.field("url", pa.string()),  # origin URL (URL lists, img2dataset tars), else null
        pa.field("source_key", pa.string()),  # the key a WebDataset / img2dataset source gave the sample
        pa.field("source_meta", pa.string()),  # that source's JSON sidecar, verbatim
        pa.field("download_status", pa.string()),  # img2dataset's per-row status for URL-list rows
    ],
)

# Optional side manifest of curation: one L2-normalised CLIP image embedding per scored row, fp16.
CLIP_EMBEDDINGS = _schema(
    "clip_embeddings",
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("clip_model", pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.float16()), nullable=False),  # (D,) with D = CLIP embed_dim
    ],
)

# One row per (key, captioner, prompt).
CAPTIONS = _schema(
    "captions",
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("captioner", pa.string(), nullable=False),  # model id or path, plus revision/hash
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("gen_params", pa.string()),  # JSON of the generation settings
        pa.field("num_tokens", pa.int32()),  # T5 tokens of the caption (training tokenizer)
        pa.field("truncated", pa.bool_()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("seconds", pa.float32()),  # generation time of the batch, divided per row
    ],
)

SCHEMAS: dict[str, pa.Schema] = {"images": IMAGES, "captions": CAPTIONS, "clip_embeddings": CLIP_EMBEDDINGS}


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Return ``table`` cast to ``schema``; missing nullable columns become nulls.

    Raises ``ValueError`` for unknown columns, missing required columns, or bad status values.
    """
    name = schema.metadata[b"pixsigma.schema"].decode()
    extra = set(table.column_names) - set(schema.names)
    if extra:
        raise ValueError(f"{name}: unknown columns {sorted(extra)}; schema has {schema.names}")
    columns = []
    for field in schema:
        if field.name in table.column_names:
            column = table.column(field.name).cast(field.type)
        elif field.nullable:
            column = pa.nulls(table.num_rows, field.type)
        else:
            raise ValueError(f"{name}: required column {field.name!r} is missing")
        if not field.nullable and column.null_count:
            raise ValueError(f"{name}: column {field.name!r} has {column.null_count} nulls")
        columns.append(column)
    out = pa.Table.from_arrays(columns, schema=schema)
    if "status" in schema.names:
        bad = set(out.column("status").to_pylist()) - set(STATUSES)
        if bad:
            raise ValueError(f"{name}: status must be one of {STATUSES}, got {sorted(bad)}")
    return out
