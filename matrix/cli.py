"""``h2k matrix run|list|report|gate``: the matrix runner's command line."""

from __future__ import annotations

import argparse
import fcntl
import importlib
import json
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

from h2k.commands.argtypes import positive_int
from h2k.errors import CheckFailed, InputError
from matrix.expand import expand, select
from matrix.load import load_matrix
from matrix.model import GOOD_VERDICTS
from matrix.reports import load_results, markdown, merge_results, write_all
from matrix.shard import parse_shard, shard_of

DEFAULT_EXECUTOR = "matrix.executors:LabExecutor"
LOCK_NAME = ".h2k-matrix.lock"


def _pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise InputError(f"{flag}: {v!r} is not NAME=PATH")
        out[name] = path
    return out


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0")
    return value


def check_inputs(spec, cells) -> None:
    """Every image and pack the cells use exists (or is a test-bed recipe), and every image passes the
    front door: bad input before any fix or boot."""
    from h2k.image import open_image

    for kind, names in (("image", {c.image for c in cells}), ("driver pack", {c.pack for c in cells if c.pack})):
        for item in (spec.image(n) if kind == "image" else spec.pack(n) for n in sorted(names)):
            if item.path:
                if not Path(item.path).exists():
                    raise InputError(f"{kind} {item.name}: {item.path} does not exist")
                if kind == "image":
                    open_image(item.path)  # the front door: a bad or hostile image is exit 3, before any cell
            elif not item.recipe:
                flag = "--image-path" if kind == "image" else "--pack-path"
                raise InputError(f"{kind} {item.name}: no path (set it in the matrix, its ${{VAR}}, or "
                                 f"{flag} {item.name}=PATH)")


