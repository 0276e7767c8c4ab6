"""Plan the offline fix: from WindowsFacts and a driver pack, list every change. Pure data.

``build_plan`` never touches the guest disk. It reads only the driver pack on
the host (INF text, file names, hashes) and returns a :class:`~h2k.changes.Plan`
whose changes ``h2k.fix`` applies in order. Every change carries a ``why``.

What a Windows guest needs to boot from a VirtIO disk (see docs/driverpack-plan.md):

1. the storage miniport ``.sys`` in ``System32\\drivers``;
2. its service key as a boot-start kernel driver in the *current* control set
   (``{CCS}``), plus the Parameters values its INF adds with ``HKR``;
3. no ``StartOverride`` under that service (it silently wins over ``Start``);
4. a binding from the VirtIO PCI IDs to the service: ``CriticalDeviceDatabase``
   (Windows 7 / 2008 R2 and earlier) and/or ``DriverDatabase`` (Windows 8+);
5. ``CrashControl\\AutoReboot`` = 0 so a bugcheck stays visible.

Then, for a complete migration: the full driver packages (storage, NetKVM,
Balloon, vioserial, ...) and the qemu-ga MSI are staged in the guest, and the
first boot (:mod:`h2k.firstboot`: a scheduled task whose steps are bounded and
retried a bounded number of times) installs them with pnputil, installs the
guest agent and re-applies the old NIC's static IP to the VirtIO NIC. Windows
Setup's own state (a generalized template) is never written.

UEFI: when the ESP's removable-media loader is missing or is not Windows' boot
manager, ``h2k.fix`` installs a copy of ``bootmgfw.efi`` (a note here says so).
"""

from __future__ import annotations

import base64
import hashlib
import struct
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from h2k import firstboot
from h2k import inf as infmod
from h2k import winver
from h2k.changes import (
    REG_BINARY,
    REG_DWORD,
    REG_EXPAND_SZ,
    REG_MULTI_SZ,
    REG_SZ,
    FileCopy,
    FileWrite,
    Plan,
    RegDeleteKey,
    RegValue,
)
from h2k.driverpack import DriverFiles, DriverPack
from h2k.errors import BlockerError, InputError
from h2k.facts import NicConfig, WindowsFacts

SCSI_ADAPTER_GUID = "{4D36E97B-E325-11CE-BFC1-08002BE10318}"
DISK_DRIVE_GUID = "{4D36E967-E325-11CE-BFC1-08002BE10318}"  # never for a controller binding
NET_GUID = "{4D36E972-E325-11CE-BFC1-08002BE10318}"

BUS_DRIVERS = {"virtio-blk": ["viostor"], "virtio-scsi": ["vioscsi"], "both": ["viostor", "vioscsi"]}
# Legacy and modern (virtio 1.0) PCI device IDs each storage driver must claim.
STORAGE_DEVICE_IDS = {"viostor": ("1001", "1042"), "vioscsi": ("1004", "1048")}

# viorng is left out by default: not needed to run, and every staged file costs appliance calls in fix.
DEFAULT_EXTRAS = ("NetKVM", "Balloon", "vioserial", "pvpanic")
REQUIRED_EXTRAS = ("NetKVM",)  # without it the migrated VM has no network

# In-box controller drivers the two-phase bootstrap boot (disk on SATA/AHCI, or IDE on
# i440fx) needs as boot-start. A VM installed on LSI/pvscsi has them demand-start,
# often with a StartOverride (Windows 8+), and would stop with 0x7B on SATA too.
BOOTSTRAP_SERVICES = {
    "storahci": "AHCI (SATA) controller, Windows 8+",
    "msahci": "AHCI (SATA) controller, Windows 7",
    "intelide": "Intel PIIX IDE controller (i440fx)",
    "pciide": "generic PCI IDE controller",
    "atapi": "IDE channel driver",
}

SYSTEM = "SYSTEM"


