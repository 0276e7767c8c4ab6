"""Property tests (hypothesis) for h2k.plan.build_plan over generated WindowsFacts."""

from __future__ import annotations

import functools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from h2k import driverpack, plan as planmod
from h2k.changes import REG_DWORD, FileCopy, FileWrite, RegDeleteKey, RegValue
from h2k.facts import NicConfig, ServiceInfo
from lab.testbed import virtio_win

from test_plan_facts import facts

SCSI = "{4D36E97B-E325-11CE-BFC1-08002BE10318}"
DISK = "{4D36E967-E325-11CE-BFC1-08002BE10318}"

# (product, edition, major, minor, build, server, arches available in the fake pack)
RELEASES = [
    ("Windows 7 Professional", "Professional", 6, 1, 7601, False, ["x86_64", "i386"]),
    ("Windows Server 2008 R2 Standard", "ServerStandard", 6, 1, 7601, True, ["x86_64"]),
    ("Windows Server (R) 2008 Standard", "ServerStandard", 6, 0, 6002, True, ["x86_64", "i386"]),
    ("Windows 8.1 Pro", "Professional", 6, 3, 9600, False, ["x86_64", "i386"]),
    ("Windows Server 2012 R2 Standard", "ServerStandard", 6, 3, 9600, True, ["x86_64"]),
    ("Windows Server 2016 Standard", "ServerStandard", 10, 0, 14393, True, ["x86_64"]),
    ("Windows Server 2019 Datacenter", "ServerDatacenter", 10, 0, 17763, True, ["x86_64"]),
    ("Windows Server 2022 Standard", "ServerStandard", 10, 0, 20348, True, ["x86_64"]),
    ("Windows Server 2025 Standard", "ServerStandard", 10, 0, 26100, True, ["x86_64"]),
    ("Windows 10 Pro", "Professional", 10, 0, 19045, False, ["x86_64", "i386", "aarch64"]),
    ("Windows 10 Pro", "Professional", 10, 0, 22631, False, ["x86_64", "aarch64"]),
]


@functools.lru_cache(maxsize=1)
def pack():
    return driverpack.open_pack(virtio_win.build_tree())


ipv4 = st.tuples(*[st.integers(1, 254)] * 4).map(lambda t: ".".join(map(str, t)))
nic = st.builds(lambda guid, dhcp, addrs, gw, dns: NicConfig(f"{{{guid}}}", dhcp, addrs, ["255.255.255.0"] * len(addrs), gw, dns),
                st.uuids().map(lambda u: str(u).upper()), st.booleans(),
                st.lists(ipv4, min_size=0, max_size=2), st.lists(ipv4, max_size=1), st.lists(ipv4, max_size=2))


@st.composite
def windows_facts(draw):
    product, edition, major, minor, build, server, arches = draw(st.sampled_from(RELEASES))
    override = draw(st.booleans())
    return facts(
        product_name=product, edition=edition, major=major, minor=minor, build=build, is_server=server,
        arch=draw(st.sampled_from(arches)),
        current_control_set=draw(st.integers(1, 3)),
        has_driver_database=draw(st.booleans()),
        storage_drivers=[ServiceInfo("viostor", start=3, has_start_override=override),
                         ServiceInfo("vioscsi", start=3, has_start_override=not override)],
        nics=draw(st.lists(nic, max_size=3)),
        drive_mappings={draw(st.sampled_from(["C:", "D:"])): "/dev/sda2"},
    )


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(windows_facts(), st.sampled_from(["virtio-blk", "virtio-scsi", "both"]))
def test_plans_are_deterministic(f, bus):
    a = planmod.build_plan(f, pack(), bus)
    b = planmod.build_plan(f, pack(), bus)
    assert a == b
    assert planmod.plan_to_dict(a) == planmod.plan_to_dict(b)


