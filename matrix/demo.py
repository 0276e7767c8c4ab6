"""``h2k demo``: the main job end to end on the embedded test bed.

1. Windows (phony disks, fake virtio-win pack): inspect, plan, fix on an
   overlay, static verify per VirtIO bus -- the testbed-windows matrix.
2. Linux (real Debian guests "from VMware"): boot them unfixed on VirtIO
   (they must fail: no VirtIO driver in the initramfs) and on SATA (they must
   pass), then fix them and boot every bus and firmware (they must pass, with
   the network smoke check through the guest agent).
3. A before/after table, plus each run's JUnit, results.json, markdown and report.html,
   and one report.html of the whole demo (every grid on one page), whose path it prints last.

The demo checks its own proof: it exits non-zero when a verdict is not the
one expected, so "the demo ran" always means "the chain was shown to work".
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from h2k import accel
from h2k.cli import main as h2k_main
from matrix.model import RunResults

MATRIX_DIR = Path(__file__).resolve().parent


@dataclass
class Stage:
    title: str
    matrix: str
    out: str
    extra_args: tuple[str, ...] = ()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the end-to-end demo on the embedded test bed (fix, boot, score, report)",
        description=(
            "Build (or reuse) the test bed, fix phony Windows disks and verify them per bus, boot the "
            "Debian test guests unfixed and fixed under QEMU, and print the verdicts before and after. "
            "Exits non-zero unless every verdict is the expected one."
        ),
    )
    p.add_argument("-o", "--out", default="demo-results", help="output directory (default: demo-results)")
    p.add_argument("-j", "--jobs", type=int, default=None, help="cells at once (default: by cores and memory)")
    p.set_defaults(func=run)


def _run_matrix(stage: Stage, out_root: Path, jobs: int | None) -> Path:
    out = out_root / stage.out
    args = ["matrix", "run", str(MATRIX_DIR / stage.matrix), "-o", str(out), *stage.extra_args]
    if jobs:
        args += ["-j", str(jobs)]
    print(f"\n== {stage.title} ==", flush=True)
    print("$ h2k " + " ".join(args), flush=True)
    rc = h2k_main(args)
    if rc == 130:
        raise KeyboardInterrupt
    return out / "results.json"


def combined_report(runs: list[tuple[str, RunResults, Path]], out_root: Path) -> Path:
    """One report.html for the whole demo: every run's grids on one page, linking each run's files.

    ``runs``: (label, results, the run's output folder). A label names the run's images in
    the page (the Linux guests appear twice: unfixed and fixed) and keeps cell IDs unique.
    """
    from matrix.html_report import write_run_html

    cells, roots = [], {}
    for label, results, out in runs:
        for r in results.cells:
            cell = replace(r.cell, id=f"{label}.{r.cell.id}", image=f"{r.cell.image} ({label})")
            cells.append(replace(r, cell=cell))
            roots[cell.id] = out
    demo = RunResults(matrix="demo", cells=cells, started=min((res.started for _, res, _ in runs if res.started),
                                                              default=""),
                      finished=max((res.finished for _, res, _ in runs), default=""),
                      interrupted=any(res.interrupted for _, res, _ in runs))
    return write_run_html(demo, out_root, roots)


def expected_unfixed(bus: str) -> str:
    # From VMware, the initramfs carries the SATA/SCSI drivers it was built for, no VirtIO.
    return "passed" if bus in ("sata", "ide") else "failed"


def run(args: argparse.Namespace) -> int:
    from matrix.reports import load_results

    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    print(f"h2k demo: {accel.decide(announce=False).describe()}", flush=True)

    windows = load_results(_run_matrix(
        Stage("Windows: inspect, plan, fix on an overlay, verify per bus (phony disks)",
              "testbed-windows.yaml", "windows"), out_root, args.jobs))
    before = load_results(_run_matrix(
        Stage("Linux from VMware, unfixed: real boots under QEMU", "testbed-linux.yaml", "linux-unfixed",
              ("--no-fix",)), out_root, args.jobs))
    after = load_results(_run_matrix(
        Stage("Linux after h2k fix: real boots under QEMU", "testbed-linux.yaml", "linux-fixed"),
        out_root, args.jobs))

    problems: list[str] = []
    print("\n== Windows phony disks: fix + static verify ==")
    print(f"{'cell':<44} {'verdict':<10} reason")
    for r in windows.cells:
        print(f"{r.id:<44} {r.verdict:<10} {r.reason[:70]}")
        if not r.good:
            problems.append(f"{r.id}: {r.verdict} ({r.reason})")

    print("\n== Linux guests: before and after h2k fix ==")
    print(f"{'cell':<40} {'unfixed':<24} {'fixed':<10} expected")
    fixed_by_id = after.by_id()
    for r in before.cells:
        f = fixed_by_id.get(r.id)
        want_before = expected_unfixed(r.cell.bus)
        shown_before = r.verdict + (f" ({r.stop_name or r.reason[:12]})" if r.verdict == "failed" else "")
        print(f"{r.id:<40} {shown_before[:24]:<24} {(f.verdict if f else '-'):<10} {want_before} -> passed")
        if r.verdict != want_before:
            problems.append(f"{r.id} unfixed: {r.verdict}, expected {want_before} ({r.reason})")
        if f is None or f.verdict != "passed":
            problems.append(f"{r.id} fixed: {f.verdict if f else 'missing'}, expected passed ({f.reason if f else ''})")

    print(f"\nreports (JUnit, results.json, summary.md, report.html) under {out_root}/")
    page = combined_report([("windows", windows, out_root / "windows"),
                            ("unfixed", before, out_root / "linux-unfixed"),
                            ("fixed", after, out_root / "linux-fixed")], out_root)
    if problems:
        print("\nh2k demo: the proof does NOT hold:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
    else:
        print("h2k demo: every verdict is the expected one: unfixed guests fail on VirtIO, fixed guests pass.")
    print(f"h2k demo: report: {page.resolve()}", flush=True)
    return 1 if problems else 0
