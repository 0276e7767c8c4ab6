"""Read the file list of an initramfs image without the guest's tools.

An initramfs is one or more newc cpio archives, concatenated: often an
uncompressed "early" archive (CPU microcode) followed by a compressed main one
(gzip, xz, zstd, lz4, ...). We walk the uncompressed archives, then hand the rest
to the matching decompressor. Used by ``verify`` (read-only: no command runs in
the guest) and by ``fix`` to learn which storage drivers the old initramfs had.
"""

from __future__ import annotations

import gzip
import lzma
import shutil
import subprocess
from pathlib import PurePosixPath

from h2k.errors import H2KError

NEWC_MAGICS = (b"070701", b"070702")
TRAILER = "TRAILER!!!"

# (magic, decompressor command or "gzip"/"xz" for the standard library)
COMPRESSORS = [
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\x28\xb5\x2f\xfd", ["zstd", "-d", "-c", "-q"]),
    (b"\x02\x21\x4c\x18", ["lz4", "-d", "-c", "-q"]),
    (b"\x04\x22\x4d\x18", ["lz4", "-d", "-c", "-q"]),
    (b"BZh", ["bzip2", "-d", "-c"]),
    (b"\x89LZO", ["lzop", "-d", "-c"]),
]


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _walk_cpio(data: bytes, pos: int, names: list[str]) -> int:
    """Append the names of one newc archive starting at ``pos``; return the offset after its trailer."""
    while True:
        if data[pos : pos + 6] not in NEWC_MAGICS:
            raise H2KError(f"initramfs: bad cpio header at offset {pos}")
        namesize = int(data[pos + 94 : pos + 102], 16)
        filesize = int(data[pos + 54 : pos + 62], 16)
        name = data[pos + 110 : pos + 110 + namesize - 1].decode("utf-8", "replace")
        pos = _align4(pos + 110 + namesize)
        pos = _align4(pos + filesize)
        if name == TRAILER:
            return pos
        names.append(name)


def _decompress(blob: bytes) -> bytes:
    for magic, how in COMPRESSORS:
        if blob.startswith(magic):
            if how == "gzip":
                return gzip.decompress(blob)
            if how in ("xz", "lzma"):
                return lzma.decompress(blob)
            if shutil.which(how[0]) is None:
                raise H2KError(f"initramfs is {how[0]}-compressed and '{how[0]}' is not installed on this host")
            proc = subprocess.run(how, input=blob, capture_output=True)
            # Trailing padding after the stream makes some tools complain; keep what decoded.
            if not proc.stdout:
                raise H2KError(f"initramfs: {how[0]} could not decompress it: {proc.stderr.decode().strip()}")
            return proc.stdout
    raise H2KError(f"initramfs: unknown compression (magic {blob[:6].hex()})")


def list_files(data: bytes) -> list[str]:
    """Every path in the initramfs image ``data`` (all concatenated archives)."""
    names: list[str] = []
    pos = 0
    while pos < len(data):
        while pos < len(data) and data[pos] == 0:  # padding between archives
            pos += 1
        if pos >= len(data):
            break
        if data[pos : pos + 6] in NEWC_MAGICS:
            pos = _walk_cpio(data, pos, names)
            continue
        inner = _decompress(data[pos:])
        ipos = 0
        while ipos < len(inner):
            while ipos < len(inner) and inner[ipos] == 0:
                ipos += 1
            if ipos >= len(inner) or inner[ipos : ipos + 6] not in NEWC_MAGICS:
                break
            ipos = _walk_cpio(inner, ipos, names)
        break
    return names


def module_name(path: str) -> str | None:
    """``usr/lib/modules/6.1/kernel/drivers/ata/ahci.ko.zst`` -> ``ahci`` (dashes as underscores)."""
    base = PurePosixPath(path).name
    if ".ko" not in base:
        return None
    stem, _, rest = base.partition(".ko")
    if rest not in ("", ".xz", ".zst", ".gz"):
        return None
    return stem.replace("-", "_")


def modules(data: bytes) -> dict[str, str]:
    """Kernel modules in the image: name -> path inside the archive."""
    found: dict[str, str] = {}
    for path in list_files(data):
        name = module_name(path)
        if name:
            found[name] = path
    return found
