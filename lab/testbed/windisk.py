"""Phony Windows disks (and a few bad disks) for testing the engine without Windows.

``build(name)`` returns a cached qcow2 for a variant in :data:`VARIANTS`. A
Windows variant is built in ONE libguestfs launch: real partition table (MBR
with an active "System Reserved" NTFS, or GPT with ESP + MSR + basic data),
real NTFS made in the appliance, SYSTEM/SOFTWARE hives rendered from the
``windows_recipes/*.reg`` templates and merged into empty hives, a real BCD in
the firmware's place, PE ``cmd.exe``/``winload``/``bootmgfw.efi``, and
``System32\\drivers`` with the VMware drivers the hives register. Everything
that refers to the disk (MountedDevices, BCD device elements) is computed from
the same layout, so libguestfs maps ``C:`` and the BCD points at real partitions.

The recipe dataclasses double as the expected facts: tests (and the engine's
tests) assert inspection results against ``VARIANTS[name]``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import struct
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

from h2k import hivelog
from h2k.progress import Progress
from lab.testbed import bcd as bcd_mod
from lab.testbed import hive as hive_mod
from lab.testbed import hivelog_writer
from lab.testbed import pe as pe_mod
from lab.testbed import regtext
from lab.testbed.cache import cached_build

RECIPES_DIR = Path(__file__).with_name("windows_recipes")
SECTOR = 512
MiB = 1024 * 1024

ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
MSR_TYPE = "E3C9E316-0B5C-4DB8-817D-F92DF00215AE"
BASIC_DATA_TYPE = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"

SCSI_ADAPTER_CLASS = "{4D36E97B-E325-11CE-BFC1-08002BE10318}"
NET_CLASS = "{4D36E972-E325-11CE-BFC1-08002BE10318}"

# Drivers written to System32\drivers: name -> description (recognisable text in the .sys).
VMWARE_DRIVERS = {
    "pvscsi": "VMware PVSCSI Controller driver",
    "vmxnet3": "VMware vmxnet3 Ethernet Adapter NDIS 6.30 driver",
    "vm3dmp": "VMware SVGA 3D miniport driver",
    "vmci": "VMware VMCI bus driver",
    "vmmemctl": "VMware memory control (balloon) driver",
    "vmmouse": "VMware pointing device driver",
    "vmhgfs": "VMware host-guest file system driver",
}
INBOX_DRIVERS = ["lsi_sas", "atapi", "disk", "ntfs", "tcpip", "classpnp", "storport"]
INBOX_DRIVERS_WIN8 = ["storahci", "stornvme"]
INBOX_DRIVERS_WIN7 = ["msahci", "intelide"]


@dataclass(frozen=True)
class WindowsRecipe:
    """One phony Windows disk; the fields are also what inspection must find."""

    name: str
    product_name: str
    edition_id: str
    installation_type: str  # Server or Client
    major: int
    minor: int
    build: int
    current_version: str  # SOFTWARE CurrentVersion ("6.3" on 8.1 and later, "6.1" on 7)
    firmware: str  # bios or uefi
    arch: str = "x86_64"
    ubr: int | None = None  # update build revision (10+)
    display_version: str | None = None  # "21H2" ... (or ReleaseId "1809" on older 10)
    release_id: str | None = None
    csd_version: str | None = None  # "Service Pack 1" (7)
    build_lab: str = "amd64fre.rs5_release.180914-1434"
    current_control_set: int = 1
    stale_control_sets: tuple[int, ...] = ()  # other ControlSet00n that exist but are not live
    driver_database: bool = True  # SYSTEM\DriverDatabase (Windows 8+)
    critical_device_database: bool = False  # Windows 7 binding
    hiberboot: int | None = 0  # Session Manager\Power\HiberbootEnabled (None: key absent)
    hostname: str = "WIN-H2K"
    nic_guid: str = "{a1b2c3d4-1111-4e2f-9a3b-5c6d7e8f9012}"
    ip_address: str = "192.168.122.50"
    subnet_mask: str = "255.255.255.0"
    gateway: str = "192.168.122.1"
    dns: str = "192.168.122.1,8.8.8.8"
    nic_service: str = "vmxnet3ndis6"  # the service vmxnet3.sys is registered as
    storage_service: str = "pvscsi"
    disk_signature: int = 0x5A3C9E11  # MBR
    disk_guid: str = "{6f3c2b1a-0d9e-4c8b-a7f6-e5d4c3b2a190}"  # GPT
    loader_guid: str = "{b7e5a3c1-9d2f-11e9-8a34-000c29aa0b17}"
    disk_gib: int = 1
    # None, "hibernated", "truncated-hive", "bitlocker", "dynamic", "faststartup" or "dirty-hive"
    defect: str | None = None
    ghost_nics: bool = False  # adapters that are gone, their interfaces still holding static IPs
    cleared_hiberfil: bool = False  # hiberfil.sys as a full shutdown leaves it (header zeroed, not resumable)
    # Windows Setup's state: "complete" (an installed system) or "generalized" (after
    # sysprep /generalize /oobe: specialize and OOBE run at the next boot).
    setup: str = "complete"
    setup_complete: str | None = None  # an existing %WINDIR%\Setup\Scripts\SetupComplete.cmd (text)
    # \EFI\Boot\bootx64.efi on the ESP: "copy" (of bootmgfw.efi, as Setup leaves it), "stale" (an
    # older build's boot manager: bootmgfw.efi was serviced, the removable-media copy was not) or
    # "none" (a VM that booted through its NVRAM entry).
    uefi_fallback: str = "copy"
    kind: str = "windows"

    @property
    def product_type(self) -> str:
        return "ServerNT" if self.installation_type == "Server" else "WinNT"

    @property
    def control_set(self) -> str:
        return "ControlSet%03d" % self.current_control_set

    @property
    def image_state(self) -> str:
        """SOFTWARE ...\\Setup\\State ImageState (and State.ini), per Microsoft's "Windows Setup States"."""
        return "IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE" if self.setup == "generalized" else "IMAGE_STATE_COMPLETE"

    def setup_values(self) -> dict[str, str | int]:
        """SYSTEM\\Setup as sysprep leaves it (generalized) or as an installed system has it."""
        if self.setup == "generalized":
            return {"CmdLine": "oobe\\windeploy.exe", "SetupType": 2, "SystemSetupInProgress": 1, "OOBEInProgress": 1}
        return {"SystemSetupInProgress": 0, "OOBEInProgress": 0}


