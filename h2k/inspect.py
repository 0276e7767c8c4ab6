"""Inspect a Windows disk in one read-only libguestfs launch: facts for the planner, and blockers.

:func:`inspect_image` opens the image read-only (``add_drive_opts readonly=1``),
launches once, and returns :class:`~h2k.facts.WindowsFacts`. The work is done
by :func:`inspect_handle` on an already launched handle, so ``h2k fix`` can
inspect and fix in the same launch.

What comes from where:

* libguestfs inspection: product, major/minor, arch, system root, drive mappings;
* the SYSTEM and SOFTWARE hives (downloaded, read with hivex): EditionID,
  CurrentBuildNumber, InstallationType, ``Select\\Current``, ``DriverDatabase``,
  storage/network services with start types and ``StartOverride``, other
  hypervisors' services, static IPs in ``Tcpip\\Parameters\\Interfaces``;
* the partition table: firmware (GPT + ESP -> uefi, MBR -> bios; metadata
  wins), where the BCD is, dynamic disks (MBR 0x42, LDM GPT types);
* volume boot sectors: BitLocker (``-FVE-FS-``); the ``hiberfil.sys`` header:
  a resumable hibernation or Fast Startup image (:mod:`h2k.hibernation`);
* Tcpip interfaces only where a present adapter is bound (:mod:`h2k.netbind`).
* Windows Setup's state (``SYSTEM\\Setup``, ``ImageState``, ``SetupComplete.cmd``):
  a generalized or mid-setup image is reported, and the fix leaves that state alone;
* UEFI: the ESP's removable-media loader ``\\EFI\\BOOT\\BOOTX64.EFI`` against
  ``\\EFI\\Microsoft\\Boot\\bootmgfw.efi`` (a VM on KVM starts with empty NVRAM).
"""

from __future__ import annotations

import json
import logging
import re
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import hivex

from h2k import accel
from h2k import bcd as bcdlib
from h2k import hibernation, hivelog, netbind
from h2k.firstboot import SETUP_COMPLETE
from h2k.errors import BlockerError, H2KError, InputError
from h2k.facts import Blocker, NicConfig, ServiceInfo, SetupState, WindowsFacts
from h2k.image import DiskImage, as_image
from h2k.registry import current_control_set, decode, find_key, find_value

log = logging.getLogger("h2k.inspect")

ESP_GUID = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LDM_GPT_TYPES = {"5808C8AA-7E8F-42E0-85D2-E1E90434CFB3", "AF9B60A0-1431-4F62-BC68-3311714A69AD"}
MBR_DYNAMIC = 0x42
FVE_SIGNATURE = b"-FVE-FS-"

STORAGE_SERVICES = [
    "viostor", "vioscsi", "pvscsi", "LSI_SAS", "LSI_SAS2", "LSI_SCSI", "megasas", "storvsc",
    "storahci", "msahci", "iaStorV", "atapi", "intelide", "pciide", "xenvbd", "vmscsi", "stornvme",
]
NETWORK_SERVICES = ["netkvm", "vmxnet3ndis6", "vmxnet", "E1G60", "e1iexpress", "e1express", "netvsc", "xennet"]
HYPERVISOR_SERVICES = {
    "vmware": ["VMTools", "vmci", "vmhgfs", "vmmemctl", "vmrawdsk", "vm3dmp", "vmusbmouse", "pvscsi", "vmxnet3ndis6"],
    "hyperv": ["storvsc", "netvsc", "vmicheartbeat"],
    "xen": ["xenbus", "xenfilt", "xeniface", "xenvbd", "xennet"],
}


class NotWindows(InputError):
    """The disk holds another OS (``os_type``); the caller may hand it to the Linux pipeline."""

    def __init__(self, message: str, os_type: str, root: str | None = None) -> None:
        super().__init__(message)
        self.os_type = os_type
        self.root = root


# ---------------------------------------------------------------- guest helpers


def open_guest(image: DiskImage | str | Path, *, readonly: bool):
    """A launched libguestfs handle on ``image`` (the one launch of an operation), its format pinned."""
    import guestfs

    disk = as_image(image)  # the front door, unless the caller already went through it
    accel.apply_libguestfs_env()
    g = guestfs.GuestFS(python_return_dict=True)
    # The appliance in its own process group: Ctrl-C at a terminal reaches h2k only, which then
    # stops between two steps and closes the handle (unmount, sync) instead of the appliance
    # dying in the middle of a write.
    g.set_pgroup(True)
    try:
        g.add_drive_opts(disk.path, format=disk.format, readonly=1 if readonly else 0)
        g.launch()
    except RuntimeError as exc:
        g.close()
        raise launch_error(disk.given, exc) from None
    except BaseException:
        g.close()
        raise
    return g


