"""Off a terminal the trainer logs progress lines with rate and ETA (and the stage's short batches so far)
instead of a tqdm bar of `\\r` frames."""

from __future__ import annotations

import logging

from training.config import LogSection
from training.observe import MetricsSink


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path, caplog):
    cfg = LogSection(every=1, progress_bar=True, tensorboard=False)
    sink = MetricsSink(tmp_path, cfg, enabled=True, total_steps=3, resume_global_step=1)
    assert sink.bar is None and sink.progress is not None  # pytest captures stderr: not a terminal
    with caplog.at_level(logging.INFO, logger="training.observe"):
        for step in (2, 3):
            record = {"stage": "32px", "loss": 0.5, "global_step": step, "partial_batches": 1, "batches": 2}
            sink.step(record, seconds=0.1, data_seconds=0.0, images=2, flops=0, peak=0.0)
    sink.close()
    (line,) = [r.getMessage() for r in caplog.records]  # the end always logs; step 2 came too soon
    assert line.startswith("train: 3/3 (100.0%), ") and line.endswith(
        ", stage 32px, loss 0.5000, partial batches 2/4"
    )
