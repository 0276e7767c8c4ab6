"""``h2k fix vm.ova -o out.qcow2``: straight from an OVA (phony Windows Server 2019, BIOS) to a fixed disk
and machine profiles that keep the firmware, the MACs, the CPUs and the memory; ``h2k verify`` agrees.

Two appliance launches (fix, verify) on one phony disk built once through cached_build.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from lab.testbed import virtio_win, windisk

pytestmark = [pytest.mark.guestfs, pytest.mark.slow, pytest.mark.xdist_group("inputs-ova")]

H2K = [sys.executable, "-m", "h2k"]
MACS = ["00:50:56:8a:01:02", "00:50:56:8a:01:03"]

OVF_TEMPLATE = """<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
  xmlns:vmw="http://www.vmware.com/schema/ovf">
  <References><File ovf:id="file1" ovf:href="win2019-disk1.vmdk" ovf:size="{size}"/></References>
  <DiskSection><Info>Virtual disks</Info>
    <Disk ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:capacity="{capacity}" ovf:capacityAllocationUnits="byte"
          ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <VirtualSystem ovf:id="win2019">
    <Info>A virtual machine</Info><Name>win2019-ova</Name>
    <OperatingSystemSection ovf:id="112" vmw:osType="windows2019srv_64Guest"><Info>os</Info></OperatingSystemSection>
    <VirtualHardwareSection><Info>hardware</Info>
      <Item><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>2</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits><rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>3072</rasd:VirtualQuantity></Item>
      <Item><rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceSubType>lsilogicsas</rasd:ResourceSubType><rasd:ResourceType>6</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>0</rasd:AddressOnParent><rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource><rasd:InstanceID>4</rasd:InstanceID><rasd:Parent>3</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:Address>{mac0}</rasd:Address><rasd:InstanceID>5</rasd:InstanceID><rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType><rasd:ResourceType>10</rasd:ResourceType></Item>
      <Item><rasd:Address>{mac1}</rasd:Address><rasd:InstanceID>6</rasd:InstanceID><rasd:ResourceSubType>E1000e</rasd:ResourceSubType><rasd:ResourceType>10</rasd:ResourceType></Item>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="bios"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""


@pytest.fixture(scope="module")
def ova(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """win2019-bios as a streamOptimized VMDK in an OVA with a manifest, as vSphere exports it."""
    src = windisk.build("win2019-bios")
    d = tmp_path_factory.mktemp("ova")
    vmdk = d / "win2019-disk1.vmdk"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "vmdk", "-o", "subformat=streamOptimized",
                    str(src), str(vmdk)], check=True)
    capacity = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(src)], capture_output=True,
                                         text=True, check=True).stdout)["virtual-size"]
    ovf_text = OVF_TEMPLATE.format(size=vmdk.stat().st_size, capacity=capacity, mac0=MACS[0], mac1=MACS[1].upper())
    (d / "win2019.ovf").write_text(ovf_text)
    mf = "".join(f"SHA256({p.name})= {hashlib.sha256(p.read_bytes()).hexdigest()}\n" for p in (d / "win2019.ovf", vmdk))
    (d / "win2019.mf").write_text(mf)
    path = d / "win2019.ova"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in ("win2019.ovf", "win2019.mf", "win2019-disk1.vmdk"):
            tar.add(d / name, arcname=name)
    for name in ("win2019.ovf", "win2019.mf", "win2019-disk1.vmdk"):
        (d / name).unlink()
    return path


def test_fix_ova_to_fixed_qcow2_and_profiles(ova: Path, tmp_path: Path) -> None:
    pack = virtio_win.build_tree()
    ova_sha = hashlib.sha256(ova.read_bytes()).hexdigest()
    out = tmp_path / "win2019.qcow2"
    r = subprocess.run([*H2K, "fix", str(ova), "-o", str(out), "--drivers", str(pack), "--bus", "virtio-blk", "--json"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["output"] == str(out) and not report["nothing_to_do"] and report["registry_changes"] > 0
    assert report["facts"]["firmware"] == "bios" and report["facts"]["firmware_source"] == "metadata"
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(out)], capture_output=True, text=True).stdout)
    assert info["format"] == "qcow2" and "backing-filename" not in info  # standalone, not an overlay of a temp file
    # Nothing unpacked is left: only the disk, its journal and the profiles.
    left = sorted(os.listdir(tmp_path))
    assert all(n.startswith("win2019.qcow2") for n in left), left
    assert hashlib.sha256(ova.read_bytes()).hexdigest() == ova_sha  # the OVA itself is untouched

    prof = json.loads(Path(str(out) + ".machine.json").read_text())
    assert prof["macs"] == MACS
    for stage in ("bootstrap", "final"):
        p = prof[stage]
        assert (p["firmware"], p["macs"], p["cpus"], p["memory_mb"]) == ("bios", MACS, 2, 3072), stage
    assert prof["bootstrap"]["disk_bus"] == "sata" and prof["final"]["disk_bus"] == "virtio-blk"
    assert prof["source"]["controllers"] == [{"name": "scsi0", "model": "lsilogicsas"}]
    assert [n["model"] for n in prof["source"]["nics"]] == ["vmxnet3", "e1000e"]

    v = subprocess.run([*H2K, "verify", str(out), "--bus", "virtio-blk"], capture_output=True, text=True, timeout=900)
    assert v.returncode == 0, v.stdout + v.stderr


def test_fix_ova_in_place_refused(ova: Path, tmp_path: Path) -> None:
    r = subprocess.run([*H2K, "fix", str(ova), "--in-place", "--drivers", str(tmp_path), "--bus", "virtio-blk"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 3 and "cannot be fixed in place" in r.stderr
    assert [p for p in ova.parent.iterdir() if p.name != ova.name] == []