@dataclass(frozen=True)
class LinuxRecipe:
    """A small disk with a Linux root file system: not Windows."""

    name: str
    distro: str = "debian"
    version_id: str = "12"
    pretty_name: str = "Debian GNU/Linux 12 (bookworm)"
    hostname: str = "not-windows"
    disk_gib: int = 1
    kind: str = "linux"


@dataclass(frozen=True)
class EmptyRecipe:
    """A blank disk: no partition table, no file system."""

    name: str
    disk_gib: int = 1
    kind: str = "empty"


Recipe = Union[WindowsRecipe, LinuxRecipe, EmptyRecipe]

WIN2019 = WindowsRecipe(
    name="win2019-bios",
    product_name="Windows Server 2019 Standard",
    edition_id="ServerStandard",
    installation_type="Server",
    major=10,
    minor=0,
    build=17763,
    ubr=5458,
    release_id="1809",
    current_version="6.3",
    firmware="bios",
    hostname="WIN2019-H2K",
)

VARIANTS: dict[str, Recipe] = {
    r.name: r
    for r in [
        WIN2019,
        WindowsRecipe(
            name="win2022-uefi",
            product_name="Windows Server 2022 Datacenter",
            edition_id="ServerDatacenter",
            installation_type="Server",
            major=10,
            minor=0,
            build=20348,
            ubr=2113,
            display_version="21H2",
            release_id="2009",
            current_version="6.3",
            firmware="uefi",
            build_lab="amd64fre.fe_release.210507-1500",
            current_control_set=2,
            stale_control_sets=(1,),
            hostname="WIN2022-H2K",
            ip_address="192.168.122.52",
            nic_guid="{c4d5e6f7-2222-4a3b-8c9d-0e1f2a3b4c5d}",
            disk_guid="{2e8f4a6c-3b1d-4f5e-9a7c-8d6b4e2f1a30}",
            loader_guid="{c2f1e0d9-5b4a-11ec-9b7e-000c29bb1c22}",
        ),
        WindowsRecipe(
            name="win11-uefi",
            product_name="Windows 10 Pro",
            edition_id="Professional",
            installation_type="Client",
            major=10,
            minor=0,
            build=22631,
            ubr=3007,
            display_version="23H2",
            release_id="2009",
            current_version="6.3",
            firmware="uefi",
            build_lab="amd64fre.ni_release.220506-1250",
            hiberboot=1,
            # Fast Startup on, but shut down fully: hiberfil.sys holds no resumable image.
            cleared_hiberfil=True,
            uefi_fallback="stale",
            hostname="DESKTOP-H2K11",
            ip_address="192.168.122.61",
            nic_guid="{e7f8a9b0-3333-4c5d-8e9f-a0b1c2d3e4f5}",
            disk_guid="{9a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d}",
            loader_guid="{d3e2f1a0-6c5b-11ee-8c8f-000c29cc2d33}",
        ),
        WindowsRecipe(
            name="win7-bios",
            product_name="Windows 7 Professional",
            edition_id="Professional",
            installation_type="Client",
            major=6,
            minor=1,
            build=7601,
            current_version="6.1",
            csd_version="Service Pack 1",
            firmware="bios",
            build_lab="win7sp1_ldr.170913-0600",
            driver_database=False,
            critical_device_database=True,
            hiberboot=None,
            hostname="WIN7-H2K",
            ip_address="192.168.122.70",
            nic_guid="{f1e2d3c4-4444-4b5a-9c8d-7e6f5a4b3c2d}",
            disk_signature=0x1D7A0C33,
            loader_guid="{e4d3c2b1-7a6f-11e0-9d9a-000c29dd3e44}",
        ),
        # Own disk signatures, so several disks can be inspected in one launch without
        # MountedDevices of one matching another's partitions.
        dataclasses.replace(WIN2019, name="bad-hibernated", defect="hibernated", disk_signature=0x5A3C9E12),
        dataclasses.replace(WIN2019, name="bad-truncated-hive", defect="truncated-hive", disk_signature=0x5A3C9E13),
        # C: carries the BitLocker OEM id "-FVE-FS-" in its boot sector (as an encrypted OS volume does).
        dataclasses.replace(WIN2019, name="bad-bitlocker", defect="bitlocker", disk_signature=0x5A3C9E14),
        # Both MBR slots are type 0x42 (LDM, a dynamic disk), written after the file systems.
        dataclasses.replace(WIN2019, name="bad-dynamic", defect="dynamic", disk_signature=0x5A3C9E15),
        # Fast Startup: HiberbootEnabled=1 and a hiberfil.sys with the HIBR header a hybrid shutdown leaves.
        dataclasses.replace(WIN2019, name="bad-faststartup", defect="faststartup", hiberboot=1,
                            disk_signature=0x5A3C9E16),
        # SYSTEM not cleanly flushed: the primary file is stale (pvscsi Start=3, sequence numbers differ),
        # SYSTEM.LOG1 and (after a log switch) SYSTEM.LOG2 hold the newest pages (pvscsi Start=0, as the
        # recipe says). Valid once replayed. It also carries ghost NICs (independent of the logs).
        dataclasses.replace(WIN2019, name="dirty-hive", defect="dirty-hive", ghost_nics=True,
                            disk_signature=0x5A3C9E17),
        LinuxRecipe(name="bad-linux"),
        EmptyRecipe(name="bad-empty"),
    ]
}

