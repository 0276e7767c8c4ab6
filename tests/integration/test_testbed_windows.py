"""The phony Windows disks, opened the way the engine opens them: libguestfs inspection + hivex.

Launches are the cost here (20-80 s each under TCG), so the eight variants are
looked at in two launches: a BIOS group and a UEFI group, several disks per
appliance. Each group is one xdist group, so one worker builds (or reuses) the
disks of a group and launches once; every test then asserts on what that
launch recorded.
"""

from __future__ import annotations

import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import hivex
import pytest

from lab.testbed import bcd as bcd_mod
from lab.testbed import windisk
from lab.testbed.regtext import RegData, read_hive
from lab.testbed.windisk import VARIANTS, WindowsRecipe

pytestmark = [pytest.mark.guestfs, pytest.mark.slow, pytest.mark.timeout(1800)]

GROUPS = {
    "bios": ["win2019-bios", "win7-bios", "bad-hibernated"],
    "uefi": ["win2022-uefi", "win11-uefi", "sysprep-uefi", "bad-linux", "bad-empty"],
    # Alone: a corrupt SYSTEM hive may make inspect_os fail for every disk in the appliance.
    "broken": ["bad-truncated-hive"],
}
GROUP_OF = {name: g for g, names in GROUPS.items() for name in names}
# Checked through the engine in tests/integration/test_windows_blockers.py (their raw bytes there too,
# without a launch): an appliance with a BitLocker/LDM disk in it would only slow these groups down.
ELSEWHERE = {"bad-bitlocker", "bad-dynamic", "bad-faststartup", "dirty-hive"}
assert sorted(GROUP_OF) == sorted(set(VARIANTS) - ELSEWHERE), "every variant must be checked"

VALID = [n for n, r in VARIANTS.items() if isinstance(r, WindowsRecipe) and r.defect is None]


def variants(names):
    return [pytest.param(n, marks=pytest.mark.xdist_group(f"testbed-windows-{GROUP_OF[n]}"), id=n) for n in names]


@dataclass
class Seen:
    """What one disk looked like from inside the appliance."""

    device: str
    partitions: list[dict] = field(default_factory=list)
    parttype: str | None = None
    filesystems: dict[str, str] = field(default_factory=dict)
    inspection: dict | None = None  # None: no OS root on this disk
    system: Path | None = None  # downloaded hives and BCD
    software: Path | None = None
    bcd: Path | None = None
    files: dict[str, bytes] = field(default_factory=dict)  # guest path -> first bytes
    part_info: dict[int, dict] = field(default_factory=dict)
    mbr_signature: int | None = None
    disk_guid: str | None = None
    rw_mount_error: str | None = None
    inspect_error: str | None = None  # inspect_os raised (for the whole appliance)


def _looker(g, root: str) -> dict:
    """Every inspection getter for ``root``; one that raises (value not available) gives None."""
    get: dict = {}
    names = ["type", "distro", "product_name", "product_variant", "major_version", "minor_version", "arch",
             "hostname", "drive_mappings", "windows_systemroot", "windows_current_control_set"]
    for what in names:
        try:
            get[what] = getattr(g, "inspect_get_" + what)(root)
        except RuntimeError:
            get[what] = None
    return get


