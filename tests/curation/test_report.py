"""The curation report: HTML with the funnel and every figure, PNGs that open."""

from __future__ import annotations

from html.parser import HTMLParser

from PIL import Image

import manifests
from curation.report import FIGURES, main


class Figures(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, str] = {}
        self.cells: list[str] = []
        self._figure: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure":
            self._figure = attrs["id"]
        elif tag == "img":
            self.images[self._figure] = attrs["src"]

    def handle_data(self, data):
        if data.strip():
            self.cells.append(data.strip())


def test_report_has_the_funnel_and_every_figure(curated):
    root, summary = curated
    main(["--input", str(root)])  # the CLI rewrites what the run wrote, from the manifest alone
    parser = Figures()
    parser.feed((root / "report" / "index.html").read_text(encoding="utf-8"))
    assert set(parser.images) == set(FIGURES)
    for name, src in parser.images.items():
        with Image.open(root / "report" / src) as png:
            assert png.format == "PNG" and min(png.size) > 100, name
    cells = parser.cells
    assert cells[cells.index("inputs") + 1] == str(summary["inputs"])
    for reason, count in summary["rejected_per_reason"].items():
        assert cells[cells.index(f"rejected: {reason}") + 1] == str(count)
    for tier, count in summary["kept_per_tier"].items():
        assert cells[cells.index(f"kept: {tier}") + 1] == str(count)
    scored = (
        manifests.connect(root)
        .execute("SELECT count(*) FROM images WHERE aesthetic IS NOT NULL")
        .fetchone()[0]
    )
    assert scored >= 8  # both contact sheets are full
