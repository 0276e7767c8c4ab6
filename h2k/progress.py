"""Progress lines for long work (image builds, conversions, matrix runs).

One line per step on stderr, with elapsed time, so logs stay readable in CI
and a person at a terminal sees that work is moving.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field


@dataclass
class Progress:
    """Reports the steps of one job: ``with Progress("build win2019", 5) as p: p.step("...")``."""

    title: str
    total: int | None = None
    stream: object = field(default_factory=lambda: sys.stderr)
    quiet: bool = field(default_factory=lambda: os.environ.get("H2K_QUIET") == "1")
    _count: int = 0
    _start: float = field(default_factory=time.monotonic)

    def step(self, what: str) -> None:
        self._count += 1
        if self.quiet:
            return
        frac = f"{self._count}/{self.total}" if self.total else f"{self._count}"
        print(f"[{self.title}] {frac} {what} ({self.elapsed():.1f}s)", file=self.stream, flush=True)

    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def done(self, what: str = "done") -> None:
        if not self.quiet:
            print(f"[{self.title}] {what} in {self.elapsed():.1f}s", file=self.stream, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.done("done" if exc is None else f"failed: {exc}")