def _observe(group: str, workdir: Path) -> dict[str, Seen]:
    import guestfs

    from h2k import accel

    names = GROUPS[group]
    disks = [windisk.build(n) for n in names]
    accel.apply_libguestfs_env()
    g = guestfs.GuestFS(python_return_dict=True)
    try:
        for n, d in zip(names, disks):
            if VARIANTS[n].kind == "windows" and (VARIANTS[n].defect == "hibernated" or VARIANTS[n].cleared_hiberfil):
                # Writable overlay: a read-write mount attempt must meet ntfs-3g's hibernation
                # check, not a read-only device; the cached image stays untouched.
                overlay = workdir / f"{n}.overlay.qcow2"
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(d),
                                str(overlay)], check=True)
                g.add_drive_opts(str(overlay), format="qcow2", readonly=False)
            else:
                g.add_drive_opts(str(d), format="qcow2", readonly=True)
        g.launch()
        devices = g.list_devices()
        seen = {n: Seen(device=dev) for n, dev in zip(names, devices)}
        fs = g.list_filesystems()
        for n, s in seen.items():
            s.filesystems = {k: v for k, v in fs.items() if k.startswith(s.device)}
            try:
                s.parttype = g.part_get_parttype(s.device)
                s.partitions = g.part_list(s.device)
            except RuntimeError:
                s.parttype = None  # no partition table
        try:
            roots = g.inspect_os()
        except RuntimeError as e:
            roots = []
            for s in seen.values():
                s.inspect_error = str(e)
        for root in roots:
            owner = next(n for n, s in seen.items() if root.startswith(s.device))
            seen[owner].inspection = _looker(g, root)
        for n, s in seen.items():
            r = VARIANTS[n]
            out = workdir / n
            out.mkdir()
            if s.parttype == "msdos":
                s.mbr_signature = struct.unpack("<I", g.pread_device(s.device, 4, 440))[0]
            if s.parttype == "gpt":
                s.disk_guid = g.part_get_disk_guid(s.device)
            for p in s.partitions:
                num = p["part_num"]
                info = {"bootable": None, "mbr_id": None, "gpt_type": None, "gpt_guid": None}
                if s.parttype == "msdos":
                    info["bootable"] = g.part_get_bootable(s.device, num)
                    info["mbr_id"] = g.part_get_mbr_id(s.device, num)
                else:
                    info["gpt_type"] = g.part_get_gpt_type(s.device, num)
                    info["gpt_guid"] = g.part_get_gpt_guid(s.device, num)
                s.part_info[num] = info
            if not isinstance(r, WindowsRecipe):
                continue
            win_dev = f"{s.device}{2 if r.firmware == 'bios' else 3}"
            sys_dev = f"{s.device}1"
            g.umount_all()
            if r.defect == "hibernated" or r.cleared_hiberfil:
                # ntfs-3g will not write to a hibernated volume: it refuses the mount, or (2017+)
                # mounts it read-only anyway. Either way a write must fail; the engine must see this.
                try:
                    g.mount(win_dev, "/")
                    try:
                        g.touch("/h2k-write-probe")
                    except RuntimeError as e:
                        s.rw_mount_error = str(e)
                    g.umount_all()
                except RuntimeError as e:
                    s.rw_mount_error = str(e)
            g.mount_ro(win_dev, "/")
            cfg = "/Windows/System32/config"
            s.system, s.software = out / "SYSTEM", out / "SOFTWARE"
            g.download(f"{cfg}/SYSTEM", str(s.system))
            g.download(f"{cfg}/SOFTWARE", str(s.software))
            for path in ("/Windows/System32/cmd.exe", "/Windows/System32/drivers/pvscsi.sys",
                         "/Windows/System32/drivers/vmxnet3.sys", "/Windows/System32/winload.exe",
                         "/Windows/System32/winload.efi", "/hiberfil.sys", "/Windows/Setup/State/State.ini",
                         "/Windows/Setup/Scripts/SetupComplete.cmd"):
                if g.is_file(path):
                    s.files[path] = g.pread(path, 4096, 0)
            g.umount_all()
            g.mount_ro(sys_dev, "/")
            bcd_path = "/Boot/BCD" if r.firmware == "bios" else "/EFI/Microsoft/Boot/BCD"
            s.bcd = out / "BCD"
            g.download(bcd_path, str(s.bcd))
            for path in ("/bootmgr", "/EFI/Microsoft/Boot/bootmgfw.efi", "/EFI/Boot/bootx64.efi"):
                if g.is_file(path):
                    s.files["sys:" + path] = g.pread(path, 4096, 0)
            g.umount_all()
        g.shutdown()
    finally:
        g.close()
    return seen


_SEEN: dict[str, dict[str, Seen] | BaseException] = {}


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="h2k-testbed-win-") as d:
        yield Path(d)


