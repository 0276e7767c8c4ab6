"""Pure parsers of h2k.inputs: VMX, OVF, Hyper-V XML, JSON sidecars, VMDK descriptors."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from h2k.errors import InputError
from h2k.inputs import cloud, formats, hyperv, ovf, vmx
from h2k.inputs.convert import parse_percent
from h2k.inputs.source import load_machine

VMX = '''.encoding = "UTF-8"
config.version = "8"
virtualHW.version = "19"
displayName = "win2019 web"
firmware = "efi"
uefi.secureBoot.enabled = "TRUE"
guestOS = "windows2019srv-64"
numvcpus = "4"
memsize = "8192"
scsi0.present = "TRUE"
scsi0.virtualDev = "pvscsi"
scsi0:1.present = "TRUE"
scsi0:1.fileName = "data.vmdk"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "win2019.vmdk"
scsi1.present = "TRUE"
scsi1.virtualDev = "lsisas1068"
scsi1:0.fileName = "logs.vmdk"
sata0.present = "TRUE"
sata0:1.deviceType = "cdrom-image"
sata0:1.fileName = "/isos/tools.iso"
ide0:0.present = "FALSE"
ide0:0.fileName = "gone.vmdk"
ethernet0.present = "TRUE"
ethernet0.virtualDev = "vmxnet3"
ethernet0.addressType = "generated"
ethernet0.generatedAddress = "00:0C:29:AB:CD:EF"
ethernet1.present = "TRUE"
ethernet1.virtualDev = "e1000e"
ethernet1.addressType = "static"
ethernet1.address = "00:50:56:01:02:03"
ethernet2.present = "FALSE"
ethernet2.virtualDev = "e1000"
'''


def test_vmx_full(tmp_path: Path) -> None:
    m = vmx.parse(VMX, tmp_path)
    assert (m.origin, m.name, m.firmware, m.secure_boot) == ("vmx", "win2019 web", "uefi", True)
    assert (m.guest_os, m.cpus, m.memory_mib) == ("windows2019srv-64", 4, 8192)
    assert [Path(d.path).name for d in m.disks] == ["win2019.vmdk", "data.vmdk", "logs.vmdk"]
    assert [(d.controller, d.unit) for d in m.disks] == [("scsi0", 0), ("scsi0", 1), ("scsi1", 0)]
    assert [(c.name, c.model) for c in m.controllers] == [("scsi0", "pvscsi"), ("scsi1", "lsisas1068")]
    assert [(n.model, n.mac) for n in m.nics] == [("vmxnet3", "00:0c:29:ab:cd:ef"), ("e1000e", "00:50:56:01:02:03")]
    meta = m.to_metadata()
    assert meta["firmware"] == "uefi" and meta["mac"] == "00:0c:29:ab:cd:ef" and meta["secure_boot"] is True
    assert meta["memory_mb"] == 8192 and meta["cpus"] == 4


def test_vmx_bios_default_hddorder_and_sata(tmp_path: Path) -> None:
    text = ('guestOS = "windows9-64"\nsata0.present = "TRUE"\nsata0:0.fileName = "a.vmdk"\n'
            'sata0:1.fileName = "b.vmdk"\nbios.hddOrder = "sata0:1"\n')
    m = vmx.parse(text, tmp_path)
    assert m.firmware == "bios" and not m.secure_boot and m.cpus == 1 and m.memory_mib is None
    assert [Path(d.path).name for d in m.disks] == ["b.vmdk", "a.vmdk"]
    assert [(c.name, c.model) for c in m.controllers] == [("sata0", "ahci")]


@pytest.mark.parametrize("text, msg", [
    ('firmware = "coreboot"\n', "neither bios nor efi"),
    ('numvcpus = "many"\n', "not a number"),
    ('memsize = "0"\n', "must be positive"),
    ('this is not a vmx\n', "not key ="),
    ('ethernet0.generatedAddress = "00:0c:29"\n', "six hex bytes"),
])
def test_vmx_bad(tmp_path: Path, text: str, msg: str) -> None:
    with pytest.raises(InputError, match=msg):
        vmx.parse(text, tmp_path)


OVF = (Path(__file__).parents[1] / "data" / "inputs" / "win2019.ovf").read_text()


def test_ovf_full() -> None:
    pkg = ovf.parse(OVF)
    m = pkg.machine
    assert pkg.disk_files == ["vm-disk1.vmdk", "vm-disk2.vmdk"]  # by controller address, not file order
    assert (m.firmware, m.secure_boot, m.cpus, m.memory_mib) == ("uefi", True, 2, 4096)
    assert m.guest_os == "windows2019srv_64Guest" and m.name == "win2019"
    assert [(n.model, n.mac) for n in m.nics] == [("vmxnet3", "00:50:56:aa:bb:cc"), ("e1000", "00:50:56:aa:bb:cd")]
    assert [(c.name, c.model) for c in m.controllers] == [("scsi0", "pvscsi"), ("ide0", "ide")]
    assert [(d.controller, d.unit) for d in m.disks] == [("scsi0", 0), ("scsi0", 1)]


def test_ovf_bios_gib_memory() -> None:
    text = OVF.replace('vmw:value="efi"', 'vmw:value="bios"').replace("byte * 2^20", "byte * 2^30").replace(">4096<", ">2<")
    m = ovf.parse(text).machine
    assert m.firmware == "bios" and m.memory_mib == 2048


@pytest.mark.parametrize("mutate, msg", [
    (lambda t: t.replace('ovf:href="vm-disk1.vmdk"', 'ovf:href="../../etc/passwd"'), "path traversal"),
    (lambda t: t.replace('ovf:href="vm-disk1.vmdk"', 'ovf:href="/etc/passwd"'), "absolute path"),
    (lambda t: t.replace('ovf:href="vm-disk1.vmdk"', 'ovf:href="http://evil/x.vmdk"'), "absolute path or URL"),
    (lambda t: t.replace('ovf:fileRef="file1"', 'ovf:fileRef="nope"'), "unknown file"),
    (lambda t: t.replace("ovf:/disk/vmdisk1", "ovf:/disk/ghost"), "unknown disk"),
    (lambda t: t.replace('ovf:size="2000"', 'ovf:size="2000" ovf:compression="gzip"'), "compressed"),
    (lambda t: t.replace("<Envelope", '<!DOCTYPE x [<!ENTITY a "b">]><Envelope'), "DOCTYPE"),
    (lambda t: t[: len(t) // 2], "not well-formed"),
    (lambda t: "<foo/>", "not an OVF"),
])
def test_ovf_bad(mutate, msg: str) -> None:
    with pytest.raises(InputError, match=msg):
        ovf.parse(mutate(OVF))


HYPERV_2012 = '''<?xml version="1.0" encoding="UTF-16" standalone="yes"?>
<configuration>
  <properties>
    <name type="string">hv-web</name>
    <subtype type="integer">1</subtype>
  </properties>
  <settings>
    <processors><count type="integer">2</count></processors>
    <memory><bank><size type="integer">3072</size></bank></memory>
    <secure_boot_enabled type="bool">True</secure_boot_enabled>
  </settings>
  <_83f8638b-8dca-4152-9eda-2ca8b33039b4_>
    <controller0><drive0><pathname type="string">C:\\VMs\\hv-web\\Virtual Hard Disks\\boot.vhdx</pathname><type type="string">VHD</type></drive0>
    <drive1><pathname type="string">C:\\iso\\x.iso</pathname><type type="string">ISO</type></drive1></controller0>
  </_83f8638b-8dca-4152-9eda-2ca8b33039b4_>
  <_d422512d-2bf2-4752-809d-7b82b5fcb1b4_>
    <controller0><drive0><pathname type="string">D:\\data.vhdx</pathname></drive0></controller0>
  </_d422512d-2bf2-4752-809d-7b82b5fcb1b4_>
  <_1234_>
    <ChannelInstanceGuid type="string">{abc}</ChannelInstanceGuid>
    <address type="string">00155D010203</address>
    <isLegacy type="bool">False</isLegacy>
  </_1234_>
</configuration>
'''


def test_hyperv_2012_export(tmp_path: Path) -> None:
    p = tmp_path / "vm.xml"
    p.write_bytes(HYPERV_2012.encode("utf-16"))  # Hyper-V writes UTF-16 with a BOM
    (tmp_path / "boot.vhdx").write_bytes(b"")
    m = load_machine(p)
    assert (m.origin, m.name, m.firmware, m.secure_boot, m.cpus, m.memory_mib) == ("hyperv", "hv-web", "uefi", True, 2, 3072)
    assert [Path(d.path).name for d in m.disks] == ["boot.vhdx", "data.vhdx"]
    assert Path(m.disks[0].path) == tmp_path / "boot.vhdx"
    assert [(d.controller) for d in m.disks] == ["ide0", "scsi0"]
    assert [(n.model, n.mac) for n in m.nics] == [("hyperv-synthetic", "00:15:5d:01:02:03")]


def test_hyperv_generation1_plain_names() -> None:
    text = ("<VM><Generation>1</Generation><SecureBoot>true</SecureBoot><ProcessorCount>1</ProcessorCount>"
            "<MemoryStartup>2147483648</MemoryStartup><Nic><MacAddress>00-15-5D-00-00-01</MacAddress></Nic></VM>")
    m = hyperv.parse(text)
    assert (m.firmware, m.secure_boot, m.memory_mib) == ("bios", False, 2048)  # no Secure Boot without UEFI
    assert m.macs == ["00:15:5d:00:00:01"]


def test_hyperv_bad(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no Hyper-V generation"):
        hyperv.parse("<configuration><properties/></configuration>")
    with pytest.raises(InputError, match="neither 1 nor 2"):
        hyperv.parse("<VM><Generation>3</Generation></VM>")
    vmcx = tmp_path / "A1B2.vmcx"
    vmcx.write_bytes(b"\x00\x01binary")
    with pytest.raises(InputError, match="export the XML"):
        load_machine(vmcx)


def test_cloud_sidecar(tmp_path: Path) -> None:
    disk = tmp_path / "web1.qcow2"
    disk.write_bytes(b"")
    (tmp_path / "web1.qcow2.json").write_text(json.dumps(
        {"firmware": "efi", "cpus": 2, "memory_mib": 2048, "nics": [{"model": "virtio", "mac": "52:54:00:12:34:56"}]}))
    m = cloud.sidecar_for(disk)
    assert m is not None and (m.firmware, m.cpus, m.memory_mib, m.macs) == ("uefi", 2, 2048, ["52:54:00:12:34:56"])
    assert [d.path for d in m.disks] == [str(disk.resolve())]
    assert cloud.parse({"generation": 2, "mac": "52-54-00-00-00-01"}, tmp_path).to_metadata()["mac"] == "52:54:00:00:00:01"
    for bad, msg in (({"cpus": 0}, "positive"), ({"firmware": "coreboot"}, "bios or uefi"),
                     ({"colour": "red"}, "unknown sidecar keys"), ([], "JSON object"), ({"nics": [{"mac": "x"}]}, "six hex")):
        with pytest.raises(InputError, match=msg):
            cloud.parse(bad, tmp_path)


DESC = '''# Disk DescriptorFile
version=1
CID=aabc3f2b
parentCID=ffffffff
createType="twoGbMaxExtentSparse"

# Extent description
RW 4192256 SPARSE "big-s001.vmdk"
RW 2048 SPARSE "big-s002.vmdk"

# The Disk Data Base
#DDB

ddb.adapterType = "lsilogic"
'''


def test_vmdk_descriptor() -> None:
    d = formats.parse_vmdk_descriptor(DESC)
    assert d.create_type == "twoGbMaxExtentSparse" and d.parent_cid is None and d.adapter_type == "lsilogic"
    assert [(e.type, e.filename, e.sectors) for e in d.extents] == [("SPARSE", "big-s001.vmdk", 4192256), ("SPARSE", "big-s002.vmdk", 2048)]
    assert d.capacity == (4192256 + 2048) * 512
    flat = formats.parse_vmdk_descriptor(DESC.replace("twoGbMaxExtentSparse", "monolithicFlat").replace(
        'RW 4192256 SPARSE "big-s001.vmdk"\nRW 2048 SPARSE "big-s002.vmdk"', 'RW 2048 FLAT "x-flat.vmdk" 0\nRW 100 ZERO'))
    assert [(e.type, e.filename, e.offset) for e in flat.extents] == [("FLAT", "x-flat.vmdk", 0), ("ZERO", None, 0)]
    child = formats.parse_vmdk_descriptor(DESC.replace("parentCID=ffffffff", 'parentCID=12345678\nparentFileNameHint="base.vmdk"'))
    assert child.parent_cid == "12345678" and child.parent_hint == "base.vmdk"


@pytest.mark.parametrize("text, msg", [
    (DESC[: DESC.index("RW 4192256") + 12], "corrupt or truncated extent line"),
    (DESC[: DESC.index("createType")], "no createType"),
    (DESC.replace("twoGbMaxExtentSparse", "fancySparse"), "unknown VMDK createType"),
    (DESC.replace("SPARSE", "WEIRD"), "unknown extent type"),
    (DESC.split("# Extent description")[0], "lists no extents"),
    ("hello", "not a VMDK descriptor"),
    (DESC.replace("version=1", "version=1\n\x01\x02garbage ~~"), "corrupt descriptor line"),
])
def test_vmdk_descriptor_bad(text: str, msg: str) -> None:
    with pytest.raises(InputError, match=msg):
        formats.parse_vmdk_descriptor(text)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=string.printable, max_size=400))
def test_vmdk_descriptor_never_crashes(junk: str) -> None:
    # Anything after the header either parses or is an InputError: never another exception.
    try:
        formats.parse_vmdk_descriptor("# Disk DescriptorFile\n" + junk)
    except InputError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_vmx_never_crashes(junk: str) -> None:
    try:
        vmx.parse(junk, Path("/nonexistent"))
    except InputError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["a", "..", ".", "b", "", "/", "\\", "c:"]), min_size=1, max_size=5))
def test_safe_relative_never_escapes(parts: list[str]) -> None:
    name = "/".join(parts)
    try:
        got = ovf.safe_relative(name, "t")
    except InputError:
        return
    assert not got.startswith("/") and ".." not in Path(got).parts and "\\" not in got


def test_progress_parse() -> None:
    assert parse_percent("    (42.17/100%)") == 42.17
    assert parse_percent("(100.00/100%)") == 100.0
    assert parse_percent("garbage") is None


def test_stem_json_that_is_not_a_sidecar_is_ignored(tmp_path: Path) -> None:
    disk = tmp_path / "win.qcow2"
    disk.write_bytes(b"")
    (tmp_path / "win.json").write_text(json.dumps({"facts": {"firmware": "bios"}}))  # saved inspect output
    assert cloud.sidecar_for(disk) is None
    (tmp_path / "win.json").write_text(json.dumps({"firmware": "uefi"}))
    assert cloud.sidecar_for(disk).firmware == "uefi"
    (tmp_path / "win.qcow2.json").write_text("{broken")
    with pytest.raises(InputError, match="not valid JSON"):
        cloud.sidecar_for(disk)
