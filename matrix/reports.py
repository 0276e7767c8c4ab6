"""Reports of a run: results.json (the source of truth), JUnit XML and a markdown summary.

``h2k matrix report results.json`` rebuilds JUnit and markdown from results.json
alone, so a merged or re-run result set gets the same reports as a fresh run.

JUnit mapping (Jenkins/Ant format; see docs/matrix.md):

* one ``<testsuite>`` per image (name ``<matrix>.<image>``), one ``<testcase>``
  per cell (name = cell ID, classname = ``<matrix>.<image>``);
* failed, timeout -> ``<failure type=verdict message=...>`` naming the stop
  code and its name when the lab saw a bugcheck;
* incomplete (the lab itself broke, or the run was interrupted) -> ``<error>``;
* skipped (never started) -> ``<skipped>``;
* softfailed -> a passing testcase: the guest booted, with a known problem.
  JUnit has no such state, and ``<skipped>`` would tell CI it never ran. The
  ``verdict`` property says ``softfailed`` and system-out carries the reason.
* every testcase has properties ``verdict``, ``proof`` (real boot, static verify or
  recorded shape), ``seconds``, ``artifact:<name>``.

``report.html`` (``matrix.html_report``) is written beside the others by ``write_all``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import xml.etree.ElementTree as ET
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

from h2k.errors import InputError
from matrix.model import RESULTS_FORMAT, RESULTS_VERSION, CellResult, RunResults

# Status words for the markdown grid (plain words: they read in any log and any font).
STATUS_WORDS = {
    "passed": "PASS",
    "softfailed": "SOFTFAIL",
    "failed": "FAIL",
    "timeout": "TIMEOUT",
    "incomplete": "INCOMPLETE",
    "skipped": "SKIPPED",
}


# --- results.json ---------------------------------------------------------------


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # a reader never sees a half-written report


def write_results(results: RunResults, path: str | Path) -> Path:
    path = Path(path)
    atomic_write(path, json.dumps(results.to_dict(), indent=2, sort_keys=False) + "\n")
    return path


def load_results(path: str | Path) -> RunResults:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise InputError(f"{path}: cannot read results: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON: {exc.msg} (line {exc.lineno})") from None
    if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
        raise InputError(f"{path}: not a hyper2kvm matrix results file (format != {RESULTS_FORMAT!r})")
    if data.get("version") != RESULTS_VERSION:
        raise InputError(f"{path}: results format version {data.get('version')!r}, this h2k reads {RESULTS_VERSION}")
    try:
        return RunResults.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: malformed results: {exc}") from None


def merge_results(parts: list[RunResults], name: str | None = None) -> RunResults:
    """One result set from several (shards, or a re-run over an older run: later parts win)."""
    if not parts:
        raise InputError("no results to merge")
    cells: "OrderedDict[str, CellResult]" = OrderedDict()
    for part in parts:
        for r in part.cells:
            cells[r.id] = r
    return RunResults(
        matrix=name or parts[0].matrix,
        cells=list(cells.values()),
        started=min((p.started for p in parts if p.started), default=""),
        finished=max((p.finished for p in parts if p.finished), default=""),
        interrupted=any(p.interrupted for p in parts),
        shard=None,
        matrix_file=parts[0].matrix_file,
        extra={"merged_from": [p.shard or p.matrix for p in parts]},
    )


# --- JUnit ----------------------------------------------------------------------


def stop_text(r: CellResult) -> str:
    if r.stop_code is None:
        return ""
    name = f" {r.stop_name}" if r.stop_name else ""
    return f"stop code 0x{r.stop_code:X}{name}"


def failure_message(r: CellResult) -> str:
    parts = [r.verdict]
    if r.stop_code is not None:
        parts.append(stop_text(r))
    if r.reason:
        parts.append(r.reason)
    return ": ".join(parts)


def _props(parent: ET.Element, props: list[tuple[str, str]]) -> None:
    el = ET.SubElement(parent, "properties")
    for name, value in props:
        ET.SubElement(el, "property", name=name, value=value)


def junit_tree(results: RunResults) -> ET.ElementTree:
    suites: "OrderedDict[str, list[CellResult]]" = OrderedDict()
    for r in results.cells:
        suites.setdefault(r.cell.image, []).append(r)
    root = ET.Element("testsuites", name=f"hyper2kvm matrix {results.matrix}")
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time": 0.0}
    host = socket.gethostname()
    for sid, (image, cells) in enumerate(suites.items()):
        counts = {
            "tests": len(cells),
            "failures": sum(r.verdict in ("failed", "timeout") for r in cells),
            "errors": sum(r.verdict == "incomplete" for r in cells),
            "skipped": sum(r.verdict == "skipped" for r in cells),
            "time": sum(r.seconds for r in cells),
        }
        for k in totals:
            totals[k] += counts[k]
        suite = ET.SubElement(
            root,
            "testsuite",
            name=f"{results.matrix}.{image}",
            tests=str(counts["tests"]),
            failures=str(counts["failures"]),
            errors=str(counts["errors"]),
            skipped=str(counts["skipped"]),
            time=f"{counts['time']:.3f}",
            timestamp=(results.started or "")[:19] or "1970-01-01T00:00:00",
            hostname=host,
            id=str(sid),
            package=results.matrix,
        )
        _props(
            suite,
            [("matrix", results.matrix), ("image", image), ("interrupted", str(results.interrupted).lower())]
            + ([("shard", results.shard)] if results.shard else []),
        )
        for r in cells:
            case = ET.SubElement(
                suite, "testcase", name=r.id, classname=f"{results.matrix}.{image}", time=f"{r.seconds:.3f}"
            )
            props = [("verdict", r.verdict), ("proof", r.proof), ("seconds", f"{r.seconds:.3f}")]
            if r.stop_code is not None:
                props.append(("stop_code", f"0x{r.stop_code:X}"))
            if r.stop_name:
                props.append(("stop_name", r.stop_name))
            if r.host:
                props.append(("host", r.host))
            if r.cell.known_issue:
                props.append(("known_issue", r.cell.known_issue))
            props += [(f"artifact:{k}", str(v)) for k, v in sorted(r.artifacts.items())]
            _props(case, props)
            if r.verdict in ("failed", "timeout"):
                el = ET.SubElement(case, "failure", type=r.verdict, message=failure_message(r))
                el.text = _detail(r)
            elif r.verdict == "incomplete":
                el = ET.SubElement(case, "error", type="incomplete", message=failure_message(r))
                el.text = _detail(r)
            elif r.verdict == "skipped":
                ET.SubElement(case, "skipped", message=r.reason or "not run")
            out = []
            if r.verdict == "softfailed":
                out.append(f"softfailed: {r.note or r.reason}")
            if r.reason and r.verdict == "passed":
                out.append(r.reason)
            for k, v in sorted(r.artifacts.items()):
                out.append(f"[[ATTACHMENT|{v}]]" if k.endswith("screen.png") else f"{k}: {v}")
            if out:
                ET.SubElement(case, "system-out").text = "\n".join(out)
    for k in ("tests", "failures", "errors", "skipped"):
        root.set(k, str(totals[k]))
    root.set("time", f"{totals['time']:.3f}")
    ET.indent(root)
    return ET.ElementTree(root)


def _detail(r: CellResult) -> str:
    lines = [failure_message(r)]
    for ph in r.phases:
        lines.append(f"phase {ph.get('phase')}: {ph.get('verdict')} {ph.get('reason', '')}".rstrip())
    for k, v in sorted(r.artifacts.items()):
        lines.append(f"{k}: {v}")
    return "\n".join(lines)


# Characters XML 1.0 cannot carry (a guest's console text may hold any of them), and lone
# surrogates (undecodable bytes kept by errors="surrogateescape"), which UTF-8 cannot encode.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_safe(text: str) -> str:
    return _NOT_XML.sub("\ufffd", text)


def write_junit(results: RunResults, path: str | Path) -> Path:
    path = Path(path)
    tree = junit_tree(results)
    text = ET.tostring(tree.getroot(), encoding="unicode", xml_declaration=False)
    atomic_write(path, '<?xml version="1.0" encoding="UTF-8"?>\n' + xml_safe(text) + "\n")
    return path


# --- markdown -------------------------------------------------------------------


def markdown(results: RunResults) -> str:
    """An image × configuration grid plus a list of what went wrong, for $GITHUB_STEP_SUMMARY."""
    c = results.counts()
    total = len(results.cells)
    head = f"## Matrix `{results.matrix}`" + (f" (shard {results.shard})" if results.shard else "")
    lines = [head, ""]
    summary = ", ".join(f"{n} {v}" for v, n in c.items() if n)
    proofs = ", ".join(f"{n} {m}" for m, n in results.proof_counts().items() if n)
    lines.append(f"{total} cells: {summary or 'none'}." + (f" Proof: {proofs}." if proofs else "")
                 + (" **Run interrupted: partial results.**" if results.interrupted else ""))
    lines.append("")
    rows: "OrderedDict[str, dict[str, CellResult]]" = OrderedDict()
    configs: list[str] = []
    for r in results.cells:
        row = r.cell.image + (f" ({r.cell.pack})" if _many_packs(results) and r.cell.pack else "")
        col = _config(r)
        rows.setdefault(row, {})[col] = r
        if col not in configs:
            configs.append(col)
    if rows:
        lines.append("| image | proof | " + " | ".join(f"`{col}`" for col in configs) + " |")
        lines.append("|---|---|" + "---|" * len(configs))
        for row, by_col in rows.items():
            cells = [STATUS_WORDS[by_col[col].verdict] if col in by_col else "-" for col in configs]
            proof = ", ".join(dict.fromkeys(r.proof for r in by_col.values()))
            lines.append(f"| {row} | {proof} | " + " | ".join(cells) + " |")
        lines.append("")
    bad = [r for r in results.cells if r.verdict not in ("passed",)]
    if bad:
        lines.append("### Not passed")
        lines.append("")
        lines.append("| cell | verdict | proof | reason | seconds |")
        lines.append("|---|---|---|---|---|")
        for r in bad:
            if r.verdict == "softfailed":
                why = r.note or r.reason
            else:
                msg = failure_message(r)
                why = msg.split(": ", 1)[1] if ": " in msg else ""
            lines.append(f"| `{r.id}` | {STATUS_WORDS[r.verdict]} | {r.proof} | {_md(why)} | {r.seconds:.1f} |")
        lines.append("")
    return "\n".join(lines)


def _many_packs(results: RunResults) -> bool:
    return len({r.cell.pack for r in results.cells if r.cell.pack}) > 1


def _config(r: CellResult) -> str:
    parts = [r.cell.firmware, r.cell.bus, r.cell.nic]
    if len(r.id.split(".")) > 4:  # the ID names the boot mode when the matrix has several
        if f".{r.cell.boot_mode}" in r.id:
            parts.append(r.cell.boot_mode)
    return ".".join(parts)


# Guest-controlled text (reasons quote the console) must not become markup, links or images in
# $GITHUB_STEP_SUMMARY: HTML tags become entities, link brackets and code ticks are escaped.
_MD_ESCAPES = {"|": "\\|", "[": "\\[", "]": "\\]", "`": "\\`", "<": "&lt;", ">": "&gt;", "\n": " ", "\r": " "}


def _md(text: str) -> str:
    text = "".join(_MD_ESCAPES.get(ch, ch) for ch in (text or "")[:300])
    return _NOT_XML.sub("\ufffd", text)


def write_markdown(results: RunResults, path: str | Path) -> Path:
    path = Path(path)
    atomic_write(path, markdown(results) + "\n")
    return path


def write_all(results: RunResults, outdir: str | Path,
              roots: Mapping[str, Path] | None = None) -> dict[str, Path]:
    """results.json, junit.xml, summary.md and report.html in ``outdir``.

    ``roots`` maps a cell ID to the folder its run wrote (a merged report's cells come from
    several); report.html looks for moved artifact files there. Default: ``outdir``.
    """
    from matrix.html_report import write_run_html  # it imports this module

    outdir = Path(outdir)
    return {
        "results": write_results(results, outdir / "results.json"),
        "junit": write_junit(results, outdir / "junit.xml"),
        "markdown": write_markdown(results, outdir / "summary.md"),
        "html": write_run_html(results, outdir, roots),
    }