def launch_error(image: str | Path, exc: RuntimeError) -> H2KError:
    """A libguestfs launch failure as one line (its first line: the cause; the rest is debugging advice)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return H2KError(f"{image}: libguestfs could not start its appliance on it: {lines[0] if lines else 'failed'} "
                    "(LIBGUESTFS_DEBUG=1 shows why)")


def guest_path(g, path: str) -> str | None:
    """The real spelling of a case-insensitive guest path (NTFS/FAT), or None if it does not exist."""
    try:
        real = g.case_sensitive_path(path)
    except RuntimeError:
        return None
    return real if g.exists(real) else None


def resolve_new_path(g, path: str) -> str:
    """Real spelling of the existing parents of ``path``; the missing tail kept as given."""
    parts = [p for p in path.split("/") if p]
    done = ""
    for i, part in enumerate(parts):
        cand = guest_path(g, f"{done}/{part}")
        if cand is None:
            return done + "/" + "/".join(parts[i:])
        done = cand
    return done or "/"


def read_head(g, path: str, n: int) -> bytes:
    try:
        return g.pread(path, n, 0)
    except RuntimeError:
        return b""


# ---------------------------------------------------------------- partitions
#
# The partition tables are parsed here from raw sectors (pread_device, served by
# the appliance's daemon) rather than with part_get_* calls: each of those runs
# parted/sfdisk inside the appliance, which costs seconds apiece under TCG.


@dataclass
class Partition:
    device: str
    disk: str
    number: int
    table: str  # gpt or msdos
    gpt_type: str | None = None
    mbr_id: int | None = None
    bootable: bool = False
    fstype: str | None = None  # ntfs, vfat (from the boot sector) or None
    bitlocker: bool = False
    start: int = 0  # byte offset on the disk
    disk_id: str = ""  # MBR: signature as 8 hex digits; GPT: disk GUID (upper case)
    part_guid: str = ""  # GPT partition GUID (upper case)


@dataclass
class Layout:
    partitions: list[Partition] = field(default_factory=list)
    # Whole disks whose table has an LDM entry (MBR 0x42 / LDM GPT types). Found from the raw
    # table of every disk: a kernel with LDM support hides the slots of a dynamic disk whose
    # LDM database it cannot read, so the partition list alone may be empty.
    dynamic_disks: list[str] = field(default_factory=list)

    def on_disk(self, disk: str) -> list[Partition]:
        return [p for p in self.partitions if p.disk == disk]

    def by_device(self, dev: str) -> Partition | None:
        return next((p for p in self.partitions if p.device == dev), None)

    def find_ref(self, ref: "bcdlib.PartitionRef") -> Partition | None:
        """The partition a BCD device element points at, if it is on this disk set."""
        for p in self.partitions:
            if ref.style == "mbr" and p.table == "msdos":
                if p.disk_id == f"{ref.disk_signature:08x}" and p.start == ref.partition_offset:
                    return p
            elif ref.style == "gpt" and p.table == "gpt":
                if p.disk_id == ref.disk_guid.strip("{}").upper() and p.part_guid == ref.partition_guid.strip("{}").upper():
                    return p
        return None


SECTOR = 512


def _guid_le(raw: bytes) -> str:
    import uuid

    return str(uuid.UUID(bytes_le=raw)).upper()


def parse_table(mbr: bytes, gpt: bytes) -> tuple[str, str, list[dict[str, Any]]]:
    """(table, disk id, entries) from sector 0 and the GPT header + entries (raw bytes).

    Entries: number, start (bytes), gpt_type/part_guid (GPT) or mbr_id/bootable (MBR).
    """
    if len(mbr) < 512 or mbr[510:512] != b"\x55\xaa":
        return "none", "", []
    slots = [mbr[446 + 16 * i : 462 + 16 * i] for i in range(4)]
    if any(s[4] == 0xEE for s in slots) and gpt[:8] == b"EFI PART":
        entries_lba, count, size = struct.unpack_from("<QII", gpt, 72)
        disk_guid = _guid_le(gpt[56:72])
        table_off = (entries_lba - 1) * SECTOR  # ``gpt`` starts at LBA 1
        out = []
        for i in range(count):
            e = gpt[table_off + i * size : table_off + (i + 1) * size]
            if len(e) < 128 or e[:16] == b"\0" * 16:
                continue
            first = struct.unpack_from("<Q", e, 32)[0]
            out.append({"number": i + 1, "start": first * SECTOR, "gpt_type": _guid_le(e[:16]),
                        "part_guid": _guid_le(e[16:32])})
        return "gpt", disk_guid, out
    sig = "%08x" % struct.unpack_from("<I", mbr, 440)[0]
    out = []
    for i, s in enumerate(slots):
        if s[4] == 0:
            continue
        out.append({"number": i + 1, "start": struct.unpack_from("<I", s, 8)[0] * SECTOR, "mbr_id": s[4],
                    "bootable": s[0] == 0x80})
    return "msdos", sig, out


def boot_sector_fs(sector: bytes) -> tuple[str | None, bool]:
    """(fstype, bitlocker) from a volume boot sector."""
    if sector[3:11] == FVE_SIGNATURE:
        return None, True
    if sector[3:11] == b"NTFS    ":
        return "ntfs", False
    if sector[82:87] == b"FAT32" or sector[54:59] in (b"FAT12", b"FAT16"):
        return "vfat", False
    return None, False


def _is_dynamic(table: str, entries: list[dict[str, Any]]) -> bool:
    return any(e.get("mbr_id") == MBR_DYNAMIC or e.get("gpt_type") in LDM_GPT_TYPES for e in entries)


def read_layout(g) -> Layout:
    layout = Layout()
    tables: dict[str, tuple[str, str, dict[int, dict[str, Any]]]] = {}
    for disk in g.list_devices():
        try:
            head = g.pread_device(disk, 34 * SECTOR, 0)  # MBR + GPT header + 128 entries of 128 bytes
        except RuntimeError:
            continue  # smaller than 34 sectors: no table
        table, disk_id, entries = parse_table(head[:SECTOR], head[SECTOR:])
        tables[disk] = (table, disk_id, {e["number"]: e for e in entries})
        if _is_dynamic(table, entries):
            layout.dynamic_disks.append(disk)
    for dev in g.list_partitions():
        disk = g.part_to_dev(dev)
        num = g.part_to_partnum(dev)
        if disk not in tables:
            head = g.pread_device(disk, 34 * SECTOR, 0)  # MBR + GPT header + 128 entries of 128 bytes
            table, disk_id, entries = parse_table(head[:SECTOR], head[SECTOR:])
            tables[disk] = (table, disk_id, {e["number"]: e for e in entries})
        table, disk_id, entries = tables[disk]
        e = entries.get(num, {})
        part = Partition(device=dev, disk=disk, number=num, table=table, start=e.get("start", 0), disk_id=disk_id,
                         gpt_type=e.get("gpt_type"), part_guid=e.get("part_guid", ""), mbr_id=e.get("mbr_id"),
                         bootable=bool(e.get("bootable")))
        try:
            part.fstype, part.bitlocker = boot_sector_fs(g.pread_device(dev, SECTOR, 0))
        except RuntimeError:
            pass
        layout.partitions.append(part)
    return layout


def firmware_of(layout: Layout, disk: str, metadata: dict[str, Any] | None) -> tuple[str, str]:
    """(firmware, source): metadata wins; else GPT + ESP -> uefi, otherwise bios."""
    fw = (metadata or {}).get("firmware")
    if fw:
        fw = str(fw).lower()
        return ("uefi" if fw in ("efi", "uefi", "2") else "bios"), "metadata"
    parts = layout.on_disk(disk)
    if any(p.gpt_type == ESP_GUID for p in parts):
        return "uefi", "partition-table"
    return "bios", "partition-table"


def load_metadata(path: str | Path | None) -> dict[str, Any] | None:
    """Source metadata: JSON ({"firmware": "uefi"}), a VMware .vmx (firmware = "efi") or a Hyper-V generation."""
    if path is None:
        return None
    p = Path(path)
    try:
        text = p.read_text(errors="replace")
    except OSError as exc:
        raise InputError(f"cannot read metadata {p}: {exc.strerror}") from exc
    if p.suffix.lower() == ".vmx":
        m = re.search(r'^\s*firmware\s*=\s*"([^"]*)"', text, re.M | re.I)
        return {"firmware": "uefi" if m and m.group(1).lower() == "efi" else "bios"}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"metadata {p} is neither JSON nor .vmx: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise InputError(f"metadata {p} must be a JSON object")
    if "generation" in data and "firmware" not in data:  # Hyper-V: generation 2 is UEFI
        data["firmware"] = "uefi" if int(data["generation"]) == 2 else "bios"
    return data


# ---------------------------------------------------------------- hives


def _str(h, key: str, name: str) -> str | None:
    node = find_key(h, key)
    got = None if node is None else find_value(h, node, name)
    if got is None:
        return None
    val = decode(*got)
    return val if isinstance(val, str) else None


def _int(h, key: str, name: str) -> int | None:
    node = find_key(h, key)
    got = None if node is None else find_value(h, node, name)
    if got is None:
        return None
    val = decode(*got)
    return val if isinstance(val, int) else None


def _multi(h, key: str, name: str) -> list[str]:
    node = find_key(h, key)
    got = None if node is None else find_value(h, node, name)
    if got is None:
        return []
    val = decode(*got)
    if isinstance(val, list):
        return val
    return [s.strip() for s in str(val).replace(";", ",").split(",") if s.strip()] if isinstance(val, str) else []


def sys_guest_path(system_root: str, image_path: str | None, service: str) -> str:
    """Guest path of a driver's .sys from its ImagePath (default System32\\drivers\\<svc>.sys)."""
    ip = (image_path or f"system32\\drivers\\{service}.sys").replace("\\??\\", "")
    ip = re.sub(r"^\\?systemroot\\", "", ip, flags=re.I)
    ip = re.sub(r"^[a-z]:\\windows\\", "", ip, flags=re.I)
    return f"{system_root}/{ip.lstrip(chr(92))}".replace("\\", "/")


