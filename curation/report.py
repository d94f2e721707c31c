"""The curation report: ``python -m curation.report --input OUT`` → ``OUT/report/index.html`` + PNG figures.

Funnel (inputs → rejections per reason → kept per tier), histograms of resolution, aspect ratio and
aesthetic score per tier (kept rows), and contact sheets of the highest and lowest scored images. It
reads only the ``images`` manifest and the bytes it names; the run writes it at the end of each job.
Every number comes from a DuckDB aggregate (histograms from a fixed sample of at most
``HISTOGRAM_SAMPLE`` rows per tier), so a report of 33M rows needs no more memory than one of 30.
"""

from __future__ import annotations

import argparse
import html
import io
import logging
import math
import tarfile
from pathlib import Path

import duckdb
import fsspec
import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

import manifests  # noqa: E402
from manifests import atomic_write_bytes  # noqa: E402
from manifests.imageio import decode_rgb  # noqa: E402
from manifests.schema import KEPT  # noqa: E402
from manifests.tars import extension_for, read_members  # noqa: E402

log = logging.getLogger(__name__)

REPORT_DIR = "report"
CONTACT_SHEET_SIZE = 8  # images per contact sheet
HISTOGRAM_SAMPLE = 200_000  # values per tier and histogram
THUMBNAIL_SIDE = 256
TIER_ORDER = ("4k", "1k")
FIGURES = {
    "funnel": "Funnel: inputs, rejections per reason, kept per tier",
    "resolution": "Resolution (megapixels) of kept images per tier",
    "aspect_ratio": "Aspect ratio (long / short side) of kept images per tier",
    "aesthetic": "Aesthetic score of kept images per tier",
    "contact_highest": "Highest aesthetic scores",
    "contact_lowest": "Lowest aesthetic scores",
}


def funnel(con: duckdb.DuckDBPyConnection) -> list[tuple[str, int]]:
    """``[("inputs", n), ("rejected: <reason>", n)…, ("kept: <tier>", n)…]`` in that order (SQL counts)."""
    (inputs,) = con.execute("SELECT count(*) FROM images").fetchone()
    rejected = con.execute(
        f"SELECT split_part(reason, ':', 1) AS r, count(*) AS n FROM images WHERE status <> '{KEPT}' "
        "GROUP BY r ORDER BY n DESC, r"
    ).fetchall()
    kept = dict(
        con.execute(f"SELECT tier, count(*) FROM images WHERE status = '{KEPT}' GROUP BY tier").fetchall()
    )
    return (
        [("inputs", inputs)]
        + [(f"rejected: {reason}", n) for reason, n in rejected]
        + [(f"kept: {tier}", kept[tier]) for tier in TIER_ORDER if tier in kept]
    )


def _png(fig: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def plot_funnel(steps: list[tuple[str, int]]) -> bytes:
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(steps) + 1))
    labels, counts = zip(*steps, strict=True)
    colours = [
        "tab:blue" if lab == "inputs" else "tab:green" if lab.startswith("kept") else "tab:red"
        for lab in labels
    ]
    ax.barh(range(len(steps)), counts, color=colours)
    ax.set_yticks(range(len(steps)), labels)
    ax.invert_yaxis()
    for i, n in enumerate(counts):
        ax.text(n, i, f" {n}", va="center")
    ax.set_xlabel("images")
    fig.tight_layout()
    return _png(fig)