@pytest.fixture
def seen(name, workdir):
    """The observation of the variant this test is parametrized with (one launch per group)."""
    group = GROUP_OF[name]
    if group not in _SEEN:
        gdir = workdir / group
        gdir.mkdir()
        try:
            _SEEN[group] = _observe(group, gdir)
        except Exception as e:  # keep the cause: every test of the group reports it, none relaunches
            _SEEN[group] = e
    got = _SEEN[group]
    if isinstance(got, BaseException):
        raise got
    return got[name]


def _values(hive: Path, key: str) -> dict[str, object]:
    tree = read_hive(hive, key)
    return {k: v.decode() for k, v in tree[key].items()}


# ------------------------------------------------------------- valid variants


@pytest.mark.parametrize("name", variants(VALID))
def test_inspection_identifies_windows(name, seen):
    r = VARIANTS[name]
    i = seen.inspection
    assert i is not None, f"{name}: libguestfs found no OS"
    assert i["type"] == "windows" and i["distro"] == "windows"
    assert i["product_name"] == r.product_name
    assert (i["major_version"], i["minor_version"]) == (r.major, r.minor)
    assert i["arch"] == r.arch
    assert i["product_variant"] == r.installation_type
    assert i["windows_systemroot"] == "/Windows"
    assert i["windows_current_control_set"] == r.control_set
    assert i["hostname"] == r.hostname
    win_num = 2 if r.firmware == "bios" else 3
    assert i["drive_mappings"] == {"C": f"{seen.device}{win_num}"}


@pytest.mark.parametrize("name", variants(VALID))
def test_partition_layout_matches_firmware(name, seen):
    r = VARIANTS[name]
    if r.firmware == "bios":
        assert seen.parttype == "msdos"
        assert seen.mbr_signature == r.disk_signature
        assert [p["part_start"] for p in seen.partitions] == [1 * 2**20, 101 * 2**20]
        assert bool(seen.part_info[1]["bootable"]) is True and bool(seen.part_info[2]["bootable"]) is False
        assert {i["mbr_id"] for i in seen.part_info.values()} == {0x07}
        assert seen.filesystems == {f"{seen.device}1": "ntfs", f"{seen.device}2": "ntfs"}
        assert seen.files["sys:/bootmgr"].startswith(b"BOOTMGR")
    else:
        assert seen.parttype == "gpt"
        assert "{%s}" % seen.disk_guid.lower() == r.disk_guid
        types = [seen.part_info[n]["gpt_type"] for n in (1, 2, 3)]
        assert types == [windisk.ESP_TYPE, windisk.MSR_TYPE, windisk.BASIC_DATA_TYPE]
        assert seen.filesystems[f"{seen.device}1"] == "vfat"
        assert seen.filesystems[f"{seen.device}3"] == "ntfs"
        assert seen.files["sys:/EFI/Microsoft/Boot/bootmgfw.efi"][:2] == b"MZ"
        if r.uefi_fallback == "copy":
            assert seen.files["sys:/EFI/Boot/bootx64.efi"] == seen.files["sys:/EFI/Microsoft/Boot/bootmgfw.efi"]
        elif r.uefi_fallback == "stale":  # win11-uefi: an older build's boot manager, a PE all the same
            fallback = seen.files["sys:/EFI/Boot/bootx64.efi"]
            assert fallback[:2] == b"MZ" and fallback != seen.files["sys:/EFI/Microsoft/Boot/bootmgfw.efi"]
        else:  # sysprep-uefi: booted through its NVRAM entry on VMware, no removable-media loader
            assert r.uefi_fallback == "none" and "sys:/EFI/Boot/bootx64.efi" not in seen.files


