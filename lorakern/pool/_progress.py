"""A dependency-free progress bar on stderr (catalog builds and scans)."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

__all__ = ["Progress"]


class Progress:
    """``with Progress(total, "hashing") as p: ... p.update(n)``.

    On a terminal the bar is redrawn in place (at most every ``min_interval`` s); elsewhere (logs, CI) it prints
    a line at each quarter. ``enabled=None`` shows it only when the stream is a terminal."""

    def __init__(self, total: int, desc: str = "", *, enabled: Optional[bool] = None,
                 stream: Optional[TextIO] = None, min_interval: float = 0.1, width: int = 30):
        self.total = max(int(total), 0)
        self.desc = desc
        self.stream = sys.stderr if stream is None else stream
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = tty if enabled is None else bool(enabled)
        self.tty = tty
        self.min_interval = min_interval
        self.width = width
        self.n = 0
        self._t0 = time.perf_counter()
        self._last = 0.0
        self._quarter = -1
        self._closed = False

    def _line(self) -> str:
        frac = self.n / self.total if self.total else 1.0
        fill = int(round(frac * self.width))
        dt = time.perf_counter() - self._t0
        rate = self.n / dt if dt > 0 else 0.0
        r = f"{rate / 1e6:.2f}M/s" if rate >= 1e6 else f"{rate / 1e3:.1f}k/s" if rate >= 1e3 else f"{rate:.0f}/s"
        return (f"{self.desc}: |{'#' * fill}{'.' * (self.width - fill)}| {100 * frac:5.1f}% "
                f"{self.n}/{self.total} [{dt:.1f}s, {r}]")

    def update(self, n: int = 1) -> None:
        self.n = min(self.n + int(n), self.total) if self.total else self.n + int(n)
        if not self.enabled:
            return
        if self.tty:
            now = time.perf_counter()
            if now - self._last >= self.min_interval or self.n >= self.total:
                self._last = now
                self.stream.write("\r" + self._line())
                self.stream.flush()
        else:
            q = int(4 * self.n / self.total) if self.total else 4
            if q > self._quarter and q < 4:
                self._quarter = q
                self.stream.write(self._line() + "\n")
                self.stream.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.enabled:
            self.stream.write(("\r" if self.tty else "") + self._line() + "\n")
            self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