@SETTINGS
@given(windows_facts(), st.sampled_from(["virtio-blk", "virtio-scsi", "both"]))
def test_registry_keys_resolve_under_the_right_hive(f, bus):
    p = planmod.build_plan(f, pack(), bus)
    for c in p.changes:
        if isinstance(c, (RegValue, RegDeleteKey)):
            assert c.hive == "SYSTEM"
            first = c.key.split("\\", 1)[0]
            assert first in ("{CCS}", "DriverDatabase", "Setup"), c.key
            # never a hard-coded or virtual control set, never a hive prefix
            assert "ControlSet0" not in c.key and "CurrentControlSet" not in c.key
            assert not c.key.upper().startswith(("HKLM", "HKEY_", "SYSTEM\\")) and "\\\\" not in c.key
            assert c.why


@SETTINGS
@given(windows_facts(), st.sampled_from(["virtio-blk", "virtio-scsi", "both"]))
def test_binding_follows_driver_database_and_uses_scsiadapter(f, bus):
    p = planmod.build_plan(f, pack(), bus)
    regs = [c for c in p.changes if isinstance(c, RegValue)]
    cdd = [c for c in regs if "\\CriticalDeviceDatabase\\" in c.key]
    ddb = [c for c in regs if c.key.startswith("DriverDatabase\\")]
    assert cdd, "CriticalDeviceDatabase is always written (harmless on Windows 8+)"
    assert bool(ddb) == f.has_driver_database
    assert {c.data for c in cdd if c.name == "ClassGUID"} == {SCSI}
    assert all(c.data != DISK for c in regs)
    services = {c.data for c in cdd if c.name == "Service"}
    assert services == set(planmod.BUS_DRIVERS[bus])
    for drv in planmod.BUS_DRIVERS[bus]:
        legacy, modern = planmod.STORAGE_DEVICE_IDS[drv]
        for dev in (legacy, modern):
            assert any(c.key.endswith(f"pci#ven_1af4&dev_{dev}") for c in cdd)  # without SUBSYS
            assert any(f"pci#ven_1af4&dev_{dev}&subsys_" in c.key for c in cdd)  # with SUBSYS


@SETTINGS
@given(windows_facts(), st.sampled_from(["virtio-blk", "virtio-scsi", "both"]))
def test_storage_service_is_boot_start_and_files_exist(f, bus):
    p = planmod.build_plan(f, pack(), bus)
    by = {(c.key, c.name): c for c in p.changes if isinstance(c, RegValue)}
    for drv in planmod.BUS_DRIVERS[bus]:
        key = f"{{CCS}}\\Services\\{drv}"
        assert (by[(key, "Start")].type, by[(key, "Start")].data) == (REG_DWORD, 0)
        assert by[(key, "Type")].data == 1 and by[(key, "Group")].data == "SCSI miniport"
        sys_copy = [c for c in p.changes if isinstance(c, FileCopy) and c.dest == f"/Windows/System32/drivers/{drv}.sys"]
        assert len(sys_copy) == 1
        first = open(sys_copy[0].source, "rb").read().split(b"\n", 1)[0].decode()
        assert first.startswith(f"H2K-FAKE-DRIVER {drv} {p.os_folder} {p.arch_folder} ")
    # StartOverride deleted exactly where inspection found one.
    deletes = {c.key for c in p.changes if isinstance(c, RegDeleteKey)}
    expected = {f"{{CCS}}\\Services\\{s.name}\\StartOverride" for s in f.storage_drivers
                if s.has_start_override and s.name in planmod.BUS_DRIVERS[bus]}
    assert deletes == expected
    letter = next(iter(f.drive_mappings))
    for c in p.changes:
        if isinstance(c, (FileCopy, FileWrite)):
            assert c.dest.startswith("/Windows/")
        if isinstance(c, FileWrite) and c.dest.endswith((".cmd", ".ps1")):
            c.content.decode("ascii")
            assert b"\n" not in c.content.replace(b"\r\n", b"")
            if c.dest.endswith(".cmd"):  # every script names the staging folder on the system drive
                assert f"{letter}\\Windows\\Drivers\\h2k-staging" in c.content.decode()
    static = [n for n in f.nics if not n.dhcp and n.addresses]
    assert any(c.dest.endswith("h2k-network.ps1") for c in p.changes if isinstance(c, FileWrite)) == bool(static)
