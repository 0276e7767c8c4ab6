"""Static boot-readiness rules for a Linux guest on VirtIO (read-only: one launch, no guest commands).

Rules (each PASS / FAIL / WARN with a subject):
- ``initramfs-virtio``: every kernel's initramfs holds the VirtIO modules the bus needs
  (virtio_pci + virtio_blk or virtio_scsi; virtio_net as WARN), or the kernel has them built in.
  Read straight from the initramfs image (cpio + decompressor), not with a guest tool.
- ``fstab-uuid`` / ``crypttab-uuid``: no entry names a device (/dev/sdX, /dev/vdX ...).
- ``grub-root-uuid``: every kernel line of grub.cfg says root=UUID= (or PARTUUID/LABEL/mapper).
- ``nic-not-pinned``: no configuration pins the old NIC's MAC (WARN for ones we cannot edit).
- ``vmware-tools``: no VMware tools package installed (WARN).
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from h2k.errors import InputError
from h2k.linux.facts import LinuxFacts
from h2k.linux.fix import root_by_uuid
from h2k.linux.inspect import inspect_handle, open_linux

BUS_MODULES = {
    "virtio-blk": ["virtio_pci", "virtio_blk"],
    "virtio-scsi": ["virtio_pci", "virtio_scsi"],
    "virtio-blk+virtio-scsi": ["virtio_pci", "virtio_blk", "virtio_scsi"],
}


@dataclass
class Rule:
    rule: str
    subject: str
    status: str  # PASS, FAIL, WARN
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status != "FAIL"

    def line(self) -> str:
        return f"{self.status:4} {self.rule:18} {self.subject}" + (f": {self.detail}" if self.detail else "")


@dataclass
class LinuxVerifyReport:
    image: str
    bus: str
    results: list[Rule] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "bus": self.bus, "passed": self.passed, "results": [asdict(r) for r in self.results]}

    def summary(self) -> str:
        head = f"{self.image}: {'boot-ready' if self.passed else 'NOT boot-ready'} on {self.bus} (Linux)"
        return "\n".join([head] + ["  " + r.line() for r in self.results])


def rules(facts: LinuxFacts, bus: str) -> list[Rule]:
    """The rules on already-gathered facts (pure: testable without a disk)."""
    if bus not in BUS_MODULES:
        raise InputError(f"unknown bus {bus!r}: use one of {', '.join(BUS_MODULES)}")
    out: list[Rule] = []
    need = BUS_MODULES[bus]
    if not facts.kernels:
        out.append(Rule("initramfs-virtio", "(no kernel)", "FAIL", "no kernel under /lib/modules"))
    for k in facts.kernels:
        have = set(k.initrd_modules) | set(k.builtin)
        if k.initrd is None:
            out.append(Rule("initramfs-virtio", k.version, "FAIL", "no initramfs"))
            continue
        missing = [m for m in need if m not in have]
        if missing:
            out.append(Rule("initramfs-virtio", k.version, "FAIL", f"{k.initrd} lacks {', '.join(missing)}"))
        elif "virtio_net" not in have:
            out.append(Rule("initramfs-virtio", k.version, "WARN", "virtio_net not in the initramfs (loaded later from the root)"))
        else:
            out.append(Rule("initramfs-virtio", k.version, "PASS", f"{', '.join(need + ['virtio_net'])} present"))
    for name, entries in (("fstab-uuid", facts.fstab), ("crypttab-uuid", facts.crypttab)):
        for e in entries:
            if e.by_device_name:
                out.append(Rule(name, f"{e.target}", "FAIL", f"{e.file}:{e.line_no} names device {e.spec}"))
        if entries and not any(e.by_device_name for e in entries):
            out.append(Rule(name, entries[0].file, "PASS", "no device names"))
    if facts.grub_cfg is None:
        out.append(Rule("grub-root-uuid", "(no grub.cfg)", "WARN", "boot loader not checked"))
    else:
        bad = [r for r in facts.grub_roots if not root_by_uuid(r)]
        if bad or not facts.grub_roots:
            out.append(Rule("grub-root-uuid", facts.grub_cfg, "FAIL", f"root={bad[0] if bad else '(no kernel entry)'}"))
        else:
            out.append(Rule("grub-root-uuid", facts.grub_cfg, "PASS", f"root={facts.grub_roots[0]}"))
    pins = facts.pinned_macs
    for p in pins:
        out.append(Rule("nic-not-pinned", p.path, "FAIL" if p.fixable else "WARN", f"{p.kind} pins {p.mac}"))
    if not pins:
        out.append(Rule("nic-not-pinned", "network config", "PASS"))
    vmw = [p for p in facts.vmware_tools if p.startswith("package:")]
    out.append(Rule("vmware-tools", "packages", "WARN" if vmw else "PASS", ", ".join(vmw)))
    return out


def verify_image(image: str | Path, bus: str = "virtio-blk", *_ignored) -> LinuxVerifyReport:
    """Check a Linux disk read-only (one libguestfs launch)."""
    if bus not in BUS_MODULES:
        raise InputError(f"unknown bus {bus!r}: use one of {', '.join(BUS_MODULES)}")
    g, root = open_linux(image, readonly=True)
    try:
        with tempfile.TemporaryDirectory(prefix="h2k-linux-verify-") as tmp:
            facts = inspect_handle(g, root, str(image), Path(tmp))
    finally:
        g.close()
    return LinuxVerifyReport(image=str(image), bus=bus, results=rules(facts, bus))
