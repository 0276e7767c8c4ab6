"""The source VM as its metadata describes it, and the ONE entry point every command calls.

``resolve_input(path, workdir)`` takes whatever the user has -- a disk in any
format qemu-img reads, a VMware ``.vmx`` or ``.ovf``, an ``.ova`` archive, a
Hyper-V configuration ``.xml``, a cloud image with a JSON sidecar, or the
sidecar itself -- and returns the disk path(s) in boot order plus a
:class:`SourceMachine` (or None when nothing but a disk was given). Nothing
given is ever written; an OVA is extracted (safely) under ``workdir`` and
``cleanup()`` removes what was extracted.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from h2k.errors import InputError

if TYPE_CHECKING:
    from h2k.image import DiskImage

FIRMWARES = ("bios", "uefi")
# Every number a metadata file can give is bounded before anything uses it (QEMU 7.2's q35 takes
# at most 1024 vCPUs; 16 TiB of memory is past any VM these tools convert).
MAX_CPUS = 1024
MAX_MEMORY_MIB = 16 << 20
MAX_NICS = 64
MAX_DISKS = 256


@dataclass
class SourceDisk:
    path: str  # absolute host path of the disk (descriptor for VMDK)
    controller: str | None = None  # e.g. "scsi0", "sata0", "ide0"
    unit: int | None = None  # position on that controller


@dataclass
class SourceNic:
    model: str | None  # the source's NIC model name (vmxnet3, e1000, e1000e, synthetic, ...)
    mac: str | None  # aa:bb:cc:dd:ee:ff, lower case


@dataclass
class SourceController:
    name: str  # scsi0, sata0, ide0, nvme0
    model: str  # pvscsi, lsilogic, lsisas1068, buslogic, ahci, ide, nvme, hyperv-scsi ...


@dataclass
class SourceMachine:
    origin: str  # vmx | ovf | hyperv | cloud
    name: str | None = None
    firmware: str | None = None  # bios | uefi (None: unknown, the disk decides)
    secure_boot: bool = False
    guest_os: str | None = None  # the source's own OS id (VMware guestOS, OVF osType ...)
    cpus: int | None = None
    memory_mib: int | None = None
    disks: list[SourceDisk] = field(default_factory=list)  # boot disk first
    nics: list[SourceNic] = field(default_factory=list)
    controllers: list[SourceController] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.firmware is not None and self.firmware not in FIRMWARES:
            raise InputError(f"{self.origin} metadata: firmware {self.firmware!r} is not bios or uefi")
        for what, value, top in (("CPU count", self.cpus, MAX_CPUS), ("memory (MiB)", self.memory_mib, MAX_MEMORY_MIB),
                                 ("NIC count", len(self.nics), MAX_NICS), ("disk count", len(self.disks), MAX_DISKS)):
            if value is not None and not 0 <= value <= top:
                raise InputError(f"{self.origin} metadata: {what} {value} is out of range (at most {top})")

    @property
    def macs(self) -> list[str]:
        return [n.mac for n in self.nics if n.mac]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_metadata(self) -> dict[str, Any]:
        """The plain metadata dict h2k.inspect / h2k.domain take (firmware wins over the disk's layout)."""
        meta: dict[str, Any] = {"source": self.origin}
        if self.firmware:
            meta["firmware"] = self.firmware
        if self.secure_boot:
            meta["secure_boot"] = True
        if self.name:
            meta["name"] = self.name
        if self.macs:
            meta["mac"] = self.macs[0]
            meta["macs"] = self.macs
        if self.memory_mib:
            meta["memory_mb"] = self.memory_mib
        if self.cpus:
            meta["cpus"] = self.cpus
        if self.guest_os:
            meta["guest_os"] = self.guest_os
        return meta


@dataclass
class ResolvedInput:
    given: str  # what the user passed
    disks: list[str]  # boot disk first
    machine: SourceMachine | None = None
    extracted: bool = False  # the disks live in a temporary directory (an OVA was unpacked)
    images: list[DiskImage] = field(default_factory=list)  # the disks, opened by the front door
    _cleanup: list[Callable[[], None]] = field(default_factory=list, repr=False)

    @property
    def disk(self) -> str:
        return self.disks[0]

    @property
    def image(self) -> DiskImage:
        """The boot disk as the front door opened it (later stages take this, not the path)."""
        return self.images[0]

    def metadata(self) -> dict[str, Any] | None:
        return self.machine.to_metadata() if self.machine else None

    def cleanup(self) -> None:
        while self._cleanup:
            self._cleanup.pop()()

    def __enter__(self) -> "ResolvedInput":
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


METADATA_SUFFIXES = {".vmx": "vmx", ".ovf": "ovf", ".ova": "ova", ".xml": "hyperv", ".vmcx": "vmcx", ".json": "cloud"}


def input_kind(path: str | Path) -> str:
    """vmx | ovf | ova | hyperv | vmcx | cloud | disk, from the suffix and the first bytes."""
    from h2k.inputs.formats import sniff

    p = Path(path)
    kind = METADATA_SUFFIXES.get(p.suffix.lower())
    if kind:
        return kind
    magic = sniff(p)
    return {"tar": "ova", "xml": "xml", "json": "cloud"}.get(magic, "disk")


def load_machine(path: str | Path) -> SourceMachine:
    """Parse a metadata file (vmx, ovf, Hyper-V xml, JSON sidecar) without touching any disk."""
    from h2k.inputs import cloud, hyperv, ovf, vmx

    p = Path(path)
    kind = input_kind(p)
    if kind == "vmx":
        return vmx.load(p)
    if kind == "ovf":
        return ovf.load(p).machine
    if kind == "ova":
        return ovf.read_ova_descriptor(p).machine
    if kind == "vmcx":
        raise InputError(hyperv.VMCX_MESSAGE.format(path=p))
    if kind in ("hyperv", "xml"):
        text = hyperv.read_text(p)
        if "<Envelope" in text[:4096]:  # an OVF saved as .xml
            return ovf.load(p).machine
        return hyperv.load(p)
    if kind == "cloud":
        return cloud.load(p)
    raise InputError(f"{p}: not a metadata file (.vmx, .ovf, .ova, Hyper-V .xml or .json)")


def resolve_input(path: str | Path, workdir: str | Path | None = None) -> ResolvedInput:
    """The disk(s) and the source machine for any supported input; InputError (one line) otherwise."""
    from h2k.image import open_image
    from h2k.inputs import cloud, ovf

    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    kind = input_kind(p)
    if kind == "ova":
        if workdir is None:
            raise InputError(f"{p}: an OVA must be unpacked; no work directory given")
        dest = Path(workdir) / f"{p.stem}.h2k-ova"
        res = ResolvedInput(given=str(p), disks=[], extracted=True)
        res._cleanup.append(lambda: shutil.rmtree(dest, ignore_errors=True))
        try:
            pkg = ovf.extract_ova(p, dest)
        except BaseException:
            res.cleanup()
            raise
        res.disks, res.machine = pkg.disks, pkg.machine
    elif kind == "disk":
        machine = cloud.sidecar_for(p)
        res = ResolvedInput(given=str(p), disks=[str(p.absolute())], machine=machine)  # (the front door resolves it)
    else:
        machine = load_machine(p)
        if kind == "ovf":
            machine_disks = ovf.load(p).disks
        else:
            machine_disks = [d.path for d in machine.disks]
        if not machine_disks:
            raise InputError(f"{p}: the metadata names no disk")
        res = ResolvedInput(given=str(p), disks=machine_disks, machine=machine)
    try:
        for d in res.disks:
            if not Path(d).exists():
                raise InputError(f"{p}: disk {d} named by the metadata is missing")
            if kind not in ("ova", "disk"):
                _check_named_disk(p, kind, d)
        # The front door, once per disk: before any appliance launch, and the format pinned from here on.
        res.images = [open_image(d) for d in res.disks]
    except BaseException:
        res.cleanup()
        raise
    return res


def _check_named_disk(meta: Path, kind: str, disk: str) -> None:
    """A disk named by metadata must live in the metadata's folder (symlinks followed); a Hyper-V
    export's XML may also name its sibling ``Virtual Hard Disks`` folder."""
    folder = os.path.realpath(meta.parent)
    allowed = [folder]
    if kind in ("hyperv", "xml"):
        allowed.append(os.path.realpath(Path(folder).parent / "Virtual Hard Disks"))
    real = os.path.realpath(disk)
    if not any(os.path.commonpath([real, a]) == a for a in allowed):
        raise InputError(f"{meta}: disk {disk!r} resolves to {real}, outside {folder}: refused "
                         "(metadata may only name disks beside it)")