# A VMware template of Server 2022 (UEFI) made with `sysprep /generalize /oobe /shutdown`: Windows
# Setup's state says specialize and OOBE run at the next boot, the template's author left a
# SetupComplete.cmd, and its ESP has no \EFI\Boot\bootx64.efi (the VM booted through its NVRAM
# entry, which a VM moved to KVM does not have). One disk for both states: they live in different
# places (hives and C: versus the ESP) and the engine handles them in separate steps.
TEMPLATE_SETUP_COMPLETE = """@echo off
rem srv2022-tpl: finish the deployment of a VM made from this template
reg add "HKLM\\SOFTWARE\\Contoso\\Template" /v Deployed /t REG_SZ /d "%DATE% %TIME%" /f
exit /b 0
"""
VARIANTS["sysprep-uefi"] = dataclasses.replace(
    VARIANTS["win2022-uefi"], name="sysprep-uefi", setup="generalized", setup_complete=TEMPLATE_SETUP_COMPLETE,
    uefi_fallback="none", hostname="WIN2022-TPL", nic_guid="{3c4d5e6f-5555-4a7b-8c9d-1e2f3a4b5c6d}",
    disk_guid="{5b7c9d1e-2f3a-4b5c-8d6e-7f8091a2b3c4}", loader_guid="{f4e3d2c1-8b7a-11ec-9c8d-000c29ee4f55}",
)


# --------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Part:
    """One partition: its role, place and identity (the same numbers go into hives and BCD)."""

    number: int
    role: str  # system-reserved, esp, msr, windows, linux
    start: int  # sector
    end: int  # sector, inclusive
    fstype: str | None  # ntfs, vfat, ext4 or None (MSR)
    label: str = ""
    gpt_type: str = ""
    gpt_guid: str = ""  # partition GUID (GPT)
    volume_guid: str = ""  # the \??\Volume{...} name Windows gave it

    @property
    def offset(self) -> int:
        return self.start * SECTOR


def _guid(seed: str) -> str:
    """A stable GUID from a seed, so a recipe always makes the same disk."""
    return "{%s}" % uuid.UUID(bytes=hashlib.sha256(seed.encode()).digest()[:16], version=4)


def layout(r: WindowsRecipe) -> list[Part]:
    total = r.disk_gib * 1024 * MiB // SECTOR
    first = 2048
    if r.firmware == "bios":
        sr_end = first + 100 * MiB // SECTOR - 1
        return [
            Part(1, "system-reserved", first, sr_end, "ntfs", "System Reserved",
                 volume_guid=_guid(r.name + "vol1")),
            Part(2, "windows", sr_end + 1, total - 1, "ntfs", volume_guid=_guid(r.name + "vol2")),
        ]
    esp_end = first + 100 * MiB // SECTOR - 1
    msr_end = esp_end + 16 * MiB // SECTOR
    last_usable = total - 34
    last_aligned = (last_usable + 1) // 2048 * 2048 - 1  # Windows ends partitions on 1 MiB boundaries
    return [
        Part(1, "esp", first, esp_end, "vfat", gpt_type=ESP_TYPE, gpt_guid=_guid(r.name + "esp"),
             volume_guid=_guid(r.name + "vol1")),
        Part(2, "msr", esp_end + 1, msr_end, None, gpt_type=MSR_TYPE, gpt_guid=_guid(r.name + "msr")),
        Part(3, "windows", msr_end + 1, last_aligned, "ntfs", gpt_type=BASIC_DATA_TYPE,
             gpt_guid=_guid(r.name + "win"), volume_guid=_guid(r.name + "vol3")),
    ]


def _part(parts: list[Part], role: str) -> Part:
    return next(p for p in parts if p.role == role)


def partition_ref(r: WindowsRecipe, p: Part) -> bcd_mod.PartitionRef:
    if r.firmware == "bios":
        return bcd_mod.PartitionRef("mbr", disk_signature=r.disk_signature, partition_offset=p.offset)
    return bcd_mod.PartitionRef("gpt", disk_guid=r.disk_guid, partition_guid=p.gpt_guid)


def mounted_device_blob(r: WindowsRecipe, p: Part) -> bytes:
    """MountedDevices data: MBR = disk signature + byte offset; GPT = "DMIO:ID:" + partition GUID."""
    if r.firmware == "bios":
        return struct.pack("<IQ", r.disk_signature, p.offset)
    return b"DMIO:ID:" + uuid.UUID(p.gpt_guid).bytes_le


# ------------------------------------------------------------ partition tables
# Written here as bytes and put on the disk with one pwrite each: a dozen
# parted calls (each followed by a udev settle) cost a minute under TCG.


def _chs(lba: int) -> bytes:
    """CHS triple for an MBR entry (255 heads, 63 sectors; beyond 1023 cylinders: the LBA marker)."""
    cyl, rem = divmod(lba, 255 * 63)
    head, sec = divmod(rem, 63)
    if cyl > 1023:
        return bytes([254, 0xFF, 0xFF])
    return bytes([head, ((cyl >> 2) & 0xC0) | (sec + 1), cyl & 0xFF])


def _mbr_entry(active: bool, ptype: int, start: int, count: int) -> bytes:
    return (bytes([0x80 if active else 0]) + _chs(start) + bytes([ptype]) + _chs(start + count - 1)
            + struct.pack("<II", start, count))


