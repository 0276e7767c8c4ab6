"""NTFS security descriptors for the files ``h2k fix`` writes, as ntfs-3g takes them.

ntfs-3g gives every file it creates the descriptor "Everyone: full control"
(owner and group Administrators): a script that later runs as SYSTEM, a staged
driver or a hive backup made that way is writable (or readable) by every user.
The fix therefore sets the security descriptor of each file and directory it
creates through ntfs-3g's ``system.ntfs_acl`` extended attribute, which reads
and writes the self-relative ``SECURITY_DESCRIPTOR`` Windows keeps in ``$Secure``.

libguestfs' ``setxattr`` cannot carry binary values (its value travels as a C
string, cut at the first NUL), so the attribute rides in the tar that
``tar_in(..., xattrs=True)`` extracts (a ``SCHILY.xattr.system.ntfs_acl`` pax
record; libguestfs passes ``--xattrs --xattrs-include='*'`` to GNU tar). It is
read back with ``getxattr``, whose answer is a byte buffer.

Layout (Microsoft's ``SECURITY_DESCRIPTOR_RELATIVE``, ``ACL``, ``ACCESS_ALLOWED_ACE``
and ``SID`` structures, all little-endian except the SID's 48-bit authority):

* header: Revision=1, Sbz1, Control (u16), OffsetOwner, OffsetGroup, OffsetSacl,
  OffsetDacl (u32 each, 0 = absent), 20 bytes;
* ACL: AclRevision=2, Sbz1, AclSize (u16), AceCount (u16), Sbz2; then the ACEs;
* ACE: AceType (0 = allowed), AceFlags, AceSize (u16), Mask (u32), SID;
* SID: Revision=1, SubAuthorityCount, IdentifierAuthority (6 bytes, big-endian),
  SubAuthority[] (u32 each).

This module writes the DACL first, then owner and group, as Windows does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

XATTR = "system.ntfs_acl"

# Control bits (winnt.h)
SE_DACL_PRESENT = 0x0004
SE_DACL_AUTO_INHERITED = 0x0400
SE_DACL_PROTECTED = 0x1000
SE_SELF_RELATIVE = 0x8000

ACCESS_ALLOWED_ACE_TYPE = 0
OBJECT_INHERIT_ACE = 0x01
CONTAINER_INHERIT_ACE = 0x02

FILE_ALL_ACCESS = 0x001F01FF  # SDDL "FA"
FILE_GENERIC_READ_EXECUTE = 0x001200A9  # SDDL "0x1200a9": read data, EA, attributes, execute, READ_CONTROL, SYNCHRONIZE

SYSTEM_SID = "S-1-5-18"  # SDDL "SY": LocalSystem
ADMINISTRATORS_SID = "S-1-5-32-544"  # SDDL "BA": BUILTIN\Administrators
USERS_SID = "S-1-5-32-545"  # SDDL "BU": BUILTIN\Users
EVERYONE_SID = "S-1-1-0"  # SDDL "WD"

SID_NAMES = {SYSTEM_SID: "SYSTEM", ADMINISTRATORS_SID: "Administrators", USERS_SID: "Users", EVERYONE_SID: "Everyone"}


def sid_bytes(sid: str) -> bytes:
    """``S-1-5-32-544`` -> the binary SID."""
    parts = sid.split("-")
    if len(parts) < 3 or parts[0] != "S":
        raise ValueError(f"not a SID: {sid!r}")
    revision, authority = int(parts[1]), int(parts[2])
    subs = [int(p) for p in parts[3:]]
    return (struct.pack("<BB", revision, len(subs)) + authority.to_bytes(6, "big")
            + b"".join(struct.pack("<I", s) for s in subs))


def sid_string(data: bytes, offset: int = 0) -> tuple[str, int]:
    """The SID at ``offset`` as text, and its length in bytes."""
    revision, count = struct.unpack_from("<BB", data, offset)
    authority = int.from_bytes(data[offset + 2 : offset + 8], "big")
    subs = struct.unpack_from(f"<{count}I", data, offset + 8)
    return "-".join(["S", str(revision), str(authority), *map(str, subs)]), 8 + 4 * count


@dataclass(frozen=True)
class Ace:
    sid: str
    mask: int
    flags: int = 0  # OBJECT_INHERIT_ACE | CONTAINER_INHERIT_ACE on directories
    type: int = ACCESS_ALLOWED_ACE_TYPE

    def to_bytes(self) -> bytes:
        sid = sid_bytes(self.sid)
        return struct.pack("<BBHI", self.type, self.flags, 8 + len(sid), self.mask) + sid


@dataclass(frozen=True)
class SecurityDescriptor:
    owner: str
    group: str
    dacl: tuple[Ace, ...]
    control: int = SE_SELF_RELATIVE | SE_DACL_PRESENT | SE_DACL_PROTECTED

    def to_bytes(self) -> bytes:
        aces = b"".join(a.to_bytes() for a in self.dacl)
        acl = struct.pack("<BBHHH", 2, 0, 8 + len(aces), len(self.dacl), 0) + aces
        owner, group = sid_bytes(self.owner), sid_bytes(self.group)
        off_dacl = 20
        off_owner = off_dacl + len(acl)
        off_group = off_owner + len(owner)
        head = struct.pack("<BBHIIII", 1, 0, self.control, off_owner, off_group, 0, off_dacl)
        return head + acl + owner + group

    def describe(self) -> str:
        """A short human form, e.g. ``owner Administrators; SYSTEM full, Administrators full``."""
        def name(sid: str) -> str:
            return SID_NAMES.get(sid, sid)

        rights = {FILE_ALL_ACCESS: "full", FILE_GENERIC_READ_EXECUTE: "read+execute"}
        aces = ", ".join(f"{name(a.sid)} {rights.get(a.mask, hex(a.mask))}" for a in self.dacl)
        return f"owner {name(self.owner)}; {aces}" + ("; protected" if self.control & SE_DACL_PROTECTED else "")


def parse(data: bytes) -> SecurityDescriptor:
    """Decode a self-relative descriptor (owner, group, allowed/denied ACEs of the DACL)."""
    if len(data) < 20:
        raise ValueError("security descriptor shorter than its 20-byte header")
    revision, _, control, off_owner, off_group, _off_sacl, off_dacl = struct.unpack_from("<BBHIIII", data, 0)
    if revision != 1 or not control & SE_SELF_RELATIVE:
        raise ValueError(f"not a self-relative security descriptor (revision {revision}, control {control:#06x})")
    owner = sid_string(data, off_owner)[0] if off_owner else ""
    group = sid_string(data, off_group)[0] if off_group else ""
    aces: list[Ace] = []
    if off_dacl and control & SE_DACL_PRESENT:
        _rev, _, _size, count, _ = struct.unpack_from("<BBHHH", data, off_dacl)
        pos = off_dacl + 8
        for _ in range(count):
            typ, flags, size, mask = struct.unpack_from("<BBHI", data, pos)
            aces.append(Ace(sid_string(data, pos + 8)[0], mask, flags, typ))
            pos += size
    return SecurityDescriptor(owner, group, tuple(aces), control)


def _profile(readers: bool, directory: bool) -> SecurityDescriptor:
    inherit = OBJECT_INHERIT_ACE | CONTAINER_INHERIT_ACE if directory else 0
    aces = [Ace(SYSTEM_SID, FILE_ALL_ACCESS, inherit), Ace(ADMINISTRATORS_SID, FILE_ALL_ACCESS, inherit)]
    if readers:
        aces.append(Ace(USERS_SID, FILE_GENERIC_READ_EXECUTE, inherit))
    return SecurityDescriptor(ADMINISTRATORS_SID, SYSTEM_SID, tuple(aces))


# SDDL O:BAG:SYD:P(A;OICI;FA;;;SY)(A;OICI;FA;;;BA) (directories; files without OICI):
# read and write for SYSTEM and Administrators only. Staging, scripts, backups, journals.
PRIVATE_DIR = _profile(readers=False, directory=True)
PRIVATE_FILE = _profile(readers=False, directory=False)
# ... plus (A;;0x1200a9;;;BU): what Windows' own system files allow users (read and execute),
# for drivers, INFs and driver-store copies placed where Windows keeps its own.
SYSTEM_DIR = _profile(readers=True, directory=True)
SYSTEM_FILE = _profile(readers=True, directory=False)

# Folders under the system root whose new files keep Windows' readable profile.
_SYSTEM_PLACES = ("system32/drivers/", "system32/driverstore/", "inf/")


def profile_for(path: str, directory: bool, system_root: str = "/Windows") -> SecurityDescriptor:
    """The descriptor a file or folder the fix creates at ``path`` (volume-relative) gets."""
    p = "/" + path.strip("/").lower() + ("/" if directory else "")
    root = "/" + system_root.strip("/").lower() + "/"
    readable = any(p.startswith(root + place) for place in _SYSTEM_PLACES)
    if readable:
        return SYSTEM_DIR if directory else SYSTEM_FILE
    return PRIVATE_DIR if directory else PRIVATE_FILE


def pax_value(sd: bytes) -> str:
    """The descriptor as a tarfile pax header value (binary kept by surrogateescape; the
    archive then says ``hdrcharset=BINARY`` and GNU tar restores the bytes as they were)."""
    return sd.decode("utf-8", "surrogateescape")
