"""What ``h2k.linux.inspect`` finds in a Linux guest: plain, JSON-serialisable data."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Kernel:
    version: str  # e.g. 6.1.0-50-amd64 (the /lib/modules directory name)
    vmlinuz: str | None  # guest path, None if /boot has no image for it
    initrd: str | None  # guest path of its initramfs, None if missing
    initrd_modules: list[str] = field(default_factory=list)  # module names packed in the initramfs
    builtin: list[str] = field(default_factory=list)  # VirtIO modules built into this kernel


@dataclass
class MountEntry:
    """One line of /etc/fstab or /etc/crypttab that matters for booting."""

    file: str  # /etc/fstab or /etc/crypttab
    line_no: int  # 1-based
    spec: str  # first field (fstab) or source device (crypttab)
    target: str  # mount point (fstab) or mapped name (crypttab)
    fstype: str = ""
    by_device_name: bool = False  # /dev/sdX, /dev/hdX, /dev/vdX, /dev/xvdX: breaks when the bus changes


@dataclass
class PinnedMac:
    """A network configuration that ties itself to the old NIC's MAC address."""

    path: str
    kind: str  # udev-rule, ifupdown-hwaddress, ifcfg-hwaddr, networkd-match, netplan-macaddress
    mac: str
    fixable: bool = True


@dataclass
class LinuxFacts:
    image: str
    root_device: str  # appliance device of the root file system
    distro: str  # libguestfs inspection: debian, ubuntu, rhel, fedora, archlinux ...
    product: str
    version: str  # major.minor
    arch: str
    package_format: str  # deb, rpm, pacman
    firmware: str  # bios or uefi (GPT + ESP -> uefi)
    mounts: dict[str, str] = field(default_factory=dict)  # mount point -> appliance device
    kernels: list[Kernel] = field(default_factory=list)
    initramfs_tool: str = "unknown"  # initramfs-tools, dracut, mkinitcpio
    initramfs_modules_setting: str | None = None  # initramfs-tools MODULES= (dep, most, list, netboot)
    bootloader: str = "unknown"  # grub2-bios, grub2-efi, unknown
    grub_cfg: str | None = None  # guest path of the generated grub config
    grub_mkconfig: str | None = None  # the guest's command that regenerates it
    grub_disable_linux_uuid: bool = False
    grub_roots: list[str] = field(default_factory=list)  # root= values of the grub.cfg kernel lines
    fstab: list[MountEntry] = field(default_factory=list)
    crypttab: list[MountEntry] = field(default_factory=list)
    pinned_macs: list[PinnedMac] = field(default_factory=list)
    vmware_tools: list[str] = field(default_factory=list)  # installed packages / leftover files
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"{self.image}: Linux {self.product} ({self.distro} {self.version}, {self.arch}), {self.firmware}",
            f"  root {self.root_device}; initramfs tool {self.initramfs_tool}"
            + (f" (MODULES={self.initramfs_modules_setting})" if self.initramfs_modules_setting else "")
            + f"; boot loader {self.bootloader}",
        ]
        for k in self.kernels:
            virtio = sorted(set(k.initrd_modules + k.builtin) & {"virtio_pci", "virtio_blk", "virtio_scsi", "virtio_net"})
            lines.append(f"  kernel {k.version}: initrd {k.initrd or 'MISSING'}; VirtIO: {', '.join(virtio) or 'none'}")
        lines.append(f"  grub root=: {', '.join(self.grub_roots) or '-'}"
                     + (" (GRUB_DISABLE_LINUX_UUID=true)" if self.grub_disable_linux_uuid else ""))
        for e in self.fstab + self.crypttab:
            flag = "  <- device name" if e.by_device_name else ""
            lines.append(f"  {e.file}:{e.line_no} {e.spec} {e.target}{flag}")
        for p in self.pinned_macs:
            lines.append(f"  pinned MAC {p.mac} in {p.path} ({p.kind})")
        if self.vmware_tools:
            lines.append(f"  VMware tools: {', '.join(self.vmware_tools)}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)