def mbr_table(disk_signature: int, entries: list[tuple[bool, int, int, int]]) -> bytes:
    """Sector 0 of an MBR disk: disk signature at 440, up to four (active, type, start, count) entries."""
    sector = bytearray(SECTOR)
    struct.pack_into("<IH", sector, 440, disk_signature, 0)
    for i, e in enumerate(entries):
        sector[446 + 16 * i : 462 + 16 * i] = _mbr_entry(*e)
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def gpt_tables(total_sectors: int, disk_guid: str, parts: list[Part]) -> list[tuple[int, bytes]]:
    """(byte offset, data) pieces of a GPT disk: protective MBR, primary and backup header and entries."""
    import zlib

    names = {"esp": "EFI system partition", "msr": "Microsoft reserved partition", "windows": "Basic data partition"}
    entries = bytearray(128 * 128)
    for i, p in enumerate(parts):
        name = names.get(p.role, p.role).encode("utf-16-le")[:72]
        struct.pack_into("<16s16sQQQ72s", entries, 128 * i, uuid.UUID(p.gpt_type).bytes_le,
                         uuid.UUID(p.gpt_guid).bytes_le, p.start, p.end, 0, name)
    entries_crc = zlib.crc32(bytes(entries))
    last = total_sectors - 1
    entry_sectors = len(entries) // SECTOR

    def header(current: int, backup: int, entries_lba: int) -> bytes:
        fields = [b"EFI PART", 0x00010000, 92, 0, 0, current, backup, 2 + entry_sectors,
                  last - 1 - entry_sectors, uuid.UUID(disk_guid).bytes_le, entries_lba, 128, 128, entries_crc]
        fmt = "<8sIIIIQQQQ16sQIII"
        crc = zlib.crc32(struct.pack(fmt, *fields))
        fields[3] = crc
        return struct.pack(fmt, *fields).ljust(SECTOR, b"\0")

    protective = mbr_table(0, [(False, 0xEE, 1, min(last, 0xFFFFFFFF))])
    return [
        (0, protective),
        (SECTOR, header(1, last, 2)),
        (2 * SECTOR, bytes(entries)),
        ((last - entry_sectors) * SECTOR, bytes(entries)),
        (last * SECTOR, header(last, 1, last - entry_sectors)),
    ]


def partition_table(r: WindowsRecipe, parts: list[Part]) -> list[tuple[int, bytes]]:
    total = r.disk_gib * 1024 * MiB // SECTOR
    if r.firmware == "bios":
        return [(0, mbr_table(r.disk_signature, [(p.role == "system-reserved", 0x07, p.start, p.end - p.start + 1)
                                                  for p in parts]))]
    return gpt_tables(total, r.disk_guid, parts)


# ---------------------------------------------------------------- registry text


def _template(name: str) -> str:
    return (RECIPES_DIR / name).read_text()


def _pkg_hash(r: WindowsRecipe, inf: str) -> str:
    return hashlib.sha256(f"{inf}{r.build}".encode()).hexdigest()[:16]


def _controlset_vars(r: WindowsRecipe, n: int, stale: bool) -> dict[str, object]:
    v: dict[str, object] = {
        "CCS": "ControlSet%03d" % n,
        "hostname": r.hostname,
        "product_type": r.product_type,
        "product_suite": "Terminal Server" if r.installation_type == "Server" else "",
        "processor_architecture": "AMD64" if r.arch == "x86_64" else "x86",
        "boot_partition": 2 if r.firmware == "bios" else 3,
        "nic_guid": r.nic_guid,
        "ip_address": r.ip_address,
        "subnet_mask": r.subnet_mask,
        "gateway": r.gateway,
        "dns": r.dns,
        "pvscsi_start": "00000000",
        "hiberboot": "%08x" % (r.hiberboot or 0),
    }
    if stale:
        # An older set: a different address and name, pvscsi not yet boot-start.
        # Anything reading ControlSet001 instead of Select\Current sees these.
        v.update(hostname="STALE-" + r.hostname[:8], ip_address="10.99.99.99", gateway="10.99.99.1",
                 pvscsi_start="00000003")
    return v


def system_reg_text(r: WindowsRecipe) -> str:
    """The SYSTEM hive as .reg text (HKEY_LOCAL_MACHINE\\SYSTEM)."""
    parts = layout(r)
    chunks = []
    for n in sorted({r.current_control_set, *r.stale_control_sets}):
        v = _controlset_vars(r, n, stale=n != r.current_control_set)
        chunks.append(regtext.expand_template(_template("system-controlset.reg"), v))
        if r.driver_database:  # Windows 8+
            chunks.append(regtext.expand_template(_template("system-controlset-win8.reg"), v))
        if r.critical_device_database:
            chunks.append(regtext.expand_template(_template("system-controlset-win7.reg"), v))
        if r.ghost_nics and n == r.current_control_set:
            chunks.append(regtext.expand_template(_template("system-controlset-ghostnic.reg"), v))
    if r.driver_database:
        chunks.append(regtext.expand_template(_template("system-driverdatabase.reg"), {
            "dd_arch": "00000009" if r.arch == "x86_64" else "00000000",
            "arch_folder": "amd64" if r.arch == "x86_64" else "x86",
            "pvscsi_pkg_hash": _pkg_hash(r, "pvscsi.inf"),
            "vmxnet3_pkg_hash": _pkg_hash(r, "vmxnet3.inf"),
        }))
    root = "HKEY_LOCAL_MACHINE\\SYSTEM"
    live = r.current_control_set
    select = [
        regtext.ValueOp("Current", regtext.dword(live)),
        regtext.ValueOp("Default", regtext.dword(live)),
        regtext.ValueOp("Failed", regtext.dword(0)),
        regtext.ValueOp("LastKnownGood", regtext.dword(r.stale_control_sets[0] if r.stale_control_sets else live)),
    ]
    mounted = []
    for p in parts:
        if p.volume_guid:
            mounted.append(regtext.ValueOp("\\??\\Volume%s" % p.volume_guid, regtext.binary(mounted_device_blob(r, p))))
    win = _part(parts, "windows")
    mounted.append(regtext.ValueOp("\\DosDevices\\C:", regtext.binary(mounted_device_blob(r, win))))
    chunks.append(regtext.format_reg([
        regtext.KeySection(root + "\\Select", values=select),
        regtext.KeySection(root + "\\MountedDevices", values=mounted),
        regtext.KeySection(root + "\\Setup", values=[
            regtext.ValueOp(k, regtext.dword(v) if isinstance(v, int) else regtext.sz(v))
            for k, v in r.setup_values().items()]),
    ]))
    return regtext.join_reg(chunks)


