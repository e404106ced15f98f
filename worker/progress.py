"""Progress display: a bar on an interactive terminal, plain periodic lines otherwise."""
from __future__ import annotations

import sys
import time


class Progress:
    """Shows ``done / total`` with a rate and a short status text."""

    def __init__(self, total: int, label: str, mode: str = "auto", stream=None,
                 every_seconds: float = 5.0):
        self.total = max(1, total)
        self.label = label
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.mode = mode
        self.every = every_seconds
        self.start = time.monotonic()
        self._last = 0.0
        self._last_pct = -1

    def update(self, done: int, status: str = "") -> None:
        if self.mode == "off":
            return
        now = time.monotonic()
        rate = done / max(1e-9, now - self.start)
        if self.mode == "bar":
            if now - self._last < 0.1 and done < self.total:
                return
            width = 30
            filled = int(width * min(done, self.total) / self.total)
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                              f"{done}/{self.total} {rate:.1f} it/s {status}\033[K")
            if done >= self.total:
                self.stream.write("\n")
            self.stream.flush()
            self._last = now
            return
        pct = int(100 * done / self.total) // 10 * 10
        if done >= self.total or now - self._last >= self.every or pct > self._last_pct:
            self._last, self._last_pct = now, pct
            self.stream.write(f"{self.label}: {done}/{self.total} ({100 * done / self.total:.0f}%) "
                              f"{rate:.1f} it/s {status}\n")
            self.stream.flush()
