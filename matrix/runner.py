"""Run the cells of a matrix in parallel and keep the reports valid at every moment.

The work of a cell is done by a ``CellExecutor`` (``matrix.executors`` has the
real one, which fixes images with h2k and boots them with the lab); the runner
only schedules:

* each (image, pack) is prepared (fixed) once, the first time a cell needs it,
  under a per-key lock so cells of other images go on meanwhile;
* every cell gets its own qcow2 overlay on the prepared disk
  (``qemu-img create -f qcow2 -b BASE -F FMT``): no copies, and cells never see
  each other's writes;
* ``jobs`` worker threads pull cells; ``--connect`` hosts are dealt round-robin;
* after every finished cell results.json, junit.xml and summary.md are rewritten
  atomically, so even a killed run leaves valid reports;
* ``stop()`` (Ctrl-C, SIGTERM) sets every running cell's stop event (the
  executor ends its QEMU), then the cells that were running are reported
  ``incomplete`` and those never started ``skipped``;
* a cell that overruns its timeout by a margin is stopped the same way and
  reported ``timeout`` (the lab normally reports its own timeouts first);
* the shared fix of an image has a watchdog too (``fix_timeout``): a fix that
  hangs is told to stop, and every cell waiting for it is reported ``timeout``
  with the reason; if the fix does not even stop, the cells waiting for it
  stop waiting after the grace period, so a hung fix never stalls the run.
"""

from __future__ import annotations

import datetime as _dt
import os
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from h2k.errors import H2KError
from h2k.image import DiskImage, as_image, overlay_on
from matrix.model import Cell, CellResult, ImageSpec, KnownIssue, MatrixSpec, PackSpec, RunResults
from matrix.progress import MatrixProgress
from matrix.reports import write_all

# How long past its timeout a cell may run before the runner stops it itself.
WATCHDOG_GRACE = 120.0
# How long stop() waits for running cells to wind down before writing the report anyway.
STOP_GRACE = 60.0
# How long the shared fix of one image may take (a Windows fix under TCG takes minutes, not an hour).
FIX_TIMEOUT = 3600.0


class FixTimeout(Exception):
    """The shared fix of an image overran ``fix_timeout``: its cells are reported ``timeout``."""


@dataclass
class _Prep:
    """One shared fix: who runs it, since when, its stop event, and its result once done."""

    stop: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    started: float | None = None
    owner: threading.Thread | None = None  # the worker running the fix
    timed_out_at: float | None = None
    result: "Prepared | BaseException | None" = None


class Interrupted(Exception):
    """Raised by an executor whose work was stopped through ``ctx.stop``."""


@dataclass
class Prepared:
    """An (image, pack) made ready once: the fixed disk every cell's overlay is backed by."""

    image: ImageSpec
    pack: PackSpec | None
    disk: DiskImage  # the base as the front door opened it (a path is opened through it)
    info: dict[str, Any] = field(default_factory=dict)  # e.g. plan summary, inspected OS

    def __post_init__(self) -> None:
        self.disk = as_image(self.disk)

    @property
    def base(self) -> Path:
        return Path(self.disk.path)

    @property
    def base_format(self) -> str:
        return self.disk.format


@dataclass
class CellContext:
    cell: Cell
    prepared: Prepared
    overlay: Path
    outdir: Path  # the cell's artifact directory
    connect: str | None  # libvirt URI, None = local QEMU
    stop: threading.Event  # set when the cell must end now (interrupt or watchdog)
    memory_mb: int
    disk: DiskImage  # ``overlay`` with its chain, as the lab takes it


@dataclass
class CellOutcome:
    verdict: str
    reason: str = ""
    stop_code: int | None = None
    stop_name: str | None = None
    artifacts: dict[str, str] = field(default_factory=dict)
    agent: dict[str, Any] = field(default_factory=dict)
    phases: list[dict[str, Any]] = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)  # a pass: the evidence names that decided it
    lab_setup: dict[str, Any] = field(default_factory=dict)  # what the lab set up to observe it (EMS, success)
    proof: str = ""  # how the verdict was reached (model.PROOF_MODES); empty = from the cell's mode


class CellExecutor(Protocol):
    def prepare(self, image: ImageSpec, pack: PackSpec | None, workdir: Path, stop: threading.Event) -> Prepared:
        """Fix ``image`` with ``pack`` (or make it ready as is); called once per (image, pack)."""

    def run_cell(self, ctx: CellContext) -> CellOutcome:
        """Run one cell on ``ctx.overlay``; raise Interrupted if ``ctx.stop`` ended it."""


def default_memory_mb(image: ImageSpec) -> int:
    if image.memory_mb:
        return image.memory_mb
    if image.mode == "fix+verify":
        return 1024  # a libguestfs appliance
    return 2048 if image.kind == "windows" else 512


