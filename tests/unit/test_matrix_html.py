"""report.html: every cell in its grid with its verdict and proof mode, links that resolve,
hostile guest text kept as text, rendered by a real browser (Debian's headless Chromium).

The real matrix output (a fixed phony Windows disk verified, a Debian guest booted) is
rendered the same way in tests/integration/test_matrix_run.py.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

from browser import Elements, colour_counts, write_png

from h2k.cli import main as h2k_main
from matrix import gate
from matrix.expand import expand
from matrix.html_report import run_html, Artifacts
from matrix.load import build_spec
from matrix.model import CellResult, RunResults
from matrix.reports import load_results, write_all, write_results

# What a hostile guest may print on its console (and so into a verdict's reason).
HOSTILE = ('</td></table><script>document.title="pwned"</script><img src=x onerror=alert(1) id=pwned>'
           '<a href="javascript:alert(2)">x</a> & "quotes" \x1b[31m\x00\x07 \udc80')
MAGENTA = (255, 0, 255)  # the stand-in screendump's colour: found in a screenshot, the thumbnail loaded
# Background colours of the verdicts in the page's CSS (a screenshot shows the grid is coloured).
PASSED_BG, FAILED_BG = (0xC8, 0xE6, 0xC9), (0xFF, 0xCD, 0xD2)


def spec():
    return build_spec({
        "name": "nightly",
        "images": [
            {"name": "win2019", "kind": "windows", "path": "/w", "firmware": ["bios", "uefi"]},
            {"name": "phony", "kind": "windows", "recipe": "win2019-bios", "mode": "fix+verify",
             "firmware": ["bios"], "nic": ["virtio-net"]},
        ],
        "packs": [{"name": "vw", "path": "/p"}],
        "bus": ["virtio-blk", "virtio-scsi"], "nic": ["virtio-net", "e1000e"],
        "boot_mode": ["two-phase", "direct"],
    }, "m.yaml")


def run_dir(tmp: Path, runner_root: Path | None = None) -> tuple[RunResults, Path]:
    """A run's output folder as the runner leaves it: results with every verdict, cells' evidence files.

    ``runner_root``: where the artifact paths in results.json say the run was (gone since:
    the folder was moved, as a downloaded shard is).
    """
    cells = expand(spec())
    out = tmp / "out"
    recorded_root = runner_root or out
    verdicts = ["passed", "failed", "softfailed", "timeout", "incomplete", "skipped"]
    results = []
    for i, cell in enumerate(cells):
        verdict = verdicts[i % len(verdicts)]
        r = CellResult(cell, verdict, reason=f"reason of {cell.id}", seconds=10.0 + i)
        if cell.mode == "boot" and verdict not in ("skipped",):
            d = out / "cells" / cell.id / "boot"
            (d / "final").mkdir(parents=True)
            (d / "bootstrap").mkdir(parents=True)
            write_png(d / "final" / "screen.png", 64, 48, MAGENTA)
            for name in ("serial.log", "qmp.jsonl"):
                (d / "final" / name).write_text("x\n")
                (d / "bootstrap" / name).write_text("x\n")
            (d / "verdict.json").write_text("{}")
            rec = recorded_root / "cells" / cell.id / "boot"
            r.artifacts = {"final/screen.png": str(rec / "final" / "screen.png"),
                           "final/serial.log": str(rec / "final" / "serial.log"),
                           "final/qmp.jsonl": str(rec / "final" / "qmp.jsonl"),
                           "bootstrap/serial.log": str(rec / "bootstrap" / "serial.log"),
                           "bootstrap/qmp.jsonl": str(rec / "bootstrap" / "qmp.jsonl"),
                           "bootstrap/screen.png": str(rec / "bootstrap" / "screen.png"),  # never written
                           "verdict.json": str(rec / "verdict.json")}
            r.phases = [{"phase": "bootstrap", "verdict": "passed", "seconds": 4.0},
                        {"phase": "final", "verdict": verdict, "seconds": 6.0}]
        if verdict == "failed":
            r.stop_code, r.stop_name = 0x7B, "INACCESSIBLE_BOOT_DEVICE"
        if cell.mode == "fix+verify":
            r.phases = [{"phase": "verify", "rules": [
                {"rule": "service", "subject": "viostor", "passed": True, "reason": ""},
                {"rule": "binding", "subject": "viostor", "passed": False, "reason": HOSTILE}]}]
        results.append(r)
    results[1].reason = HOSTILE
    results[0].evidence = ["agent", "login"]
    results[0].lab_setup = {"ems": "EMS on COM1 in the lab's copy", "success": [["agent", "login"], [HOSTILE]]}
    run = RunResults(matrix="nightly", cells=results, started="2026-11-26T01:00:00+00:00",
                     finished="2026-11-26T02:00:00+00:00",
                     extra={"prepared": {"win2019.vw": {"seconds": 31.5, "ok": True, "info": {"fix": "12 changes"}},
                                         "phony.vw": {"seconds": 2.0, "ok": False, "error": HOSTILE}}})
    return run, out


def cells_in(dom: str) -> dict[str, tuple[str, str]]:
    return {a["data-cell"]: (a["data-verdict"], a["data-proof"]) for a in Elements(dom).with_attr("data-cell")}


def test_page_is_self_contained_and_escapes_what_a_guest_controls(tmp_path):
    run, out = run_dir(tmp_path)
    paths = write_all(run, out)
    text = paths["html"].read_text()
    assert paths["html"] == out / "report.html"
    page = Elements(text)
    # nothing a guest printed became an element or an attribute; no script, no remote URL
    assert page.tags("script") == [] and not [a for _, a in page.elements if a.get("id") == "pwned"]
    assert not [a for _, a in page.elements if any(k.startswith("on") for k in a)]
    assert "javascript:" not in "".join(a.get("href", "") for a in page.tags("a"))
    assert "http://" not in text and "https://" not in text
    assert '&lt;/td&gt;&lt;/table&gt;&lt;script&gt;' in text and "\x00" not in text and "\x1b" not in text
    # every cell once, with its verdict and proof mode
    assert cells_in(text) == {r.id: (r.verdict, r.proof) for r in run.cells}
    # links are relative and resolve to the cells' files; a missing one is named, not linked
    hrefs = [a["href"] for a in page.tags("a") if not a["href"].startswith("#")]
    assert hrefs and all(h.startswith("./cells/") and (out / h).is_file() for h in hrefs)
    assert "bootstrap/screen.png (missing)" in text
    # a results file naming a host file outside the run's folder gets no link to it
    outside = tmp_path / "secret.txt"
    outside.write_text("x")
    art = Artifacts(out, lambda _: out)
    assert art.href(run.cells[0].id, str(outside)) is None
    assert art.href(run.cells[0].id, str(out / "cells" / ".." / ".." / "secret.txt")) is None
    assert art.href(run.cells[0].id, run.cells[0].artifacts["verdict.json"]).startswith("./cells/")
    assert "evidence: agent, login" in text and "ems: EMS on COM1 in the lab&#x27;s copy" in text
    assert "success: agent + login or &lt;/td&gt;" in text
    assert len(text) < 3000 * len(run.cells)  # small: screens are linked, not inlined


def test_grid_is_firmware_x_bus_by_nic_x_boot_mode(tmp_path):
    run, out = run_dir(tmp_path)
    text = run_html(run, Artifacts(out, lambda _: out))
    win = text.split('id="image-win2019"')[1].split("<h2")[0]
    rows = [th.split("</th>")[0] for th in win.split("<tr><th>")[1:]]
    assert rows == ["firmware · bus", "bios · virtio-blk", "bios · virtio-scsi",
                    "uefi · virtio-blk", "uefi · virtio-scsi"]
    assert "<th>e1000e · direct</th>" in win
    assert "prepared once in 31.5 s: 12 changes" in win
    assert "6.0 s" in text and "final 6.0 s" in text


def test_rendered_by_chromium(tmp_path, chromium):
    run, out = run_dir(tmp_path)
    page = write_all(run, out)["html"]
    dom = chromium.dom(page)
    assert cells_in(dom) == {r.id: (r.verdict, r.proof) for r in run.cells}
    elements = Elements(dom)
    assert not [a for _, a in elements.elements if a.get("id") == "pwned"] and elements.tags("script") == []
    assert "<title>Matrix nightly</title>" in dom  # no injected script retitled the page
    assert HOSTILE[:40] in "".join(elements.text)  # the guest's text is shown, as text
    shot = chromium.screenshot(page, tmp_path / "report.png", size=(1200, 900))
    colours = colour_counts(shot)
    assert colours[PASSED_BG] > 500 and colours[FAILED_BG] > 500  # the grid is coloured by verdict
    assert colours[MAGENTA] > 200  # a thumbnail of a cell's screen.png, loaded through its relative link


def test_merged_shards_link_where_they_were_downloaded(tmp_path):
    """Shards' artifact paths name the runner's folders; downloaded elsewhere, the links still resolve."""
    run, out = run_dir(tmp_path, runner_root=Path("/nonexistent/runner/out/shard-1"))
    write_results(run, out / "results.json")
    shards = tmp_path / "shards"
    one, two = run.cells[:10], run.cells[10:]
    for name, cells in (("nightly-shard-1", one), ("nightly-shard-2", two)):
        part = replace(run, cells=cells, shard=name)
        shutil.copytree(out, shards / name)
        write_results(part, shards / name / "results.json")
    merged = tmp_path / "merged"
    assert h2k_main(["matrix", "report", str(shards / "nightly-shard-1" / "results.json"),
                     str(shards / "nightly-shard-2" / "results.json"), "-o", str(merged)]) == 0
    page = Elements((merged / "report.html").read_text())
    hrefs = [a["href"] for a in page.tags("a") if not a["href"].startswith("#")]
    assert any("nightly-shard-1/cells/" in h for h in hrefs) and any("nightly-shard-2/cells/" in h for h in hrefs)
    assert all(h.startswith("./../shards/") and (merged / h).is_file() for h in hrefs)
    assert cells_in((merged / "report.html").read_text()).keys() == {r.id for r in run.cells}


def test_gate_page_regressions_first_and_static_never_weighed_against_boot(tmp_path, chromium):
    base, base_out = run_dir(tmp_path / "base")
    cand, cand_out = run_dir(tmp_path / "cand")
    by = {r.id: r for r in cand.cells}
    good = [r.id for r in base.cells if r.good and r.proof == "real boot"]
    by[good[-1]].verdict, by[good[-1]].reason = "failed", "bugcheck"  # a regression, late in the file
    # the same cell proven statically in the candidate: its PASS says something else
    static = next(r for r in cand.cells if r.proof == "real boot" and r.id != good[-1])
    static_id = static.id
    cand.cells[cand.cells.index(static)] = CellResult(replace(static.cell, mode="fix+verify"), static.verdict)
    b = write_results(base, base_out / "results.json")
    c = write_results(cand, cand_out / "results.json")
    changes = {ch.id: ch for ch in gate.compare(base, cand)}
    assert changes[static_id].kind == "incomparable"
    assert changes[static_id].detail == "proof mode differs: baseline real boot, candidate static verify"
    assert h2k_main(["matrix", "gate", "--baseline", str(b), "--candidate", str(c)]) == 1
    page = cand_out / "gate.html"
    dom = chromium.dom(page)
    rows = [a["data-change"] for a in Elements(dom).with_attr("data-change")]
    assert rows[:2] == ["regression", "incomparable"] and "same" in rows
    # both sides of a row link their own run's files
    hrefs = [a["href"] for a in Elements(dom).tags("a") if not a["href"].startswith("#")]
    assert any(h.startswith("./../../base/out/cells/") for h in hrefs)
    assert any(h.startswith("./cells/") for h in hrefs)
    assert all((page.parent / h).is_file() for h in hrefs)


def test_results_json_names_the_html_beside_it(tmp_path):
    run, out = run_dir(tmp_path)
    paths = write_all(run, out)
    assert {p.name for p in paths.values()} == {"results.json", "junit.xml", "summary.md", "report.html"}
    assert json.loads(paths["results"].read_text())["proof_counts"]["static verify"] == 4
    assert load_results(paths["results"]).to_dict() == run.to_dict()


def test_demo_puts_its_runs_on_one_page(tmp_path):
    """`h2k demo` ends with one report.html: each run's grids, cells kept apart, links into each run."""
    from matrix.demo import combined_report

    first, out1 = run_dir(tmp_path / "a")
    second, out2 = run_dir(tmp_path / "b")
    page = combined_report([("unfixed", first, out1), ("fixed", second, out2)], tmp_path)
    assert page == tmp_path / "report.html"
    text = page.read_text()
    assert set(cells_in(text)) == {f"{label}.{r.id}" for label, run in (("unfixed", first), ("fixed", second))
                                   for r in run.cells}
    assert '<h2 id="image-win2019__unfixed_">win2019 (unfixed)</h2>' in text
    hrefs = [a["href"] for a in Elements(text).tags("a") if not a["href"].startswith("#")]
    assert any(h.startswith("./a/out/cells/") for h in hrefs) and any(h.startswith("./b/out/cells/") for h in hrefs)
    assert all((tmp_path / h).is_file() for h in hrefs)


