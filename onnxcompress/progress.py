"""Progress lines for steps that take more than a few seconds, in one style: a label, a bar,
``done/total`` last (the CLI ends the line when done == total), and once a first item is
timed, an estimate of the time left."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger("onnxcompress.progress")

Progress = Callable[[str], None] | None

_WIDTH = 30


class Steps:
    """``total`` steps of one kind; ``done()`` after each reports the line. ``already`` steps
    were done before (a batch's models converted by an earlier run): they count as done at
    once, shown on a first line, and do not enter the pace."""

    def __init__(self, progress: Progress, label: str, total: int, already: int = 0) -> None:
        self.progress, self.label, self.total = progress, label, total
        self._lock = threading.Lock()  # steps may be done from two threads (codebook's plan)
        self.count = self.already = already
        self.start = time.perf_counter()
        if already:
            tick(self.progress, self.label, self.count, self.total)

    def done(self) -> None:
        with self._lock:
            self.count += 1
            tick(self.progress, self.label, self.count, self.total, self._left())

    def _left(self) -> str:
        """About how long the remaining steps take, at the pace so far."""
        if self.count >= self.total:
            return ""
        pace = (time.perf_counter() - self.start) / (self.count - self.already)
        return f"~{pace * (self.total - self.count):.0f} s left"


def tick(progress: Progress, label: str, done: int, total: int, note: str = "") -> None:
    """One progress line: ``label [####......] (note) done/total``."""
    filled = _WIDTH * done // max(total, 1)
    bar = f"[{'#' * filled}{'.' * (_WIDTH - filled)}]"
    line = f"{label} {bar} {f'({note}) ' if note else ''}{done}/{total}"
    logger.debug(line)
    if progress is not None:
        progress(line)
