"""Progress of the long passes over a dataset (generation, index, decode): a log line at most every
``every_s`` seconds with images done, rate and time left, so no phase is silent for minutes."""

from __future__ import annotations

import time

from absl import logging


class ProgressLog:
    """Logs ``what: done/total images, rate, time left`` at most every ``every_s`` seconds."""

    def __init__(self, what: str, total: int, every_s: float = 10.0):
        self.what, self.total, self.every_s = what, total, every_s
        self.start = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.every_s or done >= self.total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        logging.info(
            "%s: %d/%d images, %.0f images/s, %.0f s left.",
            self.what,
            done,
            self.total,
            rate,
            (self.total - done) / max(rate, 1e-9),
        )
