"""`h2k boot` end to end on a real (empty) disk: one-line verdict, exit status, --json."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lab import tinyguest

pytestmark = [pytest.mark.boot]


def test_h2k_boot_one_line_and_json(tmp_path):
    disk = tinyguest.empty_disk()
    cmd = [sys.executable, "-m", "h2k", "boot", str(disk), "--os", "linux", "--firmware", "bios",
           "--timeout", "120", "--outdir", str(tmp_path / "a")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("failed: no bootable device")
    p = subprocess.run(cmd[:-1] + [str(tmp_path / "b"), "--json"], capture_output=True, text=True, timeout=300)
    data = json.loads(p.stdout)
    assert data["verdict"] == "failed" and data["profile"]["disk_bus"] == "virtio-blk"
    assert json.loads((tmp_path / "b" / "verdict.json").read_text())["reason"] == data["reason"]


@pytest.mark.guestfs
def test_h2k_boot_without_os_asks_libguestfs(tmp_path):
    """--os auto (the default): a phony Windows disk is inspected as Windows, so the machine gets the
    Windows profile (Hyper-V enlightenments) and the Windows success (ems | agent)."""
    from lab.testbed import windisk

    disk = windisk.build("win2019-bios")
    p = subprocess.run([sys.executable, "-m", "h2k", "boot", str(disk), "--firmware", "bios", "--timeout", "3",
                        "--json", "--outdir", str(tmp_path / "o")], capture_output=True, text=True, timeout=600)
    assert p.returncode == 1, p.stderr
    assert "h2k boot: --os windows (libguestfs inspection found windows windows 10)" in p.stderr
    data = json.loads(p.stdout)
    assert data["profile"]["hyperv"] is True
    assert data["verdict"] == "timeout" and "missing: ems | agent" in data["reason"], data["reason"]
