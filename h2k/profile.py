"""Machine profiles: what a VM looks like, independent of how it is started.

``h2k.domain`` makes the bootstrap and final profiles for a converted disk;
the lab turns a profile into a QEMU command line (direct backend) or libvirt
domain XML (libvirt backend). Both backends must honour every field.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

FIRMWARES = ("bios", "uefi", "uefi-secureboot")
DISK_BUSES = ("sata", "ide", "virtio-blk", "virtio-scsi", "scsi-lsi", "pvscsi")
NIC_MODELS = ("virtio-net", "e1000e", "e1000", "rtl8139", "vmxnet3", "none")
STAGES = ("bootstrap", "final", "direct")

_MAC_RE = re.compile(r"^[0-9a-f]{2}([:-][0-9a-f]{2}){5}$", re.I)


def normalize_mac(text: str) -> str:
    """aa:bb:cc:dd:ee:ff from any case and ':' or '-' separators; ValueError if not six hex bytes."""
    if not _MAC_RE.match(str(text)):
        raise ValueError(f"MAC address {text!r} is not six hex bytes")
    return str(text).lower().replace("-", ":")


@dataclass
class MachineProfile:
    name: str
    stage: str = "final"  # bootstrap | final | direct
    firmware: str = "bios"  # bios | uefi | uefi-secureboot (firmware is never changed by a migration)
    machine_type: str = "q35"  # q35, or pc (i440fx) which IDE needs
    disk_bus: str = "virtio-blk"
    nic_model: str = "virtio-net"
    # One NIC (of nic_model) per MAC kept from the source VM, in the source's order; none known:
    # one NIC whose MAC QEMU or libvirt chooses.
    macs: list[str] = field(default_factory=list)
    memory_mb: int = 1024
    cpus: int = 1
    cdroms: list[str] = field(default_factory=list)  # e.g. the VirtIO driver ISO at bootstrap
    hyperv: bool = True  # Hyper-V enlightenments incl. hv-crash (stop code in GUEST_PANICKED)
    pvpanic: bool = True
    tpm: bool = False  # swtpm TPM 2.0 (Windows 11)
    guest_agent: bool = True  # virtio-serial channel org.qemu.guest_agent.0
    serial_console: bool = True  # COM1 to a socket and a log file
    # Direct kernel boot, used only for the lab's own tiny test guests.
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None

    def __post_init__(self) -> None:
        if self.firmware not in FIRMWARES:
            raise ValueError(f"firmware must be one of {FIRMWARES}, not {self.firmware!r}")
        if self.disk_bus not in DISK_BUSES:
            raise ValueError(f"disk bus must be one of {DISK_BUSES}, not {self.disk_bus!r}")
        if self.nic_model not in NIC_MODELS:
            raise ValueError(f"NIC model must be one of {NIC_MODELS}, not {self.nic_model!r}")
        self.macs = [normalize_mac(m) for m in self.macs]
        if len(set(self.macs)) != len(self.macs):
            raise ValueError(f"the same MAC address twice in {self.macs}")
        if self.disk_bus == "ide" and self.machine_type == "q35":
            # q35 has no IDE controller: IDE cells run on i440fx.
            self.machine_type = "pc"
        if self.firmware == "uefi-secureboot" and self.machine_type != "q35":
            raise ValueError("Secure Boot needs the q35 machine type (SMM)")

    @property
    def mac(self) -> str | None:
        """The first NIC's MAC, None when QEMU or libvirt chooses it."""
        return self.macs[0] if self.macs else None

    @property
    def nic_count(self) -> int:
        return 0 if self.nic_model == "none" else max(1, len(self.macs))

    @property
    def uefi(self) -> bool:
        return self.firmware.startswith("uefi")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MachineProfile":
        data = dict(data)
        legacy_mac = data.pop("mac", None)  # profiles written before several NICs were kept
        if legacy_mac and not data.get("macs"):
            data["macs"] = [legacy_mac]
        return cls(**data)
