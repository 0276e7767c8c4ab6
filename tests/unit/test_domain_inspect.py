"""`h2k domain` with no --facts/--os inspects the image (one read-only libguestfs launch) and
keeps what it finds: the phony Windows 11 UEFI disk of the test bed gets Secure Boot + TPM."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

# One libguestfs launch (~25-30 s quiet); the image is the test bed's cached one, shared with the
# engine's integration tests (built once per cache).
pytestmark = [pytest.mark.guestfs, pytest.mark.slow, pytest.mark.xdist_group("win11-uefi")]


def test_domain_from_inspection_of_a_windows11_disk(tmp_path: Path) -> None:
    from lab.testbed import windisk

    image = windisk.build("win11-uefi")
    out = tmp_path / "bootstrap.xml"
    r = subprocess.run([sys.executable, "-m", "h2k", "domain", str(image), "--stage", "bootstrap", "--name", "w11",
                        "--virtio-iso", "/isos/virtio-win.iso", "--domain-type", "qemu", "-o", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    root = ET.parse(out).getroot()
    assert root.findtext("name") == "w11-bootstrap"
    loader = root.find("os/loader")
    assert loader is not None and loader.get("secure") == "yes"  # Windows 11 on UEFI
    assert root.find("features/smm").get("state") == "on"
    assert root.find("devices/tpm/backend").get("version") == "2.0"
    assert root.find("features/hyperv") is not None and root.find("devices/panic[@model='hyperv']") is not None
    assert root.find("devices/disk[@device='disk']/target").get("bus") == "sata"
    assert root.find("devices/interface/model").get("type") == "e1000e"
    assert root.findtext("memory") == "4096"  # Windows 11 default
