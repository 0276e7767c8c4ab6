"""h2k.domain: bootstrap and final machine profiles, and the `h2k domain` command."""

from __future__ import annotations

import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from h2k import domain
from h2k.errors import InputError
from h2k.facts import WindowsFacts


def win_facts(build: int = 17763, firmware: str = "bios", server: bool = True) -> WindowsFacts:
    return WindowsFacts(
        root="/dev/sda2", product_name="Windows Server 2019 Standard", edition="ServerStandard",
        major=10, minor=0, build=build, arch="x86_64", system_root="/Windows", current_control_set=1,
        firmware=firmware, firmware_source="partition-table", bcd_device="/dev/sda1", bcd_path="/Boot/BCD",
        is_server=server,
    )


def test_bootstrap_from_windows_facts() -> None:
    p = domain.bootstrap_profile(win_facts(), virtio_iso="/isos/virtio-win.iso")
    assert (p.stage, p.disk_bus, p.nic_model, p.machine_type) == ("bootstrap", "sata", "e1000e", "q35")
    assert p.cdroms == ["/isos/virtio-win.iso"]
    assert p.firmware == "bios" and not p.tpm
    assert p.hyperv and p.pvpanic and p.guest_agent and p.serial_console
    assert p.memory_mb == 4096 and p.cpus == 2  # server default
    assert p.name == "windows-server-2019-standard-bootstrap"


def test_bootstrap_ide_runs_on_i440fx() -> None:
    p = domain.bootstrap_profile(win_facts(firmware="uefi"), bus="ide")
    assert p.machine_type == "pc" and p.disk_bus == "ide" and p.firmware == "uefi"


def test_final_keeps_firmware_and_uses_virtio() -> None:
    for fw in ("bios", "uefi"):
        p = domain.final_profile(win_facts(firmware=fw), bus="virtio-scsi")
        assert (p.stage, p.disk_bus, p.nic_model, p.firmware, p.cdroms) == ("final", "virtio-scsi", "virtio-net", fw, [])
    assert domain.final_profile(win_facts()).disk_bus == "virtio-blk"


def test_windows11_gets_secureboot_and_tpm_only_on_uefi() -> None:
    w11 = win_facts(build=22631, firmware="uefi", server=False)
    for p in (domain.bootstrap_profile(w11), domain.final_profile(w11)):
        assert p.firmware == "uefi-secureboot" and p.tpm
    # A BIOS install is never switched to UEFI.
    p = domain.final_profile(win_facts(build=22631, firmware="bios", server=False))
    assert p.firmware == "bios" and not p.tpm
    # Server 2022 (20348) and 2025 (26100) are not Windows 11.
    assert not domain.final_profile(win_facts(build=26100, firmware="uefi", server=True)).tpm
    with pytest.raises(InputError, match="Secure Boot"):
        domain.bootstrap_profile(w11, bus="ide")


def test_linux_from_a_dict_with_metadata() -> None:
    meta = {"os": "linux", "firmware": "uefi", "name": "Web 1", "mac": "52-54-00-AA-BB-CC", "memory_mb": "3072", "cpus": 4}
    p = domain.final_profile(meta)
    assert p.name == "web-1-final"
    assert p.mac == "52:54:00:aa:bb:cc" and p.memory_mb == 3072 and p.cpus == 4
    assert not p.hyperv and p.pvpanic and p.firmware == "uefi"
    b = domain.bootstrap_profile({"os": "linux"})
    assert b.memory_mb == 1024 and b.firmware == "bios" and b.cdroms == []
    # explicit arguments win over metadata
    assert domain.final_profile(meta, macs=["52:54:00:00:00:01"], cpus=1).macs == ["52:54:00:00:00:01"]
    two = {"os": "windows", "macs": ["00:50:56:00:00:01", "00-50-56-00-00-02"]}
    assert domain.bootstrap_profile(two).macs == domain.final_profile(two).macs == ["00:50:56:00:00:01", "00:50:56:00:00:02"]
    assert domain.final_profile({"os": "windows", "firmware": "uefi", "secure_boot": True}).firmware == "uefi-secureboot"