@dataclass(frozen=True)
class PlanOptions:
    """Choices a user can make; the defaults are what a migration needs."""

    extras: tuple[str, ...] = DEFAULT_EXTRAS  # driver folders staged for first-boot install
    guest_agent: bool = True  # stage and install qemu-ga
    firstboot: bool = True  # stage packages and schedule the first-boot install
    reapply_static_ip: bool = True
    binding: str = "auto"  # auto | cdd | driverdb | both
    auto_reboot_off: bool = True
    bootstrap_drivers: bool = True  # make in-box AHCI/IDE drivers boot-start for the bootstrap boot
    staging_dir: str = "Drivers/h2k-staging"  # relative to the system root
    os_folder: str | None = None  # override the folder chosen from the build (e.g. a pre-release)


# ------------------------------------------------------------------ helpers


def _bus_drivers(target_bus: str) -> list[str]:
    try:
        return BUS_DRIVERS[target_bus]
    except KeyError:
        raise InputError(f"unknown target bus {target_bus!r} (expected virtio-blk, virtio-scsi or both)") from None


def _drive_letter(facts: WindowsFacts) -> str:
    for letter, dev in sorted(facts.drive_mappings.items()):
        if dev == facts.root:
            return letter.rstrip(":\\").upper() + ":"
    return "C:"


def _guest(facts: WindowsFacts, *parts: str) -> str:
    """A guest path (for libguestfs) under the system root."""
    root = "/" + facts.system_root.strip("/")
    return "/".join([root] + [p.strip("/") for p in parts if p])


def _win(facts: WindowsFacts, guest_path: str) -> str:
    """The same path as Windows sees it, e.g. C:\\Windows\\Drivers\\h2k-staging."""
    return _drive_letter(facts) + guest_path.replace("/", "\\")


def cdd_key(hwid: str) -> str:
    """CriticalDeviceDatabase key name: PCI\\VEN_..&DEV_.. -> pci#ven_..&dev_.. (as Windows writes them)."""
    return hwid.replace("\\", "#").lower()


def binding_ids(inf_ids: list[str], dev_ids: tuple[str, ...]) -> list[str]:
    """Hardware IDs to bind, most specific first: VEN&DEV&SUBSYS&REV, VEN&DEV&SUBSYS, VEN&DEV.

    Taken from the INF (so the binding never claims a device the driver does
    not), completed with the SUBSYS-only form Windows also generates.
    """
    out: list[str] = []

    def add(i: str) -> None:
        if i.upper() not in (o.upper() for o in out):
            out.append(i.upper())

    for dev in dev_ids:
        prefix = f"PCI\\VEN_1AF4&DEV_{dev}"
        mine = [i for i in inf_ids if i.upper().startswith(prefix.upper())]
        for i in sorted(mine, key=lambda s: (-s.count("&"), s.upper())):
            parts = i.upper().split("&")
            add(i)
            if len(parts) == 4:  # VEN, DEV, SUBSYS, REV
                add("&".join(parts[:3]))
        if mine:
            add(prefix)
    return out


def _driver_version_blob(class_guid: str, date: str | None, version: str | None) -> str:
    """DriverPackages\\<pkg>\\Version as pnputil writes it (48 bytes, recorded shape):
    8-byte header, class GUID, driver date FILETIME, version quad, 8 zero bytes."""
    guid = uuid.UUID(class_guid.strip("{}")).bytes_le
    filetime = 0
    if date:
        try:
            d = datetime.strptime(date.strip(), "%m/%d/%Y").replace(tzinfo=timezone.utc)
            filetime = int((d - datetime(1601, 1, 1, tzinfo=timezone.utc)).total_seconds()) * 10_000_000
        except ValueError:
            filetime = 0
    quad = 0
    if version:
        nums = [int(x) if x.isdigit() else 0 for x in version.split(".")[:4]] + [0, 0, 0, 0]
        quad = (nums[0] << 48) | (nums[1] << 32) | (nums[2] << 16) | nums[3]
    blob = bytes.fromhex("00ff090000000000") + guid + struct.pack("<QQ", filetime, quad) + b"\0" * 8
    return blob.hex()


