"""Write an empty Windows registry hive (regf) from the format; hivex has no "create".

Layout written by :func:`empty_hive` (all integers little-endian):

* a 4 KiB base block: ``regf`` signature, equal sequence numbers (a clean
  hive, no pending log), version 1.3, root cell offset, hive-bins size, the
  hive's file name, and the checksum at 0x1FC (XOR of the first 127 dwords);
* one 4 KiB ``hbin`` holding three cells: the root key (``nk``), a security
  cell (``sk``) that the root points at, and one free cell for the rest.

The ``sk`` cell matters: hivex gives every new key its parent's security cell
and bumps that cell's reference count, so adding keys to a hive without one
fails. Offsets inside the hive are relative to the first hbin (file offset
0x1000), as in the format.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

BASE_BLOCK_SIZE = 0x1000
HBIN_SIZE = 0x1000
HBIN_HEADER_SIZE = 0x20
NO_CELL = 0xFFFFFFFF

# nk flags: KEY_HIVE_ENTRY (root key), KEY_NO_DELETE, KEY_COMP_NAME (ASCII name)
NK_ROOT_FLAGS = 0x0004 | 0x0008 | 0x0020

# Access mask bits for registry keys (winnt.h)
KEY_ALL_ACCESS = 0x000F003F
KEY_READ = 0x00020019
CONTAINER_INHERIT_ACE = 0x02
OBJECT_INHERIT_ACE = 0x01


def filetime(unix_seconds: float | None = None) -> int:
    """Windows FILETIME (100 ns ticks since 1601-01-01) for a Unix time."""
    t = time.time() if unix_seconds is None else unix_seconds
    return int((t + 11644473600) * 10_000_000)


def checksum(base_block: bytes) -> int:
    """The base-block checksum: XOR of the first 127 dwords, with 0 and ~0 remapped."""
    total = 0
    for (dword,) in struct.iter_unpack("<I", base_block[:508]):
        total ^= dword
    if total == 0xFFFFFFFF:
        return 0xFFFFFFFE
    if total == 0:
        return 1
    return total


def _sid(revision: int, authority: int, *subs: int) -> bytes:
    return struct.pack("<BB", revision, len(subs)) + authority.to_bytes(6, "big") + b"".join(
        struct.pack("<I", s) for s in subs
    )


SID_ADMINISTRATORS = _sid(1, 5, 32, 544)  # S-1-5-32-544
SID_SYSTEM = _sid(1, 5, 18)  # S-1-5-18
SID_EVERYONE = _sid(1, 1, 0)  # S-1-1-0


def _ace_allow(mask: int, sid: bytes, flags: int) -> bytes:
    size = 8 + len(sid)
    return struct.pack("<BBHI", 0, flags, size, mask) + sid  # type 0 = ACCESS_ALLOWED_ACE


def security_descriptor() -> bytes:
    """A self-relative security descriptor like the ones on real hive roots.

    Owner Administrators, group SYSTEM; DACL: Administrators and SYSTEM full
    control, Everyone read, all inherited by subkeys.
    """
    inherit = CONTAINER_INHERIT_ACE
    aces = [
        _ace_allow(KEY_ALL_ACCESS, SID_ADMINISTRATORS, inherit),
        _ace_allow(KEY_ALL_ACCESS, SID_SYSTEM, inherit),
        _ace_allow(KEY_READ, SID_EVERYONE, inherit),
    ]
    acl_body = b"".join(aces)
    acl = struct.pack("<BBHHH", 2, 0, 8 + len(acl_body), len(aces), 0) + acl_body  # ACL_REVISION 2
    header_size = 20
    owner_off = header_size
    group_off = owner_off + len(SID_ADMINISTRATORS)
    dacl_off = group_off + len(SID_SYSTEM)
    # control: SE_SELF_RELATIVE | SE_DACL_PRESENT
    control = 0x8000 | 0x0004
    header = struct.pack("<BBHIIII", 1, 0, control, owner_off, group_off, 0, dacl_off)
    return header + SID_ADMINISTRATORS + SID_SYSTEM + acl


def _cell(payload: bytes) -> bytes:
    """An allocated cell: negative size (including the 4-byte size field), 8-aligned."""
    size = (len(payload) + 4 + 7) & ~7
    return struct.pack("<i", -size) + payload + b"\0" * (size - 4 - len(payload))


def _nk_root(name: str, sk_offset: int, stamp: int) -> bytes:
    raw = name.encode("ascii")
    return (
        b"nk"
        + struct.pack(
            "<HQIIIIIIIIIIIIIIIHH",
            NK_ROOT_FLAGS,
            stamp,
            0,  # access bits
            NO_CELL,  # parent (none for the root)
            0,  # subkeys
            0,  # volatile subkeys
            NO_CELL,  # subkeys list
            NO_CELL,  # volatile subkeys list
            0,  # values
            NO_CELL,  # values list
            sk_offset,
            NO_CELL,  # class name
            0,  # largest subkey name
            0,  # largest subkey class name
            0,  # largest value name
            0,  # largest value data
            0,  # workvar
            len(raw),
            0,  # class name length
        )
        + raw
    )


def _sk(self_offset: int, descriptor: bytes, refcount: int = 1) -> bytes:
    # A single sk cell is its own list: flink and blink point at itself.
    return b"sk" + struct.pack("<HIIII", 0, self_offset, self_offset, refcount, len(descriptor)) + descriptor


def empty_hive(root_name: str = "ROOT", file_name: str = "") -> bytes:
    """A valid, clean, empty regf hive (8 KiB) whose root key is ``root_name``.

    Real hives name their root e.g. ``ROOT`` (SYSTEM/SOFTWARE exported by
    Windows) or ``NewStoreRoot`` (BCD); hivex does not care.
    ``file_name`` is the informational name in the base block
    (e.g. ``\\SystemRoot\\System32\\Config\\SYSTEM``).
    """
    stamp = filetime()
    # Cell offsets are relative to the start of the hbin area (file offset 0x1000).
    nk_offset = HBIN_HEADER_SIZE
    nk_probe = _cell(_nk_root(root_name, 0, stamp))
    sk_offset = nk_offset + len(nk_probe)
    nk = _cell(_nk_root(root_name, sk_offset, stamp))
    sk = _cell(_sk(sk_offset, security_descriptor()))
    used = HBIN_HEADER_SIZE + len(nk) + len(sk)
    free_size = HBIN_SIZE - used
    free = struct.pack("<i", free_size) + b"\0" * (free_size - 4)  # positive size = free cell

    hbin_header = b"hbin" + struct.pack("<IIQQI", 0, HBIN_SIZE, 0, stamp, 0)
    hbin = hbin_header + nk + sk + free
    assert len(hbin) == HBIN_SIZE

    base = bytearray(BASE_BLOCK_SIZE)
    struct.pack_into(
        "<4sIIQIIIIIII",
        base,
        0,
        b"regf",
        1,  # primary sequence number
        1,  # secondary sequence number (equal: the hive is clean)
        stamp,
        1,  # major version
        3,  # minor version (1.3: lf/lh lists, understood by every Windows since XP)
        0,  # file type: primary
        1,  # file format: direct memory load
        nk_offset,  # root cell
        HBIN_SIZE,  # size of all hbins
        1,  # clustering factor
    )
    fname = file_name.encode("utf-16-le")[:64]
    base[0x30 : 0x30 + len(fname)] = fname
    struct.pack_into("<I", base, 0x1FC, checksum(bytes(base)))
    return bytes(base) + hbin


def make_hive(path: str | Path, reg_text: str = "", root_prefix: str = "", root_name: str = "ROOT") -> Path:
    """Write an empty hive to ``path`` and merge ``reg_text`` (a .reg file's text) into it.

    ``root_prefix`` is the registry path the hive is mounted at, e.g.
    ``HKEY_LOCAL_MACHINE\\SYSTEM``; keys in the text are relative to it.
    """
    from lab.testbed.regtext import apply_reg  # regtext imports nothing from here at import time

    path = Path(path)
    path.write_bytes(empty_hive(root_name))
    if reg_text.strip():
        apply_reg(path, reg_text, root_prefix)
    return path
