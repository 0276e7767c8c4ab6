"""Engine-side BCD: read a real BCD hive (the test bed's writer), check it, repair, EMS -- via the hive writer."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from h2k import bcd, registry
from h2k.changes import REG_SZ, RegValue
from lab.testbed import bcd as tbcd

LOADER = "{11111111-2222-3333-4444-555555555555}"
SYS = tbcd.PartitionRef("gpt", disk_guid="{aaaaaaaa-0000-0000-0000-000000000001}", partition_guid="{bbbbbbbb-0000-0000-0000-000000000001}")
WIN = tbcd.PartitionRef("gpt", disk_guid="{aaaaaaaa-0000-0000-0000-000000000001}", partition_guid="{bbbbbbbb-0000-0000-0000-000000000003}")
WINLOAD = "\\Windows\\system32\\winload.efi"


@pytest.fixture
def store_file(tmp_path: Path) -> Path:
    return tbcd.make_bcd(tmp_path / "BCD", tbcd.BcdSpec("uefi", LOADER, SYS, WIN))


def exists(path: str) -> bool:
    return path.lower() == WINLOAD.lower()


def on_disk(ref: bcd.PartitionRef) -> bool:
    return ref.partition_guid.lower() in (SYS.partition_guid, WIN.partition_guid)


def test_device_parsing_agrees_with_the_test_bed_writer() -> None:
    for ref in (WIN, tbcd.PartitionRef("mbr", disk_signature=0x1234ABCD, partition_offset=0x100000)):
        mine = bcd.parse_device(tbcd.device_blob(ref))
        assert mine is not None and mine.style == ref.style
        if ref.style == "mbr":
            assert (mine.disk_signature, mine.partition_offset) == (ref.disk_signature, ref.partition_offset)
        else:
            assert (mine.disk_guid, mine.partition_guid) == (ref.disk_guid, ref.partition_guid)


def test_good_store_checks_ok(store_file: Path) -> None:
    check = bcd.check_store(bcd.read_store(store_file), exists, on_disk)
    assert check.ok, check.problems
    assert check.default_loader == LOADER and check.loader_path == WINLOAD and not check.ems_enabled


def test_device_on_another_disk_is_a_problem(store_file: Path) -> None:
    check = bcd.check_store(bcd.read_store(store_file), exists, lambda ref: False)
    assert not check.ok and "not on this disk" in check.problems[0]


def test_dangling_default_is_repaired_to_the_only_loader(store_file: Path) -> None:
    key = f"Objects\\{bcd.BOOTMGR}\\Elements\\{bcd.EL_DEFAULT}"
    registry.apply_changes(store_file, "BCD", [RegValue("BCD", key, "Element", REG_SZ, "{deadbeef-0000-0000-0000-000000000000}")])
    store = bcd.read_store(store_file)
    check = bcd.check_store(store, exists, on_disk)
    assert not check.ok and "does not exist" in check.problems[0]
    changes, left = bcd.repair_changes(store, check, "uefi", exists)
    assert [c.data for c in changes] == [LOADER] and not left
    registry.apply_changes(store_file, "BCD", changes)
    assert bcd.check_store(bcd.read_store(store_file), exists, on_disk).ok


def test_missing_path_is_repaired_only_if_winload_exists(store_file: Path) -> None:
    key = f"Objects\\{LOADER}\\Elements\\{bcd.EL_PATH}"
    registry.apply_changes(store_file, "BCD", [RegValue("BCD", key, "Element", REG_SZ, "\\Windows\\system32\\nope.efi")])
    store = bcd.read_store(store_file)
    check = bcd.check_store(store, exists, on_disk)
    assert not check.ok
    changes, _ = bcd.repair_changes(store, check, "uefi", exists)
    assert [c.data for c in changes] == [WINLOAD]
    none, left = bcd.repair_changes(store, check, "uefi", lambda p: False)
    assert none == [] and "left alone" in left[0]


def test_ems_on_com1_with_the_right_element_types(store_file: Path) -> None:
    store = bcd.read_store(store_file)
    res = registry.apply_changes(store_file, "BCD", bcd.ems_changes(store, LOADER))
    assert res.changed
    data = tbcd.read_bcd(store_file)
    assert data["objects"][bcd.BOOTMGR]["elements"][bcd.EL_EMS_ENABLED] is True
    assert data["objects"][LOADER.lower()]["elements"][bcd.EL_LOADER_EMS] is True
    ems = data["objects"][bcd.EMSSETTINGS]["elements"]
    assert ems[bcd.EL_EMS_PORT] == 1 and ems[bcd.EL_EMS_BAUD] == 115200
    # raw shapes: booleans 1 byte, integers 8 bytes little-endian, all REG_BINARY
    assert registry.read_value(store_file, f"Objects\\{bcd.BOOTMGR}\\Elements\\16000020", "Element") == (3, b"\x01")
    assert registry.read_value(store_file, f"Objects\\{bcd.EMSSETTINGS}\\Elements\\15000023", "Element") == (
        3, struct.pack("<Q", 115200))
    assert bcd.check_store(bcd.read_store(store_file), exists, on_disk).ems_enabled
    # idempotent
    assert not registry.apply_changes(store_file, "BCD", bcd.ems_changes(bcd.read_store(store_file), LOADER)).changed
