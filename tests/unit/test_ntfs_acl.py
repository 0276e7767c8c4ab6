"""h2k.ntfs_acl against descriptors written out by hand from Microsoft's documented layouts,
and against one ntfs-3g itself wrote (its default for new files)."""

from __future__ import annotations

import io
import tarfile

import pytest

from h2k import ntfs_acl

# O:BAG:SYD:P(A;;FA;;;SY)(A;;FA;;;BA), field by field (SECURITY_DESCRIPTOR_RELATIVE, ACL,
# ACCESS_ALLOWED_ACE, SID; little-endian except the SID's 6-byte authority):
PRIVATE_FILE_HEX = (
    "01" "00" "0490"  # Revision 1, Sbz1, Control 0x9004 = SE_SELF_RELATIVE | SE_DACL_PROTECTED | SE_DACL_PRESENT
    "48000000"  # OffsetOwner = 20 (header) + 52 (ACL) = 72
    "58000000"  # OffsetGroup = 72 + 16 (S-1-5-32-544) = 88
    "00000000"  # OffsetSacl: none
    "14000000"  # OffsetDacl = 20
    "02" "00" "3400" "0200" "0000"  # AclRevision 2, Sbz1, AclSize 52, AceCount 2, Sbz2
    "00" "00" "1400" "ff011f00" "01" "01" "000000000005" "12000000"  # allow, no flags, 20 bytes, FA, S-1-5-18
    "00" "00" "1800" "ff011f00" "01" "02" "000000000005" "20000000" "20020000"  # allow, FA, S-1-5-32-544
    "01" "02" "000000000005" "20000000" "20020000"  # owner S-1-5-32-544
    "01" "01" "000000000005" "12000000"  # group S-1-5-18
)
# The same for a folder: both ACEs OBJECT_INHERIT | CONTAINER_INHERIT (flags 0x03).
PRIVATE_DIR_HEX = PRIVATE_FILE_HEX.replace("00001400ff01", "00031400ff01").replace("00001800ff01", "00031800ff01")
# + (A;;0x1200a9;;;BU): 3 ACEs, ACL 76 bytes, owner at 96, group at 112.
SYSTEM_FILE_HEX = (
    "01000490" "60000000" "70000000" "00000000" "14000000"
    "02004c00" "03000000"
    "00001400" "ff011f00" "010100000000000512000000"
    "00001800" "ff011f00" "01020000000000052000000020020000"
    "00001800" "a9001200" "01020000000000052000000021020000"  # read & execute for S-1-5-32-545
    "01020000000000052000000020020000"
    "010100000000000512000000"
)
# What ntfs-3g gave a file it created in the libguestfs appliance (read with getxattr
# system.ntfs_acl): owner and group Administrators, Everyone full control, inheritable.
NTFS3G_DEFAULT_HEX = ("0100048014000000240000000000000034000000010200000000000520000000200200000102000000000005"
                      "200000002002000002001c000100000000031400ff011f00010100000000000100000000")


def test_profiles_match_the_hand_written_descriptors():
    assert ntfs_acl.PRIVATE_FILE.to_bytes().hex() == PRIVATE_FILE_HEX
    assert ntfs_acl.PRIVATE_DIR.to_bytes().hex() == PRIVATE_DIR_HEX
    assert ntfs_acl.SYSTEM_FILE.to_bytes().hex() == SYSTEM_FILE_HEX


def test_parse_reads_what_ntfs3g_wrote():
    sd = ntfs_acl.parse(bytes.fromhex(NTFS3G_DEFAULT_HEX))
    assert (sd.owner, sd.group) == (ntfs_acl.ADMINISTRATORS_SID, ntfs_acl.ADMINISTRATORS_SID)
    assert sd.dacl == (ntfs_acl.Ace(ntfs_acl.EVERYONE_SID, ntfs_acl.FILE_ALL_ACCESS, 0x03),)
    assert not sd.control & ntfs_acl.SE_DACL_PROTECTED
    for profile in (ntfs_acl.PRIVATE_FILE, ntfs_acl.PRIVATE_DIR, ntfs_acl.SYSTEM_DIR, ntfs_acl.SYSTEM_FILE):
        assert ntfs_acl.parse(profile.to_bytes()) == profile


def test_parse_refuses_what_is_not_a_self_relative_descriptor():
    with pytest.raises(ValueError):
        ntfs_acl.parse(b"\x01\x00\x04\x00" + b"\0" * 16)  # SE_SELF_RELATIVE missing
    with pytest.raises(ValueError):
        ntfs_acl.parse(b"\x01\x00")


@pytest.mark.parametrize("path,directory,want", [
    ("/Windows/Drivers/h2k-staging/viostor/viostor.sys", False, ntfs_acl.PRIVATE_FILE),
    ("/Windows/Drivers/h2k-staging", True, ntfs_acl.PRIVATE_DIR),
    ("/Windows/Setup/Scripts/SetupComplete.cmd", False, ntfs_acl.PRIVATE_FILE),
    ("/hyper2kvm/journal/x.json", False, ntfs_acl.PRIVATE_FILE),
    ("/Windows/System32/config/SYSTEM.h2k-backup-1", False, ntfs_acl.PRIVATE_FILE),
    ("/Windows/System32/drivers/viostor.sys", False, ntfs_acl.SYSTEM_FILE),
    ("/WINDOWS/system32/DriverStore/FileRepository/viostor.inf_amd64_0123", True, ntfs_acl.SYSTEM_DIR),
    ("/Windows/INF/viostor.inf", False, ntfs_acl.SYSTEM_FILE),
    ("/Windows/INFX/viostor.inf", False, ntfs_acl.PRIVATE_FILE),
])
def test_profile_by_place(path, directory, want):
    assert ntfs_acl.profile_for(path, directory) == want


def test_pax_value_keeps_every_byte_through_a_tar():
    """The descriptor (NULs, bytes >= 0x80) survives tarfile's pax header as GNU tar will read it."""
    sd = ntfs_acl.SYSTEM_FILE.to_bytes()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("f")
        info.pax_headers = {f"SCHILY.xattr.{ntfs_acl.XATTR}": ntfs_acl.pax_value(sd)}
        tar.addfile(info, io.BytesIO(b""))
    raw = buf.getvalue()
    assert b"hdrcharset=BINARY" in raw  # POSIX: the values are bytes, not UTF-8
    record = f" SCHILY.xattr.{ntfs_acl.XATTR}=".encode() + sd + b"\n"
    assert record in raw and raw[raw.index(record) - 3 : raw.index(record)] == str(len(record) + 3).encode()