def package_name(df: DriverFiles) -> str:
    """A DriverStore package name shaped like pnputil's: ``viostor.inf_amd64_<16 hex>``."""
    return f"{df.inf.name.lower()}_{df.arch.lower()}_{df.package_hash()}"


_crlf = firstboot.crlf


# ------------------------------------------------------------------ storage


def _storage_changes(facts: WindowsFacts, df: DriverFiles, why_ctx: str) -> tuple[list, str]:
    inf = df.parsed
    if (inf.class_guid or "").upper() != SCSI_ADAPTER_GUID:
        raise InputError(f"{df.inf}: class {inf.class_name} {inf.class_guid} is not SCSIAdapter "
                         f"{SCSI_ADAPTER_GUID}: not a storage controller driver")
    svc = inf.associated_service
    if svc is None:
        raise InputError(f"{df.inf}: installs no service (no AddService for its models)")
    name = svc.name
    sys_name = df.sys.name
    changes: list = []
    changes.append(FileCopy(str(df.sys), _guest(facts, "System32", "drivers", sys_name),
                            f"{name}: the boot-start miniport must be in System32\\drivers ({why_ctx})"))
    key = f"{{CCS}}\\Services\\{name}"
    why = f"{name}: boot-start kernel driver, so winload loads it before the disk is needed"
    changes += [
        RegValue(SYSTEM, key, "Type", REG_DWORD, 1, f"{why} (SERVICE_KERNEL_DRIVER)"),
        RegValue(SYSTEM, key, "Start", REG_DWORD, 0, f"{why} (SERVICE_BOOT_START"
                 + (f"; the INF says {svc.start_type}, boot start is forced" if svc.start_type else "") + ")"),
        RegValue(SYSTEM, key, "ErrorControl", REG_DWORD, 1, f"{why} (SERVICE_ERROR_NORMAL)"),
        RegValue(SYSTEM, key, "Group", REG_SZ, svc.load_order_group or "SCSI miniport",
                 f"{name}: load order group of storage miniports"),
        RegValue(SYSTEM, key, "ImagePath", REG_EXPAND_SZ, f"system32\\drivers\\{sys_name}",
                 f"{name}: the driver file winload loads"),
    ]
    for sec in svc.addreg_sections:
        for entry in infmod.addreg(inf, sec):
            if entry.root != "HKR" or entry.key_only or entry.name is None or entry.reg_type is None:
                continue
            sub = f"{key}\\{entry.subkey}" if entry.subkey else key
            changes.append(RegValue(SYSTEM, sub, entry.name, entry.reg_type, entry.data(),
                                    f"{name}: HKR value from {df.inf.name} [{sec}] (miniport PnP/bus parameters)"))
    for s in list(facts.storage_drivers) + list(facts.network_drivers):
        if s.name.lower() == name.lower() and s.has_start_override:
            changes.append(RegDeleteKey(SYSTEM, f"{{CCS}}\\Services\\{s.name}\\StartOverride",
                                        f"{name}: StartOverride silently overrides Start on Windows 8+"))
    return changes, name


def _bootstrap_changes(facts: WindowsFacts) -> list:
    """Start=0 (and no StartOverride) for the in-box AHCI/IDE drivers inspection found."""
    out: list = []
    for s in sorted(facts.storage_drivers, key=lambda s: s.name.lower()):
        what = BOOTSTRAP_SERVICES.get(s.name.lower())
        if what is None:
            continue
        why = f"{s.name} ({what}): boot-start so the bootstrap boot on SATA/IDE finds its disk"
        if s.start != 0:
            out.append(RegValue(SYSTEM, f"{{CCS}}\\Services\\{s.name}", "Start", REG_DWORD, 0, why))
        if s.has_start_override:
            out.append(RegDeleteKey(SYSTEM, f"{{CCS}}\\Services\\{s.name}\\StartOverride",
                                    f"{s.name}: StartOverride would keep it demand-start on Windows 8+"))
    return out


