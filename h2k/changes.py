"""The changes a plan asks for: pure data, applied by ``h2k.fix``, undone by ``h2k.rollback``.

A plan is a list of these. Paths into hives are relative to the hive root;
``{CCS}`` in a registry key stands for the current control set
("ControlSet%03d" of SYSTEM\\Select\\Current) and is resolved by the fixer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# hivex value types (winnt.h REG_*)
REG_SZ = 1
REG_EXPAND_SZ = 2
REG_BINARY = 3
REG_DWORD = 4
REG_MULTI_SZ = 7
REG_QWORD = 11


@dataclass(frozen=True)
class RegValue:
    """Set one value. ``data`` is a str (SZ/EXPAND_SZ), list[str] (MULTI_SZ), int (DWORD/QWORD) or hex str (BINARY)."""

    hive: str  # SYSTEM or SOFTWARE (or BCD)
    key: str  # backslash-separated, may contain {CCS}
    name: str  # "" for the default value
    type: int
    data: object
    why: str = ""


@dataclass(frozen=True)
class RegDeleteKey:
    """Delete a key and everything under it (e.g. a StartOverride)."""

    hive: str
    key: str
    why: str = ""


@dataclass(frozen=True)
class FileCopy:
    """Copy a file from the driver pack (host path) into the guest (guest path)."""

    source: str
    dest: str  # guest path, e.g. /Windows/System32/drivers/viostor.sys
    why: str = ""


@dataclass(frozen=True)
class FileWrite:
    """Write generated content (scripts are ASCII with CRLF) into the guest."""

    dest: str
    content: bytes
    why: str = ""


@dataclass
class Plan:
    """Everything ``fix`` will do, in order, plus what it was planned for."""

    target_bus: str  # virtio-blk or virtio-scsi (or both: "virtio-blk+virtio-scsi")
    os_folder: str  # virtio-win OS folder chosen, e.g. 2k19, w11
    arch_folder: str  # amd64, x86, ARM64
    drivers: list[str] = field(default_factory=list)  # e.g. ["viostor", "NetKVM", ...]
    changes: list[object] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
