"""Reports: JUnit valid against the schema, results.json round trip, markdown grid, report rebuild."""

from __future__ import annotations

import json
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from h2k.cli import main as h2k_main
from h2k.errors import InputError
from matrix.expand import expand
from matrix.load import build_spec
from matrix.model import CellResult, RunResults
from matrix.reports import junit_tree, load_results, markdown, merge_results, write_all, write_results

XSD = Path(__file__).resolve().parents[1] / "data" / "junit.xsd"


def xmllint_ok(path: Path) -> None:
    proc = subprocess.run(["xmllint", "--noout", "--schema", str(XSD), str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def sample() -> RunResults:
    spec = build_spec(
        {
            "name": "nightly",
            "images": [
                {"name": "win2019", "kind": "windows", "path": "/w", "firmware": ["uefi"]},
                {"name": "deb", "kind": "linux", "recipe": "linux-bios", "firmware": ["bios"]},
                {"name": "phony", "kind": "windows", "recipe": "win2019-bios", "mode": "fix+verify",
                 "firmware": ["bios"], "bus": ["virtio-blk"]},
            ],
            "packs": [{"name": "vw", "path": "/p"}],
            "bus": ["virtio-blk", "virtio-scsi", "sata"],
        },
        "m.yaml",
    )
    cells = {c.id: c for c in expand(spec)}
    return RunResults(
        matrix="nightly",
        started="2026-11-26T01:00:00+00:00",
        finished="2026-11-26T01:10:00+00:00",
        cells=[
            CellResult(cells["win2019.uefi.virtio-blk.virtio-net"], "passed", seconds=61.5,
                       artifacts={"serial": "/o/serial.log", "screendump": "/o/screen.png"}),
            CellResult(cells["win2019.uefi.virtio-scsi.virtio-net"], "failed", reason="bugcheck at final boot",
                       stop_code=0x7B, stop_name="INACCESSIBLE_BOOT_DEVICE", seconds=40.0,
                       phases=[{"phase": "bootstrap", "verdict": "passed"}, {"phase": "final", "verdict": "failed"}]),
            CellResult(cells["win2019.uefi.sata.virtio-net"], "softfailed", reason="booted",
                       note="known issue: slow NIC (was failed: no IPv4)", seconds=80),
            CellResult(cells["deb.bios.virtio-blk.virtio-net"], "timeout", reason="no marker in 240s", seconds=240),
            CellResult(cells["deb.bios.virtio-scsi.virtio-net"], "incomplete", reason="QEMU died: <oops> & \"q\""),
            CellResult(cells["deb.bios.sata.virtio-net"], "skipped", reason="not started: the run was stopped"),
            CellResult(cells["phony.bios.virtio-blk.virtio-net"], "passed", reason="9 boot-readiness rules passed",
                       seconds=0.5),
        ],
        interrupted=True,
    )


def test_results_round_trip(tmp_path):
    r = sample()
    p = write_results(r, tmp_path / "results.json")
    data = json.loads(p.read_text())
    assert data["format"] == "hyper2kvm-matrix-results" and data["version"] == 1
    assert data["counts"] == {"passed": 2, "softfailed": 1, "failed": 1, "incomplete": 1, "timeout": 1, "skipped": 1}
    # every result says how it is proven: by what the cell does (a boot, or static rules on a disk)
    assert [c["proof"] for c in data["cells"]] == ["real boot"] * 6 + ["static verify"]
    assert data["proof_counts"] == {"real boot": 6, "static verify": 1, "recorded shape": 0}
    back = load_results(p)
    assert back.to_dict() == r.to_dict()
    assert back.cells[1].cell == r.cells[1].cell
    # a results file written before the proof mode existed reads with the mode its cells imply
    for c in data["cells"]:
        del c["proof"]
    p.write_text(json.dumps(data))
    assert [c.proof for c in load_results(p).cells] == ["real boot"] * 6 + ["static verify"]


def test_proof_mode_is_one_of_three():
    r = sample().cells[0]
    assert CellResult(r.cell, "passed", proof="recorded shape").proof == "recorded shape"
    with pytest.raises(ValueError, match="unknown proof mode"):
        CellResult(r.cell, "passed", proof="booted, probably")


def test_load_results_errors(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        load_results(bad)
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(InputError, match="not a hyper2kvm matrix results file"):
        load_results(bad)
    d = sample().to_dict()
    d["version"] = 99
    bad.write_text(json.dumps(d))
    with pytest.raises(InputError, match="version 99"):
        load_results(bad)


def test_junit_shape_and_schema(tmp_path):
    paths = write_all(sample(), tmp_path)
    xmllint_ok(paths["junit"])
    root = ET.parse(paths["junit"]).getroot()
    assert root.tag == "testsuites" and root.get("tests") == "7"
    assert (root.get("failures"), root.get("errors"), root.get("skipped")) == ("2", "1", "1")
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert set(suites) == {"nightly.win2019", "nightly.deb", "nightly.phony"}
    cases = {c.get("name"): c for c in root.iter("testcase")}
    fail = cases["win2019.uefi.virtio-scsi.virtio-net"].find("failure")
    assert fail.get("type") == "failed"
    assert "0x7B INACCESSIBLE_BOOT_DEVICE" in fail.get("message")
    assert "phase final: failed" in fail.text
    soft = cases["win2019.uefi.sata.virtio-net"]
    assert soft.find("failure") is None and soft.find("skipped") is None and soft.find("error") is None
    props = {p.get("name"): p.get("value") for p in soft.iter("property")}
    assert props["verdict"] == "softfailed" and props["seconds"] == "80.000"
    assert "known issue: slow NIC" in soft.find("system-out").text
    ok = cases["win2019.uefi.virtio-blk.virtio-net"]
    props = {p.get("name"): p.get("value") for p in ok.iter("property")}
    assert props["artifact:serial"] == "/o/serial.log" and props["verdict"] == "passed"
    # the proof mode is a property of every testcase
    proofs = {c.get("name"): {p.get("name"): p.get("value") for p in c.iter("property")}["proof"]
              for c in root.iter("testcase")}
    assert proofs == {r.id: "static verify" if r.cell.image == "phony" else "real boot" for r in sample().cells}
    assert cases["deb.bios.virtio-blk.virtio-net"].find("failure").get("type") == "timeout"
    err = cases["deb.bios.virtio-scsi.virtio-net"].find("error")
    assert err.get("type") == "incomplete" and '<oops> & "q"' in err.get("message")
    assert cases["deb.bios.sata.virtio-net"].find("skipped") is not None


def test_junit_schema_rejects_a_broken_file(tmp_path):
    # The schema check itself can fail: a testcase without a name is invalid.
    bad = tmp_path / "bad.xml"
    bad.write_text('<testsuites><testsuite name="x" tests="1"><testcase classname="c"/></testsuite></testsuites>')
    proc = subprocess.run(["xmllint", "--noout", "--schema", str(XSD), str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0


def test_markdown_grid():
    md = markdown(sample())
    lines = md.splitlines()
    assert lines[0] == "## Matrix `nightly`"
    assert "Run interrupted: partial results." in md
    header = next(line for line in lines if line.startswith("| image |"))
    assert header == "| image | proof | `uefi.virtio-blk.virtio-net` | `uefi.virtio-scsi.virtio-net` | " \
                     "`uefi.sata.virtio-net` | `bios.virtio-blk.virtio-net` | `bios.virtio-scsi.virtio-net` | " \
                     "`bios.sata.virtio-net` |"
    assert "| win2019 | real boot | PASS | FAIL | SOFTFAIL | - | - | - |" in lines
    assert "| deb | real boot | - | - | - | TIMEOUT | INCOMPLETE | SKIPPED |" in lines
    assert "| phony | static verify | - | - | - | PASS | - | - |" in lines
    assert "Proof: 6 real boot, 1 static verify." in md
    assert "| `win2019.uefi.virtio-scsi.virtio-net` | FAIL | real boot | stop code 0x7B INACCESSIBLE_BOOT_DEVICE: " \
           "bugcheck at final boot | 40.0 |" in lines
    assert "\\| " not in md.split("### Not passed")[0]
    assert all(ord(ch) < 0x2000 for ch in md)  # plain words, no emoji


def test_merge_later_wins():
    a = sample()
    b = sample()
    b.cells = [CellResult(b.cells[1].cell, "passed", seconds=50)]
    b.interrupted = False
    m = merge_results([a, b])
    assert len(m.cells) == 7 and m.by_id()["win2019.uefi.virtio-scsi.virtio-net"].verdict == "passed"


def test_report_command_rebuilds_everything(tmp_path, capsys):
    r = sample()
    first = write_all(r, tmp_path / "a")
    out = tmp_path / "b"
    summary = tmp_path / "step-summary.md"
    assert h2k_main(["matrix", "report", str(first["results"]), "-o", str(out), "--summary", str(summary)]) == 0
    assert (out / "junit.xml").read_text() == first["junit"].read_text()
    assert (out / "summary.md").read_text() == first["markdown"].read_text()
    assert summary.read_text().strip() == markdown(r).strip()
    assert h2k_main(["matrix", "report", str(first["results"]), "-o", str(out), "--check"]) == 1
    # shards merge
    s1, s2 = sample(), sample()
    s1.cells, s2.cells = s1.cells[:3], s2.cells[3:]
    s1.shard, s2.shard = "1/2", "2/2"
    p1 = write_results(s1, tmp_path / "s1.json")
    p2 = write_results(s2, tmp_path / "s2.json")
    assert h2k_main(["matrix", "report", str(p1), str(p2), "-o", str(tmp_path / "m")]) == 0
    merged = load_results(tmp_path / "m" / "results.json")
    assert [c.id for c in merged.cells] == [c.id for c in r.cells]
    xmllint_ok(tmp_path / "m" / "junit.xml")
    assert junit_tree(merged).getroot().get("tests") == "7"


def test_guest_text_stays_text_in_junit_and_markdown(tmp_path):
    """A reason quotes the guest's console: control characters and markup must not break or inject."""
    r = sample()
    r.cells[1].reason = ("\x1b[31mPANIC\x00\x07 <script>x</script> [click](http://evil) ![i](http://evil/i.png) "
                         "`tick` | pipe \udc80")
    paths = write_all(r, tmp_path)
    xmllint_ok(paths["junit"])  # characters XML cannot carry were replaced, the file stays valid
    fail = {c.get("name"): c for c in ET.parse(paths["junit"]).getroot().iter("testcase")}[
        "win2019.uefi.virtio-scsi.virtio-net"].find("failure")
    assert "\ufffd[31mPANIC\ufffd\ufffd <script>x</script>" in fail.get("message")
    md = paths["markdown"].read_text()
    row = next(line for line in md.splitlines() if line.startswith("| `win2019.uefi.virtio-scsi"))
    assert "&lt;script&gt;" in row and "<script>" not in md
    assert "\\[click\\](http://evil)" in row and "!\\[i\\]" in row and "\\`tick\\`" in row and "\\| pipe" in row
    assert "\x00" not in md and "\x1b" not in md
