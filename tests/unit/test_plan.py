"""h2k.plan.build_plan on hand-made facts for the test-bed variants, against the fake virtio-win pack."""

from __future__ import annotations

import json

import pytest

from h2k import driverpack, plan as planmod
from h2k.changes import REG_BINARY, REG_DWORD, REG_EXPAND_SZ, REG_SZ, FileCopy, FileWrite, RegDeleteKey, RegValue
from h2k.errors import BlockerError, InputError
from h2k.facts import ServiceInfo
from lab.testbed import virtio_win

from test_plan_facts import hibernated, win7, win11, win2019, win2022

SCSI = "{4D36E97B-E325-11CE-BFC1-08002BE10318}"
DISK = "{4D36E967-E325-11CE-BFC1-08002BE10318}"


@pytest.fixture(scope="module")
def pack():
    return driverpack.open_pack(virtio_win.build_tree())


def regs(p, key_part=""):
    return {(c.key, c.name): c for c in p.changes if isinstance(c, RegValue) and key_part in c.key}


def copies(p):
    return {c.dest: c for c in p.changes if isinstance(c, FileCopy)}


def writes(p):
    return {c.dest: c for c in p.changes if isinstance(c, FileWrite)}


def head(path) -> str:
    return open(path, "rb").read().split(b"\n", 1)[0].decode()


def test_win2019_virtio_blk(pack):
    p = planmod.build_plan(win2019(), pack, "virtio-blk")
    assert (p.target_bus, p.os_folder, p.arch_folder) == ("virtio-blk", "2k19", "amd64")
    assert p.drivers[:2] == ["viostor", "NetKVM"] and "vioscsi" not in p.drivers
    sys_copy = copies(p)["/Windows/System32/drivers/viostor.sys"]
    assert head(sys_copy.source) == f"H2K-FAKE-DRIVER viostor 2k19 amd64 {virtio_win.DEFAULT_VERSION}"
    r = regs(p)
    svc = "{CCS}\\Services\\viostor"
    assert (r[(svc, "Type")].type, r[(svc, "Type")].data) == (REG_DWORD, 1)
    assert r[(svc, "Start")].data == 0 and r[(svc, "ErrorControl")].data == 1
    assert (r[(svc, "Group")].type, r[(svc, "Group")].data) == (REG_SZ, "SCSI miniport")
    assert (r[(svc, "ImagePath")].type, r[(svc, "ImagePath")].data) == (REG_EXPAND_SZ, "system32\\drivers\\viostor.sys")
    assert r[(svc + "\\Parameters\\PnpInterface", "5")].data == 1
    # DriverDatabase (key present on 2019) with a pnputil-shaped package name ...
    inf_key = "DriverDatabase\\DriverInfFiles\\viostor.inf"
    pkg = r[(inf_key, "Active")].data
    assert pkg.startswith("viostor.inf_amd64_") and len(pkg.rsplit("_", 1)[1]) == 16
    int(pkg.rsplit("_", 1)[1], 16)
    assert r[(inf_key, "")].data == [pkg]
    for hwid, rank in [("PCI\\VEN_1AF4&DEV_1001&SUBSYS_00021AF4&REV_00", "01ff0000"),
                       ("PCI\\VEN_1AF4&DEV_1042&SUBSYS_11001AF4&REV_01", "01ff0000"),
                       ("PCI\\VEN_1AF4&DEV_1042", "02ff0000")]:
        v = r[("DriverDatabase\\DeviceIds\\" + hwid, "viostor.inf")]
        assert (v.type, v.data) == (REG_BINARY, rank)
    assert ("DriverDatabase\\DeviceIds\\PCI\\VEN_1AF4&DEV_1001&SUBSYS_00021AF4", "viostor.inf") not in r
    assert len([k for k in r if k[0].startswith("DriverDatabase\\DeviceIds")]) == 4
    cfg = f"DriverDatabase\\DriverPackages\\{pkg}\\Configurations\\scsi_inst"
    assert r[(cfg, "Service")].data == "viostor"
    desc = f"DriverDatabase\\DriverPackages\\{pkg}\\Descriptors\\PCI\\VEN_1AF4&DEV_1042&SUBSYS_11001AF4&REV_01"
    assert r[(desc, "Configuration")].data == "scsi_inst"
    version_blob = bytes.fromhex(r[(f"DriverDatabase\\DriverPackages\\{pkg}", "Version")].data)
    assert len(version_blob) == 48 and version_blob[8:24].hex() == "7be9364d25e3ce11bfc108002be10318"
    assert f"/Windows/System32/DriverStore/FileRepository/{pkg}/viostor.sys" in copies(p)
    # ... and CriticalDeviceDatabase too (harmless on 8+), with and without SUBSYS.
    for cdd in ("pci#ven_1af4&dev_1001&subsys_00021af4&rev_00", "pci#ven_1af4&dev_1001&subsys_00021af4",
                "pci#ven_1af4&dev_1001", "pci#ven_1af4&dev_1042&subsys_11001af4&rev_01", "pci#ven_1af4&dev_1042"):
        k = "{CCS}\\Control\\CriticalDeviceDatabase\\" + cdd
        assert r[(k, "Service")].data == "viostor" and r[(k, "ClassGUID")].data == SCSI
    assert r[("{CCS}\\Control\\CrashControl", "AutoReboot")].data == 0
    # No StartOverride delete unless inspection found one.
    assert not [c for c in p.changes if isinstance(c, RegDeleteKey)]
    # Every change says why.
    assert all(getattr(c, "why", "") for c in p.changes)


