"""OVF descriptors and OVA archives: disks in order, firmware, Secure Boot, NICs, memory, CPUs.

Parsing ignores namespaces (VMware, VirtualBox and others prefix them
differently) and matches local names. An OVA is a tar: every member is
checked *before* anything is written -- absolute names, ``..``, links and
device files refuse the whole archive -- then only the descriptor, the
manifest and the disks the descriptor references are extracted, each into a
fresh directory with O_EXCL|O_NOFOLLOW, and checked against the manifest.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from h2k.errors import InputError, read_input_file
from h2k.inputs.source import SourceController, SourceDisk, SourceMachine, SourceNic

MAX_OVF = 8 << 20
RT_CPU, RT_MEMORY, RT_IDE, RT_SCSI, RT_NIC, RT_DISK, RT_OTHER_STORAGE, RT_SATA = 3, 4, 5, 6, 10, 17, 20, 20
BUS_RANK = {"scsi": 0, "sata": 1, "nvme": 2, "ide": 3}
_UNITS = {"byte": 0, "kilobytes": 10, "megabytes": 20, "gigabytes": 30, "kb": 10, "mb": 20, "gb": 30}


@dataclass
class OvfDisk:
    disk_id: str
    href: str  # file name in the package (relative)
    capacity: int | None = None  # bytes


@dataclass
class OvfPackage:
    machine: SourceMachine
    disk_files: list[str]  # hrefs in boot order
    base: Path | None = None  # directory the hrefs are relative to
    disks: list[str] = field(default_factory=list)  # absolute paths once located/extracted
    manifest: str | None = None  # name of the .mf member, if any


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _attr(el: ET.Element, name: str) -> str | None:
    for k, v in el.attrib.items():
        if _local(k) == name:
            return v
    return None


def _children(el: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in el if _local(c.tag) == name]


def _child_text(el: ET.Element, name: str) -> str | None:
    for c in el:
        if _local(c.tag) == name:
            return (c.text or "").strip()
    return None


def _find_all(root: ET.Element, name: str) -> list[ET.Element]:
    return [e for e in root.iter() if _local(e.tag) == name]


def _units_shift(units: str | None, default: int) -> int:
    if not units:
        return default
    u = units.strip().lower().replace(" ", "")
    m = re.fullmatch(r"byte(?:\*2\^(\d+))?", u)
    if m:
        return int(m.group(1) or 0)
    if u in _UNITS:
        return _UNITS[u]
    raise InputError(f"OVF: unknown allocation units {units!r}")


def _count(text: str | None, what: str, where: str) -> int:
    """A whole number from the descriptor (0 when absent); anything else is bad input, not a crash."""
    text = (text or "").strip()
    if not text:
        return 0
    if not text.isdigit() or len(text) > 20:
        raise InputError(f"{where}: {what} {text[:40]!r} is not a whole number")
    return int(text)


def safe_relative(name: str, where: str) -> str:
    """A package-relative file name, or InputError for absolute paths, URLs, '..' and backslashes."""
    if not name or "\x00" in name:
        raise InputError(f"{where}: empty or binary file name")
    if "://" in name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise InputError(f"{where}: refusing absolute path or URL {name!r}")
    if "\\" in name:
        raise InputError(f"{where}: refusing file name with a backslash {name!r}")
    parts = PurePosixPath(name).parts
    if any(p == ".." for p in parts):
        raise InputError(f"{where}: refusing path traversal in {name!r}")
    return str(PurePosixPath(*[p for p in parts if p != "."]))


def parse(text: str, where: str = "ovf") -> OvfPackage:
    """Parse OVF descriptor text into the machine and the disk files in boot order."""
    if re.search(r"<!(DOCTYPE|ENTITY)", text[:65536], re.I):
        raise InputError(f"{where}: refusing an OVF with a DOCTYPE or entity declarations")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise InputError(f"{where}: not well-formed OVF XML ({exc})") from None
    if _local(root.tag) != "Envelope":
        raise InputError(f"{where}: not an OVF descriptor (root element is {_local(root.tag)!r}, not Envelope)")
    files: dict[str, str] = {}
    for f in _find_all(root, "File"):
        fid, href = _attr(f, "id"), _attr(f, "href")
        if fid and href:
            if _attr(f, "compression") or _attr(f, "chunkSize"):
                raise InputError(f"{where}: file {href!r} is compressed or chunked; unpack it with ovftool first")
            files[fid] = safe_relative(href, where)
    disks: dict[str, OvfDisk] = {}
    for d in _find_all(root, "Disk"):
        did, ref = _attr(d, "diskId"), _attr(d, "fileRef")
        if not did:
            continue
        if ref not in files:
            raise InputError(f"{where}: disk {did!r} refers to unknown file {ref!r}")
        cap = _attr(d, "capacity")
        shift = _units_shift(_attr(d, "capacityAllocationUnits"), 0)
        disks[did] = OvfDisk(did, files[ref], int(cap) << shift if cap and cap.isdigit() else None)
    systems = _find_all(root, "VirtualSystem")
    if len(systems) != 1:
        raise InputError(f"{where}: expected one VirtualSystem, found {len(systems)} (multi-VM OVFs are not supported)")
    vs = systems[0]
    hw_sections = _find_all(vs, "VirtualHardwareSection")
    if not hw_sections:
        raise InputError(f"{where}: no VirtualHardwareSection")
    hw = hw_sections[0]
    items = [i for i in hw if _local(i.tag) in ("Item", "StorageItem", "EthernetPortItem")]
    config = {(_attr(c, "key") or "").lower(): (_attr(c, "value") or "") for c in _find_all(hw, "Config")}
    controllers: dict[str, tuple[int, SourceController]] = {}
    cpus = mem = None
    nics: list[SourceNic] = []
    disk_items: list[tuple[str | None, int, int, str]] = []
    for order, item in enumerate(items):
        rt = _child_text(item, "ResourceType")
        sub = (_child_text(item, "ResourceSubType") or "").lower()
        iid = _child_text(item, "InstanceID")
        rt_n = int(rt) if rt and rt.isdigit() else -1
        if rt_n == RT_CPU:
            cpus = _count(_child_text(item, "VirtualQuantity"), "CPU count", where) or None
        elif rt_n == RT_MEMORY:
            qty = _count(_child_text(item, "VirtualQuantity"), "memory quantity", where)
            shift = _units_shift(_child_text(item, "AllocationUnits"), 20)
            mem = (qty << shift) >> 20 or None
        elif rt_n in (RT_IDE, RT_SCSI, RT_OTHER_STORAGE) and iid:
            if rt_n == RT_IDE:
                bus, model = "ide", "ide"
            elif rt_n == RT_SCSI:
                bus, model = "scsi", {"virtualscsi": "pvscsi"}.get(sub, sub or "lsilogic")
            elif "nvme" in sub:
                bus, model = "nvme", "nvme"
            elif "sata" in sub or "ahci" in sub:
                bus, model = "sata", "ahci"
            else:
                continue
            n = sum(1 for _, c in controllers.values() if c.name.startswith(bus))
            controllers[iid] = (BUS_RANK[bus], SourceController(f"{bus}{n}", model))
        elif rt_n == RT_NIC:
            mac = _child_text(item, "Address")
            if mac:
                mac = mac.replace("-", ":").lower()
                if not re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", mac):
                    raise InputError(f"{where}: NIC address {mac!r} is not six hex bytes")
            nics.append(SourceNic(model=sub or None, mac=mac or None))
        elif rt_n == RT_DISK:
            host = next((_child_text(item, n) for n in ("HostResource",) if _child_text(item, n)), None)
            if not host:
                continue
            did = host.rsplit("/", 1)[-1]
            if did not in disks:
                raise InputError(f"{where}: disk item refers to unknown disk {host!r}")
            addr = _child_text(item, "AddressOnParent")
            disk_items.append((_child_text(item, "Parent"), int(addr) if addr and addr.isdigit() else 0, order, did))

    def rank(entry: tuple[str | None, int, int, str]) -> tuple:
        parent, addr, order, _ = entry
        ctl = controllers.get(parent or "")
        return (ctl[0] if ctl else 9, ctl[1].name if ctl else "", addr, order)

    disk_items.sort(key=rank)
    src_disks = [SourceDisk(disks[did].href, controllers[p][1].name if p in controllers else None, addr)
                 for p, addr, _, did in disk_items]
    if not src_disks:  # no hardware items for disks: keep the DiskSection order
        src_disks = [SourceDisk(d.href) for d in disks.values()]
    fw = config.get("firmware", "bios").lower()
    os_sections = _find_all(vs, "OperatingSystemSection")
    guest = None
    if os_sections:
        guest = _attr(os_sections[0], "osType") or _child_text(os_sections[0], "Description") or _attr(os_sections[0], "id")
    name = _child_text(vs, "Name") or _attr(vs, "id")
    machine = SourceMachine(
        origin="ovf", name=name or None,
        firmware="uefi" if fw == "efi" else "bios",
        secure_boot=config.get("uefi.secureboot.enabled", "").lower() == "true",
        guest_os=guest, cpus=cpus, memory_mib=mem,
        disks=src_disks, nics=nics,
        controllers=[c for _, c in sorted(controllers.values(), key=lambda rc: (rc[0], rc[1].name))],
    )
    return OvfPackage(machine=machine, disk_files=[d.path for d in src_disks])


def _read_text(data: bytes, where: str) -> str:
    if len(data) > MAX_OVF:
        raise InputError(f"{where}: OVF descriptor is implausibly large")
    for bom, enc in ((b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"), (b"\xef\xbb\xbf", "utf-8-sig")):
        if data.startswith(bom):
            return data.decode(enc, errors="replace")
    return data.decode("utf-8", errors="replace")


def load(path: str | Path) -> OvfPackage:
    """A loose .ovf next to its disks."""
    p = Path(path)
    data = read_input_file(p)
    pkg = parse(_read_text(data, str(p)), str(p))
    pkg.base = p.resolve().parent
    pkg.disks = [str(pkg.base / f) for f in pkg.disk_files]
    for d in pkg.machine.disks:
        d.path = str(pkg.base / d.path)
    return pkg


# ---------------------------------------------------------------- OVA


def check_members(tar: tarfile.TarFile, where: str) -> dict[str, tarfile.TarInfo]:
    """Every member checked before anything is extracted; the whole archive is refused on one bad member."""
    members: dict[str, tarfile.TarInfo] = {}
    for m in tar.getmembers():
        if m.issym() or m.islnk():
            raise InputError(f"{where}: refusing OVA member {m.name!r}: it is a link")
        if m.isdir():
            safe_relative(m.name.rstrip("/") or ".", where)
            continue
        if not m.isreg():
            raise InputError(f"{where}: refusing OVA member {m.name!r}: not a regular file")
        name = safe_relative(m.name, where)
        if name in members:
            raise InputError(f"{where}: refusing OVA with member {name!r} twice")
        members[name] = m
    return members


def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:")  # OVAs are plain tar; a compressed one is refused by "r:"
    except (tarfile.TarError, OSError) as exc:
        raise InputError(f"{path}: not a readable OVA (tar) archive: {exc}") from None


def _descriptor_member(members: dict[str, tarfile.TarInfo], where: str) -> str:
    ovfs = [n for n in members if n.lower().endswith(".ovf")]
    if len(ovfs) != 1:
        raise InputError(f"{where}: an OVA must hold exactly one .ovf descriptor, found {len(ovfs)}")
    return ovfs[0]


def read_ova_descriptor(path: str | Path) -> OvfPackage:
    """Parse the descriptor inside an OVA without extracting anything."""
    p = Path(path)
    with _open_tar(p) as tar:
        members = check_members(tar, str(p))
        name = _descriptor_member(members, str(p))
        fh = tar.extractfile(members[name])
        assert fh is not None
        return parse(_read_text(fh.read(MAX_OVF + 1), f"{p}:{name}"), f"{p}:{name}")


def _manifest(text: str, where: str) -> dict[str, tuple[str, str]]:
    out: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        m = re.match(r"^\s*(SHA1|SHA256|SHA512)\s*\((.+)\)\s*=\s*([0-9a-fA-F]+)\s*$", line)
        if m:
            out[m.group(2)] = (m.group(1).lower(), m.group(3).lower())
        elif line.strip():
            raise InputError(f"{where}: corrupt manifest line {line[:60]!r}")
    return out


def extract_ova(path: str | Path, dest: str | Path) -> OvfPackage:
    """Check every member, then extract the descriptor and its disks into ``dest`` (created, must not exist)."""
    p, dest = Path(path), Path(dest)
    where = str(p)
    with _open_tar(p) as tar:
        members = check_members(tar, where)
        ovf_name = _descriptor_member(members, where)
        fh = tar.extractfile(members[ovf_name])
        assert fh is not None
        pkg = parse(_read_text(fh.read(MAX_OVF + 1), f"{where}:{ovf_name}"), f"{where}:{ovf_name}")
        ovf_dir = PurePosixPath(ovf_name).parent
        wanted = {}
        for href in pkg.disk_files:
            member = str(ovf_dir / href) if str(ovf_dir) != "." else href
            if member not in members:
                raise InputError(f"{where}: disk {href!r} named by the descriptor is not in the archive")
            wanted[href] = members[member]
        mfs = [n for n in members if n.lower().endswith(".mf")]
        manifest = {}
        if mfs:
            mf = tar.extractfile(members[mfs[0]])
            assert mf is not None
            manifest = _manifest(mf.read(1 << 20).decode("utf-8", errors="replace"), f"{where}:{mfs[0]}")
        need = sum(m.size for m in wanted.values())
        dest.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(dest.parent).free
        if need > free:
            raise InputError(f"{where}: not enough free space in {dest.parent} to unpack "
                             f"({need / 2**20:.0f} MiB needed, {free / 2**20:.0f} MiB free)")
        try:
            dest.mkdir()
        except FileExistsError:
            raise InputError(f"{dest}: already exists; remove it first") from None
        try:
            for href, member in wanted.items():
                target = dest / href
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.resolve().is_relative_to(dest.resolve()):
                    raise InputError(f"{where}: refusing {href!r}: it would land outside {dest}")
                digest = _write_member(tar, member, target, manifest.get(href, (None, None))[0])
                algo_hex = manifest.get(href)
                if algo_hex and digest != algo_hex[1]:
                    raise InputError(f"{where}: {href} does not match the manifest {algo_hex[0].upper()} (corrupt download?)")
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
    pkg.base = dest
    pkg.disks = [str(dest / h) for h in pkg.disk_files]
    for d in pkg.machine.disks:
        d.path = str(dest / d.path)
    pkg.manifest = mfs[0] if mfs else None
    return pkg


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path, algo: str | None) -> str | None:
    src = tar.extractfile(member)
    assert src is not None
    h = hashlib.new(algo) if algo else None
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as out:
        while True:
            block = src.read(4 << 20)
            if not block:
                break
            if h:
                h.update(block)
            out.write(block)
    return h.hexdigest() if h else None
