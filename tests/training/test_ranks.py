"""A finished torchrun worker leaves through ``exit_torchrun_worker``: exit status 0, its output flushed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = """
import logging, sys
from training.ranks import exit_torchrun_worker
logging.basicConfig(stream=sys.stderr, format="%(message)s", level=logging.INFO)
print("stdout line", end="")  # no newline: only an explicit flush writes it to the pipe
logging.getLogger("x").info("log line")
exit_torchrun_worker()
raise SystemExit(3)  # reached only when there is no RANK
"""


def _run(**env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "PYTHONUNBUFFERED")}
    return subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env={**base, **env}, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_a_torchrun_worker_exits_zero_with_its_output_flushed() -> None:
    done = _run(RANK="1")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "stdout line"
    assert "log line" in done.stderr


def test_a_plain_process_returns_from_it() -> None:
    assert _run().returncode == 3
