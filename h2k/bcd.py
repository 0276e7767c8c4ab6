"""Boot configuration data (BCD) on the engine side: read the store, check it, plan repairs and EMS.

A BCD store is a registry hive: ``Objects\\{guid}\\Description\\Type`` gives an
object's type, ``Objects\\{guid}\\Elements\\<id>\\Element`` each element.
Element ids encode their format in bits 24-27 (Microsoft's BcdElementType):
1 device, 2 string, 3 object, 4 object list, 5 integer, 6 boolean. Strings and
object references are REG_SZ, object lists REG_MULTI_SZ, integers REG_BINARY of
8 bytes and booleans REG_BINARY of 1 byte (little-endian), devices a binary blob.

Everything here works on a hive FILE; the fixer downloads the store, and uses
the changes returned here through :mod:`h2k.registry` (journal + read-back).
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import hivex

from h2k.changes import REG_BINARY, REG_SZ, RegValue
from h2k.errors import InputError
from h2k.registry import decode, find_key, find_value

BOOTMGR = "{9dea862c-5cdd-4e70-acc1-f32b344d4795}"
EMSSETTINGS = "{0ce4991b-e6b3-4b16-b23c-5e0d9250e5d9}"
GLOBALSETTINGS = "{7ea2e1ac-2e61-4728-aaa3-896d9d0a9f0e}"

TYPE_BOOTMGR = 0x10100002
TYPE_OSLOADER = 0x10200003
TYPE_INHERIT_LIBRARY = 0x20100000  # "inherit" object usable by any application ({emssettings} is one)

EL_DEVICE = "11000001"  # library: device the application is on
EL_PATH = "12000002"  # library: application path
EL_INHERIT = "14000006"  # library: inherited objects
EL_EMS_ENABLED = "16000020"  # library: EMS on (boot manager)
EL_EMS_PORT = "15000022"  # library integer: EMS port (1 = COM1)
EL_EMS_BAUD = "15000023"  # library integer: EMS baud rate
EL_DEFAULT = "23000003"  # boot manager: default object
EL_OSDEVICE = "21000001"  # OS loader: OS device
EL_LOADER_EMS = "260000b0"  # OS loader: EMS on

EMS_PORT = 1
EMS_BAUD = 115200


def boolean(value: bool) -> str:
    return "01" if value else "00"


def integer(value: int) -> str:
    return struct.pack("<Q", value).hex()


@dataclass
class BcdObject:
    guid: str  # as spelled in the store, with braces
    type: int | None
    elements: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # id (lowercase hex) -> (type, raw)

    def element(self, el: str) -> object | None:
        got = self.elements.get(el.lower())
        return None if got is None else decode(*got)


@dataclass
class BcdStore:
    objects: dict[str, BcdObject]  # lowercase guid -> object

    def get(self, guid: str | None) -> BcdObject | None:
        return None if not guid else self.objects.get(guid.lower())

    @property
    def bootmgr(self) -> BcdObject | None:
        return self.get(BOOTMGR)

    def loaders(self) -> list[BcdObject]:
        return [o for o in self.objects.values() if o.type == TYPE_OSLOADER]


def read_store(path: str | Path) -> BcdStore:
    """Parse a BCD hive file. A file hivex cannot open is an InputError."""
    try:
        h = hivex.Hivex(str(path))
    except RuntimeError as exc:
        raise InputError(f"BCD store is unreadable ({exc})") from exc
    objects_node = find_key(h, "Objects")
    if objects_node is None:
        raise InputError("BCD store has no Objects key")
    objects: dict[str, BcdObject] = {}
    for onode in h.node_children(objects_node):
        guid = h.node_name(onode)
        type_ = None
        desc = h.node_get_child(onode, "Description")
        if desc is not None:
            got = find_value(h, desc, "Type")
            if got is not None and len(got[1]) >= 4:
                type_ = struct.unpack("<I", got[1][:4])[0]
        obj = BcdObject(guid=guid, type=type_)
        els = h.node_get_child(onode, "Elements")
        for enode in h.node_children(els) if els is not None else []:
            got = find_value(h, enode, "Element")
            if got is not None:
                obj.elements[h.node_name(enode).lower()] = got
        objects[guid.lower()] = obj
    return BcdStore(objects)


@dataclass
class BcdCheck:
    """The boot manager -> default loader chain, and what is wrong with it."""

    problems: list[str] = field(default_factory=list)
    default_loader: str | None = None
    loader_path: str | None = None
    loader_has_device: bool = False
    ems_enabled: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


def check_store(
    store: BcdStore,
    path_exists: Callable[[str], bool] | None = None,
    device_exists: Callable[[PartitionRef], bool] | None = None,
) -> BcdCheck:
    """Check that {bootmgr}'s default loader exists, has a device, and a path that exists.

    ``path_exists`` receives the loader path (e.g. ``\\Windows\\system32\\winload.efi``)
    and says whether it is on the system volume; ``device_exists`` says whether a
    partition device element points at a partition of this disk. None skips a check.
    """
    res = BcdCheck()
    mgr = store.bootmgr
    if mgr is None:
        res.problems.append("no boot manager object {bootmgr} in the store")
        return res
    default = mgr.element(EL_DEFAULT)
    if not isinstance(default, str) or not default:
        res.problems.append("the boot manager has no default loader (element 23000003)")
        return res
    res.default_loader = default
    loader = store.get(default)
    if loader is None:
        res.problems.append(f"the default loader {default} does not exist in the store")
        return res
    dev = loader.elements.get(EL_DEVICE) or loader.elements.get(EL_OSDEVICE)
    res.loader_has_device = bool(dev and dev[1])
    if not res.loader_has_device:
        res.problems.append(f"the default loader {default} has no device (11000001/21000001)")
    elif device_exists is not None:
        for el in (EL_DEVICE, EL_OSDEVICE):
            got = loader.elements.get(el)
            ref = parse_device(got[1]) if got else None
            if ref is not None and not device_exists(ref):
                res.problems.append(f"the default loader's device {el} points at a partition not on this disk ({ref.style})")
    path = loader.element(EL_PATH)
    res.loader_path = path if isinstance(path, str) and path else None
    if res.loader_path is None:
        res.problems.append(f"the default loader {default} has no path (12000002)")
    elif path_exists is not None and not path_exists(res.loader_path):
        res.problems.append(f"the default loader's path {res.loader_path} does not exist on the system volume")
    res.ems_enabled = mgr.element(EL_EMS_ENABLED) == "01" and loader.element(EL_LOADER_EMS) == "01"
    return res


@dataclass(frozen=True)
class PartitionRef:
    """Where a partition device element points: MBR (signature, byte offset) or GPT (disk, partition GUID)."""

    style: str  # mbr or gpt
    disk_signature: int = 0
    partition_offset: int = 0
    disk_guid: str = ""
    partition_guid: str = ""


DEVICE_PARTITION = 6


def parse_device(blob: bytes) -> PartitionRef | None:
    """Decode a partition device element (the layout bcdedit writes); None for other device kinds.

    After 16 bytes of options GUID: type (6 = partition), flags, length; then the
    partition (MBR byte offset as 128-bit LE, or GPT partition GUID), 4 reserved
    bytes, the partition style (1 MBR, 0 GPT), and the disk (MBR signature or GPT disk GUID).
    """
    if len(blob) < 0x48:
        return None
    dtype, _flags, length = struct.unpack_from("<III", blob, 0x10)
    if dtype != DEVICE_PARTITION or length < 0x38:
        return None
    part, style, disk = blob[0x20:0x30], struct.unpack_from("<I", blob, 0x34)[0], blob[0x38:0x48]
    if style == 1:
        return PartitionRef("mbr", disk_signature=struct.unpack_from("<I", disk)[0],
                            partition_offset=int.from_bytes(part, "little"))
    if style == 0:
        return PartitionRef("gpt", disk_guid="{%s}" % uuid.UUID(bytes_le=disk),
                            partition_guid="{%s}" % uuid.UUID(bytes_le=part))
    return None


def _el_key(guid: str, el: str) -> str:
    return f"Objects\\{guid}\\Elements\\{el}"


def repair_changes(
    store: BcdStore, check: BcdCheck, firmware: str, path_exists: Callable[[str], bool]
) -> tuple[list[RegValue], list[str]]:
    """Changes that repair only what is clearly broken, plus problems left alone (with why)."""
    changes: list[RegValue] = []
    left: list[str] = []
    if check.ok:
        return changes, left
    mgr = store.bootmgr
    if mgr is None:
        return changes, ["no {bootmgr}: not repairable offline, rebuild the store with bcdboot"]
    loader = store.get(check.default_loader)
    if loader is None:
        loaders = store.loaders()
        if len(loaders) == 1:  # one loader and a dangling default: it can only mean that one
            loader = loaders[0]
            changes.append(
                RegValue("BCD", _el_key(mgr.guid, EL_DEFAULT), "Element", REG_SZ, loader.guid,
                         why="BCD: default loader pointed at a missing object; the store has exactly one OS loader")
            )
        else:
            return changes, [f"default loader missing and {len(loaders)} OS loaders to choose from: left alone"]
    winload = "\\Windows\\system32\\winload." + ("efi" if firmware == "uefi" else "exe")
    path = loader.element(EL_PATH)
    if not isinstance(path, str) or not path or not path_exists(path):
        if path_exists(winload):
            changes.append(
                RegValue("BCD", _el_key(loader.guid, EL_PATH), "Element", REG_SZ, winload,
                         why=f"BCD: loader path {path!r} missing; {winload} exists")
            )
        else:
            left.append(f"loader path {path!r} missing and {winload} not found: left alone")
    if not (loader.elements.get(EL_DEVICE) or loader.elements.get(EL_OSDEVICE)):
        left.append("loader has no device element: not repairable without bcdboot")
    return changes, left


def ems_changes(store: BcdStore, loader_guid: str) -> list[RegValue]:
    """Enable EMS on COM1 at 115200 baud: boot manager, default loader, {emssettings}."""
    why = "BCD: EMS (serial console) on COM1 so the lab can read the console"
    mgr = store.bootmgr
    if mgr is None:
        raise InputError("cannot enable EMS: the BCD store has no boot manager")
    changes = [
        RegValue("BCD", _el_key(mgr.guid, EL_EMS_ENABLED), "Element", REG_BINARY, boolean(True), why),
        RegValue("BCD", _el_key(loader_guid, EL_LOADER_EMS), "Element", REG_BINARY, boolean(True), why),
    ]
    ems = store.get(EMSSETTINGS)
    guid = ems.guid if ems is not None else EMSSETTINGS
    if ems is None:  # a store made without {emssettings}: create it and let the boot manager inherit it
        changes.append(
            RegValue("BCD", f"Objects\\{guid}\\Description", "Type", 4, TYPE_INHERIT_LIBRARY, why)
        )
        if not _inherits(store, mgr, EMSSETTINGS):
            inherit = mgr.element(EL_INHERIT)
            current = list(inherit) if isinstance(inherit, list) else []
            changes.append(
                RegValue("BCD", _el_key(mgr.guid, EL_INHERIT), "Element", 7, current + [EMSSETTINGS], why)
            )
    changes += [
        RegValue("BCD", _el_key(guid, EL_EMS_PORT), "Element", REG_BINARY, integer(EMS_PORT), why),
        RegValue("BCD", _el_key(guid, EL_EMS_BAUD), "Element", REG_BINARY, integer(EMS_BAUD), why),
    ]
    return changes


def _inherits(store: BcdStore, obj: BcdObject, target: str, seen: set[str] | None = None) -> bool:
    seen = seen or set()
    inherit = obj.element(EL_INHERIT)
    for guid in inherit if isinstance(inherit, list) else []:
        if guid.lower() == target.lower():
            return True
        child = store.get(guid)
        if child is not None and guid.lower() not in seen:
            seen.add(guid.lower())
            if _inherits(store, child, target, seen):
                return True
    return False
