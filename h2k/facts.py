"""What inspection found: plain, JSON-serialisable data handed to the planner.

Filled by ``h2k.inspect`` (one libguestfs launch); read by ``h2k.plan``,
``h2k.fix``, ``h2k.verify`` and ``h2k.domain``. Nothing here touches a disk.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

# h2k's own first-boot hook in SYSTEM\Setup\CmdLine (written only on an idle image): it names
# the values it replaced, so a later inspection sees the image's own state through it.
H2K_CMDLINE_HOOK = re.compile(r'h2k-bootstrap\.cmd" cmdline SetupType=(absent|0) CmdLine=(absent|empty)"$')


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
class SetupState:
    """Windows Setup's own state, read and never written (a generalized template keeps it).

    ``SYSTEM\\Setup``: ``CmdLine`` (run by Winlogon before logon while ``SetupType`` is
    non-zero), ``SetupType`` (0 none, 1/2 run CmdLine, 4 upgrade), ``SystemSetupInProgress``,
    ``OOBEInProgress``, ``SetupPhase``, ``RestartSetup`` (and the older ``MiniSetupInProgress``,
    ``AuditInProgress``); ``SOFTWARE\\Microsoft\\Windows\\
    CurrentVersion\\Setup\\State`` ``ImageState`` (Microsoft's "Windows Setup States":
    ``IMAGE_STATE_COMPLETE``, ``IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE`` ...).
    None: the value is absent.
    """

    cmdline: str | None = None
    setup_type: int | None = None
    system_setup_in_progress: int | None = None
    oobe_in_progress: int | None = None
    setup_phase: int | None = None
    restart_setup: int | None = None
    mini_setup_in_progress: int | None = None  # XP/2003 names, still honoured by readers of SYSTEM\Setup
    audit_in_progress: int | None = None
    image_state: str | None = None
    # %WINDIR%\Setup\Scripts\SetupComplete.cmd as found: its size (None: absent) and its bytes
    # (base64; None when absent or too large to chain).
    setup_complete_size: int | None = None
    setup_complete_b64: str | None = None

    @property
    def h2k_hook(self) -> bool:
        """SYSTEM\\Setup holds h2k's own first-boot hook (a previous fix, first boot not yet run)."""
        return self.setup_type == 2 and bool(H2K_CMDLINE_HOOK.search(self.cmdline or ""))

    def without_h2k_hook(self) -> "SetupState":
        """The image's own state: CmdLine and SetupType as they were before h2k's hook."""
        m = H2K_CMDLINE_HOOK.search(self.cmdline or "") if self.setup_type == 2 else None
        if m is None:
            return self
        return replace(self, setup_type=None if m.group(1) == "absent" else 0,
                       cmdline=None if m.group(2) == "absent" else "")

    @property
    def kind(self) -> str:
        """``generalized`` (sysprep /generalize: specialize and OOBE run at the next boot),
        ``mid-setup`` (any other setup pass pending), or ``complete`` (an ordinary installed system).
        h2k's own pending hook does not count: the image's state is judged without it."""
        if self.h2k_hook:
            return self.without_h2k_hook().kind
        image = (self.image_state or "").upper()
        if "GENERALIZE_RESEAL" in image or "windeploy" in (self.cmdline or "").lower():
            return "generalized"
        if self.idle:
            return "complete"
        return "mid-setup"

    @property
    def idle(self) -> bool:
        """Nothing of Windows Setup is pending: the next boot is an ordinary one (h2k's own hook aside).
        CmdLine must be absent or empty, SetupType absent or 0, every flag 0 or absent."""
        if self.h2k_hook:
            return self.without_h2k_hook().idle
        image = (self.image_state or "IMAGE_STATE_COMPLETE").upper()
        return (not self.setup_type and not self.system_setup_in_progress and not self.oobe_in_progress
                and not self.setup_phase and not self.restart_setup and not self.mini_setup_in_progress
                and not self.audit_in_progress and self.cmdline in (None, "")
                and image == "IMAGE_STATE_COMPLETE")

    def describe(self) -> str:
        fields = [("CmdLine", self.cmdline), ("SetupType", self.setup_type),
                  ("SystemSetupInProgress", self.system_setup_in_progress), ("OOBEInProgress", self.oobe_in_progress),
                  ("SetupPhase", self.setup_phase), ("RestartSetup", self.restart_setup),
                  ("MiniSetupInProgress", self.mini_setup_in_progress), ("AuditInProgress", self.audit_in_progress),
                  ("ImageState", self.image_state)]
        shown = " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in fields if v is not None)
        extra = f" SetupComplete.cmd ({self.setup_complete_size} bytes)" if self.setup_complete_size is not None else ""
        if self.h2k_hook:
            extra += "; h2k's first-boot hook is pending in CmdLine"
        return f"{self.kind} ({shown or 'no setup values'}){extra}"


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
    setup: SetupState = field(default_factory=SetupState)
    # UEFI only: the removable-media loader OVMF boots with empty NVRAM (\EFI\BOOT\BOOTX64.EFI on
    # x86_64) compared with Windows' boot manager \EFI\Microsoft\Boot\bootmgfw.efi on the same ESP:
    # "same" (a copy of it), "missing", "differs", "no-bootmgfw"; None on BIOS or without an ESP.
    uefi_fallback: str | None = None
    uefi_fallback_path: str | None = None  # ESP path, e.g. /EFI/BOOT/BOOTX64.EFI
    esp_device: str | None = None  # libguestfs device of the ESP

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["setup"]["kind"] = self.setup.kind  # for readers of the JSON; recomputed on load
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WindowsFacts":
        data = dict(data)
        data["storage_drivers"] = [ServiceInfo(**s) for s in data.get("storage_drivers", [])]
        data["network_drivers"] = [ServiceInfo(**s) for s in data.get("network_drivers", [])]
        data["nics"] = [NicConfig(**n) for n in data.get("nics", [])]
        data["blockers"] = [Blocker(**b) for b in data.get("blockers", [])]
        data["setup"] = SetupState(**{k: v for k, v in data.get("setup", {}).items() if k != "kind"})
        return cls(**data)