def software_reg_text(r: WindowsRecipe) -> str:
    """The SOFTWARE hive as .reg text (HKEY_LOCAL_MACHINE\\SOFTWARE)."""
    text = regtext.expand_template(_template("software.reg"), {
        "product_name": r.product_name,
        "edition_id": r.edition_id,
        "installation_type": r.installation_type,
        "current_version": r.current_version,
        "build": r.build,
        "build_lab": r.build_lab,
    })
    extra: list[regtext.ValueOp] = []
    if r.major >= 10:  # 10+ report the real version only in these two DWORDs
        extra += [regtext.ValueOp("CurrentMajorVersionNumber", regtext.dword(r.major)),
                  regtext.ValueOp("CurrentMinorVersionNumber", regtext.dword(r.minor))]
    if r.ubr is not None:
        extra.append(regtext.ValueOp("UBR", regtext.dword(r.ubr)))
    if r.release_id:
        extra.append(regtext.ValueOp("ReleaseId", regtext.sz(r.release_id)))
    if r.display_version:
        extra.append(regtext.ValueOp("DisplayVersion", regtext.sz(r.display_version)))
    if r.csd_version:
        extra += [regtext.ValueOp("CSDVersion", regtext.sz(r.csd_version)),
                  regtext.ValueOp("CSDBuildNumber", regtext.sz("1130"))]
    key = "HKEY_LOCAL_MACHINE\\SOFTWARE\\Microsoft\\Windows NT\\CurrentVersion"
    state = "HKEY_LOCAL_MACHINE\\SOFTWARE\\Microsoft\\Windows\\CurrentVersion\\Setup\\State"
    return regtext.join_reg([text, regtext.format_reg([
        regtext.KeySection(key, values=extra),
        regtext.KeySection(state, values=[regtext.ValueOp("ImageState", regtext.sz(r.image_state))]),
    ])])


def bcd_spec(r: WindowsRecipe) -> bcd_mod.BcdSpec:
    parts = layout(r)
    system = _part(parts, "esp" if r.firmware == "uefi" else "system-reserved")
    return bcd_mod.BcdSpec(
        firmware=r.firmware,
        loader_guid=r.loader_guid,
        system_partition=partition_ref(r, system),
        windows_partition=partition_ref(r, _part(parts, "windows")),
        description=bcd_description(r),
    )


def bcd_description(r: WindowsRecipe) -> str:
    """What Windows setup names its loader entry."""
    if r.installation_type == "Server":
        return "Windows Server"
    if r.major >= 10:
        return "Windows 11" if r.build >= 22000 else "Windows 10"
    return "Windows 7"


# ----------------------------------------------------------------------- files


def _pe(r: WindowsRecipe, what: str, subsystem: int = pe_mod.SUBSYSTEM_CONSOLE) -> bytes:
    return pe_mod.make_pe(r.arch, os_version=(r.major, r.minor), subsystem=subsystem,
                          description=f"{what} (phony, hyper2kvm test bed, {r.product_name} {r.build})")


def windows_files(r: WindowsRecipe) -> dict[str, bytes]:
    """Small files on C: (guest path -> content). Hives and BCD are added separately."""
    files: dict[str, bytes] = {}
    s32 = "/Windows/System32"
    files[f"{s32}/cmd.exe"] = _pe(r, "Windows Command Processor")
    files[f"{s32}/ntoskrnl.exe"] = _pe(r, "NT kernel", pe_mod.SUBSYSTEM_NATIVE)
    files[f"{s32}/hal.dll"] = _pe(r, "Hardware Abstraction Layer", pe_mod.SUBSYSTEM_NATIVE)
    files[f"{s32}/winload.exe"] = _pe(r, "Windows boot loader (BIOS)", 16)  # boot application
    files[f"{s32}/winload.efi"] = _pe(r, "Windows boot loader (UEFI)", pe_mod.SUBSYSTEM_EFI_APPLICATION)
    files[f"{s32}/pnputil.exe"] = _pe(r, "PnP utility")
    drivers = dict(VMWARE_DRIVERS)
    inbox = INBOX_DRIVERS + (INBOX_DRIVERS_WIN8 if r.driver_database else INBOX_DRIVERS_WIN7)
    drivers.update({d: f"Microsoft inbox driver {d}" for d in inbox})
    for name, desc in drivers.items():
        files[f"{s32}/drivers/{name}.sys"] = _pe(r, desc, pe_mod.SUBSYSTEM_NATIVE)
    for inf, sys_name in (("oem2.inf", "pvscsi"), ("oem3.inf", "vmxnet3")):
        files[f"/Windows/INF/{inf}"] = _inf_text(sys_name).encode("ascii")
        if r.driver_database:
            arch = "amd64" if r.arch == "x86_64" else "x86"
            pkg = f"{s32}/DriverStore/FileRepository/{sys_name}.inf_{arch}_{_pkg_hash(r, sys_name + '.inf')}"
            files[f"{pkg}/{sys_name}.inf"] = _inf_text(sys_name).encode("ascii")
            files[f"{pkg}/{sys_name}.sys"] = files[f"{s32}/drivers/{sys_name}.sys"]
    tools = "/Program Files/VMware/VMware Tools"
    files[f"{tools}/vmtoolsd.exe"] = _pe(r, "VMware Tools daemon")
    files[f"{tools}/VMwareToolboxCmd.exe"] = _pe(r, "VMware Tools toolbox")
    files["/Windows/win.ini"] = b"; for 16-bit app support\r\n[fonts]\r\n[extensions]\r\n"
    files["/Windows/Setup/State/State.ini"] = f"[State]\r\nImageState={r.image_state}\r\n".encode("ascii")
    if r.setup_complete is not None:
        files["/Windows/Setup/Scripts/SetupComplete.cmd"] = r.setup_complete.replace("\n", "\r\n").encode("ascii")
    return files


