"""Hyper-V configuration XML: generation (1 = BIOS, 2 = UEFI), Secure Boot, CPUs, memory, disks, NICs.

Hyper-V up to 2012 R2 exports a ``<configuration>`` XML whose elements carry
``type="..."`` attributes: ``properties/subtype`` (1 for generation 2),
``settings/processors/count``, ``settings/memory/bank/size`` (MiB),
``secure_boot_enabled``, a ``pathname`` per attached drive and an ``address``
(12 hex digits) per network adapter. We read those by element name,
case-insensitively, and also accept the plainer names people write by hand or
get from PowerShell (``Generation``, ``SecureBoot``, ``ProcessorCount``,
``MemoryStartupMB``/``MemoryStartup`` bytes, ``Path``, ``MacAddress``).
Hyper-V 2016+ keeps the configuration in a binary ``.vmcx``: we do not parse
it and say how to get something we can read instead.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path, PureWindowsPath

from h2k.errors import InputError, read_input_file
from h2k.inputs.safexml import parse_untrusted
from h2k.inputs.source import SourceController, SourceDisk, SourceMachine, SourceNic

VMCX_MESSAGE = (
    "{path}: Hyper-V's binary .vmcx configuration cannot be read; export the XML instead "
    "(Hyper-V 2012 R2 export), or give a JSON sidecar such as "
    '{{"generation": 2, "secure_boot": true, "cpus": 2, "memory_mib": 4096, '
    '"nics": [{{"mac": "00:15:5d:01:02:03"}}], "disks": ["disk.vhdx"]}} '
    "(Get-VM, Get-VMFirmware and Get-VMNetworkAdapter show these values)"
)
IDE_GUID = "83f8638b-8dca-4152-9eda-2ca8b33039b4"
SCSI_GUID = "d422512d-2bf2-4752-809d-7b82b5fcb1b4"
DISK_SUFFIXES = (".vhd", ".vhdx", ".avhd", ".avhdx")


def read_text(path: Path) -> str:
    data = read_input_file(path)
    if len(data) > 8 << 20:
        raise InputError(f"{path}: configuration XML is implausibly large")
    # Hyper-V writes UTF-16 with a BOM.
    for bom, enc in ((b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"), (b"\xef\xbb\xbf", "utf-8-sig")):
        if data.startswith(bom):
            return data.decode(enc, errors="replace")
    return data.decode("utf-8", errors="replace")


def _name(el: ET.Element) -> str:
    return el.tag.rsplit("}", 1)[-1].lower()


def _first(root: ET.Element, *names: str) -> str | None:
    wanted = {n.lower() for n in names}
    for el in root.iter():
        if _name(el) in wanted and el.text and el.text.strip():
            return el.text.strip()
    return None


def _bool(v: str | None) -> bool | None:
    if v is None:
        return None
    return v.strip().lower() in ("true", "1", "yes", "on")


def _int(v: str | None, what: str, where: str) -> int | None:
    if v is None:
        return None
    try:
        return int(v)
    except ValueError:
        raise InputError(f"{where}: {what} {v!r} is not a number") from None


def _mac(raw: str, where: str) -> str:
    hexes = re.sub(r"[^0-9a-fA-F]", "", raw)
    if len(hexes) != 12:
        raise InputError(f"{where}: MAC address {raw!r} is not six hex bytes")
    return ":".join(hexes[i:i + 2] for i in range(0, 12, 2)).lower()


def parse(text: str, where: str = "hyperv") -> SourceMachine:
    text = re.sub(r"^<\?xml[^>]*\?>", "", text.lstrip("\ufeff").lstrip())  # the declaration may say UTF-16
    root = parse_untrusted(text, where, "XML")
    gen = _first(root, "generation", "VirtualSystemGeneration")
    if gen is None:
        sub = _first(root, "subtype", "VirtualSystemSubType")
        if sub is not None:
            gen = "2" if sub.strip() in ("1", "Microsoft:Hyper-V:SubType:2") else "1"
    if gen is None:
        raise InputError(f"{where}: no Hyper-V generation found (not a Hyper-V configuration XML?)")
    gen_n = _int(re.sub(r"\D", "", gen) or gen, "generation", where)
    if gen_n not in (1, 2):
        raise InputError(f"{where}: Hyper-V generation {gen!r} is neither 1 nor 2")
    secure = _bool(_first(root, "secure_boot_enabled", "SecureBoot", "SecureBootEnabled")) or False
    cpus = _int(_first(root, "ProcessorCount") or _processor_count(root), "processor count", where)
    mem = _memory(root, where)
    disks, controllers = _disks(root)
    nics = _nics(root, where)
    return SourceMachine(
        origin="hyperv", name=_first(root, "name", "VMName", "ElementName"),
        firmware="uefi" if gen_n == 2 else "bios", secure_boot=bool(secure and gen_n == 2),
        guest_os=None, cpus=cpus, memory_mib=mem, disks=disks, nics=nics, controllers=controllers,
    )


def _processor_count(root: ET.Element) -> str | None:
    for el in root.iter():
        if _name(el) == "processors":
            return _first(el, "count")
    return None


def _memory(root: ET.Element, where: str) -> int | None:
    mb = _first(root, "MemoryStartupMB")
    if mb:
        return _int(mb, "memory", where)
    raw = _first(root, "MemoryStartup", "MemoryStartupBytes")
    if raw:
        return (_int(raw, "memory", where) or 0) >> 20 or None
    for el in root.iter():
        if _name(el) == "memory":
            return _int(_first(el, "size"), "memory", where)
    return None


def _disks(root: ET.Element) -> tuple[list[SourceDisk], list[SourceController]]:
    """Drives in document order, IDE before SCSI (generation 1 boots from IDE)."""
    found: list[tuple[int, int, SourceDisk]] = []
    controllers: dict[str, SourceController] = {}

    def walk(el: ET.Element, bus: str | None, ctl: str | None) -> None:
        tag = _name(el)
        if IDE_GUID in tag:
            bus = "ide"
        elif SCSI_GUID in tag:
            bus = "scsi"
        m = re.fullmatch(r"controller(\d+)", tag)
        if m and bus:
            ctl = f"{bus}{m.group(1)}"
        for child in el:
            ctag = _name(child)
            if ctag in ("pathname", "path") and child.text and child.text.strip().lower().endswith(DISK_SUFFIXES):
                c = ctl or (f"{bus}0" if bus else None)
                if c:
                    controllers.setdefault(c, SourceController(c, "ide" if c.startswith("ide") else "hyperv-scsi"))
                found.append((0 if (c or "").startswith("ide") else 1, len(found), SourceDisk(child.text.strip(), c)))
            else:
                walk(child, bus, ctl)

    walk(root, None, None)
    found.sort(key=lambda t: (t[0], t[1]))
    return [d for _, _, d in found], list(controllers.values())


def _nics(root: ET.Element, where: str) -> list[SourceNic]:
    nics = []
    for el in root.iter():
        addr = None
        for child in el:
            if _name(child) in ("address", "macaddress") and child.text and re.fullmatch(
                    r"[0-9A-Fa-f]{12}|[0-9A-Fa-f]{2}([:-][0-9A-Fa-f]{2}){5}", child.text.strip()):
                addr = child.text.strip()
        if addr:
            legacy = _bool(_first(el, "isLegacy", "IsLegacy")) or False
            nics.append(SourceNic(model="hyperv-legacy" if legacy else "hyperv-synthetic", mac=_mac(addr, where)))
    return nics


def load(path: str | Path) -> SourceMachine:
    p = Path(path)
    if p.suffix.lower() == ".vmcx":
        raise InputError(VMCX_MESSAGE.format(path=p))
    machine = parse(read_text(p), str(p))
    base = p.resolve().parent
    for d in machine.disks:
        # Windows paths from the Hyper-V host: the disk is expected next to the XML (or in ../Virtual Hard Disks).
        name = PureWindowsPath(d.path).name
        for cand in (base / name, base.parent / "Virtual Hard Disks" / name):
            if cand.exists():
                d.path = str(cand)
                break
        else:
            d.path = str(base / name)
    return machine
