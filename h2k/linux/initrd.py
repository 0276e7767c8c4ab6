"""Read the file list of an initramfs image without the guest's tools.

An initramfs is one or more newc cpio archives, concatenated: often an
uncompressed "early" archive (CPU microcode) followed by a compressed main one
(gzip, xz, zstd, lz4, ...). We walk the uncompressed archives, then hand the rest
to the matching decompressor. Used by ``verify`` (read-only: no command runs in
the guest) and by ``fix`` to learn which storage drivers the old initramfs had.

The image comes from the guest, so it is bounded: at most MAX_IMAGE bytes are
downloaded, at most MAX_UNPACKED bytes are decompressed (a small file can unpack
to gigabytes), and every cpio header field is checked before it is used.
"""

from __future__ import annotations

import lzma
import shutil
import subprocess
import tempfile
import zlib
from pathlib import Path, PurePosixPath

from h2k.errors import H2KError, InputError

NEWC_MAGICS = (b"070701", b"070702")
TRAILER = "TRAILER!!!"
MAX_IMAGE = 512 << 20  # an initramfs file as stored (Debian's are 30-80 MiB)
MAX_UNPACKED = 1 << 30  # what its compressed part may unpack to
MAX_NAME = 4096  # PATH_MAX

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


def _hex_field(data: bytes, at: int) -> int:
    raw = data[at : at + 8]
    if len(raw) != 8 or not all(c in b"0123456789abcdefABCDEF" for c in raw):
        raise InputError(f"initramfs: corrupt cpio header field at offset {at}")
    return int(raw, 16)


def _walk_cpio(data: bytes, pos: int, names: list[str]) -> int:
    """Append the names of one newc archive starting at ``pos``; return the offset after its trailer."""
    while True:
        if data[pos : pos + 6] not in NEWC_MAGICS:
            raise InputError(f"initramfs: bad cpio header at offset {pos}")
        namesize = _hex_field(data, pos + 94)
        filesize = _hex_field(data, pos + 54)
        if not 1 <= namesize <= MAX_NAME or pos + 110 + namesize > len(data):
            raise InputError(f"initramfs: corrupt cpio entry at offset {pos} (name size {namesize})")
        name = data[pos + 110 : pos + 110 + namesize - 1].decode("utf-8", "replace")
        pos = _align4(pos + 110 + namesize)
        pos = _align4(pos + filesize)
        if name == TRAILER:
            return pos
        names.append(name)


def _too_big() -> InputError:
    return InputError(f"initramfs: unpacks to more than {MAX_UNPACKED >> 20} MiB: refused (a decompression bomb?)")


def _decompress(blob: bytes) -> bytes:
    """The first compressed stream of ``blob``, at most MAX_UNPACKED bytes of it."""
    for magic, how in COMPRESSORS:
        if blob.startswith(magic):
            try:
                if how == "gzip":
                    out = zlib.decompressobj(wbits=31).decompress(blob, MAX_UNPACKED + 1)
                elif how in ("xz", "lzma"):
                    out = lzma.LZMADecompressor().decompress(blob, MAX_UNPACKED + 1)
                else:
                    out = _external(how, blob)
            except (zlib.error, lzma.LZMAError) as exc:
                raise InputError(f"initramfs: corrupt {how} data ({exc})") from None
            if len(out) > MAX_UNPACKED:
                raise _too_big()
            return out
    raise InputError(f"initramfs: unknown compression (magic {blob[:6].hex()})")


def _external(cmd: list[str], blob: bytes) -> bytes:
    """Run a decompressor, reading at most MAX_UNPACKED + 1 bytes of its output."""
    if shutil.which(cmd[0]) is None:
        raise H2KError(f"initramfs is {cmd[0]}-compressed and '{cmd[0]}' is not installed on this host")
    with tempfile.TemporaryFile() as src:
        src.write(blob)
        src.seek(0)
        proc = subprocess.Popen(cmd, stdin=src, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proc.stdout is not None and proc.stderr is not None
            out = proc.stdout.read(MAX_UNPACKED + 1)
            if len(out) > MAX_UNPACKED:
                raise _too_big()
            err = proc.stderr.read(4096)
        finally:
            proc.kill()
            proc.wait()
    # Trailing padding after the stream makes some tools complain; keep what decoded.
    if not out:
        raise InputError(f"initramfs: {cmd[0]} could not decompress it: {err.decode(errors='replace').strip()}")
    return out


def read_from_guest(g, path: str, workdir: Path) -> bytes:
    """The initramfs at guest ``path``, downloaded only if it is no larger than MAX_IMAGE."""
    size = g.filesize(path)
    if size > MAX_IMAGE:
        raise InputError(f"initramfs {path} is {size >> 20} MiB, larger than {MAX_IMAGE >> 20} MiB: refused")
    local = Path(workdir) / f"initrd-{PurePosixPath(path).name}"
    g.download(path, str(local))
    try:
        return local.read_bytes()
    finally:
        local.unlink()


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
