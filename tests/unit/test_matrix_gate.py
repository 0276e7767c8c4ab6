"""The gate: regressions fail it, fixes and new cells do not; driver versions from guest-get-devices."""

from __future__ import annotations

import copy
from dataclasses import replace

from h2k.cli import main as h2k_main
from matrix import gate
from matrix.model import Cell, CellResult, RunResults
from matrix.reports import write_results


def cell(cid: str, kind: str = "windows") -> Cell:
    return Cell(id=cid, image=cid.split(".")[0], kind=kind, mode="boot", pack="pack", firmware="uefi",
                bus=cid.split(".")[2], nic="virtio-net", boot_mode="two-phase", timeout=600)


def dev(device_id: int, version: str, name: str) -> dict:
    return {"driver-name": name, "driver-version": version, "driver-date": 0,
            "id": {"type": "pci", "vendor-id": 0x1AF4, "device-id": device_id}}


def run(verdicts: dict[str, str], version: str = "100.95.104.26200") -> RunResults:
    cells = []
    for cid, v in verdicts.items():
        agent = {"devices": [dev(0x1048, version, "Red Hat VirtIO SCSI controller"),
                             dev(0x1041, version, "Red Hat VirtIO Ethernet Adapter"),
                             {"driver-name": "Intel", "driver-version": "1.0", "id": {"type": "pci", "vendor-id": 0x8086,
                                                                                      "device-id": 0x10D3}}]}
        cells.append(CellResult(cell(cid), v, reason="" if v == "passed" else "bugcheck", agent=agent,
                                stop_code=0x7B if v == "failed" else None,
                                stop_name="INACCESSIBLE_BOOT_DEVICE" if v == "failed" else None))
    return RunResults(matrix="driver-gate", cells=cells)


BASE = {"win2019.uefi.virtio-blk.virtio-net": "passed", "win2019.uefi.virtio-scsi.virtio-net": "softfailed",
        "win2022.uefi.virtio-blk.virtio-net": "failed", "win2022.uefi.virtio-scsi.virtio-net": "passed"}


def test_compare_kinds():
    cand = dict(BASE)
    cand["win2019.uefi.virtio-scsi.virtio-net"] = "timeout"  # softfailed -> timeout: regression
    cand["win2022.uefi.virtio-blk.virtio-net"] = "passed"  # fixed
    del cand["win2022.uefi.virtio-scsi.virtio-net"]  # missing: regression
    cand["win11.uefi.virtio-blk.virtio-net"] = "failed"  # new
    changes = {c.id: c for c in gate.compare(run(BASE), run(cand))}
    assert changes["win2019.uefi.virtio-blk.virtio-net"].kind == "same"
    assert changes["win2019.uefi.virtio-scsi.virtio-net"].kind == "regression"
    assert changes["win2022.uefi.virtio-blk.virtio-net"].kind == "fixed"
    assert changes["win2022.uefi.virtio-scsi.virtio-net"].kind == "regression"
    assert changes["win2022.uefi.virtio-scsi.virtio-net"].detail == "missing from the candidate"
    assert changes["win11.uefi.virtio-blk.virtio-net"].kind == "new"
    assert "0x7B INACCESSIBLE_BOOT_DEVICE" in changes["win11.uefi.virtio-blk.virtio-net"].detail
    assert len(gate.regressions(list(changes.values()))) == 2


def test_gate_command_exit_codes(tmp_path, capsys):
    b = write_results(run(BASE), tmp_path / "base.json")
    same = write_results(run(BASE), tmp_path / "same.json")
    assert h2k_main(["matrix", "gate", "--baseline", str(b), "--candidate", str(same)]) == 0
    out = capsys.readouterr().out
    assert "no changes" in out and "gate: PASS" in out

    worse = dict(BASE)
    worse["win2019.uefi.virtio-blk.virtio-net"] = "failed"
    c = write_results(run(worse), tmp_path / "cand.json")
    summary = tmp_path / "summary.md"
    assert h2k_main(["matrix", "gate", "--baseline", str(b), "--candidate", str(c), "--summary", str(summary)]) == 1
    captured = capsys.readouterr()
    row = next(line for line in captured.out.splitlines() if line.startswith("win2019.uefi.virtio-blk"))
    assert row.split()[:4] == ["win2019.uefi.virtio-blk.virtio-net", "passed", "failed", "regression"]
    assert "gate: FAIL: 1 regression(s)" in captured.out
    assert "h2k: error: gate failed" in captured.err
    assert "Driver-pack gate: FAIL" in summary.read_text()