def test_demo_ends_by_printing_its_report(tmp_path, monkeypatch, capsys):
    """`make demo` (h2k demo): whatever the verdicts, the last line names the one report.html."""
    import argparse

    from matrix import demo

    def fake_run_matrix(stage, out_root, jobs):  # the three matrix runs, as their output folders
        run, out = run_dir(out_root / f"{stage.out}-src")
        for r in run.cells:  # the lab decodes consoles with errors="replace": no lone surrogates in its runs
            r.reason = r.reason.replace("\udc80", "")
        write_all(run, out_root / stage.out)
        shutil.rmtree(out_root / stage.out / "cells", ignore_errors=True)
        shutil.copytree(out / "cells", out_root / stage.out / "cells")
        return out_root / stage.out / "results.json"

    monkeypatch.setattr(demo, "_run_matrix", fake_run_matrix)
    monkeypatch.setattr(demo.accel, "decide", lambda announce=False: argparse.Namespace(describe=lambda: "tcg"))
    rc = demo.run(argparse.Namespace(out=str(tmp_path / "demo"), jobs=None))
    assert rc == 1  # these stand-in runs do not hold the demo's proof
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"h2k demo: report: {(tmp_path / 'demo' / 'report.html').resolve()}"
    assert len(cells_in((tmp_path / "demo" / "report.html").read_text())) == 3 * 20