@pytest.mark.parametrize("name", variants(VALID))
def test_windows_setup_state(name, seen):
    """SYSTEM\\Setup, ImageState and State.ini as an installed system, or as sysprep /generalize /oobe leaves them."""
    r = VARIANTS[name]
    setup = _values(seen.system, "Setup")
    assert setup == r.setup_values()
    if r.setup == "generalized":
        assert setup["CmdLine"] == "oobe\\windeploy.exe" and setup["SetupType"] == 2
        assert setup["SystemSetupInProgress"] == setup["OOBEInProgress"] == 1
    state = _values(seen.software, "Microsoft\\Windows\\CurrentVersion\\Setup\\State")["ImageState"]
    assert state == ("IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE" if r.setup == "generalized" else "IMAGE_STATE_COMPLETE")
    assert seen.files["/Windows/Setup/State/State.ini"] == f"[State]\r\nImageState={state}\r\n".encode()
    script = seen.files.get("/Windows/Setup/Scripts/SetupComplete.cmd")
    assert script == (None if r.setup_complete is None else r.setup_complete.replace("\n", "\r\n").encode())


@pytest.mark.parametrize("name", variants(VALID))
def test_version_values_in_software_hive(name, seen):
    r = VARIANTS[name]
    cv = _values(seen.software, "Microsoft\\Windows NT\\CurrentVersion")
    assert cv["CurrentBuildNumber"] == str(r.build) == cv["CurrentBuild"]
    assert cv["EditionID"] == r.edition_id
    assert cv["InstallationType"] == r.installation_type
    assert cv["CurrentVersion"] == r.current_version
    if r.major >= 10:
        assert (cv["CurrentMajorVersionNumber"], cv["CurrentMinorVersionNumber"]) == (r.major, r.minor)
    else:
        assert "CurrentMajorVersionNumber" not in cv and cv["CSDVersion"] == "Service Pack 1"
    if name == "win11-uefi":  # Windows 11 still says "Windows 10" in ProductName
        assert cv["ProductName"] == "Windows 10 Pro" and int(cv["CurrentBuildNumber"]) >= 22000


@pytest.mark.parametrize("name", variants(VALID))
def test_system_hive_services_and_control_set(name, seen):
    r = VARIANTS[name]
    h = hivex.Hivex(str(seen.system))
    sel = h.node_get_child(h.root(), "Select")
    assert h.value_dword(h.node_get_value(sel, "Current")) == r.current_control_set
    ccs = r.control_set
    pv = _values(seen.system, f"{ccs}\\Services\\pvscsi")
    assert (pv["Start"], pv["Type"], pv["ErrorControl"], pv["Group"]) == (0, 1, 1, "SCSI miniport")
    assert read_hive(seen.system, f"{ccs}\\Services\\pvscsi")[f"{ccs}\\Services\\pvscsi"]["ImagePath"].type == 2
    assert pv["ImagePath"].lower().endswith("\\system32\\drivers\\pvscsi.sys")
    nic = _values(seen.system, f"{ccs}\\Services\\{r.nic_service}")
    assert nic["ImagePath"].lower().endswith("\\drivers\\vmxnet3.sys") and nic["Group"] == "NDIS"
    for svc in ("VMTools", "vm3dmp", "vmci"):
        assert _values(seen.system, f"{ccs}\\Services\\{svc}")["ImagePath"]
    # The .sys files the services name exist and are recognisable PE images.
    assert b"PVSCSI" in seen.files["/Windows/System32/drivers/pvscsi.sys"]
    assert b"vmxnet3" in seen.files["/Windows/System32/drivers/vmxnet3.sys"]
    assert seen.files["/Windows/System32/cmd.exe"][:2] == b"MZ"


@pytest.mark.parametrize("name", variants(VALID))
def test_static_ip_on_the_vmware_nic(name, seen):
    r = VARIANTS[name]
    ccs = r.control_set
    iface = _values(seen.system, f"{ccs}\\Services\\Tcpip\\Parameters\\Interfaces\\{r.nic_guid}")
    assert iface["EnableDHCP"] == 0
    assert iface["IPAddress"] == [r.ip_address]
    assert iface["SubnetMask"] == [r.subnet_mask]
    assert iface["DefaultGateway"] == [r.gateway]
    tree = read_hive(seen.system, f"{ccs}\\Services\\Tcpip\\Parameters\\Interfaces")
    assert tree[f"{ccs}\\Services\\Tcpip\\Parameters\\Interfaces\\{r.nic_guid}"]["IPAddress"].type == 7
    nic_class = _values(seen.system, f"{ccs}\\Control\\Class\\{{4d36e972-e325-11ce-bfc1-08002be10318}}\\0001")
    assert nic_class["NetCfgInstanceId"] == r.nic_guid
    assert "ven_15ad&dev_07b0" in nic_class["MatchingDeviceId"]