def read_service(h, ccs: int, name: str, file_exists, system_root: str) -> ServiceInfo | None:
    key = f"ControlSet{ccs:03d}\\Services\\{name}"
    node = find_key(h, key)
    if node is None:
        return None
    info = ServiceInfo(
        name=h.node_name(node),
        start=_int(h, key, "Start"),
        type=_int(h, key, "Type"),
        image_path=_str(h, key, "ImagePath"),
        group=_str(h, key, "Group"),
        has_start_override=h.node_get_child(node, "StartOverride") is not None,
    )
    info.file_present = bool(file_exists(sys_guest_path(system_root, info.image_path, name)))
    return info


def read_nics(h, ccs: int, boot_services: list[str] | None = None) -> tuple[list[NicConfig], list[str]]:
    """(interfaces bound to a present adapter, "{guid} addresses: why" for the ghosts) -- see :mod:`h2k.netbind`."""
    base = f"ControlSet{ccs:03d}\\Services\\Tcpip\\Parameters\\Interfaces"
    node = find_key(h, base)
    adapters = netbind.adapters_by_interface(h, ccs)
    boot_arrival = netbind.boot_controller_arrival(h, ccs, boot_services or [])
    nics, ghosts = [], []
    for child in h.node_children(node) if node is not None else []:
        key = f"{base}\\{h.node_name(child)}"
        addresses = [a for a in _multi(h, key, "IPAddress") if a and a != "0.0.0.0"]
        dhcp = _int(h, key, "EnableDHCP") == 1
        if not addresses and not dhcp:
            continue
        binding = netbind.bind_interface(h, ccs, h.node_name(child), adapters, boot_arrival)
        if binding.ghost:
            ghosts.append(f"{binding.guid} {' '.join(addresses) or 'dhcp'}: {binding.ghost}")
            continue
        nics.append(
            NicConfig(
                interface_guid=h.node_name(child),
                dhcp=dhcp,
                addresses=addresses,
                subnet_masks=_multi(h, key, "SubnetMask"),
                gateways=[a for a in _multi(h, key, "DefaultGateway") if a],
                dns=_multi(h, key, "NameServer"),
            )
        )
    return nics, ghosts


