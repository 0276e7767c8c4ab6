"""A plan's registry changes applied to a real SYSTEM hive with hivex (h2k.registry), no appliance needed."""

from __future__ import annotations

import struct

import hivex
import pytest

from h2k import driverpack, plan as planmod, registry
from h2k.changes import RegValue
from h2k.facts import ServiceInfo
from lab.testbed import virtio_win
from lab.testbed.hive import make_hive

from test_plan_facts import win2022, win7

SYSTEM_REG = r"""Windows Registry Editor Version 5.00

[HKEY_LOCAL_MACHINE\SYSTEM\Select]
"Current"=dword:00000002
"Default"=dword:00000002
"LastKnownGood"=dword:00000001

[HKEY_LOCAL_MACHINE\SYSTEM\ControlSet001\Services\viostor\StartOverride]
"0"=dword:00000003

[HKEY_LOCAL_MACHINE\SYSTEM\ControlSet002\Services\viostor]
"Start"=dword:00000003

[HKEY_LOCAL_MACHINE\SYSTEM\ControlSet002\Services\viostor\StartOverride]
"0"=dword:00000003

[HKEY_LOCAL_MACHINE\SYSTEM\ControlSet002\Control\CrashControl]
"AutoReboot"=dword:00000001

[HKEY_LOCAL_MACHINE\SYSTEM\Setup]
"SetupType"=dword:00000000
"CmdLine"=""
"""


@pytest.fixture(scope="module")
def pack():
    return driverpack.open_pack(virtio_win.build_tree())


def _get(h, path, name):
    node = h.root()
    for part in path.split("\\"):
        node = h.node_get_child(node, part)
        if node is None:
            return None
    for v in h.node_values(node):
        if h.value_key(v).lower() == name.lower():
            return h.value_value(v)
    return None


def _has(h, path):
    node = h.root()
    for part in path.split("\\"):
        node = h.node_get_child(node, part)
        if node is None:
            return False
    return True


def _reg_text(with_ddb: bool) -> str:
    return SYSTEM_REG + ("\n[HKEY_LOCAL_MACHINE\\SYSTEM\\DriverDatabase]\n\"Architecture\"=dword:00000009\n"
                         if with_ddb else "")


def test_plan_applies_to_current_control_set(tmp_path, pack):
    hive = make_hive(tmp_path / "SYSTEM", _reg_text(True), "HKEY_LOCAL_MACHINE\\SYSTEM", "SYSTEM")
    facts = win2022(storage_drivers=[ServiceInfo("viostor", start=3, has_start_override=True)])
    plan = planmod.build_plan(facts, pack, "virtio-blk")
    result = registry.apply_changes(hive, "SYSTEM", plan.changes)
    assert result.control_set == 2 and result.changed
    h = hivex.Hivex(str(hive))
    svc = "ControlSet002\\Services\\viostor"
    assert _get(h, svc, "Start") == (4, struct.pack("<I", 0))
    assert _get(h, svc, "Type") == (4, struct.pack("<I", 1))
    assert _get(h, svc, "ImagePath") == (2, "system32\\drivers\\viostor.sys\0".encode("utf-16-le"))
    assert _get(h, svc, "Group") == (1, "SCSI miniport\0".encode("utf-16-le"))
    assert not _has(h, svc + "\\StartOverride")
    assert _has(h, "ControlSet001\\Services\\viostor\\StartOverride")  # the stale set is left alone
    assert not _has(h, "ControlSet001\\Control\\CriticalDeviceDatabase")
    cdd = "ControlSet002\\Control\\CriticalDeviceDatabase\\pci#ven_1af4&dev_1042&subsys_11001af4&rev_01"
    assert _get(h, cdd, "ClassGUID") == (1, "{4D36E97B-E325-11CE-BFC1-08002BE10318}\0".encode("utf-16-le"))
    assert _get(h, "ControlSet002\\Control\\CrashControl", "AutoReboot") == (4, struct.pack("<I", 0))
    assert _get(h, "DriverDatabase\\DeviceIds\\PCI\\VEN_1AF4&DEV_1001&SUBSYS_00021AF4&REV_00", "viostor.inf") == \
        (3, bytes.fromhex("01ff0000"))
    pkg = planmod.package_name(pack.find("viostor", "2k22", "amd64"))
    default = _get(h, f"DriverDatabase\\DriverInfFiles\\viostor.inf", "")
    assert default == (7, (pkg + "\0\0").encode("utf-16-le"))
    assert _get(h, "Setup", "SetupType") == (4, struct.pack("<I", 2))
    # A second application changes nothing, and leaves every byte as it is.
    before = hive.read_bytes()
    again = registry.apply_changes(hive, "SYSTEM", plan.changes)
    assert not again.changed and hive.read_bytes() == before


def test_win7_plan_on_hive_without_driver_database(tmp_path, pack):
    hive = make_hive(tmp_path / "SYSTEM", _reg_text(False), "HKEY_LOCAL_MACHINE\\SYSTEM", "SYSTEM")
    snap = registry.snapshot(hive)
    plan = planmod.build_plan(win7(current_control_set=2), pack, "virtio-blk")
    result = registry.apply_changes(hive, "SYSTEM", plan.changes)
    h = hivex.Hivex(str(hive))
    assert not _has(h, "DriverDatabase")
    assert _get(h, "ControlSet002\\Control\\CriticalDeviceDatabase\\pci#ven_1af4&dev_1001", "Service") == \
        (1, "viostor\0".encode("utf-16-le"))
    # Only planned keys changed: every key that differs from the snapshot is one the plan names.
    after = registry.snapshot(hive)
    planned = {registry.resolve_key(c.key, 2).lower() for c in plan.changes if isinstance(c, RegValue)}
    changed = {k for k in after if after[k] != snap.get(k)}
    assert changed and all(any(p == k.lower() or p.startswith(k.lower() + "\\") for p in planned) for k in changed)
    # Undo restores the previous content.
    registry.undo_changes(hive, result.changes)
    restored = registry.snapshot(hive)
    assert {k: v for k, v in restored.items() if v} == {k: v for k, v in snap.items() if v}
