"""Progress that reads well in a log file: periodic lines with rate and ETA, no ``\\r`` bars off a terminal.

On a terminal the libraries' bars stay (tqdm, Ray Data's). In a log (``ray job logs``, CI, ``> file``) a tqdm
bar is one endless line of ``\\r`` frames, so there our loops log a ``ProgressLog`` line every
``every_seconds`` instead, and the HF libraries' bars (hub downloads, transformers' "Loading weights") are
off. Off a terminal Ray Data logs an INFO progress block every few seconds and its execution plan per
dataset: ``quiet_ray_data`` drops those (our ``ProgressLog`` line says the same once), warnings stay.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)

EVERY_SECONDS = 30.0  # between progress lines: a few per minute keeps a day-long log readable
# Ray Data's INFO emitters (execution plan, "Running Dataset", logged progress blocks). A level set on these
# child loggers survives Ray Data resetting its "ray.data" logger at every execution.
RAY_DATA_CHATTY_LOGGERS = ("ray.data._internal.execution", "ray.data._internal.progress")


def interactive() -> bool:
    """True when stderr (where bars and logs go) is a terminal."""
    return sys.stderr.isatty()


def quiet_ray_data() -> None:
    """Ray Data's execution plan and progress blocks off (warnings and errors stay); no import of Ray."""
    for name in RAY_DATA_CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def quiet_library_bars() -> None:
    """Off a terminal, turn off the progress bars of the HF libraries (a log gets ``\\r`` frames otherwise)
    and Ray Data's logged progress blocks."""
    if interactive():
        return
    quiet_ray_data()
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # transformers reads this switch when it is imported…
    if "transformers" in sys.modules:  # …so one imported already is switched off directly
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def quiet_root_info() -> None:
    """Drop INFO records sent to the root logger itself: libraries that call ``logging.info`` directly
    (open_clip logs a dozen lines per model load) would otherwise print through our INFO handlers."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: record.name != "root" or record.levelno >= logging.WARNING)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class ProgressLog:
    """``what: done/total (pct) rate unit/s, ETA …`` every ``every_seconds`` and when the loop ends."""

    def __init__(
        self,
        what: str,
        total: int | None,
        *,
        unit: str = "rows",
        every_seconds: float = EVERY_SECONDS,
        initial: int = 0,
        logger: logging.Logger = log,
    ) -> None:
        self.what, self.total, self.unit = what, total, unit
        self.every_seconds = every_seconds
        self.logger = logger
        self.initial = self.done = initial
        self.started = self.last = time.monotonic()

    def update(self, n: int = 1, *, note: str = "") -> None:
        """Count ``n`` more; log a line when ``every_seconds`` have passed since the last one or at the end."""
        self.done += n
        now = time.monotonic()
        finished = self.total is not None and self.done >= self.total
        if finished or now - self.last >= self.every_seconds:
            self.last = now
            self.logger.info("%s", self.line(now, note=note))

    def line(self, now: float | None = None, *, note: str = "") -> str:
        elapsed = max((now or time.monotonic()) - self.started, 1e-9)
        rate = (self.done - self.initial) / elapsed
        parts = [f"{self.what}: {self.done}"]
        if self.total:
            parts[0] += f"/{self.total} ({100 * self.done / self.total:.1f}%)"
        parts.append(f"{rate:.3g} {self.unit}/s")
        if self.total and self.done < self.total and rate > 0:
            parts.append(f"ETA {_duration((self.total - self.done) / rate)}")
        elif self.total and self.done >= self.total:
            parts.append(f"done in {_duration(elapsed)}")
        return ", ".join(parts + ([note] if note else []))
