"""report.html: the page people look at after a matrix run, and after a gate.

One self-contained file: inline CSS, no script, no network (a Content-Security-Policy
forbids both, so even a mistake in escaping could not run anything). Per image, a
grid of firmware x bus rows and NIC x boot mode columns, each cell coloured by its
verdict and carrying its proof mode, reason, stop code, timings, a thumbnail of its
last screendump and links to its evidence files.

Screendumps and logs are **relative links** to the cells' own files, not inlined:
the page stays a few KiB per cell whatever the screens weigh, and it works wherever
the run's folder goes with it (a GitHub Actions artifact that holds the output
folder, a copied results tree). Artifact paths in results.json are absolute paths of
the machine that ran the cell; a path that no longer exists is looked up again under
the results file's own folder (``.../cells/<id>/...``), so shards downloaded
elsewhere still link. A file that cannot be found is named, not linked.

Everything a guest or a results file controls (console text in reasons, stop names,
verify rules, paths) is escaped; characters HTML cannot carry are replaced.
"""

from __future__ import annotations

import html
import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Mapping
from urllib.parse import quote

from matrix.model import CellResult, RunResults
from matrix.reports import STATUS_WORDS, atomic_write, stop_text, xml_safe

REPORT_NAME = "report.html"
GATE_REPORT_NAME = "gate.html"
# The evidence a person opens first, in this order; the other artifacts follow.
FIRST_LINKS = ("screen.png", "serial.log", "qmp.jsonl", "verdict.json")
# A reason longer than this is cut in the grid; the full text is one click away.
REASON_CUT = 240

CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em;color:#1b1b1b;background:#fff}
h1{font-size:1.5em;margin:0 0 .3em}h2{font-size:1.2em;margin:1.6em 0 .4em}
.meta{color:#444;margin:.2em 0}.banner{padding:.5em .8em;background:#fff3cd;border:1px solid #c9a227;margin:.6em 0}
table{border-collapse:collapse;margin:.4em 0}th,td{border:1px solid #bbb;padding:4px 6px;vertical-align:top}
th{background:#f2f2f2;text-align:left;font-weight:600}
td.cell{width:15em;max-width:15em;border-left-width:6px;overflow-wrap:anywhere}
td.none{color:#999;text-align:center;vertical-align:middle}
.v-passed{background:#c8e6c9;border-left-color:#2e7d32}.v-softfailed{background:#f0f4c3;border-left-color:#9e9d24}
.v-failed{background:#ffcdd2;border-left-color:#c62828}.v-timeout{background:#ffe0b2;border-left-color:#ef6c00}
.v-incomplete{background:#e1bee7;border-left-color:#6a1b9a}.v-skipped{background:#eeeeee;border-left-color:#757575}
.word{font-weight:700;letter-spacing:.03em}
.proof{display:inline-block;font-size:.8em;padding:0 .4em;margin-left:.4em;border-radius:3px;background:#1b1b1b;color:#fff}
.p-static-verify .proof{background:#fff;color:#1b1b1b;border:1px dashed #1b1b1b}
.p-recorded-shape .proof{background:#fff;color:#555;border:1px dotted #555}
td.p-static-verify{border-style:dashed}td.p-recorded-shape{border-style:dotted}
.stop{font-family:ui-monospace,monospace;font-weight:600}.reason{margin:.2em 0;white-space:pre-wrap}
.time,.links{font-size:.85em;color:#333}.links a{margin-right:.5em}
img.thumb{display:block;width:12em;max-width:100%;margin:.3em 0;border:1px solid #777;image-rendering:auto}
.noscreen{font-size:.8em;color:#666;margin:.3em 0}
details{font-size:.85em}ul.rules{margin:.2em 0;padding-left:1.2em}.bad{color:#b71c1c;font-weight:600}
.k-regression{background:#ffcdd2}.k-incomparable{background:#e1bee7}.k-fixed{background:#c8e6c9}
.legend span{display:inline-block;padding:0 .5em;margin-right:.3em;border-left:6px solid}
"""

# No script, no fetch, no frame: styles inline, images only from files beside the page.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' file: data:; base-uri 'none'; form-action 'none'"


def esc(text: object) -> str:
    """Text (or an attribute value) for HTML: markup characters escaped, impossible characters replaced."""
    return html.escape(xml_safe(str(text)), quote=True)


def _slug(text: str) -> str:
    return text.replace(" ", "-")


def _ident(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in text)


def anchor(cell_id: str) -> str:
    return "cell-" + _ident(cell_id)


# --- where the evidence files are ---------------------------------------------------------


class Artifacts:
    """Relative links from the report's folder to a cell's evidence files, wherever they are now."""

    def __init__(self, report_dir: Path, root_for: Callable[[str], Path]) -> None:
        self.report_dir = Path(report_dir).resolve()
        self.root_for = root_for

    def locate(self, cell_id: str, path: str) -> Path | None:
        """The file now, or None. Only files inside the run's folder: a results file names paths,
        and a tampered one must not make the page point people at other files of the host."""
        p = Path(path)
        root = Path(self.root_for(cell_id)).resolve()
        parts = p.parts
        candidates = []
        if "cells" in parts:  # the run's layout: <out>/cells/<id>/...; the folder may have moved
            i = len(parts) - 1 - parts[::-1].index("cells")
            candidates.append(root.joinpath(*parts[i:]))
        candidates.append(p if p.is_absolute() else root / p)
        for c in candidates:
            c = c.resolve()
            if c.is_file() and c.is_relative_to(root):
                return c
        return None

    def href(self, cell_id: str, path: str) -> str | None:
        found = self.locate(cell_id, path)
        if found is None:
            return None
        rel = os.path.relpath(found.resolve(), self.report_dir)
        # A relative URL with every special character quoted: no scheme, no query, no markup.
        return "./" + quote(Path(rel).as_posix(), safe="/._-+")


def _artifact_order(name: str) -> tuple[int, int, str]:
    base = name.rsplit("/", 1)[-1]
    phase = 0 if name.startswith("final/") or "/" not in name else 1
    first = FIRST_LINKS.index(base) if base in FIRST_LINKS else len(FIRST_LINKS)
    return (phase, first, name)


def _screen_key(r: CellResult) -> str | None:
    """The screendump that shows how the cell ended: the final phase's, else the only one, else the bootstrap's."""
    for key in ("final/screen.png", "screen.png", "bootstrap/screen.png"):
        if key in r.artifacts:
            return key
    return next((k for k in sorted(r.artifacts) if k.endswith(".png")), None)


def _links(r: CellResult, art: Artifacts) -> str:
    out = []
    for name in sorted(r.artifacts, key=_artifact_order):
        href = art.href(r.id, r.artifacts[name])
        if href:
            out.append(f'<a href="{esc(href)}">{esc(name)}</a>')
        else:
            out.append(f'<span title="not found">{esc(name)} (missing)</span>')
    return f'<div class="links">{" ".join(out)}</div>' if out else ""


def _thumb(r: CellResult, art: Artifacts) -> str:
    key = _screen_key(r)
    if key is None:
        return '<div class="noscreen">no screendump</div>' if r.proof == "real boot" else ""
    href = art.href(r.id, r.artifacts[key])
    if href is None:
        return f'<div class="noscreen">{esc(key)} missing</div>'
    return (f'<a href="{esc(href)}"><img class="thumb" src="{esc(href)}" loading="lazy" '
            f'alt="{esc(key)} of {esc(r.id)}"></a>')


# --- one cell -----------------------------------------------------------------------------


def _seconds(r: CellResult) -> str:
    phases = [f"{esc(ph.get('phase', '?'))} {float(ph['seconds']):.1f} s" for ph in r.phases
              if isinstance(ph, dict) and isinstance(ph.get("seconds"), (int, float))]
    return f"{r.seconds:.1f} s" + (f" ({', '.join(phases)})" if phases else "")


def _rules(r: CellResult) -> str:
    """A static verify cell's rules (the evidence such a cell has instead of a screen)."""
    rules = [rule for ph in r.phases if isinstance(ph, dict) for rule in ph.get("rules") or []
             if isinstance(rule, dict)]
    if not rules:
        return ""
    failed = sum(not rule.get("passed") for rule in rules)
    items = "".join(
        f'<li class="{"" if rule.get("passed") else "bad"}">{esc(rule.get("rule", "?"))}/{esc(rule.get("subject", ""))}: '
        f'{"ok" if rule.get("passed") else "FAIL"}{": " + esc(rule.get("reason")) if rule.get("reason") else ""}</li>'
        for rule in rules)
    return (f'<details><summary>{len(rules)} rules, {failed} failed</summary>'
            f'<ul class="rules">{items}</ul></details>')


def _reason(r: CellResult) -> str:
    text = r.note if r.verdict == "softfailed" and r.note else r.reason
    if not text:
        return ""
    text = str(text)
    if len(text) <= REASON_CUT:
        return f'<div class="reason">{esc(text)}</div>'
    return (f'<div class="reason">{esc(text[:REASON_CUT])}…</div>'
            f'<details><summary>full reason</summary><div class="reason">{esc(text)}</div></details>')


def _words(value: object) -> str:
    """A lab-setup value as words: success alternatives [[a, b], [c]] read "a + b or c"."""
    if isinstance(value, list):
        if value and all(isinstance(v, list) for v in value):
            return " or ".join(" + ".join(map(str, v)) for v in value)
        return ", ".join(map(str, value))
    return str(value)


def _lab_setup(r: CellResult) -> str:
    """What decided a pass, and what the lab changed on its own copy to observe the boot (EMS ...)."""
    out = f'<div class="time">evidence: {esc(", ".join(map(str, r.evidence)))}</div>' if r.evidence else ""
    setup = r.lab_setup if isinstance(r.lab_setup, dict) else {}
    if setup:
        items = "".join(f"<li>{esc(k)}: {esc(_words(v))}</li>" for k, v in setup.items())
        out += f'<details><summary>lab setup</summary><ul class="rules">{items}</ul></details>'
    return out


def cell_html(r: CellResult, art: Artifacts, id_prefix: str = "") -> str:
    stop = f'<div class="stop">{esc(stop_text(r))}</div>' if r.stop_code is not None else ""
    host = f'<div class="time">on {esc(r.host)}</div>' if r.host else ""
    known = (f'<div class="time">known issue: {esc(r.cell.known_issue)}</div>'
             if r.cell.known_issue and r.verdict != "softfailed" else "")
    return (
        f'<td class="cell v-{esc(r.verdict)} p-{esc(_slug(r.proof))}" id="{esc(id_prefix + anchor(r.id))}" '
        f'data-cell="{esc(r.id)}" data-verdict="{esc(r.verdict)}" data-proof="{esc(r.proof)}">'
        f'<span class="word">{esc(STATUS_WORDS.get(r.verdict, r.verdict))}</span>'
        f'<span class="proof">{esc(r.proof)}</span>'
        f"{stop}{_reason(r)}{known}"
        f'<div class="time">{_seconds(r)}</div>{host}{_lab_setup(r)}'
        f"{_thumb(r, art)}{_rules(r)}{_links(r, art)}</td>"
    )


# --- a run ----------------------------------------------------------------------------------


def _grids(results: RunResults) -> "OrderedDict[str, list[CellResult]]":
    many_packs = len({r.cell.pack for r in results.cells if r.cell.pack}) > 1
    grids: "OrderedDict[str, list[CellResult]]" = OrderedDict()
    for r in results.cells:
        title = r.cell.image + (f" with {r.cell.pack}" if many_packs and r.cell.pack else "")
        grids.setdefault(title, []).append(r)
    return grids


def grid_html(cells: list[CellResult], art: Artifacts) -> str:
    """Firmware x bus rows, NIC x boot mode columns, in the order the matrix gives them."""
    rows = list(dict.fromkeys((r.cell.firmware, r.cell.bus) for r in cells))
    cols = list(dict.fromkeys((r.cell.nic, r.cell.boot_mode) for r in cells))
    at = {(r.cell.firmware, r.cell.bus, r.cell.nic, r.cell.boot_mode): r for r in cells}
    head = "".join(f"<th>{esc(nic)} · {esc(mode)}</th>" for nic, mode in cols)
    body = []
    for fw, bus in rows:
        tds = []
        for nic, mode in cols:
            r = at.get((fw, bus, nic, mode))
            tds.append(cell_html(r, art) if r else '<td class="none">—</td>')
        body.append(f"<tr><th>{esc(fw)} · {esc(bus)}</th>{''.join(tds)}</tr>")
    return f'<table class="grid"><tr><th>firmware · bus</th>{head}</tr>{"".join(body)}</table>'


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {esc(k)}" for k, n in counts.items() if n) or "none"


def _prepared(results: RunResults, key: str) -> str:
    prep = (results.extra or {}).get("prepared") or {}
    info = prep.get(key) if isinstance(prep, dict) else None
    if not isinstance(info, dict):
        return ""
    secs = info.get("seconds")
    fix = (info.get("info") or {}).get("fix") if isinstance(info.get("info"), dict) else None
    what = "prepared once" + (f" in {float(secs):.1f} s" if isinstance(secs, (int, float)) else "")
    if isinstance(fix, str) and fix:
        what += f": {esc(fix.splitlines()[0][:REASON_CUT])}"  # the summary's head line
    if info.get("ok") is False:
        what = f"could not be prepared: {esc(info.get('error') or '?')}"
    return f'<p class="meta">{what}</p>'


def legend() -> str:
    verdicts = "".join(f'<span class="v-{v}">{STATUS_WORDS[v]}</span>' for v in STATUS_WORDS)
    return (f'<p class="legend meta">{verdicts} · proof: <b>real boot</b> (a guest booted under QEMU), '
            "<b>static verify</b> (boot-readiness rules read on the fixed disk: nothing booted; dashed), "
            "<b>recorded shape</b> (replayed, no guest ran; dotted)</p>")


def page(title: str, body: str, *, refresh: bool = False) -> str:
    meta_refresh = '<meta http-equiv="refresh" content="30">' if refresh else ""
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">{meta_refresh}'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def run_html(results: RunResults, art: Artifacts) -> str:
    in_progress = bool((results.extra or {}).get("in_progress"))
    parts = [f"<h1>Matrix {esc(results.matrix)}" + (f" (shard {esc(results.shard)})" if results.shard else "")
             + "</h1>"]
    parts.append(f'<p class="meta">{len(results.cells)} cells: {_counts(results.counts())}. '
                 f"Proof: {_counts(results.proof_counts())}.</p>")
    when = " → ".join(esc(t) for t in (results.started, results.finished) if t)
    if when:
        parts.append(f'<p class="meta">{when}</p>')
    if in_progress:
        parts.append('<p class="banner">Run in progress: this page is rewritten after every cell.</p>')
    elif results.interrupted:
        parts.append('<p class="banner">Run interrupted: partial results.</p>')
    parts.append(legend())
    bad = [r for r in results.cells if r.verdict != "passed"]
    if bad:
        items = "".join(
            f'<li><a href="#{esc(anchor(r.id))}">{esc(r.id)}</a>: {esc(STATUS_WORDS.get(r.verdict, r.verdict))} '
            f"({esc(r.proof)})" + (f" {esc(stop_text(r))}" if r.stop_code is not None else "") + "</li>"
            for r in bad)
        parts.append(f"<h2>Not passed</h2><ul>{items}</ul>")
    for title, cells in _grids(results).items():
        parts.append(f'<h2 id="image-{esc(_ident(title))}">{esc(title)}</h2>')
        first = cells[0].cell
        parts.append(_prepared(results, f"{first.image}.{first.pack or 'nopack'}"))
        parts.append(grid_html(cells, art))
    return page(f"Matrix {results.matrix}", "\n".join(parts), refresh=in_progress)


def write_run_html(results: RunResults, outdir: str | Path,
                   roots: Mapping[str, Path] | None = None) -> Path:
    """``outdir``/report.html; a cell's files are looked up under ``roots[cell id]`` (default ``outdir``)."""
    outdir = Path(outdir)
    roots = dict(roots or {})
    art = Artifacts(outdir, lambda cid: roots.get(cid, outdir))
    path = outdir / REPORT_NAME
    atomic_write(path, run_html(results, art))
    return path


# --- a gate -----------------------------------------------------------------------------------


def _side(r: CellResult | None, art: Artifacts, id_prefix: str) -> str:
    if r is None:
        return '<td class="none">missing</td>'
    return cell_html(r, art, id_prefix)


def gate_html(changes: list, baseline: RunResults, candidate: RunResults, base_art: Artifacts,
              cand_art: Artifacts, *, verdict: str, problems: list[str], names: tuple[str, str]) -> str:
    from matrix.gate import KIND_ORDER, ordered

    base, cand = baseline.by_id(), candidate.by_id()
    shown = [ch for ch in ordered(changes) if ch.kind != "same"]
    same = [ch for ch in changes if ch.kind == "same"]
    counts = OrderedDict((k, sum(ch.kind == k for ch in changes)) for k in KIND_ORDER)
    parts = [f'<h1>Driver-pack gate: <span class="{"v-passed" if verdict == "PASS" else "v-failed"}">'
             f"{esc(verdict)}</span></h1>",
             f'<p class="meta">baseline: {esc(names[0])} ({_counts(baseline.counts())}); '
             f"candidate: {esc(names[1])} ({_counts(candidate.counts())})</p>",
             f'<p class="meta">changes: {_counts(counts)}</p>', legend()]
    if problems:
        items = "".join(f"<li>{esc(p)}</li>" for p in problems)
        parts.append(f"<h2>Driver version</h2><ul>{items}</ul>")

    def rows(chs: list) -> str:
        return "".join(
            f'<tr class="k-{esc(ch.kind)}" data-change="{esc(ch.kind)}" data-id="{esc(ch.id)}">'
            f"<th>{esc(ch.id)}<br>{esc(ch.kind)}<div class=\"reason\">{esc(ch.detail)}</div></th>"
            f"{_side(base.get(ch.id), base_art, 'baseline-')}{_side(cand.get(ch.id), cand_art, 'candidate-')}</tr>"
            for ch in chs)

    head = "<tr><th>cell, change</th><th>baseline</th><th>candidate</th></tr>"
    parts.append("<h2>Changes (regressions first)</h2>")
    parts.append(f'<table class="gate">{head}{rows(shown)}</table>' if shown else "<p>no changes</p>")
    if same:
        parts.append(f'<details><summary>{len(same)} unchanged cells</summary>'
                     f'<table class="gate">{head}{rows(same)}</table></details>')
    return page(f"Driver-pack gate: {verdict}", "\n".join(parts))


def write_gate_html(path: str | Path, changes: list, baseline: RunResults, candidate: RunResults,
                    baseline_path: str | Path, candidate_path: str | Path, *, verdict: str,
                    problems: list[str]) -> Path:
    path = Path(path)
    base_root, cand_root = Path(baseline_path).parent, Path(candidate_path).parent
    text = gate_html(changes, baseline, candidate, Artifacts(path.parent, lambda _: base_root),
                     Artifacts(path.parent, lambda _: cand_root), verdict=verdict, problems=problems,
                     names=(str(baseline_path), str(candidate_path)))
    atomic_write(path, text)
    return path