SETUP_COMPLETE_MAX = 1 << 20  # larger is not a script anyone chains: refused by the planner


def read_setup_state(sys_h, soft_h) -> SetupState:
    """Windows Setup's values: ``SYSTEM\\Setup`` and SOFTWARE's ``Setup\\State\\ImageState``."""
    state = SetupState()
    if sys_h is not None:
        state.cmdline = _str(sys_h, "Setup", "CmdLine")
        state.setup_type = _int(sys_h, "Setup", "SetupType")
        state.system_setup_in_progress = _int(sys_h, "Setup", "SystemSetupInProgress")
        state.oobe_in_progress = _int(sys_h, "Setup", "OOBEInProgress")
        state.setup_phase = _int(sys_h, "Setup", "SetupPhase")
        state.restart_setup = _int(sys_h, "Setup", "RestartSetup")
        state.mini_setup_in_progress = _int(sys_h, "Setup", "MiniSetupInProgress")
        state.audit_in_progress = _int(sys_h, "Setup", "AuditInProgress")
    if soft_h is not None:
        state.image_state = _str(soft_h, "Microsoft\\Windows\\CurrentVersion\\Setup\\State", "ImageState")
    return state


def _read_setup_complete(g, mounts: "Mounts", root: str, system_root: str, state: SetupState) -> None:
    """SetupComplete.cmd's size and bytes (base64) into ``state``; bytes only up to SETUP_COMPLETE_MAX."""
    import base64

    real = mounts.find(root, f"{system_root}/{SETUP_COMPLETE}")
    if real is None or not g.is_file(real):
        return
    state.setup_complete_size = size = g.filesize(real)
    if size <= SETUP_COMPLETE_MAX:
        state.setup_complete_b64 = base64.b64encode(g.read_file(real) if size else b"").decode("ascii")


# Removable-media loader names by architecture (UEFI specification, "Removable Media Boot Behavior").
UEFI_FALLBACK = {"x86_64": "BOOTX64.EFI", "i386": "BOOTIA32.EFI", "aarch64": "BOOTAA64.EFI"}
BOOTMGFW = "/EFI/Microsoft/Boot/bootmgfw.efi"


def uefi_fallback_path(arch: str) -> str:
    return "/EFI/BOOT/" + UEFI_FALLBACK.get(arch, "BOOTX64.EFI")


def _file_digest(g, path: str, tmp: Path) -> str:
    """SHA-256 of a guest file, hashed on the host (a download: boot managers reach megabytes)."""
    import hashlib

    local = tmp / "digest.bin"
    g.download(path, str(local))
    try:
        return hashlib.sha256(local.read_bytes()).hexdigest()
    finally:
        local.unlink()


