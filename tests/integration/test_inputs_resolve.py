"""resolve_input and the commands on real VM inputs (qemu-img disks + hand-written metadata), no appliance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from h2k.errors import InputError
from h2k.inputs.cli_support import engine_input, write_profiles
from h2k.inputs.source import resolve_input

H2K = [sys.executable, "-m", "h2k"]


def qimg(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def h2k(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*H2K, *args], capture_output=True, text=True, timeout=120, env={**os.environ, "H2K_QUIET": "1"})


VMX = '''displayName = "web"
firmware = "efi"
uefi.secureBoot.enabled = "TRUE"
numvcpus = "2"
memsize = "2048"
scsi0.virtualDev = "pvscsi"
scsi0:0.fileName = "web.vmdk"
scsi0:1.fileName = "web_1.vmdk"
ethernet0.virtualDev = "vmxnet3"
ethernet0.addressType = "static"
ethernet0.address = "00:50:56:00:00:42"
'''


@pytest.fixture()
def vmware_dir(tmp_path: Path) -> Path:
    qimg("create", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", str(tmp_path / "web.vmdk"), "64M")
    qimg("create", "-f", "vmdk", str(tmp_path / "web_1.vmdk"), "32M")
    (tmp_path / "web.vmx").write_text(VMX)
    return tmp_path


def test_vmx_input(vmware_dir: Path) -> None:
    with resolve_input(vmware_dir / "web.vmx") as res:
        assert [Path(d).name for d in res.disks] == ["web.vmdk", "web_1.vmdk"] and not res.extracted
        meta = res.metadata()
        assert meta["firmware"] == "uefi" and meta["secure_boot"] and meta["mac"] == "00:50:56:00:00:42"
    # --metadata JSON wins over the VMX's own values
    over = vmware_dir / "over.json"
    over.write_text(json.dumps({"firmware": "bios"}))
    with engine_input(str(vmware_dir / "web.vmx"), str(over)) as (disk, meta, _):
        assert Path(disk).name == "web.vmdk" and meta["firmware"] == "bios" and meta["cpus"] == 2


def test_convert_vmx_two_disks(vmware_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "o" / "web.qcow2"
    out.parent.mkdir()
    r = h2k("convert", str(vmware_dir / "web.vmx"), "-o", str(out), "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert [Path(o["output"]).name for o in data["outputs"]] == ["web.qcow2", "web-disk2.qcow2"]
    assert [o["virtual_size"] for o in data["outputs"]] == [64 << 20, 32 << 20]
    assert data["machine"]["nics"] == [{"model": "vmxnet3", "mac": "00:50:56:00:00:42"}]
    assert sorted(os.listdir(out.parent)) == ["web-disk2.qcow2", "web.qcow2"]


def test_vmx_missing_disk(vmware_dir: Path) -> None:
    (vmware_dir / "web_1.vmdk").unlink()
    with pytest.raises(InputError, match="web_1.vmdk named by the metadata is missing"):
        resolve_input(vmware_dir / "web.vmx")


def test_hyperv_xml_and_vhdx(tmp_path: Path) -> None:
    qimg("create", "-f", "vhdx", str(tmp_path / "srv.vhdx"), "64M")
    (tmp_path / "srv.xml").write_text(
        "<configuration><properties><name type='string'>srv</name><subtype type='integer'>0</subtype></properties>"
        "<_83f8638b-8dca-4152-9eda-2ca8b33039b4_><controller0><drive0><pathname type='string'>"
        "C:\\Hyper-V\\srv.vhdx</pathname></drive0></controller0></_83f8638b-8dca-4152-9eda-2ca8b33039b4_>"
        "<_nic_><address type='string'>00155DAABBCC</address></_nic_></configuration>")
    with resolve_input(tmp_path / "srv.xml") as res:
        assert res.disk == str(tmp_path / "srv.vhdx")
        assert res.machine.firmware == "bios" and res.machine.macs == ["00:15:5d:aa:bb:cc"]


def test_cloud_sidecar_and_ova(tmp_path: Path) -> None:
    disk = tmp_path / "c.qcow2"
    qimg("create", "-f", "qcow2", str(disk), "16M")
    Path(str(disk) + ".json").write_text(json.dumps({"firmware": "uefi", "cpus": 3, "nics": [{"mac": "52:54:00:00:00:09"}]}))
    with resolve_input(disk) as res:
        assert res.machine.origin == "cloud" and res.metadata()["cpus"] == 3
    # an OVA built from the same disk: extracted under the work dir, removed by cleanup()
    vmdk = tmp_path / "c.vmdk"
    qimg("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", str(disk), str(vmdk))
    ovf_text = (Path(__file__).parents[1] / "data" / "inputs" / "win2019.ovf").read_text()
    ovf_text = ovf_text.replace("vm-disk1.vmdk", "c.vmdk").replace("vm-disk2.vmdk", "c.vmdk")
    (tmp_path / "c.ovf").write_text(ovf_text)
    with tarfile.open(tmp_path / "c.ova", "w") as tar:
        tar.add(tmp_path / "c.ovf", "c.ovf")
        tar.add(vmdk, "c.vmdk")
    work = tmp_path / "work"
    work.mkdir()
    res = resolve_input(tmp_path / "c.ova", work)
    assert res.extracted and Path(res.disk).parent.parent == work and Path(res.disk).read_bytes() == vmdk.read_bytes()
    res.cleanup()
    assert os.listdir(work) == []


def test_domain_takes_vmx_metadata_and_refuses_a_vm(vmware_dir: Path, tmp_path: Path) -> None:
    img = tmp_path / "d.qcow2"
    qimg("create", "-f", "qcow2", str(img), "16M")
    r = h2k("domain", str(img), "--os", "windows", "--metadata", str(vmware_dir / "web.vmx"), "--domain-type", "qemu", "--no-validate")
    assert r.returncode == 0, r.stderr
    root = ET.fromstring(r.stdout)
    assert root.find("devices/interface/mac").get("address") == "00:50:56:00:00:42"
    assert root.findtext("vcpu") == "2" and root.findtext("memory") == "2048"
    assert root.find("os/loader") is not None and root.find("os/loader").get("secure") == "yes"
    r = h2k("domain", str(vmware_dir / "web.vmx"))
    assert r.returncode == 3 and "a VM, not a disk" in r.stderr


def test_write_profiles_source_metadata_wins(tmp_path: Path) -> None:
    meta = {"firmware": "uefi", "secure_boot": True, "mac": "00:50:56:00:00:01", "macs": ["00:50:56:00:00:01", "00:50:56:00:00:02"],
            "cpus": 4, "memory_mb": 8192, "name": "web"}
    facts = {"firmware": "bios", "build": 17763, "is_server": True}  # the disk layout said BIOS
    path = write_profiles(tmp_path / "web.qcow2", None, meta, facts, "windows", "virtio-scsi")
    prof = json.loads(path.read_text())
    assert prof["final"]["firmware"] == prof["bootstrap"]["firmware"] == "uefi-secureboot"
    assert prof["final"]["disk_bus"] == "virtio-scsi" and prof["macs"] == meta["macs"]
    assert (prof["final"]["cpus"], prof["final"]["memory_mb"], prof["final"]["macs"]) == (4, 8192, meta["macs"])


def test_differencing_vhd_refused_with_advice(tmp_path: Path) -> None:
    """A VHD whose footer says 'differencing' (type 4, a Hyper-V checkpoint) is refused before qemu-img reads it."""
    vhd = tmp_path / "child.avhd"
    qimg("create", "-f", "vpc", str(vhd), "16M")
    data = bytearray(vhd.read_bytes())
    data[60:64] = (4).to_bytes(4, "big")  # footer copy at the start
    data[-512 + 60:-512 + 64] = (4).to_bytes(4, "big")  # footer at the end
    vhd.write_bytes(bytes(data))
    r = h2k("convert", str(vhd), "-o", str(tmp_path / "x.qcow2"))
    assert r.returncode == 3 and "differencing VHD" in r.stderr and "Merge" in r.stderr
    assert not (tmp_path / "x.qcow2").exists()


def test_domain_picks_up_the_profiles_fix_left(tmp_path: Path) -> None:
    img = tmp_path / "fixed.qcow2"
    qimg("create", "-f", "qcow2", str(img), "16M")
    macs = ["00:50:56:00:00:07", "00:50:56:00:00:08"]
    meta = {"firmware": "uefi", "mac": macs[0], "macs": macs, "cpus": 3, "memory_mb": 1536}
    write_profiles(img, None, meta, {"firmware": "bios"}, "windows", "virtio-blk")
    r = h2k("domain", str(img), "--os", "windows", "--domain-type", "qemu", "--no-validate")
    assert r.returncode == 0, r.stderr
    root = ET.fromstring(r.stdout)
    assert [i.find("mac").get("address") for i in root.findall("devices/interface")] == macs  # one NIC each, in order
    assert root.findtext("vcpu") == "3" and root.findtext("memory") == "1536" and root.find("os/loader") is not None