def _inf_text(name: str) -> str:
    if name == "pvscsi":
        return ("[Version]\r\nSignature=\"$WINDOWS NT$\"\r\nClass=SCSIAdapter\r\n"
                f"ClassGUID={SCSI_ADAPTER_CLASS}\r\nProvider=%VMWARE%\r\nDriverVer=03/18/2022,1.3.26.0\r\n"
                "\r\n[Manufacturer]\r\n%VMWARE%=VMWARE,NTamd64\r\n\r\n[VMWARE.NTamd64]\r\n"
                "%pvscsi.DeviceDesc%=pvscsi_Inst, PCI\\VEN_15AD&DEV_07C0\r\n\r\n"
                "[pvscsi_Service_Inst]\r\nServiceType=1\r\nStartType=0\r\nErrorControl=1\r\n"
                "ServiceBinary=%12%\\pvscsi.sys\r\nLoadOrderGroup=SCSI miniport\r\n\r\n"
                "[Strings]\r\nVMWARE=\"VMware, Inc.\"\r\npvscsi.DeviceDesc=\"VMware PVSCSI Controller\"\r\n")
    return ("[Version]\r\nSignature=\"$WINDOWS NT$\"\r\nClass=Net\r\n"
            f"ClassGUID={NET_CLASS}\r\nProvider=%VMWARE%\r\nDriverVer=05/10/2023,1.9.11.0\r\n"
            "\r\n[Manufacturer]\r\n%VMWARE%=VMWARE,NTamd64\r\n\r\n[VMWARE.NTamd64]\r\n"
            "%vmxnet3.DeviceDesc%=vmxnet3.ndis630.x64, PCI\\VEN_15AD&DEV_07B0\r\n\r\n"
            "[vmxnet3.Service]\r\nServiceType=1\r\nStartType=3\r\nErrorControl=1\r\n"
            "ServiceBinary=%12%\\vmxnet3.sys\r\nLoadOrderGroup=NDIS\r\n\r\n"
            "[Strings]\r\nVMWARE=\"VMware, Inc.\"\r\nvmxnet3.DeviceDesc=\"vmxnet3 Ethernet Adapter\"\r\n")


BITLOCKER_OEM_ID = b"-FVE-FS-"  # the OEM id at byte 3 of a BitLocker volume's boot sector
LDM_MBR_TYPE = 0x42  # MBR partition type of a dynamic (LDM) disk


DIRTY_SEQ = 2107  # the sequence number of the dirty SYSTEM's last reconcile (any; a real one is in the thousands)


def _with_start(r: WindowsRecipe, hive: bytes, start: int, tmp: Path, name: str) -> bytes:
    """``hive`` with the storage driver's Start changed (hivex), as bytes."""
    path = tmp / name
    path.write_bytes(hive)
    regtext.apply_reg(path, "Windows Registry Editor Version 5.00\r\n\r\n"
                      f"[HKEY_LOCAL_MACHINE\\SYSTEM\\{r.control_set}\\Services\\{r.storage_service}]\r\n"
                      f'"Start"=dword:{start:08x}\r\n', "HKEY_LOCAL_MACHINE\\SYSTEM")
    return path.read_bytes()


def dirty_system(r: WindowsRecipe, system: Path, tmp: Path) -> dict[str, bytes]:
    """Make ``system`` a dirty primary whose newest data (the recipe's) is only in SYSTEM.LOG1 and .LOG2.

    As Windows leaves a hive it logged and never reconciled
    (:mod:`lab.testbed.hivelog_writer`): the primary was reconciled with
    pvscsi demand-start (Start=3, sequence number :data:`DIRTY_SEQ`); a flush
    to SYSTEM.LOG1 made it Start=1, then the writer switched logs and a flush
    to SYSTEM.LOG2 made it the recipe's hive (Start=0). SYSTEM.LOG1 still holds
    an entry of an older round after its current one (Start=4, numbered below
    the primary's), which must not be applied.
    """
    recipe = system.read_bytes()
    stale = _with_start(r, recipe, 3, tmp, "reconciled")
    reconciled = bytes(hivelog.with_base_fields(stale[:hivelog.BASE_BLOCK], seq1=DIRTY_SEQ, seq2=DIRTY_SEQ)) + stale[
        hivelog.BASE_BLOCK:]
    mid = _with_start(r, recipe, 1, tmp, "mid")
    old_round = hivelog_writer.log_entry(DIRTY_SEQ - 40, hivelog.read_base_block(reconciled).hbins_size,
                                         hivelog_writer.changed_pages(reconciled, _with_start(r, recipe, 4, tmp, "old")))
    primary, logs = hivelog_writer.dirty_hive(
        reconciled, [hivelog_writer.Flush(mid, "LOG1"), hivelog_writer.Flush(recipe, "LOG2")], {"LOG1": old_round})
    system.write_bytes(primary)
    return {"SYSTEM.LOG1": logs["LOG1"], "SYSTEM.LOG2": logs["LOG2"]}


def hiberfil(size: int = 64 * 1024) -> bytes:
    """A hiberfil.sys header as a hibernated (or Fast-Startup) Windows leaves it: ``HIBR``."""
    head = b"HIBR" + struct.pack("<IIII", 0, 0x1000, 0, 0x1000)
    return head + b"\0" * (size - len(head))


