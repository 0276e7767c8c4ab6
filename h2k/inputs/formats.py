"""What a disk file is, from its own bytes; VMDK descriptors parsed and checked.

QEMU's probe is not used: it reads a *fixed* VHD as raw (the VHD footer sits at
the end of the file, so the guest would get 512 extra bytes), probing is unsafe
for raw images, and its messages for a broken VMDK descriptor or a missing
extent are not one clear line. So we read the first bytes ourselves, parse VMDK
descriptors (text file or embedded in a sparse/streamOptimized extent), check
that every extent file is present and long enough, and recognise the magic of
the formats QEMU would probe but h2k does not read, so that such a file is
refused instead of being taken for raw. :mod:`h2k.image` (the front door)
builds on this and always passes the format to qemu-img with -f.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from h2k.errors import InputError

SECTOR = 512
MAX_DESCRIPTOR = 64 * 1024  # a text descriptor is a few hundred bytes; refuse anything huge

# createType values VMware documents for hosted products and ESXi; qemu reads all but the VMFS raw ones.
VMDK_CREATE_TYPES = {
    "monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
    "streamOptimized", "vmfs", "vmfsSparse", "vmfsThin", "vmfsPreallocated", "vmfsEagerZeroedThick",
    "custom",
}
EXTENT_TYPES = {"FLAT", "SPARSE", "ZERO", "VMFS", "VMFSSPARSE", "VMFSRDM", "VMFSRAW"}
_EXTENT_RE = re.compile(
    r'^(RW|RDONLY|NOACCESS)\s+([0-9]{1,20})\s+([A-Z]+)(?:\s+"([^"]*)"(?:\s+([0-9]{1,20}))?)?\s*$'
)
_KV_RE = re.compile(r'^([A-Za-z][\w.]*)\s*=\s*"?([^"]*)"?\s*$')


@dataclass(frozen=True)
class VmdkExtent:
    access: str  # RW | RDONLY | NOACCESS
    sectors: int
    type: str  # FLAT | SPARSE | ZERO | VMFS ...
    filename: str | None  # relative to the descriptor's directory; None for ZERO
    offset: int = 0  # in sectors, FLAT only


@dataclass(frozen=True)
class VmdkDescriptor:
    create_type: str
    cid: str | None
    parent_cid: str | None
    parent_hint: str | None  # parentFileNameHint: the parent disk of a snapshot (delta) disk
    extents: tuple[VmdkExtent, ...]
    adapter_type: str | None = None  # ddb.adapterType (ide, lsilogic, buslogic, legacyESX)

    @property
    def capacity(self) -> int:
        return sum(e.sectors for e in self.extents) * SECTOR


@dataclass
class DiskInfo:
    """One disk file as the engine needs to know it (never written by h2k.inputs)."""

    path: str
    format: str  # qemu-img driver name: qcow2, raw, vmdk, vpc, vhdx
    virtual_size: int
    actual_size: int | None = None
    subformat: str | None = None  # VMDK createType, "fixed"/"dynamic" for VHD
    backing: str | None = None  # absolute path of the parent (backing) disk, if any
    files: list[str] = field(default_factory=list)  # every file the disk consists of

    def to_dict(self) -> dict:
        return asdict(self)


def parse_vmdk_descriptor(text: str, where: str = "descriptor") -> VmdkDescriptor:
    """Parse VMDK descriptor text; InputError naming the first problem (truncated, corrupt, unknown)."""
    if "\x00" in text.rstrip("\x00"):
        raise InputError(f"{where}: VMDK descriptor contains binary data (corrupt)")
    text = text.rstrip("\x00")
    if not text.lstrip().startswith("# Disk DescriptorFile"):
        raise InputError(f"{where}: not a VMDK descriptor (no '# Disk DescriptorFile' header)")
    keys: dict[str, str] = {}
    extents: list[VmdkExtent] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.split(None, 1)[0] in ("RW", "RDONLY", "NOACCESS"):
            m = _EXTENT_RE.match(line)
            if not m:
                raise InputError(f"{where}: corrupt or truncated extent line {n}: {line[:60]!r}")
            access, sectors, etype, fname, offset = m.groups()
            if etype not in EXTENT_TYPES:
                raise InputError(f"{where}: corrupt or truncated extent line {n}: unknown extent type {etype!r}")
            if etype != "ZERO" and not fname:
                raise InputError(f"{where}: extent on line {n} names no file")
            extents.append(VmdkExtent(access, int(sectors), etype, fname, int(offset or 0)))
            continue
        m = _KV_RE.match(line)
        if not m:
            raise InputError(f"{where}: corrupt descriptor line {n}: {line[:60]!r}")
        keys[m.group(1)] = m.group(2)
    ctype = keys.get("createType")
    if ctype is None:
        raise InputError(f"{where}: VMDK descriptor has no createType (truncated or corrupt)")
    if ctype not in VMDK_CREATE_TYPES:
        raise InputError(f"{where}: unknown VMDK createType {ctype!r}")
    if not extents:
        raise InputError(f"{where}: VMDK descriptor lists no extents (truncated or corrupt)")
    parent_cid = keys.get("parentCID")
    hint = qemu_parent_hint(text, where)
    return VmdkDescriptor(
        create_type=ctype, cid=keys.get("CID"),
        parent_cid=None if parent_cid in (None, "ffffffff") else parent_cid,
        parent_hint=hint, extents=tuple(extents), adapter_type=keys.get("ddb.adapterType"),
    )


def qemu_parent_hint(text: str, where: str = "descriptor") -> str | None:
    """The parent disk QEMU opens, read as QEMU reads it (``vmdk_parent_open``): the first
    ``parentFileNameHint`` anywhere in the text (comments included), the two characters after
    it skipped (``="``), up to the next double quote."""
    at = text.find("parentFileNameHint")
    if at < 0:
        return None
    start = at + len("parentFileNameHint") + 2
    end = text.find('"', start)
    if end < 0:
        raise InputError(f"{where}: VMDK parentFileNameHint has no closing quote (corrupt descriptor)")
    return text[start:end] or None


def read_head(path: Path, n: int = 4096) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a disk image") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None


def _vhd_footer_type(path: Path) -> int | None:
    """The VHD disk type from the footer at the end of the file (2 fixed, 3 dynamic, 4 differencing)."""
    try:
        size = path.stat().st_size
        if size < SECTOR:
            return None
        with open(path, "rb") as f:
            f.seek(size - SECTOR)
            foot = f.read(SECTOR)
    except OSError:
        return None
    if foot[:8] != b"conectix":
        return None
    return struct.unpack(">I", foot[60:64])[0]


# Metadata must look like text from its first byte: one stray "<" or "{" at the start of binary data is not XML
# or JSON (random bytes started with one about once in a hundred runs).
_XML_START = re.compile(r"\s*<(\?xml|!--|!DOCTYPE|[A-Za-z_])")
_JSON_START = re.compile(r"\s*\{\s*(\"|\})")


def _text_start(head: bytes) -> str | None:
    """The first few hundred characters if the head is UTF-8 or UTF-16 text with no control bytes, else None."""
    sample = head[:512]
    if sample[:2] in (b"\xff\xfe", b"\xfe\xff"):
        encoding, sample = ("utf-16-le" if sample[:2] == b"\xff\xfe" else "utf-16-be"), sample[2:]
    else:
        encoding, sample = "utf-8", sample.removeprefix(b"\xef\xbb\xbf")
    text = sample.decode(encoding, errors="ignore") if encoding != "utf-8" else _decode_prefix(sample)
    if text is None or any(ord(c) < 32 and c not in "\t\r\n" for c in text):
        return None
    return text


def _decode_prefix(sample: bytes) -> str | None:
    """UTF-8 decode, forgiving only a character cut off at the end of the sample."""
    for cut in range(4):
        try:
            return sample[: len(sample) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return None


# Formats QEMU probes by magic that h2k does not read (block/*.c probe functions): such a file
# must be refused, never taken for raw.
FOREIGN_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"QED\x00", "qed"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
    (0, b"Bochs Virtual HD Image", "bochs"),
    (0, b"#!/bin/sh\n#V2.0 Format\n", "cloop"),
    (0x40, b"\x7f\x10\xda\xbe", "vdi"),
)
PROBE_BYTES = 2048  # what QEMU's probe reads (BLOCK_PROBE_BUF_SIZE)
_VMDK_VERSION_LINES = tuple(f"version={v}{eol}".encode() for v in "123" for eol in ("\n", "\r\n"))


def qemu_sees_vmdk_text(head: bytes) -> bool:
    """QEMU's vmdk_probe for text: after comment lines and blank lines, a ``version=1|2|3`` line."""
    p, end = 0, len(head)
    while p < end:
        if head[p:p + 1] == b"#":
            nl = head.find(b"\n", p)
            p = end if nl < 0 else nl + 1
            continue
        if head[p:p + 1] == b" ":
            while p < end and head[p:p + 1] == b" ":
                p += 1
            if p < end and head[p:p + 1] == b"\r":
                p += 1
            if p == end or head[p:p + 1] != b"\n":
                return False
            p += 1
            continue
        return head[p:].startswith(_VMDK_VERSION_LINES)
    return False


def sniff(path: str | Path) -> str:
    """What the first bytes say: qcow2, vmdk-sparse, vmdk-descriptor, vhdx, vhd, vhd-fixed, tar, xml, json,
    ``foreign:<format>`` (a format QEMU knows and h2k does not read), or raw."""
    path = Path(path)
    head = read_head(path, PROBE_BYTES)
    if head[:4] == b"QFI\xfb":
        return "qcow2"
    if head[:4] == b"KDMV":
        return "vmdk-sparse"
    if head[:4] == b"COWD":
        return "vmdk-cowd"
    if head.lstrip().startswith(b"# Disk DescriptorFile") or qemu_sees_vmdk_text(head):
        return "vmdk-descriptor"
    for offset, magic, name in FOREIGN_MAGIC:
        if head[offset:offset + len(magic)] == magic:
            return f"foreign:{name}"
    if head[:8] == b"vhdxfile":
        return "vhdx"
    if head[:8] == b"conectix":
        return "vhd"
    if len(head) > 262 and head[257:262] == b"ustar":
        return "tar"
    text = _text_start(head)
    if text is not None and _XML_START.match(text):
        return "xml"
    if text is not None and _JSON_START.match(text):
        return "json"
    if _vhd_footer_type(path) is not None:
        return "vhd-fixed"  # qemu-img would call this raw
    return "raw"


def embedded_descriptor(path: Path) -> str:
    """The descriptor inside a sparse/streamOptimized VMDK extent (KDMV header at offset 0)."""
    head = read_head(path, 512)
    if len(head) < 44:
        raise InputError(f"{path}: VMDK header is truncated")
    desc_off, desc_size = struct.unpack_from("<QQ", head, 28)
    if desc_off == 0 or desc_size == 0:
        raise InputError(f"{path}: sparse VMDK extent has no embedded descriptor (open its descriptor file instead)")
    if desc_size * SECTOR > MAX_DESCRIPTOR:
        raise InputError(f"{path}: embedded VMDK descriptor is implausibly large (corrupt header)")
    if (desc_off + desc_size) * SECTOR > path.stat().st_size:
        raise InputError(f"{path}: VMDK file is truncated (descriptor past its end)")
    with open(path, "rb") as f:
        f.seek(desc_off * SECTOR)
        data = f.read(desc_size * SECTOR)
    if len(data) < desc_size * SECTOR:
        raise InputError(f"{path}: VMDK file is truncated (descriptor past its end)")
    # The embedded descriptor is a C string: it ends at the first NUL, as VMware and qemu read it.
    # What follows may be stale bytes: qemu rewrites the region whole when it updates the CID, and
    # a CID one hex digit shorter than the last leaves the old tail behind the new NUL (~1 in 16).
    return data.split(b"\0", 1)[0].decode("utf-8", errors="replace")


def vmdk_descriptor(path: str | Path) -> VmdkDescriptor:
    path = Path(path)
    kind = sniff(path)
    if kind == "vmdk-sparse":
        return parse_vmdk_descriptor(embedded_descriptor(path), str(path))
    if kind == "vmdk-descriptor":
        if path.stat().st_size > MAX_DESCRIPTOR:
            raise InputError(f"{path}: VMDK descriptor file is implausibly large")
        return parse_vmdk_descriptor(path.read_bytes().decode("utf-8", errors="replace"), str(path))
    raise InputError(f"{path}: not a VMDK file")


def check_vmdk(path: str | Path, confine: Callable[[str], str] | None = None) -> tuple[VmdkDescriptor, list[str]]:
    """The descriptor and every file the disk reads; InputError for a missing or short extent.

    ``confine(name)`` (the front door's) returns an extent's real path or refuses it, before
    anything of the extent is read.
    """
    path = Path(path)
    desc = vmdk_descriptor(path)
    files = [str(path.resolve())]
    embedded = sniff(path) == "vmdk-sparse"
    for ext in desc.extents:
        if ext.type == "ZERO" or ext.filename is None:
            continue
        if embedded and len(desc.extents) == 1:
            continue  # monolithic / streamOptimized: the extent is this file
        if os.path.isabs(ext.filename):
            raise InputError(f"{path}: extent {ext.filename!r} is an absolute path; keep extents next to the descriptor")
        extent = Path(confine(ext.filename)) if confine else path.parent / ext.filename
        if not extent.is_file():
            raise InputError(f"{path}: missing extent file {ext.filename!r}")
        if ext.type in ("FLAT", "VMFS") and extent.stat().st_size < (ext.offset + ext.sectors) * SECTOR:
            raise InputError(f"{path}: extent {ext.filename!r} is truncated "
                             f"({extent.stat().st_size} bytes, needs {(ext.offset + ext.sectors) * SECTOR})")
        if ext.type == "SPARSE" and read_head(extent, 4) != b"KDMV":
            raise InputError(f"{path}: extent {ext.filename!r} is not a sparse VMDK extent (corrupt)")
        files.append(str(extent.resolve()))
    return desc, files


# What a file name claims, to catch e.g. a broken ".vmdk" that would otherwise pass as a raw disk.
CLAIMED = {".vmdk": "vmdk", ".vhd": "vpc", ".vhdx": "vhdx", ".avhdx": "vhdx", ".avhd": "vpc", ".qcow2": "qcow2"}

# sniff() kind -> the qemu-img driver h2k pins; kinds not listed are refused (see refusal()).
SNIFFED_FORMATS = {"qcow2": "qcow2", "vmdk-sparse": "vmdk", "vmdk-descriptor": "vmdk", "vhdx": "vhdx",
                   "vhd": "vpc", "vhd-fixed": "vpc", "raw": "raw"}


def refusal(path: Path, kind: str) -> str:
    """The one-line reason a file of sniff() ``kind`` is not opened as a disk."""
    if kind in ("tar", "xml", "json"):
        return f"{path}: is {kind} metadata, not a disk image"
    if kind == "vmdk-cowd":
        return f"{path}: old ESX 'COWD' VMDK delta disks are not supported; consolidate the snapshot first"
    if kind.startswith("foreign:"):
        return (f"{path}: unknown or unsupported image format ({kind.split(':', 1)[1]}); "
                "h2k reads qcow2, raw, VMDK, VHD and VHDX")
    return f"{path}: unknown image format ({kind})"


def vhd_subformat(path: Path) -> str:
    """fixed or dynamic; InputError for a differencing VHD (qemu-img cannot read VHD parents)."""
    footer = _vhd_footer_type(path)
    if footer == 4 or read_head(path, 64)[60:64] == struct.pack(">I", 4):
        raise InputError(f"{path}: differencing VHD (a Hyper-V checkpoint); qemu-img cannot read VHD "
                         "parents: merge the checkpoint in Hyper-V (Edit Disk > Merge) first")
    return "fixed" if read_head(path, 8) != b"conectix" else "dynamic"


def check_raw(path: Path) -> None:
    """A file with no known header is raw only if its name and size agree."""
    size = path.stat().st_size
    claimed = CLAIMED.get(path.suffix.lower())
    if claimed:
        raise InputError(f"{path}: named {path.suffix} but its content is no {claimed} image (unknown format or corrupt header)")
    if size == 0:
        raise InputError(f"{path}: empty file, not a disk image")
    if size % SECTOR:
        raise InputError(f"{path}: unknown format (no known image header, and {size} bytes is not a whole number of sectors)")
