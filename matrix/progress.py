"""Live progress of a matrix run on stderr: cells done/running/failed and an ETA.

One line per event (a cell starts or ends), so CI logs stay readable; the ETA
is the mean time of finished cells times the cells left, divided by the
workers that will run them.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import TextIO

from matrix.model import GOOD_VERDICTS, CellResult


def _fmt(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class MatrixProgress:
    def __init__(self, title: str, total: int, jobs: int, stream: TextIO | None = None, quiet: bool | None = None):
        self.title = title
        self.total = total
        self.jobs = max(1, jobs)
        self.stream = stream or sys.stderr
        self.quiet = os.environ.get("H2K_QUIET") == "1" if quiet is None else quiet
        self.done = 0
        self.failed = 0
        self.running: set[str] = set()
        self._durations: list[float] = []
        self._start = time.monotonic()
        self._lock = threading.Lock()

    def eta(self) -> float | None:
        if not self._durations:
            return None
        left = self.total - self.done
        if left <= 0:
            return 0.0
        mean = sum(self._durations) / len(self._durations)
        waves = -(-left // min(self.jobs, left))  # ceil
        return mean * waves

    def status(self) -> str:
        eta = self.eta()
        return (
            f"{self.done}/{self.total} done, {len(self.running)} running, {self.failed} failed, "
            f"ETA {_fmt(eta) if eta is not None else '?'}, elapsed {_fmt(time.monotonic() - self._start)}"
        )

    def _emit(self, event: str) -> None:
        if not self.quiet:
            print(f"[matrix {self.title}] {self.status()} | {event}", file=self.stream, flush=True)

    def started(self, cell_id: str, host: str | None = None) -> None:
        with self._lock:
            self.running.add(cell_id)
            self._emit(f"start {cell_id}" + (f" on {host}" if host else ""))

    def finished(self, result: CellResult) -> None:
        with self._lock:
            self.running.discard(result.id)
            self.done += 1
            if result.verdict not in GOOD_VERDICTS:
                self.failed += 1
            self._durations.append(result.seconds)
            extra = f": {result.reason}" if result.reason and result.verdict != "passed" else ""
            self._emit(f"{result.verdict} {result.id} ({result.seconds:.1f}s){extra}")

    def note(self, text: str) -> None:
        with self._lock:
            self._emit(text)