def check_uefi_fallback(g, mounts: "Mounts", esp: str, arch: str, tmp: Path) -> str:
    """``same``, ``missing``, ``differs`` or ``no-bootmgfw`` for the ESP ``esp`` (mounted)."""
    bootmgr = mounts.find(esp, BOOTMGFW)
    if bootmgr is None:
        return "no-bootmgfw"
    fallback = mounts.find(esp, uefi_fallback_path(arch))
    if fallback is None or not g.is_file(fallback):
        return "missing"
    if g.filesize(fallback) != g.filesize(bootmgr):
        return "differs"
    return "same" if _file_digest(g, fallback, tmp) == _file_digest(g, bootmgr, tmp) else "differs"


# ---------------------------------------------------------------- the inspection


class Mounts:
    """Several filesystems mounted side by side (``/sda2``, ``/sda1`` ...), each mounted once.

    Every mount runs a helper inside the appliance (seconds under TCG), so an
    operation mounts what it needs once and keeps it: the Windows volume and the
    volume holding the BCD, together. Paths in plans and journals stay relative
    to their volume (``/Windows/...``); :meth:`p` prefixes the mount point.
    """

    def __init__(self, g) -> None:
        self.g = g
        self.points: dict[str, str] = {}
        self.writable: dict[str, bool] = {}

    @staticmethod
    def point_for(device: str) -> str:
        return "/" + device.replace("/dev/", "").replace("/", "_")

    def mount(self, device: str, rw: bool) -> bool:
        """Mount ``device`` (rw falls back to ro, e.g. a hibernated NTFS). False if it cannot be mounted."""
        mp = self.points.get(device) or self.point_for(device)
        if device not in self.points:
            self.g.mkmountpoint(mp)
            self.points[device] = mp
        elif device in self.writable:
            self.g.umount(mp)
        for try_rw in ([True, False] if rw else [False]):
            try:
                (self.g.mount if try_rw else self.g.mount_ro)(device, mp)
                self.writable[device] = try_rw
                return True
            except RuntimeError as exc:
                log.debug("mount %s %s failed: %s", device, "rw" if try_rw else "ro", exc)
        self.writable.pop(device, None)
        return False

    def mounted(self, device: str) -> bool:
        return device in self.writable

    def p(self, device: str, path: str) -> str:
        return self.points[device] + "/" + path.lstrip("/")

    def find(self, device: str, path: str) -> str | None:
        """Real spelling (with the mount point) of a case-insensitive path on ``device``, or None."""
        return guest_path(self.g, self.p(device, path))

    def rel(self, device: str, real: str) -> str:
        mp = self.points[device]
        return real[len(mp):] or "/" if real.startswith(mp) else real

    def umount_all(self) -> None:
        for device, mp in self.points.items():
            if device in self.writable:
                self.g.umount(mp)
        self.writable.clear()


@dataclass
class Inspection:
    """Facts plus the working state ``fix`` needs in the same launch."""

    facts: WindowsFacts
    layout: Layout
    mounts: Mounts
    hive_paths: dict[str, str] = field(default_factory=dict)  # SYSTEM/SOFTWARE -> real path on the root volume
    local_hives: dict[str, Path] = field(default_factory=dict)  # downloaded copies (in workdir), logs replayed
    hive_originals: dict[str, Path] = field(default_factory=dict)  # the untouched download of a dirty hive

    def win(self, path: str) -> str:
        """A path on the Windows volume, as the appliance sees it."""
        return self.mounts.p(self.facts.root, path)

    def win_find(self, path: str) -> str | None:
        return self.mounts.find(self.facts.root, path.replace("\\", "/"))


def _pe_arch(head: bytes) -> str | None:
    if head[:2] != b"MZ" or len(head) < 0x40:
        return None
    off = struct.unpack_from("<I", head, 0x3C)[0]
    if len(head) < off + 6 or head[off : off + 4] != b"PE\0\0":
        return None
    machine = struct.unpack_from("<H", head, off + 4)[0]
    return {0x8664: "x86_64", 0x14C: "i386", 0xAA64: "aarch64"}.get(machine)


def _drive_mappings(h, layout: Layout) -> dict[str, str]:
    """SYSTEM\\MountedDevices: ``\\DosDevices\\C:`` -> MBR signature + offset, or DMIO:ID: + GPT partition GUID."""
    node = find_key(h, "MountedDevices")
    out: dict[str, str] = {}
    for v in h.node_values(node) if node is not None else []:
        name = h.value_key(v)
        m = re.match(r"^\\DosDevices\\([A-Za-z]):$", name)
        if not m:
            continue
        data = h.value_value(v)[1]
        ref = None
        if len(data) == 12:
            sig, off = struct.unpack("<IQ", data)
            ref = bcdlib.PartitionRef("mbr", disk_signature=sig, partition_offset=off)
        elif len(data) == 24 and data[:8] == b"DMIO:ID:":
            ref = bcdlib.PartitionRef("gpt", disk_guid="", partition_guid=_guid_le(data[8:24]))
        if ref is None:
            continue
        for p in layout.partitions:
            if (ref.style == "mbr" and p.disk_id == f"{ref.disk_signature:08x}" and p.start == ref.partition_offset) or (
                ref.style == "gpt" and p.part_guid == ref.partition_guid
            ):
                out[m.group(1).upper()] = p.device
    return out


