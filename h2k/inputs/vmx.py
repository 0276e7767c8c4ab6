"""VMware ``.vmx``: firmware, Secure Boot, guest OS, CPUs, memory, controllers, disks, NICs.

A .vmx is ``key = "value"`` lines (keys case-insensitive). Disks are
``<bus><n>:<m>.fileName`` on a controller ``<bus><n>`` whose model is
``<bus><n>.virtualDev`` (scsi: lsilogic, lsisas1068, pvscsi, buslogic).
Boot order: ``bios.hddOrder`` when present, else SCSI, SATA, NVMe, IDE, by
controller then unit -- the order VMware's BIOS tries them by default.
"""

from __future__ import annotations

import re
from pathlib import Path

from h2k.errors import InputError, read_input_file
from h2k.inputs.source import SourceController, SourceDisk, SourceMachine, SourceNic

_LINE = re.compile(r'^\s*([A-Za-z0-9_.:\-]+)\s*=\s*"(.*)"\s*$')
_DISK = re.compile(r"^(scsi|sata|ide|nvme)(\d+):(\d+)\.filename$")
BUS_ORDER = {"scsi": 0, "sata": 1, "nvme": 2, "ide": 3}
DEFAULT_CONTROLLER = {"sata": "ahci", "ide": "ide", "nvme": "nvme", "scsi": "lsilogic"}
DISK_SUFFIXES = (".vmdk",)


def parse_pairs(text: str, where: str = "vmx") -> dict[str, str]:
    pairs: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#") or line.startswith(".encoding"):
            continue
        m = _LINE.match(line)
        if not m:
            raise InputError(f"{where}: line {n} is not key = \"value\": {line[:60]!r}")
        pairs[m.group(1).lower()] = m.group(2)
    return pairs


def _true(v: str | None) -> bool:
    return (v or "").strip().lower() in ("true", "yes", "1")


def _int(pairs: dict[str, str], key: str, where: str) -> int | None:
    v = pairs.get(key)
    if v in (None, ""):
        return None
    try:
        n = int(v)
    except ValueError:
        raise InputError(f"{where}: {key} = {v!r} is not a number") from None
    if n <= 0:
        raise InputError(f"{where}: {key} = {v!r} must be positive")
    return n


def _mac(pairs: dict[str, str], prefix: str) -> str | None:
    kind = pairs.get(f"{prefix}.addresstype", "generated").lower()
    mac = pairs.get(f"{prefix}.address") if kind == "static" else pairs.get(f"{prefix}.generatedaddress")
    mac = mac or pairs.get(f"{prefix}.address") or pairs.get(f"{prefix}.generatedaddress")
    if not mac:
        return None
    if not re.fullmatch(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}", mac):
        raise InputError(f"{prefix}: MAC address {mac!r} is not six hex bytes")
    return mac.lower()


def parse(text: str, base: Path, where: str = "vmx") -> SourceMachine:
    """A SourceMachine from .vmx text; disk paths are resolved against ``base`` (the .vmx's directory)."""
    pairs = parse_pairs(text, where)
    fw = pairs.get("firmware", "bios").lower()
    if fw not in ("bios", "efi"):
        raise InputError(f"{where}: firmware = {fw!r} is neither bios nor efi")
    controllers: dict[str, SourceController] = {}
    disks: list[tuple[tuple, SourceDisk]] = []
    for key, value in pairs.items():
        m = _DISK.match(key)
        if not m:
            continue
        bus, n, unit = m.group(1), int(m.group(2)), int(m.group(3))
        dev = f"{bus}{n}:{unit}"
        if pairs.get(f"{dev}.present", "true").lower() == "false" or pairs.get(f"{bus}{n}.present", "true").lower() == "false":
            continue
        devtype = pairs.get(f"{dev}.devicetype", "disk").lower()
        if "cdrom" in devtype or not value.lower().endswith(DISK_SUFFIXES):
            continue  # CD-ROMs and ISOs are not disks to migrate
        ctl = f"{bus}{n}"
        controllers.setdefault(ctl, SourceController(ctl, pairs.get(f"{ctl}.virtualdev", DEFAULT_CONTROLLER[bus]).lower()))
        path = Path(value) if Path(value).is_absolute() else base / value
        disks.append(((BUS_ORDER[bus], n, unit), SourceDisk(str(path), ctl, unit)))
    order = [d.strip().lower() for d in pairs.get("bios.hddorder", "").split(",") if d.strip()]
    # hddOrder names devices like "scsi0:0"; listed ones first, in that order.
    rank = {dev: i for i, dev in enumerate(order)}
    disks.sort(key=lambda kd: (rank.get(f"{kd[1].controller}:{kd[1].unit}", len(rank)), kd[0]))
    nics = []
    idx = sorted({int(m.group(1)) for k in pairs if (m := re.match(r"^ethernet(\d+)\.", k))})
    for i in idx:
        p = f"ethernet{i}"
        if pairs.get(f"{p}.present", "true").lower() == "false":
            continue
        nics.append(SourceNic(model=pairs.get(f"{p}.virtualdev", "vlance").lower(), mac=_mac(pairs, p)))
    mem = _int(pairs, "memsize", where)
    return SourceMachine(
        origin="vmx",
        name=pairs.get("displayname") or None,
        firmware="uefi" if fw == "efi" else "bios",
        secure_boot=_true(pairs.get("uefi.secureboot.enabled")),
        guest_os=pairs.get("guestos") or None,
        cpus=_int(pairs, "numvcpus", where) or 1,
        memory_mib=mem,
        disks=[d for _, d in disks],
        nics=nics,
        controllers=sorted(controllers.values(), key=lambda c: (BUS_ORDER.get(re.sub(r"\d+$", "", c.name), 9), c.name)),
    )


def load(path: str | Path) -> SourceMachine:
    p = Path(path)
    raw = read_input_file(p)
    if len(raw) > 1 << 20 or b"\x00" in raw:
        raise InputError(f"{p}: not a .vmx text file")
    return parse(raw.decode("utf-8", errors="replace"), p.resolve().parent, str(p))
