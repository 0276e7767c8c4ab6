"""Machine profiles for a converted disk: the bootstrap and the final machine.

A migrated Windows guest first boots on hardware it already has drivers for
(``bootstrap``: disk on SATA, or IDE on i440fx; the VirtIO driver ISO as a
CD-ROM; an e1000e NIC) so its first-boot service can install the VirtIO
drivers properly; then it runs on VirtIO (``final``: virtio-blk or virtio-scsi;
virtio-net). The firmware is never changed by a migration: it comes from the
inspection (or the source metadata) and both profiles keep it. The MACs (one NIC
each), memory and CPU count come from the source VM's metadata when known.

Input is either an :class:`h2k.facts.WindowsFacts` or a plain dict, so Linux
guests (and callers without an inspection) can use the same code::

    {"os": "linux", "firmware": "uefi", "name": "web1", "macs": ["52:54:00:.."],
     "memory_mb": 2048, "cpus": 2}

(a single ``"mac"`` is read too). Every MAC becomes one NIC, in order.

Nothing here touches a disk; the result is a :class:`h2k.profile.MachineProfile`
that ``h2k.libvirt_xml`` (libvirt) or the lab's direct backend turns into a VM.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from h2k.errors import InputError
from h2k.facts import WindowsFacts
from h2k.profile import FIRMWARES, NIC_MODELS, MachineProfile

BOOTSTRAP_BUSES = ("sata", "ide")
FINAL_BUSES = ("virtio-blk", "virtio-scsi")
OS_TYPES = ("windows", "linux")
WINDOWS11_MIN_BUILD = 22000  # Windows 11 still says "Windows 10" in ProductName


@dataclass(frozen=True)
class GuestSummary:
    """The few facts a machine profile depends on, from facts or a dict."""

    name: str
    os: str  # windows | linux
    firmware: str  # bios | uefi | uefi-secureboot
    windows11: bool = False
    server: bool = False
    macs: tuple[str, ...] = ()  # as given; MachineProfile checks and normalizes them
    memory_mb: int | None = None
    cpus: int | None = None


def summarize(facts_or_meta: WindowsFacts | Mapping[str, Any], name: str | None = None) -> GuestSummary:
    """Reduce WindowsFacts or a metadata dict to what a profile needs; InputError if unusable."""
    if isinstance(facts_or_meta, WindowsFacts):
        f = facts_or_meta
        win11 = f.major >= 10 and f.build >= WINDOWS11_MIN_BUILD and not f.is_server
        return GuestSummary(
            name=name or _safe_name(f.product_name) or "windows",
            os="windows",
            firmware=_check_firmware(f.firmware),
            windows11=win11,
            server=f.is_server,
        )
    if not isinstance(facts_or_meta, Mapping):
        raise InputError(f"machine profile input must be WindowsFacts or a dict, not {type(facts_or_meta).__name__}")
    meta = dict(facts_or_meta)
    os_type = str(meta.get("os") or meta.get("os_type") or "").lower()
    if os_type not in OS_TYPES:
        raise InputError(f"guest OS must be one of {', '.join(OS_TYPES)}, not {os_type or 'missing'!r}")
    fw = str(meta.get("firmware") or "bios").lower()
    firmware = _check_firmware({"efi": "uefi"}.get(fw, fw))  # VMware and OVF say "efi"
    if meta.get("secure_boot") and firmware == "uefi":
        firmware = "uefi-secureboot"
    build = int(meta.get("build") or 0)
    server = bool(meta.get("is_server") or meta.get("server"))
    win11 = os_type == "windows" and (bool(meta.get("windows11")) or (build >= WINDOWS11_MIN_BUILD and not server))
    return GuestSummary(
        name=name or _safe_name(str(meta.get("name") or "")) or os_type,
        os=os_type,
        firmware=firmware,
        windows11=win11,
        server=server,
        macs=tuple(macs_of(meta)),
        memory_mb=_positive_int(meta, "memory_mb"),
        cpus=_positive_int(meta, "cpus"),
    )


def bootstrap_profile(
    facts_or_meta: WindowsFacts | Mapping[str, Any],
    *,
    name: str | None = None,
    bus: str = "sata",
    nic: str = "e1000e",
    virtio_iso: str | None = None,
    macs: Sequence[str] | None = None,
    memory_mb: int | None = None,
    cpus: int | None = None,
) -> MachineProfile:
    """The first boot on hardware the guest already drives: SATA (or IDE on i440fx), e1000e, driver ISO."""
    if bus not in BOOTSTRAP_BUSES:
        raise InputError(f"bootstrap disk bus must be one of {', '.join(BOOTSTRAP_BUSES)}, not {bus!r}")
    g = summarize(facts_or_meta, name)
    return _profile(g, "bootstrap", bus, nic, [virtio_iso] if virtio_iso else [], macs, memory_mb, cpus)


def final_profile(
    facts_or_meta: WindowsFacts | Mapping[str, Any],
    *,
    name: str | None = None,
    bus: str = "virtio-blk",
    nic: str = "virtio-net",
    macs: Sequence[str] | None = None,
    memory_mb: int | None = None,
    cpus: int | None = None,
) -> MachineProfile:
    """The machine the guest runs on after migration: virtio-blk or virtio-scsi and virtio-net."""
    if bus not in FINAL_BUSES:
        raise InputError(f"final disk bus must be one of {', '.join(FINAL_BUSES)}, not {bus!r}")
    g = summarize(facts_or_meta, name)
    return _profile(g, "final", bus, nic, [], macs, memory_mb, cpus)


def _profile(
    g: GuestSummary,
    stage: str,
    bus: str,
    nic: str,
    cdroms: list[str],
    macs: Sequence[str] | None,
    memory_mb: int | None,
    cpus: int | None,
) -> MachineProfile:
    if nic not in NIC_MODELS:
        raise InputError(f"NIC model must be one of {', '.join(NIC_MODELS)}, not {nic!r}")
    windows = g.os == "windows"
    firmware = g.firmware
    tpm = False
    if windows and g.windows11 and firmware.startswith("uefi"):
        # Windows 11 requires Secure Boot capability and TPM 2.0; BIOS-installed ones stay BIOS.
        firmware, tpm = "uefi-secureboot", True
    machine = "pc" if bus == "ide" else "q35"
    if machine == "pc" and firmware == "uefi-secureboot":
        raise InputError("IDE needs the i440fx machine, which cannot run Secure Boot (SMM): use --bus sata")
    try:
        return MachineProfile(
            name=f"{g.name}-{stage}",
            stage=stage,
            firmware=firmware,
            machine_type=machine,
            disk_bus=bus,
            nic_model=nic,
            macs=list(macs or g.macs),  # given MACs replace the source's
            memory_mb=memory_mb or g.memory_mb or _default_memory(g),
            cpus=cpus or g.cpus or 2,
            cdroms=list(cdroms),
            hyperv=windows,  # Linux does not need enlightenments; Windows gets hv-crash stop codes
            pvpanic=True,
            tpm=tpm,
            guest_agent=True,
            serial_console=True,
        )
    except ValueError as exc:  # the profile's own checks (bad or repeated MACs) are bad input here
        raise InputError(str(exc)) from None


def _default_memory(g: GuestSummary) -> int:
    if g.os == "windows":
        return 4096 if (g.windows11 or g.server) else 2048
    return 1024


def macs_of(meta: Mapping[str, Any]) -> list[str]:
    """The MAC addresses in metadata: its ``macs`` list, else its single ``mac``, else none."""
    macs = meta.get("macs") or ([meta["mac"]] if meta.get("mac") else [])
    if isinstance(macs, str) or not isinstance(macs, Sequence):
        raise InputError(f"macs must be a list of MAC addresses, not {macs!r}")
    return list(macs)


def _check_firmware(fw: str) -> str:
    if fw not in FIRMWARES:
        raise InputError(f"firmware must be one of {', '.join(FIRMWARES)}, not {fw!r}")
    return fw


def _positive_int(meta: Mapping[str, Any], key: str) -> int | None:
    value = meta.get(key)
    if value in (None, ""):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise InputError(f"{key} must be a positive integer, not {value!r}") from None
    if n <= 0:
        raise InputError(f"{key} must be a positive integer, not {value!r}")
    return n


def _safe_name(text: str) -> str:
    """A libvirt-friendly domain name: lower-case letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40]