def _version(soft_h) -> tuple[int, int]:
    cv = "Microsoft\\Windows NT\\CurrentVersion"
    major, minor = _int(soft_h, cv, "CurrentMajorVersionNumber"), _int(soft_h, cv, "CurrentMinorVersionNumber")
    if major is not None:
        return major, minor or 0
    text = _str(soft_h, cv, "CurrentVersion") or "0.0"
    parts = (text.split(".") + ["0"])[:2]
    return tuple(int(x) if x.isdigit() else 0 for x in parts)  # type: ignore[return-value]


def _identify_other_os(g, image: str, layout: Layout) -> NoReturn:
    """No Windows volume: say what is there (libguestfs inspection, only on this path)."""
    if any(p.bitlocker for p in layout.partitions):
        raise BlockerError(f"{image}: the system volume is BitLocker-encrypted (-FVE-FS-); decrypt or suspend it first")
    if layout.dynamic_disks or any(p.mbr_id == MBR_DYNAMIC or p.gpt_type in LDM_GPT_TYPES for p in layout.partitions):
        raise BlockerError(f"{image}: the disk is a dynamic (LDM) disk; convert the system disk to basic first")
    roots = g.inspect_os()
    if roots:
        os_type = g.inspect_get_type(roots[0])
        distro = g.inspect_get_distro(roots[0])
        raise NotWindows(f"{image}: not a Windows disk (found {os_type} {distro})", os_type, roots[0])
    if not layout.partitions:
        raise InputError(f"{image}: no partitions and no operating system found (blank disk?)")
    raise InputError(f"{image}: no operating system found on any partition")


def inspect_handle(
    g, image: str, workdir: str | Path, metadata: dict[str, Any] | None = None, *, writable: bool = False
) -> Inspection:
    """Inspect on a launched handle; leaves the Windows volume (and the BCD's) mounted in ``insp.mounts``.

    ``writable`` mounts read-write where possible (fix on an overlay); otherwise read-only.
    """
    layout = read_layout(g)
    mounts = Mounts(g)
    root = None
    for part in layout.partitions:
        if part.fstype == "ntfs" and mounts.mount(part.device, writable):
            if root is None and mounts.find(part.device, "/Windows/System32/config/SYSTEM"):
                root = part.device
    if root is None:
        _identify_other_os(g, image, layout)

    blockers: list[Blocker] = []
    system_root = mounts.rel(root, mounts.find(root, "/Windows") or mounts.p(root, "/Windows"))
    part = layout.by_device(root)
    disk = part.disk if part else g.part_to_dev(root)
    facts = WindowsFacts(
        root=root, product_name="unknown", edition=None, major=0, minor=0, build=0, arch="unknown",
        system_root=system_root, current_control_set=0, firmware="bios", firmware_source="partition-table",
        bcd_device=None, bcd_path=None,
    )
    facts.firmware, facts.firmware_source = firmware_of(layout, disk, metadata)
    insp = Inspection(facts=facts, layout=layout, mounts=mounts)

    # Blockers from the partition table and boot sectors.
    if disk in layout.dynamic_disks:
        blockers.append(Blocker("dynamic-disk", f"{disk} (the system disk) is a dynamic (LDM) disk; convert it to basic first"))
    for p in layout.partitions:
        if p.bitlocker:
            blockers.append(Blocker("bitlocker", f"{p.device} is BitLocker-encrypted (-FVE-FS-); decrypt or suspend BitLocker first"))

    # Hives: downloaded and read on the host.
    workdir = Path(workdir)
    for name in ("SYSTEM", "SOFTWARE"):
        real = mounts.find(root, f"{system_root}/System32/config/{name}")
        if real is None:
            blockers.append(Blocker("corrupt-hive", f"{name} hive missing from {system_root}\\System32\\config"))
            continue
        local = workdir / name
        g.download(real, str(local))
        insp.hive_paths[name] = mounts.rel(root, real)
        insp.local_hives[name] = local
        blockers += _recover_dirty(g, insp, name, real, local, workdir)

    def file_exists(path: str) -> bool:
        return mounts.find(root, path) is not None

    arch = _pe_arch(read_head(g, mounts.find(root, f"{system_root}/System32/cmd.exe") or "/nonexistent", 4096))
    sys_h = _open_hive(insp, "SYSTEM", blockers)
    soft_h = _open_hive(insp, "SOFTWARE", blockers)
    if soft_h is not None:
        cv = "Microsoft\\Windows NT\\CurrentVersion"
        facts.product_name = _str(soft_h, cv, "ProductName") or "unknown"
        facts.edition = _str(soft_h, cv, "EditionID")
        facts.major, facts.minor = _version(soft_h)
        build = _str(soft_h, cv, "CurrentBuildNumber") or _str(soft_h, cv, "CurrentBuild")
        facts.build = int(build) if build and build.isdigit() else 0
        facts.is_server = (_str(soft_h, cv, "InstallationType") or "").lower().startswith("server") or (
            "server" in (facts.edition or "").lower()
        )
    if sys_h is not None:
        try:
            ccs = current_control_set(sys_h)
        except InputError as exc:
            blockers.append(Blocker("corrupt-hive", str(exc)))
            ccs = 0
        facts.current_control_set = ccs
        facts.has_driver_database = find_key(sys_h, "DriverDatabase") is not None
        facts.drive_mappings = _drive_mappings(sys_h, layout)
        if ccs and find_key(sys_h, f"ControlSet{ccs:03d}") is None:
            blockers.append(Blocker("corrupt-hive", f"SYSTEM\\Select\\Current is {ccs} but ControlSet{ccs:03d} does not exist"))
        elif ccs:
            if arch is None:
                env = _str(sys_h, f"ControlSet{ccs:03d}\\Control\\Session Manager\\Environment", "PROCESSOR_ARCHITECTURE")
                arch = {"AMD64": "x86_64", "X86": "i386", "ARM64": "aarch64"}.get((env or "").upper())
            for name in STORAGE_SERVICES:
                svc = read_service(sys_h, ccs, name, file_exists, system_root)
                if svc:
                    facts.storage_drivers.append(svc)
            for name in NETWORK_SERVICES:
                svc = read_service(sys_h, ccs, name, file_exists, system_root)
                if svc:
                    facts.network_drivers.append(svc)
            for family, names in HYPERVISOR_SERVICES.items():
                if any(find_key(sys_h, f"ControlSet{ccs:03d}\\Services\\{n}") is not None for n in names):
                    facts.hypervisor_tools.append(family)
            facts.nics, facts.ghost_interfaces = read_nics(
                sys_h, ccs, [d.name for d in facts.storage_drivers if d.start == 0])
            blockers += _hibernation(g, mounts, root, sys_h, ccs)
    facts.setup = read_setup_state(sys_h, soft_h)
    _read_setup_complete(g, mounts, root, system_root, facts.setup)
    facts.arch = arch or "unknown"
    facts.bcd_device, facts.bcd_path = _locate_bcd(mounts, layout, disk, facts.firmware, root, writable)
    if facts.firmware == "uefi":
        esp = next((p.device for p in layout.on_disk(disk) if p.gpt_type == ESP_GUID), None)
        if esp is not None and (mounts.mounted(esp) or mounts.mount(esp, writable)):
            facts.esp_device = esp
            facts.uefi_fallback_path = uefi_fallback_path(facts.arch)
            facts.uefi_fallback = check_uefi_fallback(g, mounts, esp, facts.arch, workdir)
    facts.blockers = blockers
    return insp


