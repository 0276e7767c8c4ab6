"""The qcow2 header, read by h2k itself before qemu-img ever opens the file.

Only what decides whether opening the image is safe: the version, the
backing file name and its recorded format, the external data file, and
encryption. Layout from QEMU's ``docs/interop/qcow2.txt``: big-endian fields,
a 72-byte version 2 header (version 3 adds ``header_length`` at offset 100),
then header extensions (type, length, data padded to 8 bytes) ending with type
0. Every offset and length taken from the file is bounded before it is used.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from h2k.errors import InputError

MAGIC = b"QFI\xfb"
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21  # 512 B to 2 MiB clusters, as QEMU accepts
MAX_BACKING_NAME = 1023  # QEMU refuses longer backing file names
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_DATA_FILE = 0x44415441
INCOMPAT_EXTERNAL_DATA = 1 << 2


@dataclass(frozen=True)
class Qcow2Header:
    version: int
    size: int  # virtual size in bytes
    backing_file: str | None
    backing_format: str | None  # None: not recorded (QEMU would probe)
    data_file: str | None  # the external data file name, if the header extension is present
    external_data: bool  # the incompatible-feature bit for an external data file
    encrypted: bool


def parse_header(head: bytes, where: str = "qcow2") -> Qcow2Header:
    """The header from the file's first cluster; InputError for anything malformed or out of bounds."""
    if len(head) < 72 or head[:4] != MAGIC:
        raise InputError(f"{where}: qcow2 header is truncated or has no qcow2 magic")
    version, backing_off, backing_len, cluster_bits = struct.unpack_from(">IQII", head, 4)
    if version not in (2, 3):
        raise InputError(f"{where}: qcow version {version} images are not supported (only qcow2 versions 2 and 3)")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise InputError(f"{where}: qcow2 cluster size 2^{cluster_bits} is out of bounds (corrupt header)")
    (size,) = struct.unpack_from(">Q", head, 24)
    (crypt,) = struct.unpack_from(">I", head, 32)
    incompatible = 0
    ext_start = 72
    if version == 3:
        if len(head) < 104:
            raise InputError(f"{where}: qcow2 version 3 header is truncated")
        (incompatible,) = struct.unpack_from(">Q", head, 72)
        (header_len,) = struct.unpack_from(">I", head, 100)
        if header_len < 104 or header_len % 8 or header_len > len(head):
            raise InputError(f"{where}: qcow2 header length {header_len} is out of bounds (corrupt header)")
        ext_start = header_len
    backing = None
    if backing_off:
        if backing_len == 0 or backing_len > MAX_BACKING_NAME:
            raise InputError(f"{where}: qcow2 backing file name length {backing_len} is out of bounds")
        if backing_off + backing_len > min(len(head), 1 << cluster_bits):
            raise InputError(f"{where}: qcow2 backing file name lies outside the first cluster (corrupt header)")
        backing = _text(head[backing_off:backing_off + backing_len], where, "backing file name")
    # As QEMU reads them: extensions up to the backing file name (or the end of the first cluster).
    end = backing_off if backing_off else 1 << cluster_bits
    if end > len(head):
        raise InputError(f"{where}: qcow2 header is truncated (the first cluster is incomplete)")
    fmt = data_file = None
    pos = ext_start
    while pos < end:
        if pos + 8 > end:
            raise InputError(f"{where}: qcow2 header extension at {pos} is truncated (corrupt header)")
        ext_type, ext_len = struct.unpack_from(">II", head, pos)
        if ext_type == EXT_END:
            break
        if ext_len > end - pos - 8:
            raise InputError(f"{where}: qcow2 header extension 0x{ext_type:08x} is too large (corrupt header)")
        data = head[pos + 8:pos + 8 + ext_len]
        if ext_type == EXT_BACKING_FORMAT:
            fmt = _text(data, where, "backing format")
        elif ext_type == EXT_DATA_FILE:
            data_file = _text(data, where, "data file name")
        pos += 8 + ext_len + (-ext_len % 8)
    return Qcow2Header(version=version, size=size, backing_file=backing, backing_format=fmt,
                       data_file=data_file, external_data=bool(incompatible & INCOMPAT_EXTERNAL_DATA),
                       encrypted=crypt != 0)


def read_header(path: str | Path) -> Qcow2Header:
    """The header of the qcow2 file at ``path`` (its first cluster is read: at most 2 MiB)."""
    try:
        with open(path, "rb") as f:
            head = f.read(104)
            if len(head) >= 24:
                bits = struct.unpack_from(">I", head, 20)[0]
                if MIN_CLUSTER_BITS <= bits <= MAX_CLUSTER_BITS:
                    head += f.read((1 << bits) - len(head))
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_header(head, str(path))


def _text(raw: bytes, where: str, what: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{where}: qcow2 {what} is not UTF-8 text (corrupt header)") from None
    if "\x00" in text or not text:
        raise InputError(f"{where}: qcow2 {what} is empty or holds NUL bytes (corrupt header)")
    return text