@contextmanager
def output_lock(out: Path):
    """Hold ``out/.h2k-matrix.lock`` for the run: a second run into the same folder is bad input."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    fh = open(path, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            raise InputError(f"{out}: another h2k matrix run (pid {holder}) is writing there; "
                             "wait for it or choose another -o") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield
    finally:
        fh.close()  # releases the lock


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("matrix", help="a matrix file (YAML), e.g. matrix/testbed-linux.yaml")
    p.add_argument("--image-path", action="append", metavar="NAME=PATH",
                   help="use PATH for the matrix's image NAME (overrides the file and its ${VARS}); repeatable")
    p.add_argument("--pack-path", action="append", metavar="NAME=PATH",
                   help="use PATH (a virtio-win ISO or tree) for the driver pack NAME; repeatable")
    p.add_argument("--shard", metavar="I/N", help="run only shard I of N (cells dealt round-robin by sorted ID)")
    p.add_argument("--only", action="append", metavar="GLOB", help="only cells whose ID matches GLOB; repeatable")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "matrix",
        help="run a matrix of images x firmware x bus x NIC, write JUnit/JSON/markdown, gate driver packs",
        description=(
            "Expand a matrix file into cells (image x firmware x disk bus x NIC x boot mode x driver pack), "
            "fix each image once, boot every cell on its own qcow2 overlay in parallel, and report. "
            "See docs/matrix.md for the file format."
        ),
    )
    msub = p.add_subparsers(dest="matrix_command", metavar="ACTION")
    msub.required = True

    rp = msub.add_parser("run", help="run the cells and write results.json, junit.xml, summary.md and report.html",
                         description="Run the matrix. Ctrl-C or SIGTERM stops every running cell and still "
                                     "writes a valid partial report. Exit 0 when every cell passed or softfailed, "
                                     "1 otherwise, 130 when interrupted.")
    _common(rp)
    rp.add_argument("-o", "--out", metavar="DIR", help="output directory (default: matrix-results/<matrix name>)")
    rp.add_argument("-j", "--jobs", type=positive_int, metavar="N",
                    help="cells at once (default: the core count; always capped by free memory)")
    rp.add_argument("--rerun-failed", metavar="RESULTS", help="run only the cells that did not pass in RESULTS "
                    "(a results.json) and merge the new verdicts into it")
    rp.add_argument("--connect", action="append", metavar="URI",
                    help="libvirt URI(s) to run cells on, dealt round-robin; repeatable or comma-separated "
                         "(implies the libvirt backend)")
    rp.add_argument("--backend", choices=("qemu", "libvirt"), default=None,
                    help="how the lab starts guests (default: qemu, or libvirt with --connect)")
    rp.add_argument("--summary", metavar="FILE", help="also append the markdown summary to FILE "
                    "(e.g. $GITHUB_STEP_SUMMARY)")
    rp.add_argument("--no-fix", action="store_true",
                    help="boot the images as they are, without h2k's fix (shows the 'before' state)")
    rp.add_argument("--fix-timeout", type=_seconds, default=None, metavar="SECONDS",
                    help="stop an image's shared fix after this long; its cells are reported timeout "
                         "(default: 3600)")
    rp.add_argument("--executor", default=DEFAULT_EXECUTOR, metavar="MODULE:CLASS",
                    help=argparse.SUPPRESS)  # for tests and other labs; the default is the real one
    rp.set_defaults(func=run_run)

    lp = msub.add_parser("list", help="print the expanded cells (ID, timeout, known issue)")
    _common(lp)
    lp.add_argument("--json", action="store_true", help="print the cells as JSON")
    lp.set_defaults(func=run_list)

    pp = msub.add_parser("report", help="rebuild junit.xml, summary.md, report.html (and a merged results.json) "
                                        "from results",
                         description="Rebuild every report from results.json files alone; several files "
                                     "(e.g. one per shard) are merged, later files winning for the same cell. "
                                     "report.html links each cell's files where its results.json's folder has them.")
    pp.add_argument("results", nargs="+", help="results.json file(s)")
    pp.add_argument("-o", "--out", metavar="DIR", default=".", help="where to write the reports (default: .)")
    pp.add_argument("--summary", metavar="FILE", help="also append the markdown summary to FILE")
    pp.add_argument("--check", action="store_true", help="exit 1 unless every cell passed or softfailed")
    pp.set_defaults(func=run_report)

    gp = msub.add_parser("gate", help="compare a candidate run with a baseline; exit 1 on any regression",
                         description="A regression is a cell that passed or softfailed in the baseline and "
                                     "failed, timed out, was incomplete or skipped, or is missing in the candidate.")
    gp.add_argument("--baseline", required=True, metavar="RESULTS", help="results.json of the baseline run")
    gp.add_argument("--candidate", required=True, metavar="RESULTS", help="results.json of the candidate run")
    gp.add_argument("--require-driver-version", metavar="VERSION",
                    help="also require every VirtIO device in every passed Windows boot cell of the candidate "
                         "to run this driver version (from the guest agent's guest-get-devices)")
    gp.add_argument("--all", action="store_true", help="list unchanged cells too")
    gp.add_argument("--summary", metavar="FILE", help="also append the table to FILE (markdown code block)")
    gp.add_argument("--html", metavar="FILE",
                    help="write the HTML gate report here (default: gate.html beside the candidate's results.json)")
    gp.set_defaults(func=run_gate)


def _cells(args: argparse.Namespace):
    spec = load_matrix(args.matrix, image_paths=_pairs(args.image_path, "--image-path"),
                       pack_paths=_pairs(args.pack_path, "--pack-path"))
    cells = select(expand(spec), args.only or [])
    shard = parse_shard(args.shard) if args.shard else None
    if shard:
        cells = shard_of(cells, shard)
    return spec, cells, shard


def run_list(args: argparse.Namespace) -> int:
    _, cells, _ = _cells(args)
    if args.json:
        print(json.dumps([c.to_dict() for c in cells], indent=2))
        return 0
    for c in cells:
        issue = f"\tknown issue: {c.known_issue}" if c.known_issue else ""
        print(f"{c.id}\t{c.mode}\t{c.timeout}s{issue}")
    return 0


def load_executor(spec: str, args: argparse.Namespace):
    module, _, cls = spec.partition(":")
    try:
        klass = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"--executor {spec}: cannot load: {exc}") from None
    if hasattr(klass, "from_args"):
        return klass.from_args(args)
    return klass()


def _append(path: str | None, text: str) -> None:
    if path:
        with open(path, "a") as fh:
            fh.write(text + "\n")


def run_run(args: argparse.Namespace) -> int:
    from matrix.runner import Runner  # threads and subprocess only when running

    spec, cells, shard = _cells(args)
    previous = None
    if args.rerun_failed:
        previous = load_results(args.rerun_failed)
        bad = {r.id for r in previous.cells if r.verdict not in GOOD_VERDICTS}
        cells = [c for c in cells if c.id in bad]
    if not cells:
        raise InputError(f"{args.matrix}: no cells to run" + (" (nothing failed in the previous run)" if previous else ""))
    check_inputs(spec, cells)
    hosts = [h for v in (args.connect or []) for h in v.split(",") if h]
    args.backend = args.backend or ("libvirt" if hosts else "qemu")
    executor = load_executor(args.executor, args)
    out = Path(args.out or Path("matrix-results") / spec.name)
    if out.exists() and not out.is_dir():
        raise InputError(f"-o {out}: not a directory")
    extra = {"fix_timeout": args.fix_timeout} if args.fix_timeout else {}
    with output_lock(out):
        runner = Runner(spec, cells, executor, out, jobs=args.jobs, connect=hosts,
                        shard=str(shard) if shard else None, previous=previous, **extra)
        return _run_locked(args, spec, cells, runner, out)


def _run_locked(args: argparse.Namespace, spec, cells, runner, out: Path) -> int:
    def on_signal(signum, frame):  # first signal: stop cleanly; the report is still written
        print(f"h2k: {signal.Signals(signum).name}: stopping {len(runner._running)} running cell(s)",
              file=sys.stderr, flush=True)
        runner.stop()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"h2k: matrix {spec.name}: {len(cells)} cell(s), {runner.jobs} at once, reports in {out}",
              file=sys.stderr, flush=True)
        results = runner.run()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    _append(args.summary, markdown(results))
    c = results.counts()
    print(f"h2k: matrix {spec.name}: " + ", ".join(f"{n} {v}" for v, n in c.items() if n)
          + f"; reports in {out} (open {out / 'report.html'})", file=sys.stderr)
    if runner.stopping:
        return 130
    return 0 if results.ok else 1


def run_report(args: argparse.Namespace) -> int:
    parts = [load_results(p) for p in args.results]
    results = parts[0] if len(parts) == 1 else merge_results(parts)
    # Each cell's files are beside the results.json it came from (later files win, as in the merge).
    roots = {r.id: Path(path).resolve().parent for path, part in zip(args.results, parts) for r in part.cells}
    paths = write_all(results, args.out, roots)
    for kind, path in paths.items():
        print(f"{kind}\t{path}")
    _append(args.summary, markdown(results))
    if args.check and not all(r.verdict in GOOD_VERDICTS for r in results.cells):
        raise CheckFailed(f"{sum(r.verdict not in GOOD_VERDICTS for r in results.cells)} cell(s) did not pass")
    return 0


def run_gate(args: argparse.Namespace) -> int:
    from matrix import gate
    from matrix.html_report import GATE_REPORT_NAME, write_gate_html

    baseline = load_results(args.baseline)
    candidate = load_results(args.candidate)
    changes = gate.compare(baseline, candidate)
    text = gate.table(changes, all_cells=args.all)
    print(f"baseline:  {args.baseline}: {gate.describe(baseline)}")
    print(f"candidate: {args.candidate}: {gate.describe(candidate)}")
    print(text)
    regs = gate.regressions(changes)
    mixed = gate.incomparable(changes)
    problems = gate.check_driver_versions(candidate, args.require_driver_version) if args.require_driver_version else []
    for p in problems:
        print(f"driver version: {p}")
    verdict = "FAIL" if regs or mixed or problems else "PASS"
    print(f"gate: {verdict}: {len(regs)} regression(s)"
          + (f", {len(mixed)} cell(s) not comparable (proof mode differs)" if mixed else "")
          + (f", {len(problems)} driver-version problem(s)" if args.require_driver_version else ""))
    html = Path(args.html) if args.html else Path(args.candidate).parent / GATE_REPORT_NAME
    write_gate_html(html, changes, baseline, candidate, args.baseline, args.candidate, verdict=verdict,
                    problems=problems)
    print(f"html report: {html}")
    _append(args.summary, f"## Driver-pack gate: {verdict}\n\n```\n{text}\n```\n"
            + "".join(f"- driver version: {p}\n" for p in problems))
    if regs or mixed or problems:
        raise CheckFailed(f"gate failed: {len(regs)} regression(s), {len(mixed)} not comparable, "
                          f"{len(problems)} driver-version problem(s)")
    return 0