# ----------------------------------------------------------------------- build


def _guestfs():
    import guestfs

    from h2k import accel

    accel.apply_libguestfs_env()
    g = guestfs.GuestFS(python_return_dict=True)
    return g


def _qemu_img_create(path: Path, gib: int) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{gib}G"], check=True)


# The security descriptor Windows gives a file under %WINDIR% (inherited ACEs: SYSTEM and
# Administrators full control, Users read and execute; owner Administrators, group SYSTEM),
# written out by hand from the SECURITY_DESCRIPTOR_RELATIVE / ACL / ACE / SID layouts:
# O:BAG:SYD:AI(A;ID;FA;;;SY)(A;ID;FA;;;BA)(A;ID;0x1200a9;;;BU). ntfs-3g alone would give
# the files it creates "Everyone: full control".
WINDOWS_FILE_SD = bytes.fromhex(
    "01000484" "60000000" "70000000" "00000000" "14000000"  # rev 1, control AI|DP|SR, owner, group, no SACL, DACL
    "02004c00" "03000000"  # ACL rev 2, 76 bytes, 3 ACEs
    "00101400" "ff011f00" "010100000000000512000000"  # allowed, inherited, FA, S-1-5-18
    "00101800" "ff011f00" "01020000000000052000000020020000"  # allowed, inherited, FA, S-1-5-32-544
    "00101800" "a9001200" "01020000000000052000000021020000"  # allowed, inherited, 0x1200a9, S-1-5-32-545
    "01020000000000052000000020020000"  # owner S-1-5-32-544
    "010100000000000512000000"  # group S-1-5-18
)


def _write_tree(g, files: dict[str, bytes], staging: Path, acls: dict[str, bytes] | None = None) -> None:
    """Put files (guest path -> bytes; a path ending in "/" is a directory) in the mounted guest.

    One tar_in call: each write() is a round trip into a FUSE file system. ``acls``: guest
    path -> security descriptor, set through ntfs-3g's system.ntfs_acl (a pax xattr record).
    """
    import io
    import tarfile

    acls = acls or {}
    tar_path = staging / "tree.tar"
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        made: set[str] = set()
        for path, data in sorted(files.items()):
            rel = path.strip("/")
            parents = rel.split("/")[:-1] if not path.endswith("/") else rel.split("/")
            for i in range(1, len(parents) + 1):
                d = "/".join(parents[:i])
                if d not in made:
                    made.add(d)
                    info = tarfile.TarInfo(d)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1546300800
                    tar.addfile(info)
            if path.endswith("/"):
                continue
            info = tarfile.TarInfo(rel)
            info.size, info.mode, info.mtime = len(data), 0o644, 1546300800
            if path in acls:
                info.pax_headers = {"SCHILY.xattr.system.ntfs_acl": acls[path].decode("utf-8", "surrogateescape")}
            tar.addfile(info, io.BytesIO(data))
    g.tar_in(str(tar_path), "/", xattrs=bool(acls))