def test_win2022_current_2_virtio_scsi(pack):
    p = planmod.build_plan(win2022(), pack, "virtio-scsi")
    assert (p.os_folder, p.drivers[0]) == ("2k22", "vioscsi")
    assert head(copies(p)["/Windows/System32/drivers/vioscsi.sys"].source).startswith("H2K-FAKE-DRIVER vioscsi 2k22 amd64")
    r = regs(p)
    assert r[("{CCS}\\Services\\vioscsi", "Start")].data == 0
    assert r[("{CCS}\\Services\\vioscsi\\Parameters", "BusType")].data == 0xA  # SAS, from vioscsi.inf
    # The plan never names a control set: the fixer resolves {CCS} from Select\Current (= 2 here).
    for c in p.changes:
        if isinstance(c, (RegValue, RegDeleteKey)):
            assert "ControlSet0" not in c.key and "CurrentControlSet" not in c.key
    assert ("DriverDatabase\\DeviceIds\\PCI\\VEN_1AF4&DEV_1048&SUBSYS_11001AF4&REV_01", "vioscsi.inf") in r


def test_win11_from_build_not_product_name(pack):
    p = planmod.build_plan(win11(), pack, "virtio-blk")
    assert p.os_folder == "w11"
    assert head(copies(p)["/Windows/System32/drivers/viostor.sys"].source).startswith("H2K-FAKE-DRIVER viostor w11 amd64")
    script = writes(p)["/Windows/Drivers/h2k-staging/steps/drivers.cmd"].content.decode("ascii")
    assert "pnputil.exe\" /add-driver" in script and "/subdirs /install" in script


def test_win7_critical_device_database_only(pack):
    p = planmod.build_plan(win7(), pack, "virtio-blk")
    assert p.os_folder == "w7"
    keys = [c.key for c in p.changes if isinstance(c, RegValue)]
    assert not [k for k in keys if k.startswith("DriverDatabase")]
    cdd = {(c.key, c.name): c.data for c in p.changes if isinstance(c, RegValue) and "CriticalDeviceDatabase" in c.key}
    assert len(cdd) == 12  # 6 IDs x (Service, ClassGUID)
    guids = {v for (k, n), v in cdd.items() if n == "ClassGUID"}
    assert guids == {SCSI} and DISK not in guids
    script = writes(p)["/Windows/Drivers/h2k-staging/steps/drivers.cmd"].content.decode("ascii")
    assert "pnputil.exe\" -i -a" in script and "pnputil.exe\" /add-driver" not in script


def test_win7_32bit(pack):
    p = planmod.build_plan(win7(arch="i386"), pack, "virtio-blk")
    assert (p.os_folder, p.arch_folder) == ("w7", "x86")
    assert "/Windows/Drivers/h2k-staging/guest-agent/qemu-ga-i386.msi" in copies(p)
    assert head(copies(p)["/Windows/System32/drivers/viostor.sys"].source).startswith("H2K-FAKE-DRIVER viostor w7 x86")


def test_both_buses(pack):
    p = planmod.build_plan(win2019(), pack, "both")
    assert p.target_bus == "virtio-blk+virtio-scsi" and p.drivers[:2] == ["viostor", "vioscsi"]
    c = copies(p)
    assert "/Windows/System32/drivers/viostor.sys" in c and "/Windows/System32/drivers/vioscsi.sys" in c


def test_start_override_deleted_when_found(pack):
    f = win2019(storage_drivers=[ServiceInfo("viostor", start=3, has_start_override=True)])
    p = planmod.build_plan(f, pack, "virtio-blk")
    deletes = [c for c in p.changes if isinstance(c, RegDeleteKey)]
    assert [(d.hive, d.key) for d in deletes] == [("SYSTEM", "{CCS}\\Services\\viostor\\StartOverride")]