def _recover_dirty(g, insp: Inspection, name: str, real: str, local: Path, workdir: Path) -> list[Blocker]:
    """A dirty hive: replay its new-format logs into the local copy, or return a blocker.

    The pristine download stays in ``insp.hive_originals`` (fix backs THAT up and
    checks the guest still holds it); ``insp.local_hives`` becomes the replayed copy.
    """
    data = local.read_bytes()
    base = hivelog.read_base_block(data)
    if base is None or not base.dirty:
        return []  # clean, or not regf at all (hivex will say corrupt)
    logs: dict[str, bytes] = {}
    for suffix in (".LOG1", ".LOG2", ".LOG"):
        path = guest_path(g, real + suffix)
        if path is not None and g.is_file(path):
            dest = workdir / f"{name}{suffix}"
            g.download(path, str(dest))  # logs reach megabytes: read_file is capped by the protocol
            logs[name + suffix] = dest.read_bytes()
    state = f"primary sequence {base.seq1} != secondary {base.seq2}" if base.checksum_ok else "base block checksum wrong"
    try:
        rec = hivelog.replay(data, logs)
    except hivelog.ReplayError as exc:
        return [Blocker("dirty-hive", f"the {name} hive was not cleanly flushed ({state}) and {exc}: "
                        "boot Windows once and shut it down cleanly")]
    original = workdir / f"{name}.dirty-original"
    local.replace(original)
    local.write_bytes(rec.data)
    insp.hive_originals[name] = original
    insp.facts.replayed_hives.append(
        f"{name}: {state}; replayed {', '.join(rec.logs_used)} entries {rec.applied[0]}..{rec.applied[-1]}"
        + "".join(f"; not applied after them: {note}" for note in rec.notes))
    log.info("%s was dirty; replayed %s", name, insp.facts.replayed_hives[-1])
    return []


def _open_hive(insp: Inspection, name: str, blockers: list[Blocker]):
    local = insp.local_hives.get(name)
    if local is None:
        return None
    try:
        h = hivex.Hivex(str(local))
        h.root()
        return h
    except RuntimeError as exc:
        blockers.append(Blocker("corrupt-hive", f"the {name} hive is corrupt (hivex: {exc or 'unreadable'})"))
        return None