def _cdd_changes(name: str, ids: list[str]) -> list:
    out = []
    for hwid in ids:
        key = f"{{CCS}}\\Control\\CriticalDeviceDatabase\\{cdd_key(hwid)}"
        why = f"{name}: bind {hwid} at boot (CriticalDeviceDatabase, Windows up to 7/2008 R2)"
        out.append(RegValue(SYSTEM, key, "Service", REG_SZ, name, why))
        out.append(RegValue(SYSTEM, key, "ClassGUID", REG_SZ, SCSI_ADAPTER_GUID,
                            f"{name}: SCSIAdapter class (a storage controller, not DiskDrive)"))
    return out


def _driverdb_changes(facts: WindowsFacts, df: DriverFiles, name: str, ids: list[str], staged_dir: str) -> list:
    inf = df.parsed
    inf_name = df.inf.name.lower()
    pkg = package_name(df)
    configs: list[str] = []
    first_ids: set[str] = set()
    descriptors: dict[str, tuple[str, str]] = {}
    for m in inf.models:
        if not infmod.decoration_matches(m.decoration, df.arch):
            continue
        if m.install_section not in configs:
            configs.append(m.install_section)
        if m.hardware_ids:
            first_ids.add(m.hardware_ids[0].upper())
        for hwid in m.hardware_ids:
            descriptors.setdefault(hwid.upper(), (m.install_section, m.description))
    if not configs:
        raise InputError(f"{df.inf}: no Models section for {df.arch}")
    why = f"{name}: bind the VirtIO PCI IDs through DriverDatabase (Windows 8 and later)"
    out: list = []
    # The package itself, in the driver store and in \Windows\INF, as pnputil leaves it.
    repo = _guest(facts, "System32", "DriverStore", "FileRepository", pkg)
    for f in (df.inf, df.sys, df.cat):
        if f is not None:
            out.append(FileCopy(str(f), f"{repo}/{f.name.lower()}",
                                f"{name}: driver-store copy of the package DriverDatabase points at"))
    out.append(FileCopy(str(df.inf), _guest(facts, "INF", inf_name), f"{name}: the INF named in DriverInfFiles"))
    k_inf = f"DriverDatabase\\DriverInfFiles\\{inf_name}"
    out += [
        RegValue(SYSTEM, k_inf, "", REG_MULTI_SZ, [pkg], why),
        RegValue(SYSTEM, k_inf, "Active", REG_SZ, pkg, why),
        RegValue(SYSTEM, k_inf, "Configurations", REG_MULTI_SZ, configs, why),
    ]
    # Only the IDs the INF lists: pnputil indexes exactly those (the extra SUBSYS-only
    # form is for CriticalDeviceDatabase, which matches by key name alone).
    ids = [i for i in ids if i.upper() in descriptors]
    for hwid in ids:
        rank = "01ff0000" if hwid.upper() in first_ids else "02ff0000"
        dev_key = "DriverDatabase\\DeviceIds\\" + hwid.upper()  # PCI\VEN_..: PCI is a key level
        out.append(RegValue(SYSTEM, dev_key, inf_name, REG_BINARY, rank,
                            f"{name}: {hwid} -> {inf_name} (hardware-ID rank {rank[:2]})"))
    k_pkg = f"DriverDatabase\\DriverPackages\\{pkg}"
    out += [
        RegValue(SYSTEM, k_pkg, "", REG_SZ, inf_name, why),
        RegValue(SYSTEM, k_pkg, "InfName", REG_SZ, df.inf.name.lower(), why),
        RegValue(SYSTEM, k_pkg, "OemPath", REG_SZ, _win(facts, staged_dir), why),
        RegValue(SYSTEM, k_pkg, "Version", REG_BINARY,
                 _driver_version_blob(inf.class_guid or SCSI_ADAPTER_GUID, inf.driver_date, inf.driver_version),
                 f"{name}: class, date and version of the package ({inf.driver_version})"),
    ]
    if df.cat is not None:
        out.append(RegValue(SYSTEM, k_pkg, "Catalog", REG_SZ, df.cat.name.lower(), why))
    if inf.provider:
        out.append(RegValue(SYSTEM, k_pkg, "Provider", REG_SZ, inf.provider, why))
    svc = inf.associated_service
    for cfg in configs:
        k_cfg = f"{k_pkg}\\Configurations\\{cfg}"
        out += [
            RegValue(SYSTEM, k_cfg, "ConfigFlags", REG_DWORD, 0, why),
            RegValue(SYSTEM, k_cfg, "ConfigScope", REG_DWORD, 7, why),
            RegValue(SYSTEM, k_cfg, "Service", REG_SZ, name, f"{name}: the configuration installs this service"),
        ]
        for sec in (svc.addreg_sections if svc else []):
            for entry in infmod.addreg(inf, sec):
                if entry.root != "HKR" or entry.key_only or entry.name is None or entry.reg_type is None:
                    continue
                sub = f"{k_cfg}\\Services\\{name}" + (f"\\{entry.subkey}" if entry.subkey else "")
                out.append(RegValue(SYSTEM, sub, entry.name, entry.reg_type, entry.data(), why))
    for hwid in ids:
        if hwid.upper() not in descriptors:
            continue
        cfg, desc = descriptors[hwid.upper()]
        k_desc = f"{k_pkg}\\Descriptors\\{hwid.upper()}"
        out += [
            RegValue(SYSTEM, k_desc, "Configuration", REG_SZ, cfg, why),
            RegValue(SYSTEM, k_desc, "Description", REG_SZ, desc, why),
            RegValue(SYSTEM, k_desc, "Manufacturer", REG_SZ, inf.provider or "", why),
        ]
    return out