def test_firstboot_scripts_ascii_crlf_and_network(pack):
    p = planmod.build_plan(win2019(), pack, "virtio-blk")
    w = writes(p)
    stage = "/Windows/Drivers/h2k-staging"
    scripts = [d for d in w if d.endswith((".cmd", ".ps1", ".txt"))]
    assert len(scripts) == 8  # bootstrap, runner, watchdog, network, steps.txt, three steps
    for dest in scripts:
        data = w[dest].content
        data.decode("ascii")
        assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b""), dest
    ps1 = w[f"{stage}/h2k-network.ps1"].content.decode()
    assert "address=192.168.50.10 mask=255.255.255.0 gateway=192.168.50.1" in ps1
    assert "address=192.168.50.3 index=2" in ps1
    agent = w[f"{stage}/steps/guest-agent.cmd"].content.decode()
    assert '/i "C:\\Windows\\Drivers\\h2k-staging\\guest-agent\\qemu-ga-x86_64.msi" /qn' in agent
    assert w[f"{stage}/steps.txt"].content.decode().split("\r\n")[1:4] == ["drivers 900", "guest-agent 600", "network 300"]
    assert "h2k-network.ps1" in w[f"{stage}/steps/network.cmd"].content.decode()
    xml = w[f"{stage}/h2k-firstboot.xml"].content
    assert xml.startswith(b"\xff\xfe") and "<BootTrigger>" in xml.decode("utf-16")
    assert "<UserId>S-1-5-18</UserId>" in xml.decode("utf-16")
    r = regs(p)
    assert r[("Setup", "SetupType")].data == 2
    assert r[("Setup", "CmdLine")].data == \
        'cmd.exe /c ""C:\\Windows\\Drivers\\h2k-staging\\h2k-bootstrap.cmd" cmdline SetupType=absent CmdLine=absent"'
    staged = [d for d in copies(p) if d.startswith("/Windows/Drivers/h2k-staging/")]
    for drv in ("viostor/viostor.inf", "NetKVM/netkvm.sys", "Balloon/balloon.inf", "vioserial/vioser.sys",
                "guest-agent/qemu-ga-x86_64.msi"):
        assert f"/Windows/Drivers/h2k-staging/{drv}" in staged
    assert not [d for d in staged if d.endswith(".pdb")]


def test_dhcp_only_has_no_network_script(pack):
    f = win2019(nics=[])
    p = planmod.build_plan(f, pack, "virtio-blk")
    assert [d for d in writes(p) if d.endswith(".ps1")] == ["/Windows/Drivers/h2k-staging/h2k-watchdog.ps1"]
    assert "/Windows/Drivers/h2k-staging/steps/network.cmd" not in writes(p)
    assert "network" not in writes(p)["/Windows/Drivers/h2k-staging/steps.txt"].content.decode()


def test_minimal_options(pack):
    opts = planmod.PlanOptions(firstboot=False, auto_reboot_off=False, binding="cdd")
    p = planmod.build_plan(win2019(), pack, "virtio-blk", opts)
    assert p.drivers == ["viostor"]
    assert not writes(p) and not [c for c in p.changes if isinstance(c, RegValue) and c.key.startswith(("Setup", "DriverDatabase"))]
    assert not [c for c in p.changes if isinstance(c, RegValue) and "CrashControl" in c.key]


def test_optional_driver_missing_is_a_note(pack):
    p = planmod.build_plan(win7(), pack, "virtio-blk")
    assert p.drivers == ["viostor", "NetKVM", "Balloon", "vioserial"]
    assert any("no pvpanic for w7/amd64" in n for n in p.notes)
    opts = planmod.PlanOptions(extras=("NetKVM", "viorng"))
    p = planmod.build_plan(win2019(product_name="Windows Server 2025 Standard", build=26100), pack, "virtio-blk", opts)
    assert p.os_folder == "2k25" and p.drivers == ["viostor", "NetKVM"]
    assert any("no viorng for 2k25/amd64" in n for n in p.notes)


def test_arm64_without_guest_agent(pack):
    p = planmod.build_plan(win11(arch="aarch64"), pack, "virtio-blk")
    assert p.arch_folder == "ARM64"
    assert any("no guest agent MSI for ARM64" in n for n in p.notes)
    assert "/Windows/Drivers/h2k-staging/steps/guest-agent.cmd" not in writes(p)


