"""``h2k plan`` end to end through the CLI: facts JSON (fast) and a phony image (libguestfs, slow)."""

from __future__ import annotations

import json

import pytest

from h2k import cli
from lab.testbed import virtio_win

from test_plan_facts import hibernated, win2019, win2022


@pytest.fixture(scope="module")
def iso():
    return str(virtio_win.build_iso())


def _facts_file(tmp_path, f, name="facts.json"):
    p = tmp_path / name
    p.write_text(json.dumps(f.to_dict()))
    return str(p)


def test_plan_table_from_facts_and_iso(tmp_path, iso, capsys):
    rc = cli.main(["plan", _facts_file(tmp_path, win2022()), "--drivers", iso, "--bus", "virtio-scsi"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith("plan: virtio-scsi on 2k22/amd64; drivers: vioscsi, NetKVM")
    assert "SYSTEM\\{CCS}\\Services\\vioscsi :: Start" in out
    assert "/Windows/System32/drivers/vioscsi.sys" in out


def test_plan_json(tmp_path, iso, capsys):
    # "h2k inspect --json" output may also be wrapped as {"facts": {...}}.
    p = tmp_path / "wrapped.json"
    p.write_text(json.dumps({"facts": win2019().to_dict()}))
    rc = cli.main(["plan", str(p), "--drivers", iso, "--bus", "both", "--json", "--no-firstboot"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert data["target_bus"] == "virtio-blk+virtio-scsi" and data["drivers"] == ["viostor", "vioscsi"]
    kinds = {c["kind"] for c in data["changes"]}
    assert kinds == {"FileCopy", "RegValue"}
    assert any(c.get("name") == "ClassGUID" and c["data"] == "{4D36E97B-E325-11CE-BFC1-08002BE10318}"
               for c in data["changes"])


@pytest.mark.parametrize("facts_kw,pack,code,msg", [
    ({"build": 17700}, None, 3, "unknown Windows Server build 17700"),
    ({}, "/nonexistent/pack", 3, "driver pack /nonexistent/pack does not exist"),
    ({"arch": "ppc64le"}, None, 3, "unsupported Windows architecture"),
])
def test_plan_errors_are_one_line(tmp_path, iso, capsys, facts_kw, pack, code, msg):
    rc = cli.main(["plan", _facts_file(tmp_path, win2019(**facts_kw)), "--drivers", pack or iso, "--bus", "virtio-blk"])
    err = capsys.readouterr().err
    assert rc == code
    assert err.startswith("h2k: error: ") and msg in err and err.count("\n") == 1


def test_plan_refuses_blocked_guest(tmp_path, iso, capsys):
    rc = cli.main(["plan", _facts_file(tmp_path, hibernated()), "--drivers", iso, "--bus", "virtio-blk"])
    assert rc == 4 and "hibernated" in capsys.readouterr().err


def test_plan_bad_facts_file(tmp_path, iso, capsys):
    p = tmp_path / "x.json"
    p.write_text("{broken")
    assert cli.main(["plan", str(p), "--drivers", iso, "--bus", "virtio-blk"]) == 3
    assert "not valid JSON" in capsys.readouterr().err


@pytest.mark.guestfs
@pytest.mark.slow
def test_plan_from_phony_image(iso, capsys):
    from lab.testbed import windisk

    image = windisk.build("win2019-bios")
    rc = cli.main(["plan", str(image), "--drivers", iso, "--bus", "virtio-blk", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and (data["os_folder"], data["arch_folder"]) == ("2k19", "amd64")
    assert any(c["kind"] == "FileCopy" and c["dest"].lower().endswith("/system32/drivers/viostor.sys")
               for c in data["changes"])
