"""Progress in a log file: lines with rate and ETA at most every ``every_seconds``, no ``\\r`` bars."""

from __future__ import annotations

import logging

from manifests.progress import ProgressLog, quiet_library_bars


def test_lines_with_rate_and_eta(caplog, monkeypatch):
    clock = iter([0.0, 10.0, 20.0, 25.0, 40.0])
    monkeypatch.setattr("manifests.progress.time.monotonic", lambda: next(clock))
    progress = ProgressLog("captions", 100, every_seconds=15.0)  # started at t=0
    with caplog.at_level(logging.INFO, logger="manifests.progress"):
        progress.update(10)  # t=10: too soon
        progress.update(30)  # t=20: a line
        progress.update(10)  # t=25: too soon
        progress.update(50, note="stage 64px")  # t=40: the end, always a line
    assert [r.getMessage() for r in caplog.records] == [
        "captions: 40/100 (40.0%), 2 rows/s, ETA 30s",
        "captions: 100/100 (100.0%), 2.5 rows/s, done in 40s, stage 64px",
    ]


def test_unknown_total_and_resumed_count():
    progress = ProgressLog("scan", None, unit="images", initial=500)
    progress.done = 620
    assert progress.line(progress.started + 60) == "scan: 620, 2 images/s"
    progress = ProgressLog("train", 10000, unit="steps", initial=2000)
    progress.done = 2010
    assert progress.line(progress.started + 10).endswith("1 steps/s, ETA 2h13m")


def test_library_bars_off_in_a_log():
    """pytest captures stderr, so this is "not a terminal": HF bars are off, and transformers' too."""
    import transformers
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars

    try:
        quiet_library_bars()
        assert are_progress_bars_disabled()
        assert not transformers.utils.logging.is_progress_bar_enabled()
    finally:
        enable_progress_bars()
        transformers.utils.logging.enable_progress_bar()