def _binding_mode(facts: WindowsFacts, options: PlanOptions) -> tuple[bool, bool, str]:
    """(write CriticalDeviceDatabase, write DriverDatabase, reason)."""
    mode = options.binding
    if mode == "cdd":
        return True, False, "binding=cdd requested"
    if mode == "driverdb":
        return False, True, "binding=driverdb requested"
    if mode == "both":
        return True, True, "binding=both requested"
    if mode != "auto":
        raise InputError(f"unknown binding mode {mode!r} (expected auto, cdd, driverdb or both)")
    if facts.has_driver_database:
        # CriticalDeviceDatabase is ignored on Windows 8+, and harmless: write both.
        return True, True, "SYSTEM\\DriverDatabase exists (Windows 8+): DriverDatabase, plus CDD as a harmless fallback"
    return True, False, "no SYSTEM\\DriverDatabase (Windows 7/2008 R2 or earlier): CriticalDeviceDatabase"


# ------------------------------------------------------------------ first boot


def _static_nics(facts: WindowsFacts) -> list[NicConfig]:
    return [n for n in facts.nics if not n.dhcp and n.addresses]


def _network_script(nics: list[NicConfig]) -> str:
    """PowerShell (2.0-compatible: WMI + netsh) that waits for VirtIO NICs and applies the old static IPs.

    The i-th recorded static configuration goes to the i-th VirtIO adapter
    (ordered by PNP device ID); an adapter without a recorded configuration
    keeps DHCP.
    """
    lines = [
        "# hyper2kvm: re-apply the static IP configuration of the old NIC(s) to the VirtIO NIC(s).",
        "$ErrorActionPreference = 'Continue'",
        "$log = Join-Path (Split-Path -Parent $MyInvocation.MyCommand.Path) 'network.log'",
        "function Log($m) { Add-Content -Path $log -Value ((Get-Date -Format s) + ' ' + $m) }",
        "$adapters = @()",
        "for ($i = 0; $i -lt 90; $i++) {",
        "  $adapters = @(Get-WmiObject Win32_NetworkAdapter | Where-Object { $_.PNPDeviceID -like 'PCI\\VEN_1AF4&DEV_1000*' -or $_.PNPDeviceID -like 'PCI\\VEN_1AF4&DEV_1041*' } | Where-Object { $_.NetConnectionID } | Sort-Object PNPDeviceID)",
        f"  if ($adapters.Count -ge {len(nics)}) {{ break }}",
        "  Start-Sleep -Seconds 2",
        "}",
        "if ($adapters.Count -eq 0) { Log 'no VirtIO network adapter appeared'; exit 1 }",
        "$rc = 0",
    ]
    for idx, nic in enumerate(nics):
        masks = list(nic.subnet_masks) + ["255.255.255.0"] * (len(nic.addresses) - len(nic.subnet_masks))
        lines.append(f"if ($adapters.Count -gt {idx}) {{")
        lines.append(f"  $name = $adapters[{idx}].NetConnectionID")
        lines.append(f"  Log (\"adapter {idx} '\" + $name + \"' <- {nic.interface_guid}\")")
        gw = f" gateway={nic.gateways[0]} gwmetric=1" if nic.gateways else ""
        lines.append(f"  netsh interface ipv4 set address name=\"$name\" source=static "
                     f"address={nic.addresses[0]} mask={masks[0]}{gw} | Out-Null")
        lines.append("  if ($LASTEXITCODE -ne 0) { $rc = 1; Log 'netsh set address failed' }")
        for addr, mask in zip(nic.addresses[1:], masks[1:]):
            lines.append(f"  netsh interface ipv4 add address name=\"$name\" address={addr} mask={mask} | Out-Null")
        for n, dns in enumerate(nic.dns):
            if n == 0:
                lines.append(f"  netsh interface ipv4 set dnsservers name=\"$name\" source=static "
                             f"address={dns} register=primary | Out-Null")
            else:
                lines.append(f"  netsh interface ipv4 add dnsservers name=\"$name\" address={dns} "
                             f"index={n + 1} | Out-Null")
        lines.append("}")
    lines.append("exit $rc")
    return "\n".join(lines) + "\n"