def _hibernation(g, mounts: Mounts, root: str, sys_h, ccs: int) -> list[Blocker]:
    hiber = mounts.find(root, "/hiberfil.sys")
    hiberboot = _int(sys_h, f"ControlSet{ccs:03d}\\Control\\Session Manager\\Power", "HiberbootEnabled") == 1
    return hibernation.blockers(None if hiber is None else read_head(g, hiber, 4), hiberboot)


def _locate_bcd(mounts: Mounts, layout: Layout, disk: str, firmware: str, root: str, writable: bool) -> tuple[str | None, str | None]:
    """Where the BCD store is: the ESP for UEFI; the active/System Reserved partition (or C:) for BIOS.

    Returns (device, path on that device); the device stays mounted.
    """
    parts = layout.on_disk(disk)
    if firmware == "uefi":
        path = "/EFI/Microsoft/Boot/BCD"
        cands = [p for p in parts if p.gpt_type == ESP_GUID] + [p for p in parts if p.fstype == "vfat" and p.gpt_type != ESP_GUID]
    else:
        path = "/Boot/BCD"
        cands = [p for p in parts if p.bootable] + [p for p in parts if not p.bootable and p.fstype in ("ntfs", "vfat")]
    for p in cands:
        if not mounts.mounted(p.device) and not mounts.mount(p.device, writable):
            continue
        real = mounts.find(p.device, path)
        if real:
            return p.device, mounts.rel(p.device, real)
    return None, None


def inspect_image(image: str | Path, metadata: dict[str, Any] | None = None) -> WindowsFacts:
    """Facts about a Windows disk, in one read-only libguestfs launch. Blockers are in ``facts.blockers``.

    Raises :class:`NotWindows` for another OS, InputError when no OS is found,
    BlockerError when the system volume cannot even be read (BitLocker).
    """
    disk = as_image(image)
    g = open_guest(disk, readonly=True)
    try:
        with tempfile.TemporaryDirectory(prefix="h2k-inspect-") as tmp:
            return inspect_handle(g, disk.given, tmp, metadata).facts
    finally:
        g.close()


def summary(facts: WindowsFacts) -> str:
    """A readable multi-line summary for ``h2k inspect``."""
    lines = [
        f"product        {facts.product_name} ({facts.edition or 'edition unknown'})",
        f"version        {facts.major}.{facts.minor} build {facts.build}  arch {facts.arch}  "
        f"{'server' if facts.is_server else 'client'}",
        f"system root    {facts.root} {facts.system_root}  control set ControlSet{facts.current_control_set:03d}",
        f"firmware       {facts.firmware} (from {facts.firmware_source})",
        f"BCD            {facts.bcd_device or '-'} {facts.bcd_path or '(not found)'}",
        f"drives         {', '.join(f'{k} {v}' for k, v in sorted(facts.drive_mappings.items())) or '-'}",
        f"binding        {'DriverDatabase' if facts.has_driver_database else 'CriticalDeviceDatabase'}",
    ]
    for label, svcs in (("storage", facts.storage_drivers), ("network", facts.network_drivers)):
        for s in svcs:
            lines.append(
                f"{label:<14} {s.name:<14} start={s.start} type={s.type} sys={'yes' if s.file_present else 'NO'}"
                f"{' StartOverride' if s.has_start_override else ''}"
            )
    lines.append(f"other tools    {', '.join(facts.hypervisor_tools) or '-'}")
    for nic in facts.nics:
        lines.append(f"nic            {nic.interface_guid} {'dhcp' if nic.dhcp else 'static'} {' '.join(nic.addresses)}")
    for ghost in facts.ghost_interfaces:
        lines.append(f"ghost nic      {ghost} (its settings are not carried over)")
    for r in facts.replayed_hives:
        lines.append(f"hive log       {r}")
    lines.append(f"setup          {facts.setup.describe()}")
    if facts.uefi_fallback is not None:
        lines.append(f"uefi fallback  {facts.uefi_fallback_path}: {UEFI_FALLBACK_WORDS.get(facts.uefi_fallback, facts.uefi_fallback)}")
    for b in facts.blockers:
        lines.append(f"BLOCKER        {b.kind}: {b.detail}")
    return "\n".join(lines)


UEFI_FALLBACK_WORDS = {
    "same": "a copy of bootmgfw.efi",
    "missing": "MISSING (fix installs a copy of bootmgfw.efi)",
    "differs": "not Windows' boot manager (fix replaces it with bootmgfw.efi, keeping a backup)",
    "no-bootmgfw": "no \\EFI\\Microsoft\\Boot\\bootmgfw.efi on the ESP to copy",
}


def blocker_error(facts: WindowsFacts) -> BlockerError | InputError | None:
    """The error ``fix`` raises for these facts (first blocker wins), or None."""
    if not facts.blockers:
        return None
    b = facts.blockers[0]
    more = f" (+{len(facts.blockers) - 1} more)" if len(facts.blockers) > 1 else ""
    if b.kind == "corrupt-hive":
        return InputError(f"corrupt hive: {b.detail}{more}")
    return BlockerError(f"{b.kind}: {b.detail}{more}")
