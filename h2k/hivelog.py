"""Dirty registry hives and their transaction logs (new format, Windows 8.1+): detect, replay, write.

Windows 8.1 / Server 2012 R2 and later write registry changes to
``<hive>.LOG1`` / ``<hive>.LOG2`` first and into the primary file only later
("reconcile"). A VM that was powered off, crashed, or snapshotted live leaves a
primary file that is *dirty* -- its base block's primary and secondary sequence
numbers differ, or its checksum is wrong -- and the newest data only in the
logs. hivex reads the primary file and ignores the logs, so editing such a hive
would edit stale data (and Windows would then replay the logs over our edit).

Format facts (msuhanov, "Windows registry file format specification"):

* base block (4096 bytes): ``regf``, primary seq @4, secondary seq @8,
  file type @28 (0 primary, 1 old log, 6 new log), hive bins data size @40,
  XOR-32 checksum of the first 508 bytes @508;
* a new-format log: the first 512 bytes are a copy of the base block (type 6);
  log entries start at 512, each at a 512-byte boundary: ``HvLE``, size @4,
  flags @8, sequence number @12, hive bins data size @16, dirty page count @20,
  Hash-1 @24 (Marvin32 of the entry from byte 40, ``size - 40`` bytes),
  Hash-2 @32 (Marvin32 of the entry's first 32 bytes), then ``count`` page
  references (offset from the start of the hive bins data, size), then the
  pages back to back;
* replay: entries whose sequence number is >= the primary's secondary sequence
  number, in order, .LOG1 then .LOG2, stopping at the first bogus entry
  (signature, hashes, size) or a gap in the sequence; the last applied entry's
  sequence number goes into both base block fields and its hive bins size
  into the base block.

Old-format logs (``DIRT`` dirty vector, Windows Vista/7) are detected and not
replayed: the caller refuses the disk with a clear cause instead.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

BASE_BLOCK = 4096
LOG_HEADER = 512
MARVIN_SEED = 14219357686671994754  # the seed the spec gives for HvLE hashes
FILE_TYPE_PRIMARY = 0
FILE_TYPE_LOG_OLD = (1, 2)
FILE_TYPE_LOG_NEW = 6


# ---------------------------------------------------------------- Marvin32


def _rotl(x: int, n: int) -> int:
    return ((x << n) | (x >> (32 - n))) & 0xFFFFFFFF


def marvin32(data: bytes, seed: int = MARVIN_SEED) -> int:
    """The 64-bit Marvin32 state (high word p1, low word p0), as HvLE entries store it (little-endian)."""
    p0, p1 = seed & 0xFFFFFFFF, seed >> 32

    def block(p0: int, p1: int) -> tuple[int, int]:
        p1 ^= p0
        p0 = _rotl(p0, 20)
        p0 = (p0 + p1) & 0xFFFFFFFF
        p1 = _rotl(p1, 9)
        p1 ^= p0
        p0 = _rotl(p0, 27)
        p0 = (p0 + p1) & 0xFFFFFFFF
        p1 = _rotl(p1, 19)
        return p0, p1

    n = len(data) // 4 * 4
    for i in range(0, n, 4):
        p0 = (p0 + struct.unpack_from("<I", data, i)[0]) & 0xFFFFFFFF
        p0, p1 = block(p0, p1)
    tail = data[n:]
    # The tail is padded with 0x80 then zeros to a full 32-bit word.
    final = int.from_bytes(tail + b"\x80" + b"\0" * (3 - len(tail)), "little")
    p0 = (p0 + final) & 0xFFFFFFFF
    p0, p1 = block(p0, p1)
    p0, p1 = block(p0, p1)
    return (p1 << 32) | p0


# ---------------------------------------------------------------- base block


def checksum(base: bytes) -> int:
    """XOR-32 of the first 508 bytes (Windows stores 1 for 0 and 0xFFFFFFFE for 0xFFFFFFFF)."""
    c = 0
    for (word,) in struct.iter_unpack("<I", base[:508]):
        c ^= word
    return {0: 1, 0xFFFFFFFF: 0xFFFFFFFE}.get(c, c)


@dataclass(frozen=True)
class BaseBlock:
    seq1: int
    seq2: int
    file_type: int
    hbins_size: int
    checksum_ok: bool

    @property
    def dirty(self) -> bool:
        return self.seq1 != self.seq2 or not self.checksum_ok


def read_base_block(data: bytes) -> BaseBlock | None:
    """The base block fields, or None when ``data`` is not a regf file."""
    if len(data) < 512 or data[:4] != b"regf":
        return None
    seq1, seq2 = struct.unpack_from("<II", data, 4)
    file_type = struct.unpack_from("<I", data, 28)[0]
    size = struct.unpack_from("<I", data, 40)[0]
    stored = struct.unpack_from("<I", data, 508)[0]
    return BaseBlock(seq1, seq2, file_type, size, stored == checksum(data))


def _with_base(data: bytes | bytearray, **fields: int) -> bytearray:
    out = bytearray(data)
    offsets = {"seq1": 4, "seq2": 8, "file_type": 28, "hbins_size": 40}
    for name, value in fields.items():
        struct.pack_into("<I", out, offsets[name], value)
    struct.pack_into("<I", out, 508, checksum(out))
    return out


# ---------------------------------------------------------------- log files


@dataclass(frozen=True)
class LogEntry:
    offset: int  # in the log file
    seq: int
    hbins_size: int
    pages: tuple[tuple[int, bytes], ...]  # (offset from the start of the hive bins data, data)


@dataclass
class LogFile:
    kind: str  # "new", "old", "empty" (no or zeroed file), "invalid"
    entries: list[LogEntry] = field(default_factory=list)
    stopped: str | None = None  # why reading stopped before the end (a bogus entry), if it did


def parse_log(data: bytes) -> LogFile:
    """Entries of a new-format log, up to the first bogus one; old-format logs are only recognised."""
    if not data or not data[:4].strip(b"\0"):
        return LogFile("empty")
    base = read_base_block(data)
    if base is None:
        return LogFile("invalid", stopped="no regf base block")
    if base.file_type in FILE_TYPE_LOG_OLD:
        return LogFile("old")
    if base.file_type != FILE_TYPE_LOG_NEW:
        return LogFile("invalid", stopped=f"file type {base.file_type} is not a transaction log")
    log = LogFile("new")
    pos = LOG_HEADER
    while pos + 40 <= len(data):
        head = data[pos : pos + 40]
        if head[:4] != b"HvLE":
            break  # the end of the entries (zeros or leftovers)
        size, _flags, seq, hbins_size, count = struct.unpack_from("<IIIII", head, 4)
        h1, h2 = struct.unpack_from("<QQ", head, 24)
        if size < 40 + 8 * count or size % 512 or pos + size > len(data):
            log.stopped = f"entry at {pos}: bad size {size}"
            break
        entry = data[pos : pos + size]
        if marvin32(entry[40:]) != h1 or marvin32(entry[:32]) != h2:
            log.stopped = f"entry at {pos}: hash mismatch"
            break
        pages = []
        at = 40 + 8 * count
        for i in range(count):
            off, length = struct.unpack_from("<II", entry, 40 + 8 * i)
            if at + length > size or off + length > hbins_size:
                log.stopped = f"entry at {pos}: page {i} out of bounds"
                return log
            pages.append((off, bytes(entry[at : at + length])))
            at += length
        log.entries.append(LogEntry(pos, seq, hbins_size, tuple(pages)))
        pos += size
    return log


@dataclass
class Replay:
    """The result of replaying logs into a primary file."""

    data: bytes  # the recovered hive (clean: seq1 == seq2, checksum right)
    applied: list[int]  # sequence numbers of the applied entries
    logs_used: list[str]


class ReplayError(Exception):
    """The hive is dirty and cannot be recovered from what is there (one-line cause)."""


def replay(primary: bytes, logs: dict[str, bytes]) -> Replay:
    """Apply the subsequent entries of ``logs`` (name -> bytes, .LOG1 before .LOG2) to a dirty ``primary``."""
    base = read_base_block(primary)
    if base is None:
        raise ReplayError("not a regf file")
    if not base.checksum_ok:
        # Recovering the base block itself from the log's copy is possible but not done here.
        raise ReplayError("the base block checksum is wrong")
    parsed = {name: parse_log(data) for name, data in sorted(logs.items(), key=lambda kv: _log_order(kv[0]))}
    if any(p.kind == "old" for p in parsed.values()) and not any(p.kind == "new" for p in parsed.values()):
        raise ReplayError("its transaction log is in the old (Windows 7) format, which is not replayed")
    candidates = [(name, e) for name, p in parsed.items() if p.kind == "new" for e in p.entries if e.seq >= base.seq2]
    candidates.sort(key=lambda ne: ne[1].seq)
    if not candidates:
        raise ReplayError("no transaction log entry is newer than the primary file")
    hbins = bytearray(primary[BASE_BLOCK : BASE_BLOCK + base.hbins_size])
    applied: list[int] = []
    used: list[str] = []
    for name, e in candidates:
        if applied and e.seq != applied[-1] + 1:
            if e.seq == applied[-1]:
                continue  # the same entry in both logs
            break  # a gap: later entries cannot be applied safely
        # A hive grows only by bins the entry carries (new bins are dirty pages): a larger size is
        # bogus, not a reason to allocate up to 4 GiB on the word of a crafted log.
        if e.hbins_size > len(hbins) + sum(len(page) for _, page in e.pages):
            break
        if len(hbins) < e.hbins_size:
            hbins.extend(b"\0" * (e.hbins_size - len(hbins)))
        del hbins[e.hbins_size :]
        for off, page in e.pages:
            hbins[off : off + len(page)] = page
        applied.append(e.seq)
        if name not in used:
            used.append(name)
    if not applied:
        raise ReplayError("its first newer transaction log entry claims a hive size its pages do not cover")
    last = applied[-1]
    head = _with_base(primary[:BASE_BLOCK], seq1=last, seq2=last, hbins_size=len(hbins))
    return Replay(bytes(head) + bytes(hbins), applied, used)


def _log_order(name: str) -> tuple[int, str]:
    up = name.upper()
    return (0 if up.endswith(".LOG1") else 1 if up.endswith(".LOG2") else 2, up)


# ---------------------------------------------------------------- writer (test bed, unit tests)


def log_entry(seq: int, hbins_size: int, pages: list[tuple[int, bytes]]) -> bytes:
    """One HvLE entry, padded to a multiple of 512 bytes, with both Marvin32 hashes."""
    refs = b"".join(struct.pack("<II", off, len(data)) for off, data in pages)
    body = refs + b"".join(data for _, data in pages)
    size = -(-(40 + len(body)) // 512) * 512
    body = body.ljust(size - 40, b"\0")
    h1 = marvin32(body)
    head = b"HvLE" + struct.pack("<IIIII", size, 0, seq, hbins_size, len(pages)) + struct.pack("<Q", h1)
    return head + struct.pack("<Q", marvin32(head)) + body


def dirty_pair(old: bytes, new: bytes, page: int = 4096) -> tuple[bytes, bytes]:
    """(dirty primary, .LOG1): what a crash after logging ``new`` over a primary still at ``old`` leaves.

    The primary keeps ``old``'s hive bins with its primary sequence number one
    ahead of the secondary (a write began and never finished); the log holds the
    4 KiB pages of ``new`` that differ from ``old`` in one entry.
    """
    ob, nb = read_base_block(old), read_base_block(new)
    if ob is None or nb is None:
        raise ValueError("both hives must be regf files")
    seq = ob.seq2 + 1
    old_bins = old[BASE_BLOCK : BASE_BLOCK + ob.hbins_size]
    new_bins = new[BASE_BLOCK : BASE_BLOCK + nb.hbins_size]
    pages = []
    for off in range(0, len(new_bins), page):
        chunk = new_bins[off : off + page]
        if chunk != old_bins[off : off + page]:
            pages.append((off, chunk))
    primary = bytes(_with_base(old[:BASE_BLOCK], seq1=seq, seq2=ob.seq2)) + old[BASE_BLOCK:]
    header = _with_base(old[:BASE_BLOCK], seq1=seq, seq2=seq, file_type=FILE_TYPE_LOG_NEW)[:LOG_HEADER]
    log = bytes(header) + log_entry(seq, len(new_bins), pages)
    return primary, log
