"""A real matrix over the test bed: h2k fixes, the lab boots, the runner reports.

One ``h2k matrix run`` (two workers) mixes:
* phony Windows disks (win2019-bios, win2022-uefi with Current=2): fix+verify cells,
  each fixed once with the fake virtio-win pack and verified per VirtIO bus;
* a hibernated phony disk: the engine refuses it (failed), and a known issue
  turns its virtio-scsi cell into softfailed;
* the Debian test-bed guest after ``h2k.linux.fix_image`` (the cached fixed disk of tests/e2e):
  the runner's own fix runs on it and finds nothing to do, then one real boot on virtio-blk,
  scored by the lab on the image's own ``expect:`` (console marker and guest agent, both);
* every Windows image is fixed into the lab's copy with EMS on, recorded per cell;
Then the JUnit file is validated against the schema, report.html is rendered by
headless Chromium (every cell with its verdict and proof mode, the real screendump shown),
and the gate and report commands run on the real results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from browser import Elements, colour_counts

from matrix.reports import load_results

ROOT = Path(__file__).resolve().parents[2]
XSD = ROOT / "tests" / "data" / "junit.xsd"

# In the linux-bios group: the fixed Debian disk is made there, so this worker never waits on it.
pytestmark = [pytest.mark.guestfs, pytest.mark.boot, pytest.mark.slow, pytest.mark.xdist_group("linux-bios")]

MATRIX = textwrap.dedent(
    """
    name: itest
    images:
      - {name: win2019, kind: windows, recipe: win2019-bios, os: windows-server-2019, mode: fix+verify, firmware: [bios]}
      - {name: win2022, kind: windows, recipe: win2022-uefi, os: windows-server-2022, mode: fix+verify, firmware: [uefi]}
      - {name: hibernated, kind: windows, recipe: bad-hibernated, mode: fix+verify, firmware: [bios]}
      - {name: debian, kind: linux, path: "DEBIAN_DISK", os: debian-12, firmware: [bios],
         expect: {success: [marker+agent]}}
    packs:
      - {name: virtio-win, recipe: virtio-win-tree}
    firmware: [bios, uefi]
    bus: [virtio-blk, virtio-scsi]
    nic: [virtio-net]
    boot_mode: [direct]
    timeouts: {default: 600}
    exclude:
      - {image: debian, bus: virtio-scsi}  # one real boot is the point here; tests/e2e boots every bus
    known_issues:
      - {match: {image: hibernated, bus: virtio-scsi}, reason: "the test bed's hibernated disk is refused by design"}
    """
)
DEBIAN_CELL = "debian.bios.virtio-blk.virtio-net"


@pytest.fixture(scope="module")
def matrix_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("matrix")
    m = tmp / "itest.yaml"
    from lab.testbed import linux_guest

    m.write_text(MATRIX.replace("DEBIAN_DISK", str(linux_guest.fixed_disk("bios")[0])))
    out = tmp / "out"
    proc = subprocess.run([sys.executable, "-m", "h2k", "matrix", "run", str(m), "-j", "2", "-o", str(out)],
                          capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, H2K_QUIET="0"),
                          timeout=2400)
    return tmp, out, proc


def test_matrix_verdicts(matrix_run):
    tmp, out, proc = matrix_run
    results = load_results(out / "results.json")
    by = {r.id: r for r in results.cells}
    assert set(by) == {
        "win2019.bios.virtio-blk.virtio-net", "win2019.bios.virtio-scsi.virtio-net",
        "win2022.uefi.virtio-blk.virtio-net", "win2022.uefi.virtio-scsi.virtio-net",
        "hibernated.bios.virtio-blk.virtio-net", "hibernated.bios.virtio-scsi.virtio-net", DEBIAN_CELL,
    }, proc.stderr
    for cid in ("win2019.bios.virtio-blk.virtio-net", "win2019.bios.virtio-scsi.virtio-net",
                "win2022.uefi.virtio-blk.virtio-net", "win2022.uefi.virtio-scsi.virtio-net"):
        r = by[cid]
        assert r.verdict == "passed", (cid, r.reason, proc.stderr[-3000:])
        rules = r.phases[0]["rules"]
        assert rules and all(rule["passed"] for rule in rules)
        # EMS was enabled on the lab's copy (the BCD still verifies), and the cell's record says so.
        assert "lab's fixed copy" in r.lab_setup["ems"], r.lab_setup
    # the engine refuses a hibernated disk; the known issue softens only the cell it names
    hib = by["hibernated.bios.virtio-blk.virtio-net"]
    assert hib.verdict == "failed" and "hibernat" in hib.reason.lower()
    soft = by["hibernated.bios.virtio-scsi.virtio-net"]
    assert soft.verdict == "softfailed" and soft.note.startswith("known issue: the test bed's hibernated disk")
    # the Debian guest really booted: the lab's verdict from its console marker and agent
    deb = by[DEBIAN_CELL]
    assert deb.verdict == "passed", (deb.reason, proc.stderr[-3000:])
    assert "H2K-BOOT-OK" in Path(deb.artifacts["serial.log"]).read_text(errors="replace")
    assert deb.evidence == ["marker", "agent"] and deb.lab_setup["success"] == [["marker", "agent"]]
    assert "console marker 'H2K-BOOT-OK' + agent up (" in deb.reason
    assert proc.returncode == 1  # one cell failed
    # each (image, pack) was fixed once; every cell ran on its own overlay of that fix
    prepared = results.extra["prepared"]
    assert set(prepared) == {"win2019.virtio-win", "win2022.virtio-win", "hibernated.virtio-win", "debian.nopack"}
    assert "nothing to do" in json.dumps(prepared["debian.nopack"]["info"])
    assert prepared["win2022.virtio-win"]["info"]["facts"]["build"] == 20348
    # The EMS elements in the lab copy's BCD, as the fix journalled them (their bytes are read back
    # with hivex in tests/integration/test_windows_engine.py::test_bcd_ems_and_nothing_else).
    for key in ("win2019.virtio-win", "win2022.virtio-win"):
        info = prepared[key]["info"]
        assert "EMS serial console on COM1" in info["fix"]
        journal = json.loads(Path(info["journal"]).read_text())
        elements = {c["key"].rsplit("\\", 1)[-1] for c in journal["registry"] if c["hive"] == "BCD"}
        assert {"16000020", "260000b0"} <= elements, elements  # EMS on the boot manager and the loader
    for cid, r in by.items():
        if r.cell.image == "hibernated":
            continue
        overlay = out / "cells" / cid / "disk.qcow2"
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(overlay)], check=True,
                                         capture_output=True, text=True).stdout)
        assert info["backing-filename"] == prepared[f"{r.cell.image}.{r.cell.pack or 'nopack'}"]["base"]
    # live progress went to stderr
    assert "| start " in proc.stderr and "ETA" in proc.stderr


def test_matrix_reports(matrix_run):
    tmp, out, _ = matrix_run
    lint = subprocess.run(["xmllint", "--noout", "--schema", str(XSD), str(out / "junit.xml")],
                          capture_output=True, text=True)
    assert lint.returncode == 0, lint.stderr
    root = ET.parse(out / "junit.xml").getroot()
    assert root.get("tests") == "7" and root.get("failures") == "1"
    assert {s.get("name") for s in root.findall("testsuite")} == {"itest.win2019", "itest.win2022", "itest.hibernated",
                                                                  "itest.debian"}
    md = (out / "summary.md").read_text()
    assert "| win2019 | static verify | PASS | PASS | - | - |" in md
    assert "| hibernated | static verify | FAIL | SOFTFAIL | - | - |" in md
    assert "| debian | real boot | PASS | - | - | - |" in md and "Proof: 1 real boot, 6 static verify." in md
    # report rebuilds the same files from results.json alone
    again = tmp / "again"
    subprocess.run([sys.executable, "-m", "h2k", "matrix", "report", str(out / "results.json"), "-o", str(again)],
                   check=True, cwd=ROOT, capture_output=True)
    assert (again / "summary.md").read_text() == md
    assert (again / "junit.xml").read_text() == (out / "junit.xml").read_text()


def test_gate_on_the_real_results(matrix_run):
    tmp, out, _ = matrix_run
    base = out / "results.json"
    gate = [sys.executable, "-m", "h2k", "matrix", "gate", "--baseline", str(base)]
    same = subprocess.run(gate + ["--candidate", str(base)], capture_output=True, text=True, cwd=ROOT)
    assert same.returncode == 0, same.stdout + same.stderr
    # a candidate run in which one cell failed: a regression the gate must catch
    data = json.loads(base.read_text())
    for c in data["cells"]:
        if c["id"] == "win2022.uefi.virtio-scsi.virtio-net":
            c["verdict"], c["reason"] = "failed", "binding-drvdb/vioscsi: no DriverDatabase entry"
    worse = tmp / "worse.json"
    worse.write_text(json.dumps(data))
    bad = subprocess.run(gate + ["--candidate", str(worse)], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 1
    row = next(line for line in bad.stdout.splitlines() if line.startswith("win2022.uefi.virtio-scsi"))
    assert row.split()[1:4] == ["passed", "failed", "regression"]


def test_html_report_of_the_real_run(matrix_run, chromium):
    """The page a person opens after the run: rendered by Chromium from the run's own files."""
    tmp, out, _ = matrix_run
    results = load_results(out / "results.json")
    page = out / "report.html"
    dom = Elements(chromium.dom(page))
    cells = {a["data-cell"]: (a["data-verdict"], a["data-proof"]) for a in dom.with_attr("data-cell")}
    assert cells == {r.id: (r.verdict, r.proof) for r in results.cells}
    # a static verify cell and a booted one say so
    assert cells["win2019.bios.virtio-blk.virtio-net"] == ("passed", "static verify")
    assert cells[DEBIAN_CELL] == ("passed", "real boot")
    # the booted cell's evidence: its screendump as a thumbnail and its logs, linked relatively
    thumbs = [a["src"] for a in dom.tags("img")]
    assert thumbs == [f"./cells/{DEBIAN_CELL}/boot/screen.png"]
    links = {a["href"].rsplit("/", 1)[-1] for a in dom.tags("a") if f"/cells/{DEBIAN_CELL}/" in a["href"]}
    assert {"screen.png", "serial.log", "qmp.jsonl", "verdict.json"} <= links
    assert all((out / a["href"]).is_file() for a in dom.tags("a") if not a["href"].startswith("#"))
    colours = colour_counts(chromium.screenshot(page, tmp / "report.png", size=(1200, 2400)))
    assert colours[(0xC8, 0xE6, 0xC9)] > 500 and colours[(0xFF, 0xCD, 0xD2)] > 500  # passed and failed cells
    assert colours[(0, 0, 0)] > 1000  # the guest's VGA screen (black), loaded through its relative link
