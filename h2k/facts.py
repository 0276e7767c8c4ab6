"""What inspection found: plain, JSON-serialisable data handed to the planner.

Filled by ``h2k.inspect`` (one libguestfs launch); read by ``h2k.plan``,
``h2k.fix``, ``h2k.verify`` and ``h2k.domain``. Nothing here touches a disk.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ServiceInfo:
    """A driver/service key under <CurrentControlSet>\\Services."""

    name: str
    start: int | None = None  # 0 boot, 1 system, 2 auto, 3 demand, 4 disabled
    type: int | None = None
    image_path: str | None = None
    group: str | None = None
    has_start_override: bool = False
    file_present: bool = False  # the .sys exists in System32\drivers


@dataclass
class NicConfig:
    """A TCP/IP interface configuration found in Tcpip\\Parameters\\Interfaces."""

    interface_guid: str
    dhcp: bool
    addresses: list[str] = field(default_factory=list)
    subnet_masks: list[str] = field(default_factory=list)
    gateways: list[str] = field(default_factory=list)
    dns: list[str] = field(default_factory=list)


@dataclass
class Blocker:
    """A condition under which the engine refuses to touch the disk."""

    kind: str  # hibernated, fast-startup, bitlocker, dynamic-disk, corrupt-hive, not-windows, no-os
    detail: str


@dataclass
class WindowsFacts:
    root: str  # libguestfs device of the system volume, e.g. /dev/sda2
    product_name: str  # as in SOFTWARE (Windows 11 says "Windows 10 ...")
    edition: str | None  # EditionID, e.g. ServerStandard, Professional
    major: int
    minor: int
    build: int
    arch: str  # x86_64, i386, aarch64 (libguestfs' naming)
    system_root: str  # guest path, normally /Windows
    current_control_set: int  # SYSTEM\Select\Current
    firmware: str  # bios or uefi
    firmware_source: str  # "metadata" or "partition-table"
    bcd_device: str | None  # libguestfs device holding the BCD store
    bcd_path: str | None  # path within that device, e.g. /Boot/BCD or /EFI/Microsoft/Boot/BCD
    drive_mappings: dict[str, str] = field(default_factory=dict)  # "C:" -> "/dev/sda2"
    has_driver_database: bool = False  # SYSTEM\DriverDatabase present (Windows 8+ binding)
    is_server: bool = False
    storage_drivers: list[ServiceInfo] = field(default_factory=list)
    network_drivers: list[ServiceInfo] = field(default_factory=list)
    hypervisor_tools: list[str] = field(default_factory=list)  # vmware, hyperv, xen
    nics: list[NicConfig] = field(default_factory=list)
    blockers: list[Blocker] = field(default_factory=list)
    # Hives that were dirty (not cleanly flushed) and whose transaction logs were replayed
    # before reading; one line each: "SYSTEM: <state>; replayed SYSTEM.LOG1 entries 4..4".
    replayed_hives: list[str] = field(default_factory=list)
    # Tcpip interfaces left out of ``nics`` because no present adapter is bound to them;
    # one line each: "{guid} 10.20.30.40: <why>".
    ghost_interfaces: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WindowsFacts":
        data = dict(data)
        data["storage_drivers"] = [ServiceInfo(**s) for s in data.get("storage_drivers", [])]
        data["network_drivers"] = [ServiceInfo(**s) for s in data.get("network_drivers", [])]
        data["nics"] = [NicConfig(**n) for n in data.get("nics", [])]
        data["blockers"] = [Blocker(**b) for b in data.get("blockers", [])]
        return cls(**data)