def plot_histogram(values_per_tier: dict[str, list[float]], xlabel: str) -> bytes:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for tier, values in values_per_tier.items():
        if values:
            ax.hist(values, bins=min(30, max(5, len(values))), alpha=0.6, label=f"{tier} ({len(values)})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    if any(values_per_tier.values()):
        ax.legend()
    fig.tight_layout()
    return _png(fig)


def thumbnail(root: Path, row: dict) -> Image.Image:
    """A small RGB view of the row's image: from its shard when kept, else from its source."""
    if row["shard"]:
        name = f"{row['key']}.{extension_for(row['format'])}"
        data = read_members(root / row["shard"], {name})[name]
    elif "#" in row["source"]:
        tar_uri, member = row["source"].rsplit("#", 1)
        with fsspec.open(tar_uri, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            data = tar.extractfile(member).read()
    else:
        with fsspec.open(row["source"], "rb") as f:
            data = f.read()
    image = decode_rgb(data, min_side=THUMBNAIL_SIDE)
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    return image


def plot_contact_sheet(root: Path, rows: list[dict]) -> bytes:
    columns = 4
    num_rows = max(1, math.ceil(len(rows) / columns))
    fig, axes = plt.subplots(num_rows, columns, figsize=(3 * columns, 3.2 * num_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows, strict=False):
        try:
            ax.imshow(thumbnail(root, row))
        except (OSError, KeyError, ValueError, SyntaxError) as err:  # a source gone since the run
            ax.text(0.5, 0.5, f"unavailable:\n{type(err).__name__}", ha="center", va="center")
        ax.set_title(f"{row['aesthetic']:.2f} · {row['tier'] or row['reason'].split(':')[0]}", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def kept_values(con: duckdb.DuckDBPyConnection, expression: str) -> dict[str, list[float]]:
    """``expression`` over kept rows per tier: every value up to ``HISTOGRAM_SAMPLE``, else a fixed sample."""
    out = {}
    for tier in TIER_ORDER:
        rows = con.execute(
            f"SELECT v FROM (SELECT {expression} AS v FROM images WHERE status = '{KEPT}' AND tier = ?) "
            f"USING SAMPLE reservoir({HISTOGRAM_SAMPLE} ROWS) REPEATABLE (0)",
            [tier],
        ).fetchnumpy()["v"]
        out[tier] = rows.tolist()
    return out


def extremes(con: duckdb.DuckDBPyConnection, order: str) -> list[dict]:
    """The ``CONTACT_SHEET_SIZE`` scored rows with the highest (``DESC``) or lowest (``ASC``) score."""
    table = con.sql(
        f"SELECT key, source, shard, format, tier, reason, aesthetic FROM images WHERE aesthetic IS NOT NULL "
        f"ORDER BY aesthetic {order}, key LIMIT {CONTACT_SHEET_SIZE}"
    ).to_arrow_table()
    return table.to_pylist()


def figures(root: Path, con: duckdb.DuckDBPyConnection) -> dict[str, bytes]:
    """Every figure of the report as PNG bytes, by name (the keys of ``FIGURES``); aggregates in DuckDB."""
    return {
        "funnel": plot_funnel(funnel(con)),
        "resolution": plot_histogram(kept_values(con, "width * height / 1e6"), "megapixels"),
        "aspect_ratio": plot_histogram(
            kept_values(con, "greatest(width, height) / least(width, height)"), "long side / short side"
        ),
        "aesthetic": plot_histogram(kept_values(con, "aesthetic"), "aesthetic score"),
        "contact_highest": plot_contact_sheet(root, extremes(con, "DESC")),
        "contact_lowest": plot_contact_sheet(root, extremes(con, "ASC")),
    }


def render_html(steps: list[tuple[str, int]], names: list[str]) -> str:
    funnel_rows = "\n".join(f"<tr><td>{html.escape(label)}</td><td>{n}</td></tr>" for label, n in steps)
    sections = "\n".join(
        f'<figure id="{name}"><img src="{name}.png" alt="{html.escape(FIGURES[name])}">'
        f"<figcaption>{html.escape(FIGURES[name])}</figcaption></figure>"
        for name in names
    )
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>pixsigma curation report</title></head>
<body>
<h1>Curation report</h1>
<h2>Funnel</h2>
<table id="funnel-table"><tr><th>step</th><th>images</th></tr>
{funnel_rows}
</table>
{sections}
</body></html>
"""


def write_report(root: str | Path) -> Path:
    """Write ``root/report/index.html`` and its PNG figures from the run's ``images`` manifest."""
    root = Path(root)
    con = manifests.connect(root)
    try:
        out = root / REPORT_DIR
        pngs = figures(root, con)
        for name, data in pngs.items():
            atomic_write_bytes(out / f"{name}.png", data)
        path = out / "index.html"
        atomic_write_bytes(path, render_html(funnel(con), list(pngs)).encode())
    finally:
        con.close()
    log.info("report: %s", path)
    return path


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m curation.report --input RUN``."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--input", type=Path, required=True, help="the curation run folder (--output of curation/run.py)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(f"report: {write_report(args.input)}")


if __name__ == "__main__":
    main()
