"""Pure parsing the inspector relies on: partition tables from raw sectors, boot sectors, PE headers, metadata."""

from __future__ import annotations

import json
import struct
import uuid

from h2k import inspect as insp
from lab.testbed import pe


def mbr(sig: int, slots: list[tuple[bool, int, int]]) -> bytes:
    sector = bytearray(512)
    struct.pack_into("<I", sector, 440, sig)
    for i, (active, ptype, lba) in enumerate(slots):
        struct.pack_into("<B3xB3xII", sector, 446 + 16 * i, 0x80 if active else 0, ptype, lba, 2048)
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def test_mbr_table() -> None:
    table, disk_id, entries = insp.parse_table(mbr(0x5A3C9E11, [(True, 7, 2048), (False, 7, 1050624)]), b"")
    assert (table, disk_id) == ("msdos", "5a3c9e11")
    assert entries == [
        {"number": 1, "start": 2048 * 512, "mbr_id": 7, "bootable": True},
        {"number": 2, "start": 1050624 * 512, "mbr_id": 7, "bootable": False},
    ]


def test_gpt_table() -> None:
    disk, esp_part = uuid.uuid4(), uuid.uuid4()
    header = bytearray(512)
    header[:8] = b"EFI PART"
    header[56:72] = disk.bytes_le
    struct.pack_into("<QII", header, 72, 2, 128, 128)
    entries = bytearray(128 * 128)
    entries[0:16] = uuid.UUID(insp.ESP_GUID).bytes_le
    entries[16:32] = esp_part.bytes_le
    struct.pack_into("<Q", entries, 32, 2048)
    table, disk_id, parts = insp.parse_table(mbr(0, [(False, 0xEE, 1)]), bytes(header) + bytes(entries))
    assert (table, disk_id) == ("gpt", str(disk).upper())
    assert parts == [{"number": 1, "start": 2048 * 512, "gpt_type": insp.ESP_GUID, "part_guid": str(esp_part).upper()}]


def test_no_table() -> None:
    assert insp.parse_table(b"\0" * 512, b"") == ("none", "", [])


def test_boot_sectors() -> None:
    assert insp.boot_sector_fs(b"\xebR\x90NTFS    " + b"\0" * 500) == ("ntfs", False)
    assert insp.boot_sector_fs(b"\xebX\x90-FVE-FS-" + b"\0" * 500) == (None, True)
    fat = bytearray(512)
    fat[82:87] = b"FAT32"
    assert insp.boot_sector_fs(bytes(fat)) == ("vfat", False)


def test_pe_arch() -> None:
    assert insp._pe_arch(pe.make_pe("x86_64")) == "x86_64"
    assert insp._pe_arch(pe.make_pe("i386")) == "i386"
    assert insp._pe_arch(b"not a PE" * 100) is None


def test_metadata(tmp_path) -> None:
    vmx = tmp_path / "w.vmx"
    vmx.write_text('displayName = "w"\nfirmware = "efi"\n')
    assert insp.load_metadata(vmx) == {"firmware": "uefi"}
    js = tmp_path / "m.json"
    js.write_text(json.dumps({"generation": 2}))
    assert insp.load_metadata(js)["firmware"] == "uefi"
    assert insp.firmware_of(insp.Layout(), "/dev/sda", {"firmware": "bios"}) == ("bios", "metadata")
