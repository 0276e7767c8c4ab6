"""Cloud images: a raw or qcow2 disk with a JSON sidecar describing the machine.

The sidecar is ``<disk>.json`` (e.g. ``web1.qcow2.json``) or ``<disk stem>.json``
next to the disk, or the JSON file given directly with a ``disks`` list::

    {"name": "web1", "firmware": "uefi", "secure_boot": false, "guest_os": "windows2019srv_64",
     "cpus": 2, "memory_mib": 4096, "disks": ["web1.qcow2"],
     "nics": [{"model": "virtio", "mac": "52:54:00:12:34:56"}]}

``generation`` (Hyper-V style, 2 = UEFI), ``memory_mb`` and a single ``mac`` are accepted too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from h2k.errors import InputError
from h2k.inputs.source import SourceDisk, SourceMachine, SourceNic

_MAC = re.compile(r"^[0-9a-f]{2}([:-][0-9a-f]{2}){5}$", re.I)
KNOWN = {"name", "firmware", "secure_boot", "guest_os", "os", "cpus", "memory_mib", "memory_mb", "disks", "nics",
         "mac", "generation", "source", "build", "is_server", "windows11", "macs"}


def _posint(data: dict, key: str, where: str) -> int | None:
    v = data.get(key)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise InputError(f"{where}: {key} must be a positive integer, not {v!r}")
    return v


def _mac(v: Any, where: str) -> str:
    if not isinstance(v, str) or not _MAC.match(v):
        raise InputError(f"{where}: MAC address {v!r} is not six hex bytes")
    return v.lower().replace("-", ":")


def parse(data: Any, base: Path, where: str = "sidecar") -> SourceMachine:
    if not isinstance(data, dict):
        raise InputError(f"{where}: the sidecar must be a JSON object")
    unknown = sorted(set(data) - KNOWN)
    if unknown:
        raise InputError(f"{where}: unknown sidecar keys {', '.join(unknown)} (known: {', '.join(sorted(KNOWN))})")
    fw = data.get("firmware")
    if fw is None and "generation" in data:
        if data["generation"] not in (1, 2, "1", "2"):
            raise InputError(f"{where}: generation must be 1 or 2")
        fw = "uefi" if int(data["generation"]) == 2 else "bios"
    if fw is not None:
        fw = {"efi": "uefi"}.get(str(fw).lower(), str(fw).lower())
        if fw not in ("bios", "uefi"):
            raise InputError(f"{where}: firmware must be bios or uefi, not {data.get('firmware')!r}")
    for key, kind in (("nics", list), ("disks", list), ("name", str), ("guest_os", str), ("os", str)):
        if data.get(key) is not None and not isinstance(data[key], kind):
            raise InputError(f"{where}: {key} must be a {'list' if kind is list else 'string'}")
    nics = []
    for n in data.get("nics") or []:
        if not isinstance(n, dict):
            raise InputError(f"{where}: each NIC must be an object with model and mac")
        nics.append(SourceNic(model=n.get("model"), mac=_mac(n["mac"], where) if n.get("mac") else None))
    if data.get("mac") and not nics:
        nics.append(SourceNic(model=None, mac=_mac(data["mac"], where)))
    disks = []
    for d in data.get("disks") or []:
        if not isinstance(d, str) or not d:
            raise InputError(f"{where}: disks must be a list of file names")
        disks.append(SourceDisk(str(Path(d) if Path(d).is_absolute() else base / d)))
    return SourceMachine(
        origin="cloud", name=data.get("name"), firmware=fw, secure_boot=bool(data.get("secure_boot")),
        guest_os=data.get("guest_os") or data.get("os"), cpus=_posint(data, "cpus", where),
        memory_mib=_posint(data, "memory_mib", where) or _posint(data, "memory_mb", where),
        disks=disks, nics=nics,
    )


def load(path: str | Path) -> SourceMachine:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as exc:
        raise InputError(f"{p}: cannot read: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{p}: not valid JSON ({exc})") from None
    return parse(data, p.resolve().parent, str(p))


def sidecar_for(disk: str | Path) -> SourceMachine | None:
    """The machine from ``<disk>.json`` or ``<stem>.json`` next to a disk, if one exists.

    ``<disk>.json`` is our convention, so a broken one is an error. ``<stem>.json`` is a
    common name for other things (e.g. saved ``h2k inspect --json`` facts): it counts only
    when it is a JSON object with nothing but sidecar keys.
    """
    d = Path(disk)
    own = d.with_name(d.name + ".json")
    if own.is_file():
        m = load(own)
    else:
        stem = d.with_suffix(".json")
        if stem == d or not stem.is_file():
            return None
        try:
            data = json.loads(stem.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        if not isinstance(data, dict) or not data or set(data) - KNOWN:
            return None
        m = parse(data, stem.resolve().parent, str(stem))
    if not m.disks:
        m.disks = [SourceDisk(str(d.resolve()))]
    return m