def _firstboot_changes(facts: WindowsFacts, staging: str, agent_msi: str | None) -> tuple[list, firstboot.Hook]:
    staging_win = _win(facts, staging)
    nics = _static_nics(facts)
    changes: list = []
    steps = [firstboot.driver_step(facts.build, staging_win)]
    if agent_msi:
        steps.append(firstboot.agent_step(staging_win, agent_msi))
    if nics:
        changes.append(FileWrite(f"{staging}/h2k-network.ps1", _crlf(_network_script(nics)),
                                 "re-apply the old NIC's static IP to the VirtIO NIC at first boot"))
        steps.append(firstboot.network_step(staging_win))
    more, hook = firstboot.firstboot_changes(facts, staging, staging_win, facts.system_root, steps)
    return changes + more, hook


# ------------------------------------------------------------------ the plan


def build_plan(facts: WindowsFacts, pack: DriverPack, target_bus: str,
               options: PlanOptions | None = None) -> Plan:
    """Every change needed to boot ``facts``' Windows on ``target_bus``. Pure: reads only the pack."""
    options = options or PlanOptions()
    if facts.blockers:
        b = facts.blockers[0]
        raise BlockerError(f"refusing to plan: {b.kind}: {b.detail}")
    storage = _bus_drivers(target_bus)
    release = winver.resolve_facts(facts)
    os_folder = options.os_folder or release.os_folder
    arch = release.arch_folder
    plan = Plan(target_bus="virtio-blk+virtio-scsi" if target_bus == "both" else target_bus,
                os_folder=os_folder, arch_folder=arch)
    plan.notes.append(f"{release.name}, {facts.arch}: virtio-win folders {os_folder}/{arch}"
                      + (" (overridden)" if options.os_folder else ""))
    plan.notes.append(f"driver pack: {pack.source}" + (f" ({pack.label})" if pack.label else ""))
    cdd, driverdb, reason = _binding_mode(facts, options)
    plan.notes.append(f"binding: {reason}")

    staging = _guest(facts, options.staging_dir)
    found: dict[str, DriverFiles] = {}
    for drv in storage:
        df = pack.find(drv, os_folder, arch)  # InputError if the pack lacks it
        found[drv] = df
        plan.notes.append(f"{drv} {df.version or '?'} from {df.directory}")
    extras: list[str] = []
    if options.firstboot:
        for drv in options.extras:
            if drv.lower() in (s.lower() for s in storage):
                continue
            if not pack.has(drv, os_folder, arch):
                if drv in REQUIRED_EXTRAS:
                    pack.find(drv, os_folder, arch)  # raises the pack's clear error
                plan.notes.append(f"pack has no {drv} for {os_folder}/{arch}: not staged")
                continue
            found[drv] = pack.find(drv, os_folder, arch)
            extras.append(drv)
    plan.drivers = storage + extras

    changes: list = []
    for drv in storage:
        df = found[drv]
        storage_changes, svc_name = _storage_changes(facts, df, f"target bus {target_bus}")
        changes += storage_changes
        dev_ids = STORAGE_DEVICE_IDS.get(drv.lower(), ())
        ids = binding_ids(df.parsed.hardware_ids(arch), dev_ids)
        if not ids:
            raise InputError(f"{df.inf} does not list the VirtIO PCI IDs of {drv} for {arch}: "
                             f"expected PCI\\VEN_1AF4&DEV_{'/'.join(dev_ids or ('?',))}")
        for dev in dev_ids:
            if not any(f"&DEV_{dev}" in i for i in ids):
                # Old packs predate virtio 1.0 (modern) IDs: QEMU then needs a transitional device.
                plan.notes.append(f"{df.inf.name} does not claim PCI\\VEN_1AF4&DEV_{dev}: "
                                  f"that device variant will not bind")
        if cdd:
            changes += _cdd_changes(svc_name, ids)
        if driverdb:
            changes += _driverdb_changes(facts, df, svc_name, ids, f"{staging}/{df.driver}")

    if options.bootstrap_drivers:
        changes += _bootstrap_changes(facts)

    if options.auto_reboot_off:
        changes.append(RegValue(SYSTEM, "{CCS}\\Control\\CrashControl", "AutoReboot", REG_DWORD, 0,
                                "keep a bugcheck on screen (and paused for the lab) instead of rebooting"))

    if options.firstboot:
        for drv in storage + extras:
            df = found[drv]
            for f in df.files:
                if f.suffix.lower() == ".pdb":
                    continue  # debug symbols: not needed to install
                changes.append(FileCopy(str(f), f"{staging}/{df.driver}/{f.name}",
                                        f"{df.driver}: full package staged for pnputil at first boot"))
        agent_name = None
        if options.guest_agent:
            msi = pack.guest_agent(arch)
            if msi is None:
                plan.notes.append(f"pack has no guest agent MSI for {arch}: qemu-ga not staged")
            else:
                agent_name = msi.name
                changes.append(FileCopy(str(msi), f"{staging}/guest-agent/{msi.name}",
                                        "qemu guest agent, installed by msiexec at first boot"))
        if not options.reapply_static_ip:
            facts = _without_static(facts)
        more, hook = _firstboot_changes(facts, staging, agent_name)
        changes += more
        plan.notes.append(f"first boot: {hook.reason}")
        plan.notes.append("pnputil " + ("/add-driver ... /subdirs /install" if facts.build >= firstboot.PNPUTIL_ADD_DRIVER_BUILD
                                        else "-i -a (one INF at a time)") + f" for build {facts.build}")
        if _static_nics(facts):
            plan.notes.append(f"static IP of {len(_static_nics(facts))} old NIC(s) re-applied at first boot")
    if facts.uefi_fallback in ("missing", "differs"):
        plan.notes.append(f"UEFI: {facts.uefi_fallback_path} {facts.uefi_fallback}: fix installs a copy of "
                          "\\EFI\\Microsoft\\Boot\\bootmgfw.efi there (a VM on KVM starts with empty NVRAM)")
    elif facts.uefi_fallback == "no-bootmgfw":
        plan.notes.append("UEFI: no \\EFI\\Microsoft\\Boot\\bootmgfw.efi on the ESP: the fallback loader cannot be checked")
    if not facts.setup.idle:
        plan.notes.append(f"Windows Setup: {facts.setup.describe()}: left as found")
    plan.changes = changes
    return plan


