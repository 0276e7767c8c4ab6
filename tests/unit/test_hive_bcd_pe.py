"""BCD stores and PE images written by the test bed, checked with hivex and `file`."""

from __future__ import annotations

import shutil
import subprocess

import hivex
import pytest

from lab.testbed import bcd
from lab.testbed.pe import SUBSYSTEM_EFI_APPLICATION, SUBSYSTEM_NATIVE, make_pe, pe_machine
from lab.testbed.regtext import expand_template, join_reg, parse_reg

LOADER = "{11111111-2222-4333-8444-555555555555}"


def _spec(firmware):
    if firmware == "bios":
        sysp = bcd.PartitionRef("mbr", disk_signature=0xDEADBEEF, partition_offset=1 << 20)
        win = bcd.PartitionRef("mbr", disk_signature=0xDEADBEEF, partition_offset=101 << 20)
    else:
        disk = "{aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee}"
        sysp = bcd.PartitionRef("gpt", disk_guid=disk, partition_guid="{10000000-0000-4000-8000-000000000001}")
        win = bcd.PartitionRef("gpt", disk_guid=disk, partition_guid="{30000000-0000-4000-8000-000000000003}")
    return bcd.BcdSpec(firmware, LOADER, sysp, win)


@pytest.mark.parametrize("firmware, loader", [("bios", "winload.exe"), ("uefi", "winload.efi")])
def test_bcd_store_reads_back(tmp_path, firmware, loader):
    spec = _spec(firmware)
    path = bcd.make_bcd(tmp_path / "BCD", spec)
    store = bcd.read_bcd(path)
    assert store["key_name"] == "BCD00000000"
    assert store["default"] == LOADER
    assert store["default_path"] == "\\Windows\\system32\\" + loader
    assert store["default_systemroot"] == "\\Windows"
    objs = store["objects"]
    assert objs[bcd.BOOTMGR]["type"] == 0x10100002
    assert objs[LOADER]["type"] == 0x10200003
    assert objs[bcd.BOOTMGR]["elements"]["24000001"] == [LOADER]
    assert objs[bcd.BOOTMGR]["elements"]["25000004"] == 30
    assert objs[bcd.EMSSETTINGS]["elements"]["16000020"] is False
    assert bcd.parse_device(objs[LOADER]["elements"]["11000001"]) == spec.windows_partition
    assert bcd.parse_device(objs[bcd.BOOTMGR]["elements"]["11000001"]) == spec.system_partition
    # Raw shape with plain hivex: Elements\<id>\Element, typed as documented.
    h = hivex.Hivex(str(path))
    el = h.node_get_child(h.node_get_child(h.node_get_child(h.node_get_child(h.root(), "Objects"), bcd.BOOTMGR), "Elements"), "23000003")
    assert h.value_type(h.node_get_value(el, "Element"))[0] == 1
    assert h.value_string(h.node_get_value(el, "Element")) == LOADER


def test_device_blob_layout():
    blob = bcd.device_blob(bcd.PartitionRef("mbr", disk_signature=0x12345678, partition_offset=0x100000))
    assert len(blob) == 0x58
    assert blob[0x10:0x1C] == bytes.fromhex("06000000" "00000000" "48000000")
    assert blob[0x20:0x28] == (0x100000).to_bytes(8, "little")
    assert blob[0x34] == 1 and blob[0x38:0x3C] == bytes.fromhex("78563412")
    assert bcd.parse_device(b"\0" * 0x58) is None


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_read_bcd_rejects_non_hive(tmp_path):
    p = tmp_path / "BCD"
    p.write_bytes(b"not a hive" * 1000)
    with pytest.raises(RuntimeError):
        bcd.read_bcd(p)


@pytest.mark.skipif(not shutil.which("file"), reason="needs file(1)")
@pytest.mark.parametrize(
    "arch, subsystem, expect",
    [
        ("x86_64", 3, "PE32+ executable (console) x86-64"),
        ("i386", 3, "PE32 executable (console) Intel 80386"),
        ("x86_64", SUBSYSTEM_NATIVE, "PE32+ executable (native) x86-64"),
        ("x86_64", SUBSYSTEM_EFI_APPLICATION, "PE32+ executable (EFI application) x86-64"),
    ],
)
def test_pe_is_recognised_by_file(tmp_path, arch, subsystem, expect):
    # libguestfs inspection reads the Windows architecture from cmd.exe this way.
    p = tmp_path / "cmd.exe"
    data = make_pe(arch, subsystem=subsystem, description="phony")
    p.write_bytes(data)
    out = subprocess.run(["file", "-b", str(p)], capture_output=True, text=True, check=True).stdout
    assert out.startswith(expect)
    assert pe_machine(data) == arch


def test_pe_rejects_unknown_arch():
    with pytest.raises(ValueError):
        make_pe("sparc")
    assert pe_machine(b"MZ" + b"\0" * 100) is None


def test_template_macros_render_standard_reg_text():
    text = expand_template(
        'Windows Registry Editor Version 5.00\n[HKLM\\S\\${CCS}]\n"A"=<<multi_sz:a|b>>\n"E"=<<expand_sz:%X%\\y>>\n"Q"=<<qword:5>>\n',
        {"CCS": "ControlSet002"},
    )
    assert "${" not in text and "<<" not in text
    (sec,) = parse_reg(join_reg([text]))
    vals = {op.name: op.value.decode() for op in sec.values}
    assert sec.path.endswith("ControlSet002")
    assert vals == {"A": ["a", "b"], "E": "%X%\\y", "Q": 5}
    with pytest.raises(KeyError):
        expand_template("${missing}", {})
