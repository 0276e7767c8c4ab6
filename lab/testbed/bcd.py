"""A real Boot Configuration Data store (a registry hive), and a reader for any BCD.

The store is written as .reg text (see :func:`bcd_reg_text`) and merged into an
empty hive with hivex, so it is exactly what a BCD looks like to hivex:

    Description\\KeyName = "BCD00000000"
    Objects\\{guid}\\Description\\Type = DWORD object type
    Objects\\{guid}\\Elements\\<element id>\\Element = value

Element ids encode their format in bits 24-27 (1 device, 2 string, 3 object,
4 object list, 5 integer, 6 boolean, 7 integer list). Strings and object
references are REG_SZ, lists REG_MULTI_SZ, integers/booleans/devices REG_BINARY.

Device elements (``11000001`` application device, ``21000001`` OS device) are
binary; for a partition this module writes (offsets in bytes):

    0x00 16  zero GUID (no additional options)
    0x10 4   device type 6 (partition)       0x14 4  flags 0
    0x18 4   0x48 (length of the data from 0x10)  0x1C 4  0
    0x20 16  partition: MBR byte offset (u128 LE) or GPT partition GUID (mixed-endian)
    0x30 4   0                                0x34 4  partition style 1 MBR / 0 GPT
    0x38 16  disk: MBR signature (u32 LE, then zeros) or GPT disk GUID (mixed-endian)
    0x48 16  zeros
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

from lab.testbed.hive import empty_hive
from lab.testbed.regtext import (
    REG_BINARY,
    KeySection,
    RegData,
    ValueOp,
    apply_reg,
    binary,
    decode_multi_sz,
    decode_utf16z,
    dword,
    format_reg,
    multi_sz,
    read_hive,
    sz,
)

# Well-known object GUIDs (bcdedit aliases)
BOOTMGR = "{9dea862c-5cdd-4e70-acc1-f32b344d4795}"
EMSSETTINGS = "{0ce4991b-e6b3-4b16-b23c-5e0d9250e5d9}"
DBGSETTINGS = "{4636856e-540f-4170-a130-a84776f4c654}"
GLOBALSETTINGS = "{7ea2e1ac-2e61-4728-aaa3-896d9d0a9f0e}"
BOOTLOADERSETTINGS = "{6efb52bf-1766-41db-a6b3-0ee5eff72bd7}"
MEMDIAG = "{b2721d73-1db4-4c62-bf78-c548a880142d}"

# Object types (Description\Type)
TYPE_BOOTMGR = 0x10100002
TYPE_OSLOADER = 0x10200003
TYPE_INHERIT_ALL = 0x20100000  # settings inherited by every application
TYPE_INHERIT_OSLOADER = 0x20200003
TYPE_MEMDIAG = 0x10200005

# Element ids used here
E_DEVICE = "11000001"  # application device
E_PATH = "12000002"  # application path
E_DESCRIPTION = "12000004"
E_LOCALE = "12000005"
E_INHERIT = "14000006"
E_BOOTEMS = "16000020"
E_EMS_PORT = "15000022"
E_EMS_BAUD = "15000023"
E_OSDEVICE = "21000001"
E_SYSTEMROOT = "22000002"
E_DEFAULT = "23000003"
E_RESUMEOBJECT = "23000006"
E_DISPLAYORDER = "24000001"
E_TOOLSDISPLAYORDER = "24000010"
E_TIMEOUT = "25000004"
E_NX = "25000020"
E_BOOTMENUPOLICY = "250000c2"
E_EMS_LOADER = "260000b0"

DEVICE_TYPE_PARTITION = 6
STYLE_GPT = 0
STYLE_MBR = 1


@dataclass(frozen=True)
class PartitionRef:
    """Where a BCD device element points: a partition on an MBR or a GPT disk."""

    style: str  # "mbr" or "gpt"
    disk_signature: int = 0  # MBR
    partition_offset: int = 0  # MBR: byte offset of the partition
    disk_guid: str = ""  # GPT, "{...}" or bare
    partition_guid: str = ""  # GPT


def device_blob(ref: PartitionRef) -> bytes:
    """The binary device element for a partition (layout in the module docstring)."""
    if ref.style == "mbr":
        part = ref.partition_offset.to_bytes(16, "little")
        disk = struct.pack("<I", ref.disk_signature) + b"\0" * 12
        style = STYLE_MBR
    elif ref.style == "gpt":
        part = uuid.UUID(ref.partition_guid).bytes_le
        disk = uuid.UUID(ref.disk_guid).bytes_le
        style = STYLE_GPT
    else:
        raise ValueError(f"unknown partition style {ref.style!r}")
    body = struct.pack("<IIII", DEVICE_TYPE_PARTITION, 0, 0x48, 0) + part + struct.pack("<II", 0, style) + disk
    return b"\0" * 16 + body + b"\0" * 16


def parse_device(blob: bytes) -> PartitionRef | None:
    """Decode a partition device element; None for other device kinds (ramdisk, boot, locate ...)."""
    if len(blob) < 0x48:
        return None
    dtype, _flags, length = struct.unpack_from("<III", blob, 0x10)
    if dtype != DEVICE_TYPE_PARTITION or length < 0x38:
        return None
    part = blob[0x20:0x30]
    style = struct.unpack_from("<I", blob, 0x34)[0]
    disk = blob[0x38:0x48]
    if style == STYLE_MBR:
        return PartitionRef(
            "mbr",
            disk_signature=struct.unpack_from("<I", disk)[0],
            partition_offset=int.from_bytes(part, "little"),
        )
    if style == STYLE_GPT:
        return PartitionRef(
            "gpt",
            disk_guid="{%s}" % uuid.UUID(bytes_le=disk),
            partition_guid="{%s}" % uuid.UUID(bytes_le=part),
        )
    return None


def _int_elem(n: int) -> RegData:
    return binary(struct.pack("<Q", n))


def _bool_elem(b: bool) -> RegData:
    return binary(b"\x01" if b else b"\x00")


@dataclass(frozen=True)
class BcdSpec:
    """What goes in a Windows BCD store: one boot manager, one OS loader, the usual settings."""

    firmware: str  # "bios" or "uefi"
    loader_guid: str  # "{...}" of the OS loader object
    system_partition: PartitionRef  # where bootmgr lives (System Reserved or ESP)
    windows_partition: PartitionRef  # C:
    description: str = "Windows Server"
    locale: str = "en-US"
    timeout: int = 30
    resume_guid: str = ""  # optional resume object reference


def bcd_sections(spec: BcdSpec) -> list[KeySection]:
    """The store as .reg sections under ``HKEY_LOCAL_MACHINE\\BCD00000000``."""
    root = "HKEY_LOCAL_MACHINE\\BCD00000000"
    uefi = spec.firmware == "uefi"
    loader = spec.loader_guid.lower()
    secs = [KeySection(f"{root}\\Description", values=[ValueOp("KeyName", sz("BCD00000000")),
                                                       ValueOp("System", dword(1)),
                                                       ValueOp("TreatAsSystem", dword(1))])]

    def obj(guid: str, otype: int, elements: dict[str, RegData]) -> None:
        base = f"{root}\\Objects\\{guid}"
        secs.append(KeySection(f"{base}\\Description", values=[ValueOp("Type", dword(otype))]))
        for eid, val in elements.items():
            secs.append(KeySection(f"{base}\\Elements\\{eid}", values=[ValueOp("Element", val)]))

    sys_dev = device_blob(spec.system_partition)
    win_dev = device_blob(spec.windows_partition)
    bootmgr = {
        E_DEVICE: binary(sys_dev),
        E_DESCRIPTION: sz("Windows Boot Manager"),
        E_LOCALE: sz(spec.locale),
        E_INHERIT: multi_sz([GLOBALSETTINGS]),
        E_DEFAULT: sz(loader),
        E_RESUMEOBJECT: sz(spec.resume_guid) if spec.resume_guid else None,
        E_DISPLAYORDER: multi_sz([loader]),
        E_TOOLSDISPLAYORDER: multi_sz([MEMDIAG]),
        E_TIMEOUT: _int_elem(spec.timeout),
    }
    if uefi:
        bootmgr[E_PATH] = sz("\\EFI\\Microsoft\\Boot\\bootmgfw.efi")
    obj(BOOTMGR, TYPE_BOOTMGR, {k: v for k, v in bootmgr.items() if v is not None})

    winload = "\\Windows\\system32\\winload.efi" if uefi else "\\Windows\\system32\\winload.exe"
    obj(
        loader,
        TYPE_OSLOADER,
        {
            E_DEVICE: binary(win_dev),
            E_PATH: sz(winload),
            E_DESCRIPTION: sz(spec.description),
            E_LOCALE: sz(spec.locale),
            E_INHERIT: multi_sz([BOOTLOADERSETTINGS]),
            E_OSDEVICE: binary(win_dev),
            E_SYSTEMROOT: sz("\\Windows"),
            E_NX: _int_elem(1),  # OptOut on servers / OptIn on clients: any value reads fine
            E_BOOTMENUPOLICY: _int_elem(0),
        },
    )
    obj(GLOBALSETTINGS, TYPE_INHERIT_ALL, {E_INHERIT: multi_sz([DBGSETTINGS, EMSSETTINGS])})
    obj(DBGSETTINGS, TYPE_INHERIT_ALL, {"15000011": _int_elem(1), "15000013": _int_elem(1), "15000014": _int_elem(115200)})
    obj(EMSSETTINGS, TYPE_INHERIT_ALL, {E_BOOTEMS: _bool_elem(False)})
    obj(BOOTLOADERSETTINGS, TYPE_INHERIT_OSLOADER, {E_INHERIT: multi_sz([GLOBALSETTINGS])})
    memtest = "\\EFI\\Microsoft\\Boot\\memtest.efi" if uefi else "\\boot\\memtest.exe"
    obj(MEMDIAG, TYPE_MEMDIAG, {E_DEVICE: binary(sys_dev), E_PATH: sz(memtest),
                                E_DESCRIPTION: sz("Windows Memory Diagnostic")})
    return secs


def bcd_reg_text(spec: BcdSpec) -> str:
    return format_reg(bcd_sections(spec))


def make_bcd(path: str | Path, spec: BcdSpec) -> Path:
    """Write a BCD hive for ``spec`` to ``path``."""
    path = Path(path)
    path.write_bytes(empty_hive("NewStoreRoot"))
    apply_reg(path, bcd_reg_text(spec), "HKEY_LOCAL_MACHINE\\BCD00000000")
    return path


# ----------------------------------------------------------------------- reading


def decode_element(element_id: str, value: RegData) -> object:
    """A BCD element value as Python data, by its id's format and its registry type.

    device -> bytes (see :func:`parse_device`), string/object -> str,
    object list -> list[str], integer -> int, boolean -> bool, integer list -> list[int].
    """
    fmt = (int(element_id, 16) >> 24) & 0xF
    if value.type in (1, 2):
        return decode_utf16z(value.data)
    if value.type == 7:
        return decode_multi_sz(value.data)
    data = value.data
    if value.type == REG_BINARY:
        if fmt == 5:
            return int.from_bytes(data[:8], "little")
        if fmt == 6:
            return any(data)
        if fmt == 7:
            return [int.from_bytes(data[i : i + 8], "little") for i in range(0, len(data) - len(data) % 8, 8)]
    return data


def read_bcd(path: str | Path) -> dict:
    """Read any BCD hive into plain data.

    Returns ``{"key_name": str|None, "objects": {guid: {"type": int|None, "elements":
    {element_id: value}}}, "bootmgr": guid|None, "default": guid|None,
    "default_path": str|None, "default_systemroot": str|None}``. GUIDs are
    lower-case with braces; element ids lower-case hex as stored.
    Raises RuntimeError (from hivex) if the file is not a hive.
    """
    tree = read_hive(path)
    key_name = None
    desc = _get_ci(tree, "Description")
    if desc is not None and "KeyName" in desc:
        key_name = decode_utf16z(desc["KeyName"].data)
    objects: dict[str, dict] = {}
    for key, values in tree.items():
        parts = key.split("\\")
        if len(parts) < 2 or parts[0].lower() != "objects":
            continue
        guid = parts[1].lower()
        o = objects.setdefault(guid, {"type": None, "elements": {}})
        if len(parts) == 3 and parts[2].lower() == "description":
            t = values.get("Type")
            if t is not None and len(t.data) >= 4:
                o["type"] = struct.unpack_from("<I", t.data)[0]
        elif len(parts) == 4 and parts[2].lower() == "elements" and "Element" in values:
            o["elements"][parts[3].lower()] = decode_element(parts[3], values["Element"])
    bootmgr = BOOTMGR if BOOTMGR in objects else None
    default = None
    if bootmgr:
        d = objects[bootmgr]["elements"].get(E_DEFAULT)
        default = d.lower() if isinstance(d, str) else None
    loader = objects.get(default or "", {}).get("elements", {})
    return {
        "key_name": key_name,
        "objects": objects,
        "bootmgr": bootmgr,
        "default": default,
        "default_path": loader.get(E_PATH),
        "default_systemroot": loader.get(E_SYSTEMROOT),
    }


def _get_ci(tree: dict, key: str) -> dict | None:
    for k, v in tree.items():
        if k.lower() == key.lower():
            return v
    return None