def _without_static(facts: WindowsFacts) -> WindowsFacts:
    copy = WindowsFacts.from_dict(facts.to_dict())
    copy.nics = [n for n in copy.nics if n.dhcp]
    return copy


# ------------------------------------------------------------------ output


def change_to_dict(change: object) -> dict:
    kind = type(change).__name__
    if isinstance(change, FileWrite):
        d = {"kind": kind, "dest": change.dest, "why": change.why, "size": len(change.content),
             "sha256": hashlib.sha256(change.content).hexdigest()}
        try:
            d["text"] = change.content.decode("ascii")
        except UnicodeDecodeError:
            d["base64"] = base64.b64encode(change.content).decode()
        return d
    d = asdict(change)  # type: ignore[call-overload]
    d["kind"] = kind
    return d


def change_from_dict(d: dict) -> object:
    d = dict(d)
    kind = d.pop("kind")
    if kind == "FileWrite":
        content = d["text"].encode("ascii") if "text" in d else base64.b64decode(d["base64"])
        return FileWrite(d["dest"], content, d.get("why", ""))
    cls = {"RegValue": RegValue, "RegDeleteKey": RegDeleteKey, "FileCopy": FileCopy}[kind]
    return cls(**d)


def plan_to_dict(plan: Plan) -> dict:
    return {
        "target_bus": plan.target_bus, "os_folder": plan.os_folder, "arch_folder": plan.arch_folder,
        "drivers": list(plan.drivers), "notes": list(plan.notes),
        "changes": [change_to_dict(c) for c in plan.changes],
    }