def mem_available_mb() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 4096


def worker_bound(jobs: int | None, n_cells: int, per_cell_mb: int, *, cores: int | None = None,
                 avail_mb: int | None = None) -> int:
    """Workers to use: --jobs (or the core count), capped by memory and by the number of cells.

    Under TCG each guest keeps about one core busy; each cell also needs its guest's
    memory plus QEMU's own (~512 MiB), and 1 GiB is left for the host.
    """
    cores = cores or os.cpu_count() or 1
    avail = mem_available_mb() if avail_mb is None else avail_mb
    by_mem = max(1, (avail - 1024) // (per_cell_mb + 512))
    want = jobs if jobs else cores
    return max(1, min(want, by_mem, max(1, n_cells)))


def create_overlay(base: DiskImage, overlay: Path) -> DiskImage:
    """A cell's own qcow2 overlay on the prepared base (backing format pinned)."""
    overlay.parent.mkdir(parents=True, exist_ok=True)
    if overlay.exists():
        overlay.unlink()
    return overlay_on(base, overlay)


def soften(result: CellResult, issues: list[KnownIssue]) -> CellResult:
    """A failure that matches a known issue becomes softfailed, keeping the original reason as a note."""
    if result.verdict not in ("failed", "timeout"):
        return result
    for issue in issues:
        if not issue.rule.matches(result.cell):
            continue
        if issue.stop_code is not None and result.stop_code != issue.stop_code:
            continue
        if issue.reason_contains and issue.reason_contains not in (result.reason or ""):
            continue
        result.note = f"known issue: {issue.reason} (was {result.verdict}: {result.reason})"
        result.verdict = "softfailed"
        return result
    return result


def interleave(cells: list[Cell]) -> list[tuple[int, Cell]]:
    """Execution order: the first cell of every (image, pack), then the second of each, ...

    So the first workers start fixing different images at once instead of all
    waiting for the same fix. The index is the cell's place in the matrix (used
    to deal --connect hosts), not its place in this order.
    """
    groups: dict[tuple[str, str | None], list[tuple[int, Cell]]] = {}
    for i, cell in enumerate(cells):
        groups.setdefault((cell.image, cell.pack), []).append((i, cell))
    out: list[tuple[int, Cell]] = []
    lists = list(groups.values())
    for depth in range(max((len(g) for g in lists), default=0)):
        out.extend(g[depth] for g in lists if depth < len(g))
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._+-" else "_" for ch in name)


class Runner:
    def __init__(
        self,
        spec: MatrixSpec,
        cells: list[Cell],
        executor: CellExecutor,
        outdir: str | Path,
        *,
        jobs: int | None = None,
        connect: list[str] | None = None,
        shard: str | None = None,
        previous: RunResults | None = None,
        progress: MatrixProgress | None = None,
        watchdog_grace: float = WATCHDOG_GRACE,
        stop_grace: float = STOP_GRACE,
        fix_timeout: float = FIX_TIMEOUT,
    ) -> None:
        self.spec = spec
        self.cells = cells
        self.executor = executor
        self.outdir = Path(outdir)
        self.connect = list(connect or [])
        self.shard = shard
        self.previous = previous  # --rerun-failed: results we merge the re-run into
        per_cell = max((default_memory_mb(spec.image(c.image)) for c in cells), default=512)
        self.jobs = worker_bound(jobs, len(cells), per_cell)
        self.progress = progress or MatrixProgress(spec.name, len(cells), self.jobs)
        self.watchdog_grace = watchdog_grace
        self.stop_grace = stop_grace
        self.fix_timeout = fix_timeout
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._final_written = False
        self._results: dict[str, CellResult] = {}
        self._running: dict[str, tuple[float | None, threading.Event, bool]] = {}  # id -> (started, stop, timed_out)
        self._preps: dict[tuple[str, str | None], _Prep] = {}
        self._prep_report: dict[str, dict[str, Any]] = {}
        self.started = ""

    # --- control ------------------------------------------------------------

    def stop(self) -> None:
        """Stop the run: no new cells start, running cells are told to end now."""
        self._stop.set()
        with self._lock:
            for _, ev, _ in self._running.values():
                ev.set()
            for prep in self._preps.values():
                prep.stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # --- results ------------------------------------------------------------

    def snapshot(self, *, final: bool) -> RunResults:
        cells = []
        with self._lock:
            for cell in self.cells:
                r = self._results.get(cell.id)
                if r is None:
                    if cell.id in self._running:
                        r = CellResult(cell, "incomplete", reason="interrupted: the run was stopped while this cell ran"
                                       if final else "still running")
                    else:
                        r = CellResult(cell, "skipped", reason="not started: the run was stopped"
                                       if final else "not started yet")
                cells.append(r)
        results = RunResults(
            matrix=self.spec.name,
            cells=cells,
            started=self.started,
            finished=_now() if final else "",
            interrupted=self._stop.is_set() or not final,
            shard=self.shard,
            matrix_file=self.spec.source,
            extra={"in_progress": not final, "jobs": self.jobs, "hosts": self.connect,
                   "prepared": dict(self._prep_report)},
        )
        if self.previous is not None:
            from matrix.reports import merge_results

            merged = merge_results([self.previous, results], name=self.spec.name)
            merged.interrupted = results.interrupted
            merged.shard = self.shard
            merged.extra = dict(results.extra, rerun_of=self.previous.started)
            return merged
        return results

    def _write(self, *, final: bool) -> RunResults:
        with self._write_lock:  # one writer at a time; each file is replaced atomically
            results = self.snapshot(final=final)
            if self._final_written:
                return results  # a straggler after the final report must not overwrite it
            write_all(results, self.outdir)
            self._final_written = final
        return results

    # --- work ---------------------------------------------------------------

    def _prepare(self, cell: Cell) -> Prepared:
        """The (image, pack)'s fixed disk: the first cell to need it runs the fix, the others wait for it."""
        key = (cell.image, cell.pack)
        with self._lock:
            prep = self._preps.get(key)
            owner = prep is None
            if owner:
                prep = self._preps[key] = _Prep(started=time.monotonic(), owner=threading.current_thread())
                if self._stop.is_set():
                    prep.stop.set()
        if owner:
            self._run_prepare(cell, prep)
        else:
            while not prep.done.wait(0.2):
                hung = prep.timed_out_at is not None and time.monotonic() - prep.timed_out_at > self.watchdog_grace
                if hung:  # the fix ignores its stop: do not wait for it any longer
                    raise FixTimeout(self._fix_timeout_reason(cell, "and did not stop"))
        got = prep.result
        if isinstance(got, BaseException):
            raise got
        assert got is not None
        return got

    def _fix_timeout_reason(self, cell: Cell, more: str = "") -> str:
        what = cell.image + (f" with {cell.pack}" if cell.pack else "")
        return (f"the shared fix of {what} did not finish within {self.fix_timeout:.0f}s"
                + (f" {more}" if more else "") + ": stopped by the runner")

    def _run_prepare(self, cell: Cell, prep: _Prep) -> None:
        image = self.spec.image(cell.image)
        pack = self.spec.pack(cell.pack)
        workdir = self.outdir / "prepared" / _safe(f"{cell.image}.{cell.pack or 'nopack'}")
        workdir.mkdir(parents=True, exist_ok=True)
        self.progress.note(f"preparing {cell.image}" + (f" with {cell.pack}" if cell.pack else ""))
        t_prep = time.monotonic()
        try:
            got: Prepared | BaseException = self.executor.prepare(image, pack, workdir, prep.stop)
        except BaseException as exc:  # remembered: every cell of this key reports it
            got = exc
        if prep.timed_out_at is not None:
            got = FixTimeout(self._fix_timeout_reason(cell))
        prep.result = got
        prep.done.set()
        what = "prepared" if not isinstance(got, BaseException) else "could not prepare"
        self.progress.note(f"{what} {cell.image}" + (f" with {cell.pack}" if cell.pack else "")
                           + f" in {time.monotonic() - t_prep:.0f}s")
        self._prep_report[f"{cell.image}.{cell.pack or 'nopack'}"] = {
            "seconds": round(time.monotonic() - t_prep, 3),
            "ok": not isinstance(got, BaseException),
            "error": str(got) if isinstance(got, BaseException) else None,
            "base": str(got.base) if isinstance(got, Prepared) else None,
            "info": got.info if isinstance(got, Prepared) else {},
        }

    def _run_one(self, cell: Cell, host: str | None) -> CellResult:
        cell_dir = self.outdir / "cells" / _safe(cell.id)
        cell_dir.mkdir(parents=True, exist_ok=True)
        ev = threading.Event()
        t0 = time.monotonic()
        with self._lock:
            self._running[cell.id] = (None, ev, False)  # no deadline while the shared fix runs
            if self._stop.is_set():
                ev.set()
        self.progress.started(cell.id, host)
        try:
            prepared = self._prepare(cell)
            overlay = cell_dir / "disk.qcow2"
            disk = create_overlay(prepared.disk, overlay)
            # The cell's own time (and its timeout) starts now: the fix is shared and reported apart.
            t0 = time.monotonic()
            with self._lock:
                self._running[cell.id] = (t0, ev, False)
            ctx = CellContext(cell, prepared, overlay, cell_dir, host, ev,
                              default_memory_mb(self.spec.image(cell.image)), disk)
            out = self.executor.run_cell(ctx)
            result = CellResult(
                cell,
                out.verdict,
                reason=out.reason,
                stop_code=out.stop_code,
                stop_name=out.stop_name,
                artifacts=dict(out.artifacts),
                agent=dict(out.agent),
                phases=list(out.phases),
                host=host,
                evidence=list(out.evidence),
                lab_setup=dict(out.lab_setup),
                proof=out.proof,
            )
        except FixTimeout as exc:
            result = CellResult(cell, "timeout", reason=str(exc), host=host)
        except Interrupted as exc:
            result = CellResult(cell, "incomplete", reason=f"interrupted: {exc or 'the run was stopped'}", host=host)
        except H2KError as exc:  # the engine refused or failed with a cause a person can act on
            result = CellResult(cell, "failed", reason=str(exc), host=host)
        except Exception as exc:  # the lab or the runner broke: not the guest's fault
            (cell_dir / "traceback.txt").write_text(traceback.format_exc())
            result = CellResult(cell, "incomplete", reason=f"{type(exc).__name__}: {exc}", host=host,
                                artifacts={"traceback": str(cell_dir / "traceback.txt")})
        result.seconds = round(time.monotonic() - t0, 3)
        with self._lock:
            timed_out = self._running.get(cell.id, (0, None, False))[2]
        if timed_out and result.verdict in ("incomplete",):
            result.verdict = "timeout"
            result.reason = f"no verdict within {cell.timeout}s (+{self.watchdog_grace:.0f}s grace): stopped by the runner"
        elif self._stop.is_set() and result.verdict == "incomplete" and not result.reason.startswith("interrupted"):
            result.reason = f"interrupted: {result.reason}"
        return soften(result, self.spec.known_issues)

    def _worker(self, work: "queue.Queue[tuple[int, Cell]]") -> None:
        while not self._stop.is_set():
            try:
                index, cell = work.get_nowait()
            except queue.Empty:
                return
            host = self.connect[index % len(self.connect)] if self.connect else None
            result = self._run_one(cell, host)
            with self._lock:
                self._running.pop(cell.id, None)
                self._results[cell.id] = result
            self.progress.finished(result)
            self._write(final=False)

    def _watchdog(self) -> None:
        now = time.monotonic()
        with self._lock:
            for cid, (t0, ev, timed_out) in list(self._running.items()):
                cell = next(c for c in self.cells if c.id == cid)
                if t0 is not None and not timed_out and now - t0 > cell.timeout + self.watchdog_grace:
                    self._running[cid] = (t0, ev, True)
                    ev.set()
            for prep in self._preps.values():
                if (not prep.done.is_set() and prep.timed_out_at is None and prep.started is not None
                        and now - prep.started > self.fix_timeout):
                    prep.timed_out_at = now
                    prep.stop.set()

    def _only_hung_fixes_left(self, alive: list[threading.Thread]) -> bool:
        """Every live worker runs a fix that overran and ignored its stop for the grace period.

        Their cells are reported ``timeout`` now (the workers are daemon threads, stuck in
        the executor); cells never started are reported skipped.
        """
        now = time.monotonic()
        with self._lock:
            hung = {k: p for k, p in self._preps.items()
                    if not p.done.is_set() and p.timed_out_at is not None and now - p.timed_out_at > self.watchdog_grace}
            if not alive or not all(any(p.owner is t for p in hung.values()) for t in alive):
                return False
            by_id = {c.id: c for c in self.cells}
            for cid in list(self._running):
                cell = by_id[cid]
                if (cell.image, cell.pack) in hung:
                    self._results[cid] = CellResult(cell, "timeout",
                                                    reason=self._fix_timeout_reason(cell, "and did not stop"))
                    self._running.pop(cid)
            return True

    def run(self) -> RunResults:
        """Run every cell; returns the final results (also written to ``outdir``)."""
        self.started = _now()
        self.outdir.mkdir(parents=True, exist_ok=True)
        self._write(final=False)
        work: "queue.Queue[tuple[int, Cell]]" = queue.Queue()
        for item in interleave(self.cells):
            work.put(item)
        threads = [threading.Thread(target=self._worker, args=(work,), name=f"matrix-{k}", daemon=True)
                   for k in range(self.jobs)]
        for t in threads:
            t.start()
        stop_deadline = None
        while True:
            alive = [t for t in threads if t.is_alive()]
            if not alive:
                break
            alive[0].join(timeout=0.2)  # short joins keep signal handlers responsive
            self._watchdog()
            if self._only_hung_fixes_left(alive):
                self.progress.note("a shared fix hung and ignored its stop; writing the report without it")
                break
            if self._stop.is_set():
                if stop_deadline is None:
                    stop_deadline = time.monotonic() + self.stop_grace
                elif time.monotonic() > stop_deadline:
                    self.progress.note("cells still running after the stop grace period; writing the report anyway")
                    break
        return self._write(final=True)