def _build_windows(r: WindowsRecipe, out: Path) -> None:
    parts = layout(r)
    with Progress(f"build {r.name}", 6) as prog, tempfile.TemporaryDirectory(prefix="h2k-windisk-") as tmpd:
        tmp = Path(tmpd)
        prog.step("hives and BCD from .reg text")
        system = hive_mod.make_hive(tmp / "SYSTEM", system_reg_text(r), "HKEY_LOCAL_MACHINE\\SYSTEM")
        software = hive_mod.make_hive(tmp / "SOFTWARE", software_reg_text(r), "HKEY_LOCAL_MACHINE\\SOFTWARE")
        if r.defect == "truncated-hive":
            data = system.read_bytes()
            # Cut inside the hive bins: the header still says regf, the bins are gone.
            system.write_bytes(data[: 0x1000 + 0x1000 // 2])
        system_logs: dict[str, bytes] = {}
        if r.defect == "dirty-hive":
            system_logs = dirty_system(r, system, tmp)
        bcd = bcd_mod.make_bcd(tmp / "BCD", bcd_spec(r))
        empty = hive_mod.empty_hive()
        _qemu_img_create(out, r.disk_gib)

        prog.step("launch libguestfs")
        g = _guestfs()
        try:
            g.add_drive_opts(str(out), format="qcow2", readonly=False)
            g.launch()
            dev = g.list_devices()[0]
            prog.step("partition and make file systems")
            for offset, data in partition_table(r, parts):
                g.pwrite_device(dev, data, offset)
            g.blockdev_rereadpt(dev)
            for p in parts:
                if p.fstype:
                    opts = {"label": p.label} if p.label else {}
                    g.mkfs(p.fstype, f"{dev}{p.number}", **opts)

            prog.step("write C: (hives, PE files, drivers)")
            win = _part(parts, "windows")
            g.mount(f"{dev}{win.number}", "/")
            files = windows_files(r)
            cfg = "/Windows/System32/config"
            files[f"{cfg}/SYSTEM"] = system.read_bytes()
            files[f"{cfg}/SOFTWARE"] = software.read_bytes()
            for h in ("SAM", "SECURITY", "DEFAULT"):
                files[f"{cfg}/{h}"] = empty
            for log_name, log_data in system_logs.items():
                files[f"{cfg}/{log_name}"] = log_data
            if r.defect in ("hibernated", "faststartup"):
                files["/hiberfil.sys"] = hiberfil()
            elif r.cleared_hiberfil:
                files["/hiberfil.sys"] = bytes(len(hiberfil()))
            for d in ("/Users/Public", "/ProgramData", "/Windows/Temp", "/Program Files (x86)"):
                files[d + "/"] = b""
            _write_tree(g, files, tmp, {p: WINDOWS_FILE_SD for p in files if p.startswith("/Windows/Setup/Scripts/")})
            g.umount_all()

            prog.step("write the boot files and BCD")
            boot_files: dict[str, bytes] = {}
            if r.firmware == "bios":
                sysp = _part(parts, "system-reserved")
                boot_files["/bootmgr"] = b"BOOTMGR phony (hyper2kvm test bed)\0" + b"\0" * 4000
                boot_files["/Boot/BCD"] = bcd.read_bytes()
            else:
                sysp = _part(parts, "esp")
                efi = _pe(r, "Windows Boot Manager", pe_mod.SUBSYSTEM_EFI_APPLICATION)
                boot_files["/EFI/Microsoft/Boot/bootmgfw.efi"] = efi
                boot_files["/EFI/Microsoft/Boot/BCD"] = bcd.read_bytes()
                if r.uefi_fallback == "copy":
                    boot_files["/EFI/Boot/bootx64.efi"] = efi
                elif r.uefi_fallback == "stale":
                    boot_files["/EFI/Boot/bootx64.efi"] = pe_mod.make_pe(
                        r.arch, os_version=(10, 0), subsystem=pe_mod.SUBSYSTEM_EFI_APPLICATION,
                        description="Windows Boot Manager (phony, hyper2kvm test bed, an older build)")
            g.mount(f"{dev}{sysp.number}", "/")
            _write_tree(g, boot_files, tmp)
            g.umount_all()
            # Defects that make a volume or the table unreadable go on last, over finished file systems.
            if r.defect == "bitlocker":
                g.pwrite_device(f"{dev}{win.number}", BITLOCKER_OEM_ID, 3)
            if r.defect == "dynamic":
                g.pwrite_device(dev, mbr_table(r.disk_signature, [
                    (p.role == "system-reserved", LDM_MBR_TYPE, p.start, p.end - p.start + 1) for p in parts]), 0)
            g.shutdown()
        finally:
            g.close()
        prog.step("done")


def _build_linux(r: LinuxRecipe, out: Path) -> None:
    with Progress(f"build {r.name}", 3) as prog:
        _qemu_img_create(out, r.disk_gib)
        prog.step("launch libguestfs")
        g = _guestfs()
        try:
            g.add_drive_opts(str(out), format="qcow2", readonly=False)
            g.launch()
            dev = g.list_devices()[0]
            prog.step("partition, mkfs ext4, write /etc")
            g.part_disk(dev, "mbr")
            g.mkfs("ext4", f"{dev}1", label="rootfs")
            g.mount(f"{dev}1", "/")
            for d in ("/usr/bin", "/usr/lib", "/etc", "/var", "/home", "/root", "/tmp", "/boot"):
                g.mkdir_p(d)
            g.ln_s("usr/bin", "/bin")
            g.ln_s("usr/lib", "/lib")
            uuid_ = g.vfs_uuid(f"{dev}1")
            g.write("/etc/os-release", (
                f'PRETTY_NAME="{r.pretty_name}"\nNAME="Debian GNU/Linux"\nVERSION_ID="{r.version_id}"\n'
                f'VERSION="{r.version_id} (bookworm)"\nVERSION_CODENAME=bookworm\nID={r.distro}\n'
                'HOME_URL="https://www.debian.org/"\n').encode())
            g.write("/etc/debian_version", f"{r.version_id}.5\n".encode())
            g.write("/etc/hostname", f"{r.hostname}\n".encode())
            g.write("/etc/hosts", f"127.0.0.1\tlocalhost\n127.0.1.1\t{r.hostname}\n".encode())
            g.write("/etc/fstab", f"UUID={uuid_}\t/\text4\terrors=remount-ro\t0\t1\n".encode())
            # A real ELF binary, so libguestfs can tell the architecture.
            ls = shutil.which("ls") or "/usr/bin/ls"
            g.upload(ls, "/usr/bin/ls")
            g.chmod(0o755, "/usr/bin/ls")
            g.umount_all()
            g.shutdown()
        finally:
            g.close()
        prog.step("done")


def _build_empty(r: EmptyRecipe, out: Path) -> None:
    with Progress(f"build {r.name}", 1) as prog:
        _qemu_img_create(out, r.disk_gib)
        prog.step("blank qcow2")


def _recipe_data(r: Recipe) -> dict:
    data = {"recipe": dataclasses.asdict(r), "kind": r.kind}
    if r.kind == "windows":
        data["templates"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(RECIPES_DIR.glob("*.reg"))}
    return data


# Only the log writer's code goes into the cache key (h2k.hivelog's reader may change freely).
HIVELOG_WRITER = [hivelog_writer, hivelog.marvin32, hivelog._rotl, hivelog.checksum, hivelog.with_base_fields,
                  hivelog.read_base_block]


def build(name: str) -> Path:
    """The cached qcow2 for variant ``name`` (built on first use, ~30-60 s under TCG)."""
    if name not in VARIANTS:
        from h2k.errors import InputError

        raise InputError(f"unknown phony disk {name!r} (known: {', '.join(sorted(VARIANTS))})")
    r = VARIANTS[name]
    fn: Callable[[Path], None]
    if isinstance(r, WindowsRecipe):
        fn = lambda out: _build_windows(r, out)  # noqa: E731
    elif isinstance(r, LinuxRecipe):
        fn = lambda out: _build_linux(r, out)  # noqa: E731
    else:
        fn = lambda out: _build_empty(r, out)  # noqa: E731
    return cached_build(name, _recipe_data(r), fn, suffix=".qcow2",
                        modules=[sys.modules[__name__], hive_mod, regtext, pe_mod, bcd_mod, *HIVELOG_WRITER])


def builders() -> dict[str, Callable[[], Path]]:
    """For ``h2k testbed build``: one builder per variant."""
    return {name: (lambda n=name: build(n)) for name in VARIANTS}