@pytest.mark.parametrize(
    "call,msg",
    [
        (lambda: domain.final_profile({"os": "plan9"}), "guest OS"),
        (lambda: domain.final_profile({"os": "linux", "firmware": "coreboot"}), "firmware"),
        (lambda: domain.final_profile({"os": "linux", "mac": "zz"}), "MAC"),
        (lambda: domain.final_profile({"os": "linux", "macs": "00:50:56:00:00:01"}), "list of MAC"),
        (lambda: domain.final_profile({"os": "linux"}, macs=["00:50:56:00:00:01"] * 2), "twice"),
        (lambda: domain.final_profile({"os": "linux", "memory_mb": -5}), "memory_mb"),
        (lambda: domain.final_profile({"os": "linux"}, bus="sata"), "final disk bus"),
        (lambda: domain.bootstrap_profile({"os": "linux"}, bus="virtio-blk"), "bootstrap disk bus"),
        (lambda: domain.final_profile({"os": "linux"}, nic="ne2k"), "NIC"),
        (lambda: domain.final_profile(["linux"]), "WindowsFacts or a dict"),
    ],
)
def test_bad_input_is_a_one_line_input_error(call, msg: str) -> None:
    with pytest.raises(InputError, match=msg) as ei:
        call()
    assert "\n" not in str(ei.value)


def _h2k(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "h2k", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("virt-xml-validate") is None, reason="virt-xml-validate missing")
def test_cli_writes_valid_xml(tmp_path: Path) -> None:
    img = tmp_path / "srv.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1G"], check=True)
    facts = tmp_path / "facts.json"
    import json

    facts.write_text(json.dumps(win_facts(firmware="uefi").to_dict()))
    out = tmp_path / "boot.xml"
    r = _h2k("domain", str(img), "--stage", "bootstrap", "--facts", str(facts), "--virtio-iso", "/isos/v.iso",
             "--mac", "52:54:00:01:02:03", "--mac", "52:54:00:01:02:04", "--domain-type", "qemu", "-o", str(out))
    assert r.returncode == 0, r.stderr
    root = ET.parse(out).getroot()
    assert root.findtext("name") == "srv-bootstrap"
    assert root.find("os/loader").get("type") == "pflash"
    assert root.find("devices/disk/target").get("bus") == "sata"
    assert root.find("devices/disk/driver").get("type") == "qcow2"
    assert root.find("devices/interface/model").get("type") == "e1000e"
    assert [i.find("mac").get("address") for i in root.findall("devices/interface")] == ["52:54:00:01:02:03", "52:54:00:01:02:04"]
    assert root.find("devices/disk[@device='cdrom']/source").get("file") == "/isos/v.iso"
    assert root.findtext("on_reboot") == "restart"  # a user's machine, not a lab one

    r = _h2k("domain", str(img), "--stage", "final", "--bus", "virtio-scsi", "--os", "linux", "--firmware", "bios", "--domain-type", "qemu")
    assert r.returncode == 0, r.stderr
    root = ET.fromstring(r.stdout)
    assert root.find("devices/controller[@type='scsi']").get("model") == "virtio-scsi"
    assert root.find("features/hyperv") is None

    # Source metadata: firmware "efi" (VMware's word), MAC, memory, CPUs kept.
    meta = tmp_path / "vm.json"
    meta.write_text(json.dumps({"firmware": "efi", "mac": "00:50:56:aa:bb:cc", "memory_mb": 3072, "cpus": 3}))
    r = _h2k("domain", str(img), "--os", "linux", "--metadata", str(meta), "--domain-type", "qemu")
    assert r.returncode == 0, r.stderr
    root = ET.fromstring(r.stdout)
    assert root.find("os/loader") is not None
    assert root.find("devices/interface/mac").get("address") == "00:50:56:aa:bb:cc"
    assert root.findtext("memory") == "3072" and root.findtext("vcpu") == "3"


def test_cli_bad_input(tmp_path: Path) -> None:
    r = _h2k("domain", str(tmp_path / "missing.qcow2"))
    assert r.returncode == 3 and r.stderr.strip() == f"h2k: error: {tmp_path / 'missing.qcow2'}: no such disk image"
    img = tmp_path / "d.raw"
    img.write_bytes(b"\0" * 512)
    r = _h2k("domain", str(img), "--stage", "final", "--bus", "ide", "--domain-type", "qemu")
    assert r.returncode == 3 and "final disk bus" in r.stderr  # refused before any inspection
    r = _h2k("domain", str(img), "--os", "linux", "--mac", "nonsense", "--domain-type", "qemu")
    assert r.returncode == 3 and "MAC address" in r.stderr
    bad = tmp_path / "f.json"
    bad.write_text("{not json")
    r = _h2k("domain", str(img), "--facts", str(bad), "--domain-type", "qemu")
    assert r.returncode == 3 and "cannot read facts" in r.stderr
