"""Verify rules on real hive files: the real planner's changes applied by the hive writer, then doctored.

No libguestfs here (the integration tests run verify on real disks): these show
each rule catches what it must -- wrong ClassGUID, binding in the wrong control
set, missing .sys, StartOverride -- in a second.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from h2k import registry
from h2k.changes import REG_BINARY, REG_SZ, FileCopy, RegDeleteKey, RegValue
from h2k.driverpack import open_pack
from h2k.facts import WindowsFacts
from h2k.plan import build_plan
from h2k.verify import DISK_DRIVE_GUID, verify_hives
from lab.testbed import virtio_win
from lab.testbed.hive import make_hive


def system_reg(current: int, driver_database: bool) -> str:
    text = f"""Windows Registry Editor Version 5.00

[HKEY_LOCAL_MACHINE\\SYSTEM\\Select]
"Current"=dword:{current:08x}
"Default"=dword:{current:08x}

[HKEY_LOCAL_MACHINE\\SYSTEM\\ControlSet001\\Services\\pvscsi]
"Start"=dword:00000000

[HKEY_LOCAL_MACHINE\\SYSTEM\\ControlSet002\\Services\\pvscsi]
"Start"=dword:00000000
"""
    if driver_database:
        text += "\n[HKEY_LOCAL_MACHINE\\SYSTEM\\DriverDatabase\\DriverInfFiles]\n"
    return text


def facts_for(build: int, driver_database: bool) -> WindowsFacts:
    return WindowsFacts(
        root="/dev/sda2", product_name="Windows Server 2019 Standard" if build == 17763 else "Windows 7 Professional",
        edition="ServerStandard" if build == 17763 else "Professional", major=10 if build == 17763 else 6,
        minor=0 if build == 17763 else 1, build=build, arch="x86_64", system_root="/Windows",
        current_control_set=2, firmware="bios", firmware_source="partition-table", bcd_device="/dev/sda1",
        bcd_path="/Boot/BCD", drive_mappings={"C": "/dev/sda2"}, has_driver_database=driver_database,
        is_server=build == 17763,
    )


@pytest.fixture(scope="module")
def pack():
    return open_pack(virtio_win.build_tree())


def fixed_hive(tmp_path: Path, pack, *, build: int, drvdb: bool, bus: str, current: int = 2,
               apply_with_current: int | None = None) -> tuple[Path, set[str]]:
    """A SYSTEM hive with the plan applied; optionally applied while Select\\Current pointed elsewhere."""
    hive = make_hive(tmp_path / "SYSTEM", system_reg(apply_with_current or current, drvdb), r"HKEY_LOCAL_MACHINE\SYSTEM")
    plan = build_plan(facts_for(build, drvdb), pack, bus)
    registry.apply_changes(hive, "SYSTEM", plan.changes)
    if apply_with_current is not None:
        registry.apply_changes(hive, "SYSTEM", [RegValue("SYSTEM", "Select", "Current", 4, current)])
    files = {c.dest.lower() for c in plan.changes if isinstance(c, FileCopy)}
    return hive, files


def run(hive: Path, files: set[str], bus: str):
    _, results = verify_hives(hive, bus, lambda p: p.lower() in files, check_bcd_store=False)
    return {(r.rule, r.subject): r for r in results}


@pytest.mark.parametrize("build,drvdb", [(7601, False), (17763, True)])
@pytest.mark.parametrize("bus,drv", [("virtio-blk", "viostor"), ("virtio-scsi", "vioscsi")])
def test_planned_hive_passes(tmp_path, pack, build, drvdb, bus, drv) -> None:
    hive, files = fixed_hive(tmp_path, pack, build=build, drvdb=drvdb, bus=bus)
    res = run(hive, files, bus)
    assert all(r.passed for r in res.values()), [r.line() for r in res.values() if not r.passed]
    assert ("binding-drvdb", drv) in res if drvdb else ("binding-drvdb", drv) not in res


def test_unfixed_hive_fails(tmp_path) -> None:
    hive = make_hive(tmp_path / "SYSTEM", system_reg(2, False), r"HKEY_LOCAL_MACHINE\SYSTEM")
    res = run(hive, set(), "virtio-blk")
    assert not res[("service", "viostor")].passed
    assert not res[("binding-cddb", "viostor")].passed


def test_wrong_class_guid_in_cddb_fails(tmp_path, pack) -> None:
    hive, files = fixed_hive(tmp_path, pack, build=7601, drvdb=False, bus="virtio-blk")
    key = r"{CCS}\Control\CriticalDeviceDatabase\pci#ven_1af4&dev_1001&subsys_00021af4&rev_00"
    registry.apply_changes(hive, "SYSTEM", [RegValue("SYSTEM", key, "ClassGUID", REG_SZ, DISK_DRIVE_GUID)])
    r = run(hive, files, "virtio-blk")[("binding-cddb", "viostor")]
    assert not r.passed and "DiskDrive" in r.reason


def test_wrong_class_guid_in_driver_database_fails(tmp_path, pack) -> None:
    hive, files = fixed_hive(tmp_path, pack, build=17763, drvdb=True, bus="virtio-scsi")
    h = registry.hivex.Hivex(str(hive))
    pkgs = h.node_children(registry.find_key(h, r"DriverDatabase\DriverPackages"))
    pkg = h.node_name(pkgs[0])
    version = bytearray(registry.read_value(hive, rf"DriverDatabase\DriverPackages\{pkg}", "Version")[1])
    version[8:24] = uuid.UUID(DISK_DRIVE_GUID.strip("{}")).bytes_le
    registry.apply_changes(hive, "SYSTEM", [RegValue("SYSTEM", rf"DriverDatabase\DriverPackages\{pkg}", "Version", REG_BINARY, bytes(version))])
    r = run(hive, files, "virtio-scsi")[("binding-drvdb", "vioscsi")]
    assert not r.passed and "DiskDrive" in r.reason


def test_binding_in_the_wrong_control_set_fails(tmp_path, pack) -> None:
    # Written into ControlSet001 while the live set is ControlSet002 (the classic "assumed 001" bug).
    hive, files = fixed_hive(tmp_path, pack, build=7601, drvdb=False, bus="virtio-blk", current=2, apply_with_current=1)
    res = run(hive, files, "virtio-blk")
    assert not res[("service", "viostor")].passed and "ControlSet001" in res[("service", "viostor")].reason
    assert not res[("binding-cddb", "viostor")].passed
    assert "ControlSet001" in res[("binding-cddb", "viostor")].reason


def test_missing_sys_fails(tmp_path, pack) -> None:
    hive, files = fixed_hive(tmp_path, pack, build=17763, drvdb=True, bus="virtio-blk")
    files = {f for f in files if not f.endswith("/system32/drivers/viostor.sys")}
    r = run(hive, files, "virtio-blk")[("sys-present", "viostor")]
    assert not r.passed and "MISSING" in r.reason


def test_start_override_fails(tmp_path, pack) -> None:
    hive, files = fixed_hive(tmp_path, pack, build=17763, drvdb=True, bus="virtio-blk")
    registry.apply_changes(hive, "SYSTEM", [RegValue("SYSTEM", r"{CCS}\Services\viostor\StartOverride", "0", 4, 3)])
    assert not run(hive, files, "virtio-blk")[("no-start-override", "viostor")].passed
    registry.apply_changes(hive, "SYSTEM", [RegDeleteKey("SYSTEM", r"{CCS}\Services\viostor\StartOverride")])
    assert run(hive, files, "virtio-blk")[("no-start-override", "viostor")].passed


def test_demand_start_fails(tmp_path, pack) -> None:
    hive, files = fixed_hive(tmp_path, pack, build=7601, drvdb=False, bus="virtio-scsi")
    registry.apply_changes(hive, "SYSTEM", [RegValue("SYSTEM", r"{CCS}\Services\vioscsi", "Start", 4, 3)])
    r = run(hive, files, "virtio-scsi")[("service", "vioscsi")]
    assert not r.passed and "Start=3" in r.reason


@pytest.mark.parametrize("state,passed,words", [
    ("same", True, "is a copy of \\EFI\\Microsoft\\Boot\\bootmgfw.efi"),
    ("missing", False, "is missing"),
    ("differs", False, "is not Windows' boot manager"),
    ("no-bootmgfw", False, "bootmgfw.efi is not on the ESP"),
    (None, False, "no ESP"),
])
def test_uefi_fallback_rule(state, passed, words):
    from h2k.verify import check_uefi_fallback

    r = check_uefi_fallback("uefi", state, "/EFI/BOOT/BOOTX64.EFI")
    assert (r.rule, r.passed) == ("uefi-fallback", passed) and words in r.reason
    assert r.reason.startswith("\\EFI\\BOOT\\BOOTX64.EFI") or state is None
    assert check_uefi_fallback("bios", state, None) is None  # BIOS boots the MBR, not a removable-media path