def test_errors(pack, tmp_path):
    with pytest.raises(InputError, match="unknown Windows Server build 25982"):
        planmod.build_plan(win2019(build=25982), pack, "virtio-blk")
    with pytest.raises(InputError, match="unknown target bus"):
        planmod.build_plan(win2019(), pack, "ide")
    with pytest.raises(BlockerError, match="hibernated"):
        planmod.build_plan(hibernated(), pack, "virtio-blk")
    # A pack that has vioscsi only cannot serve virtio-blk.
    tree = virtio_win.build_tree()
    m = tmp_path / "only-scsi.json"
    m.write_text(json.dumps({"drivers": {"vioscsi": {"2k19": {"amd64": str(tree / "vioscsi/2k19/amd64")}},
                                         "NetKVM": {"2k19": {"amd64": str(tree / "NetKVM/2k19/amd64")}}}}))
    small = driverpack.open_pack(m)
    with pytest.raises(InputError, match="has no viostor for 2k19/amd64"):
        planmod.build_plan(win2019(), small, "virtio-blk")
    assert planmod.build_plan(win2019(), small, "virtio-scsi").drivers == ["vioscsi", "NetKVM"]
    # NetKVM is required when staging: its absence is an error, not a note.
    m2 = tmp_path / "no-net.json"
    m2.write_text(json.dumps({"drivers": {"viostor": {"2k19": {"amd64": str(tree / "viostor/2k19/amd64")}}}}))
    with pytest.raises(InputError, match="no NetKVM"):
        planmod.build_plan(win2019(), driverpack.open_pack(m2), "virtio-blk")


def test_wrong_class_inf_is_refused(pack, tmp_path):
    import shutil

    tree = virtio_win.build_tree()
    d = tmp_path / "viostor"
    shutil.copytree(tree / "viostor/2k19/amd64", d)
    inf = d / "viostor.inf"
    inf.write_text(inf.read_text().replace("{4D36E97B-E325-11CE-BFC1-08002BE10318}", "{4D36E967-E325-11CE-BFC1-08002BE10318}"))
    m = tmp_path / "p.json"
    m.write_text(json.dumps({"base": str(tree), "drivers": {"viostor": {"2k19": {"amd64": str(d)}}}}))
    with pytest.raises(InputError, match="not SCSIAdapter"):
        planmod.build_plan(win2019(), driverpack.open_pack(m), "virtio-blk")


def test_json_round_trip_and_table(pack):
    p = planmod.build_plan(win2022(), pack, "both")
    d = planmod.plan_to_dict(p)
    text = json.dumps(d)
    back = planmod.plan_from_dict(json.loads(text))
    assert back == p
    table = planmod.format_table(p)
    assert "SYSTEM\\{CCS}\\Services\\vioscsi :: Start" in table and "DWORD 0" in table


def test_legacy_only_inf_binds_with_a_note(pack, tmp_path):
    import shutil

    tree = virtio_win.build_tree()
    d = tmp_path / "viostor-old"
    shutil.copytree(tree / "viostor/w7/amd64", d)
    inf = d / "viostor.inf"
    lines = [l for l in inf.read_text().splitlines(keepends=True) if "DEV_1042" not in l]
    inf.write_text("".join(lines))
    m = tmp_path / "p.json"
    m.write_text(json.dumps({"base": str(tree), "drivers": {"viostor": {"w7": {"amd64": str(d)}}}}))
    p = planmod.build_plan(win7(), driverpack.open_pack(m), "virtio-blk")
    cdd = {c.key for c in p.changes if isinstance(c, RegValue) and "CriticalDeviceDatabase" in c.key}
    assert len(cdd) == 3 and not [k for k in cdd if "dev_1042" in k]
    assert any("does not claim PCI\\VEN_1AF4&DEV_1042" in n for n in p.notes)


def test_bootstrap_ahci_ide_drivers_made_boot_start(pack):
    f = win2019(storage_drivers=[
        ServiceInfo("pvscsi", start=0), ServiceInfo("storahci", start=3, has_start_override=True),
        ServiceInfo("atapi", start=0), ServiceInfo("intelide", start=3), ServiceInfo("LSI_SAS", start=3)])
    p = planmod.build_plan(f, pack, "virtio-blk")
    starts = {c.key: c.data for c in p.changes if isinstance(c, RegValue) and c.name == "Start"}
    assert starts["{CCS}\\Services\\storahci"] == 0 and starts["{CCS}\\Services\\intelide"] == 0
    assert "{CCS}\\Services\\atapi" not in starts  # already boot start: nothing to write
    assert "{CCS}\\Services\\LSI_SAS" not in starts and "{CCS}\\Services\\pvscsi" not in starts
    deletes = [c.key for c in p.changes if isinstance(c, RegDeleteKey)]
    assert deletes == ["{CCS}\\Services\\storahci\\StartOverride"]
    off = planmod.build_plan(f, pack, "virtio-blk", planmod.PlanOptions(bootstrap_drivers=False))
    assert not [c for c in off.changes if isinstance(c, RegDeleteKey)]