@pytest.mark.parametrize("name", variants(VALID))
def test_driver_binding_database_matches_windows_generation(name, seen):
    r = VARIANTS[name]
    h = hivex.Hivex(str(seen.system))
    dd = h.node_get_child(h.root(), "DriverDatabase")
    cs = h.node_get_child(h.node_get_child(h.root(), r.control_set), "Control")
    cdd = h.node_get_child(cs, "CriticalDeviceDatabase")
    if r.driver_database:
        assert dd is not None and cdd is None
        dev = _values(seen.system, "DriverDatabase\\DeviceIds\\PCI\\VEN_15AD&DEV_07C0")
        assert "oem2.inf" in dev
        pkg = _values(seen.system, "DriverDatabase\\DriverInfFiles\\oem2.inf")[""][0]
        assert pkg.startswith("pvscsi.inf_amd64_") and len(pkg.rsplit("_", 1)[1]) == 16
        so = _values(seen.system, f"{r.control_set}\\Services\\storahci\\StartOverride")
        assert so == {"0": 3}
        power = _values(seen.system, f"{r.control_set}\\Control\\Session Manager\\Power")
        assert power["HiberbootEnabled"] == r.hiberboot
    else:
        assert dd is None and cdd is not None
        entry = _values(seen.system, f"{r.control_set}\\Control\\CriticalDeviceDatabase\\pci#ven_15ad&dev_07c0")
        assert entry["Service"] == "pvscsi"
        assert entry["ClassGUID"].upper() == "{4D36E97B-E325-11CE-BFC1-08002BE10318}"


@pytest.mark.parametrize("name", variants(VALID))
def test_mounted_devices_point_at_the_real_partition(name, seen):
    r = VARIANTS[name]
    md = read_hive(seen.system, "MountedDevices")["MountedDevices"]
    c = md["\\DosDevices\\C:"]
    assert isinstance(c, RegData) and c.type == 3
    win_num = 2 if r.firmware == "bios" else 3
    if r.firmware == "bios":
        sig, off = struct.unpack("<IQ", c.data)
        assert sig == seen.mbr_signature
        assert off == seen.partitions[win_num - 1]["part_start"]
    else:
        import uuid

        assert c.data[:8] == b"DMIO:ID:"
        assert str(uuid.UUID(bytes_le=c.data[8:24])).upper() == seen.part_info[win_num]["gpt_guid"]


@pytest.mark.parametrize("name", variants(VALID))
def test_bcd_default_loader(name, seen):
    r = VARIANTS[name]
    store = bcd_mod.read_bcd(seen.bcd)
    assert store["key_name"] == "BCD00000000"
    assert store["bootmgr"] == bcd_mod.BOOTMGR
    assert store["objects"][bcd_mod.BOOTMGR]["type"] == bcd_mod.TYPE_BOOTMGR
    assert store["default"] == r.loader_guid
    assert store["objects"][r.loader_guid]["type"] == bcd_mod.TYPE_OSLOADER
    assert store["objects"][bcd_mod.BOOTMGR]["elements"]["24000001"] == [r.loader_guid]
    ext = "efi" if r.firmware == "uefi" else "exe"
    assert store["default_path"] == f"\\Windows\\system32\\winload.{ext}"
    assert store["default_systemroot"] == "\\Windows"
    assert f"/Windows/System32/winload.{ext}" in seen.files  # the loader the BCD names exists
    assert bcd_mod.EMSSETTINGS in store["objects"]
    # The loader's devices point at C: on this very disk.
    osdev = bcd_mod.parse_device(store["objects"][r.loader_guid]["elements"]["21000001"])
    win_num = 2 if r.firmware == "bios" else 3
    if r.firmware == "bios":
        assert osdev.style == "mbr" and osdev.disk_signature == seen.mbr_signature
        assert osdev.partition_offset == seen.partitions[win_num - 1]["part_start"]
    else:
        assert osdev.style == "gpt" and osdev.partition_guid.strip("{}").upper() == seen.part_info[win_num]["gpt_guid"]
    # And the raw hive has the shape bcdedit writes: Element values of the documented types.
    h = hivex.Hivex(str(seen.bcd))
    obj = h.node_get_child(h.node_get_child(h.root(), "Objects"), r.loader_guid)
    el = h.node_get_child(h.node_get_child(obj, "Elements"), "12000002")
    assert h.value_type(h.node_get_value(el, "Element"))[0] == 1  # REG_SZ