def test_driver_version_proof(tmp_path, capsys):
    good = {k: "passed" for k in BASE}
    b = write_results(run(good, "100.94.104.24900"), tmp_path / "b.json")
    c = write_results(run(good, "100.95.104.26200"), tmp_path / "c.json")
    args = ["matrix", "gate", "--baseline", str(b), "--candidate", str(c)]
    assert h2k_main(args + ["--require-driver-version", "100.95.104.26200"]) == 0
    # the candidate's run still bound the old driver on one device: the gate must catch it
    stale = run(good, "100.95.104.26200")
    stale.cells[0].agent["devices"][0]["driver-version"] = "100.94.104.24900"
    s = write_results(stale, tmp_path / "s.json")
    assert h2k_main(["matrix", "gate", "--baseline", str(b), "--candidate", str(s),
                     "--require-driver-version", "100.95.104.26200"]) == 1
    out = capsys.readouterr().out
    assert "win2019.uefi.virtio-blk.virtio-net: Red Hat VirtIO SCSI controller (1AF4:1048) runs driver " \
           "100.94.104.24900, not 100.95.104.26200" in out
    # no agent data at all is not proof
    bare = copy.deepcopy(run(good))
    for r in bare.cells:
        r.agent = {}
    assert any("no guest-get-devices data" in p for p in gate.check_driver_versions(bare, "1"))
    linux_only = RunResults(matrix="x", cells=[CellResult(cell("deb.bios.virtio-blk.virtio-net", "linux"), "passed")])
    assert gate.check_driver_versions(linux_only, "1") == [
        "no passed Windows boot cell in the candidate results to prove the driver version"]


def test_static_verify_is_never_weighed_against_a_real_boot(tmp_path, capsys):
    """The same cell ID proven by static rules in one run and by a boot in the other: refused, named apart."""
    base = run(BASE)
    cand = run(BASE)
    booted = cand.cells[0]
    cand.cells[0] = CellResult(replace(booted.cell, mode="fix+verify"), "passed")
    cand.cells[3].verdict = "failed"  # and one plain regression
    changes = gate.compare(base, cand)
    kinds = {c.id: c.kind for c in changes}
    assert kinds["win2019.uefi.virtio-blk.virtio-net"] == "incomparable"
    assert [c.id for c in gate.incomparable(changes)] == ["win2019.uefi.virtio-blk.virtio-net"]
    assert [c.id for c in gate.regressions(changes)] == ["win2022.uefi.virtio-scsi.virtio-net"]
    # regressions first, then what cannot be compared
    assert [c.kind for c in gate.ordered(changes)][:2] == ["regression", "incomparable"]
    b = write_results(base, tmp_path / "b" / "results.json")
    c = write_results(cand, tmp_path / "c" / "results.json")
    assert h2k_main(["matrix", "gate", "--baseline", str(b), "--candidate", str(c)]) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[3].split()[3] == "regression" and lines[4].split()[3] == "incomparable"
    assert "proof mode differs: baseline real boot, candidate static verify" in out
    assert "gate: FAIL: 1 regression(s), 1 cell(s) not comparable (proof mode differs)" in out
    assert f"html report: {tmp_path / 'c' / 'gate.html'}" in out and (tmp_path / "c" / "gate.html").is_file()
    # static cells on both sides compare as usual
    assert h2k_main(["matrix", "gate", "--baseline", str(c), "--candidate", str(c),
                     "--html", str(tmp_path / "g.html")]) == 0
    assert (tmp_path / "g.html").is_file()