def plan_from_dict(d: dict) -> Plan:
    return Plan(d["target_bus"], d["os_folder"], d["arch_folder"], list(d.get("drivers", [])),
                [change_from_dict(c) for c in d.get("changes", [])], list(d.get("notes", [])))


_TYPE_NAMES = {REG_SZ: "SZ", REG_EXPAND_SZ: "EXPAND_SZ", REG_BINARY: "BINARY", REG_DWORD: "DWORD",
               REG_MULTI_SZ: "MULTI_SZ", 11: "QWORD"}


def describe(change: object) -> tuple[str, str, str]:
    """(action, target, value) for a table row."""
    if isinstance(change, RegValue):
        if change.type == REG_DWORD:
            val = f"{change.data} (0x{int(change.data):x})"  # type: ignore[arg-type]
        elif change.type == REG_BINARY:
            val = f"hex:{change.data}"
        else:
            val = repr(change.data) if isinstance(change.data, list) else str(change.data)
        name = change.name or "(default)"
        return "set", f"{change.hive}\\{change.key} :: {name}", f"{_TYPE_NAMES.get(change.type, change.type)} {val}"
    if isinstance(change, RegDeleteKey):
        return "delete key", f"{change.hive}\\{change.key}", ""
    if isinstance(change, FileCopy):
        return "copy", change.dest, f"from {change.source}"
    if isinstance(change, FileWrite):
        return "write", change.dest, f"{len(change.content)} bytes"
    return type(change).__name__, "", ""


def format_table(plan: Plan) -> str:
    lines = [f"plan: {plan.target_bus} on {plan.os_folder}/{plan.arch_folder}; drivers: {', '.join(plan.drivers)}"]
    lines += [f"  note: {n}" for n in plan.notes]
    rows = [("#", "action", "target", "value", "why")]
    for i, c in enumerate(plan.changes, 1):
        a, t, v = describe(c)
        rows.append((str(i), a, t, v, getattr(c, "why", "")))
    widths = [min(max(len(r[i]) for r in rows), cap) for i, cap in enumerate((4, 10, 90, 60, 200))]
    for r in rows:
        cells = [r[i] if len(r[i]) <= widths[i] else r[i][: widths[i] - 1] + "~" for i in range(4)]
        lines.append("  ".join(cells[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])
    return "\n".join(lines)