@pytest.mark.parametrize("name", variants(["win2022-uefi"]))
def test_stale_control_set_differs_from_the_live_one(name, seen):
    r = VARIANTS[name]
    assert r.current_control_set == 2
    live = _values(seen.system, f"ControlSet002\\Services\\Tcpip\\Parameters\\Interfaces\\{r.nic_guid}")
    stale = _values(seen.system, f"ControlSet001\\Services\\Tcpip\\Parameters\\Interfaces\\{r.nic_guid}")
    assert live["IPAddress"] == [r.ip_address] and stale["IPAddress"] != live["IPAddress"]
    assert _values(seen.system, "ControlSet001\\Services\\pvscsi")["Start"] != 0


@pytest.mark.parametrize("name", variants(["win11-uefi"]))
def test_fast_startup_on_but_fully_shut_down(name, seen):
    """HiberbootEnabled=1 and a hiberfil.sys whose header a full shutdown left zeroed: ntfs-3g (an independent
    reader of that header) mounts the volume read-write, as h2k's inspection must accept it."""
    r = VARIANTS[name]
    assert r.hiberboot == 1 and r.cleared_hiberfil
    assert _values(seen.system, f"{r.control_set}\\Control\\Session Manager\\Power")["HiberbootEnabled"] == 1
    assert seen.files["/hiberfil.sys"] == bytes(4096)
    assert seen.rw_mount_error is None


# --------------------------------------------------------------- bad variants


@pytest.mark.parametrize("name", variants(["bad-hibernated"]))
def test_hibernated_volume_is_detectable(name, seen):
    assert seen.files["/hiberfil.sys"][:4] == b"HIBR"
    assert seen.rw_mount_error is not None, "ntfs-3g let us write to a hibernated volume"
    err = seen.rw_mount_error.lower()
    assert "hibernat" in err or "read-only" in err, seen.rw_mount_error
    # Read-only inspection still sees Windows: refusing is the engine's job.
    assert seen.inspection is not None and seen.inspection["type"] == "windows"


@pytest.mark.parametrize("name", variants(["bad-truncated-hive"]))
def test_truncated_system_hive_does_not_open(name, seen):
    assert seen.system.stat().st_size < 0x2000
    with pytest.raises(RuntimeError):
        hivex.Hivex(str(seen.system))
    # libguestfs must not report a healthy Windows: it fails, finds no OS, or cannot name the control set.
    assert (seen.inspect_error is not None or seen.inspection is None
            or not seen.inspection.get("windows_current_control_set")), seen.inspection


@pytest.mark.parametrize("name", variants(["bad-linux"]))
def test_linux_disk_is_inspected_as_linux(name, seen):
    i = seen.inspection
    assert i is not None and i["type"] == "linux" and i["distro"] == "debian"
    assert i["arch"] == "x86_64"


@pytest.mark.parametrize("name", variants(["bad-empty"]))
def test_empty_disk_has_no_os(name, seen):
    assert seen.inspection is None
    assert seen.parttype is None and seen.filesystems in ({}, {seen.device: "unknown"})
