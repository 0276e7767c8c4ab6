"""Dirty registry hives and their transaction logs (new format, Windows 8.1+): detect and replay.

Windows 8.1 / Server 2012 R2 and later write registry changes to
``<hive>.LOG1`` / ``<hive>.LOG2`` first and into the primary file only later
("reconcile"). A VM that was powered off, crashed, or snapshotted live leaves a
primary file that is *dirty* -- its base block's primary and secondary sequence
numbers differ, or its checksum is wrong -- and the newest data only in the
logs. hivex reads the primary file and ignores the logs, so editing such a hive
would edit stale data (and Windows would then replay the logs over our edit).

Format and rules (M. Suhanov, "Windows registry file format specification",
and his reference reader yarp, whose rules are "how Windows works"):

* base block (4096 bytes): ``regf``, primary seq @4, secondary seq @8,
  file type @28 (0 primary, 1/2 old log, 6 new log), hive bins data size @40,
  flags @144, XOR-32 checksum of the first 508 bytes @508;
* a new-format log: its first 512 bytes are a copy of the base block (file
  type 6, both sequence numbers equal: the number of its first entry); log
  entries start at 512, each at a 512-byte boundary: ``HvLE``, size @4 (a
  multiple of 512), flags @8, sequence number @12, hive bins data size @16 (a
  multiple of 4096), dirty page count @20, Hash-1 @24 (Marvin32 of the entry
  from byte 40, ``size - 40`` bytes), Hash-2 @32 (Marvin32 of the entry's first
  32 bytes, Hash-1 included), then ``count`` page references (offset from the
  start of the hive bins data, size), then the pages back to back;
* the entries of one log are numbered consecutively from its base block's
  sequence number; reading stops at the first entry that is not (signature,
  size, hive bins size, page count, hashes, sequence number) -- what follows
  is left over from earlier rounds;
* replay: the entries numbered at or above the primary's secondary sequence
  number, in sequence across both logs (Windows numbers on across a log
  switch), stopping at a gap; the last applied entry's sequence number goes
  into both base block fields, its hive bins size and its flags (bit 0, the
  KTM lock) into the base block.

The first entry applied may be numbered above the primary's secondary sequence
number: after a "partial reconcile" Windows has written the older entries into
the primary without updating its base block (Suhanov, "Missing log entries for
a dirty primary file", observed on Windows 10).

Old-format logs (``DIRT`` dirty vector, Windows Vista/7) are recognised and
not replayed: no log written by Windows 7 is available to prove a replay
against, so the caller refuses the disk with that cause.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

BASE_BLOCK = 4096
LOG_HEADER = 512
# The HvLE hash seed: the kernel passes the 64-bit constant 0x82EF4D887A4E55C5 to
# SymCryptMarvin32ExpandSeed as 8 little-endian bytes, which loads the low 32 bits as the
# first state word. (The specification lists the same constant as the bytes "82 EF 4D 88
# 7A 4E 55 C5", most significant first.)
MARVIN_SEED = 0x82EF4D887A4E55C5
FILE_TYPE_PRIMARY = 0
FILE_TYPE_LOG_OLD = (1, 2)
FILE_TYPE_LOG_NEW = 6
HBIN_ALIGN = 4096


# ---------------------------------------------------------------- Marvin32


def _rotl(x: int, n: int) -> int:
    return ((x << n) | (x >> (32 - n))) & 0xFFFFFFFF


def marvin32(data: bytes, seed: int = MARVIN_SEED) -> int:
    """The 64-bit Marvin32 result (high word s1, low word s0), as HvLE entries store it (little-endian)."""
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
    for (word,) in struct.iter_unpack("<I", data[:n]):
        p0 = (p0 + word) & 0xFFFFFFFF
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
    flags: int
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
    flags = struct.unpack_from("<I", data, 144)[0]
    stored = struct.unpack_from("<I", data, 508)[0]
    return BaseBlock(seq1, seq2, file_type, size, flags, stored == checksum(data))


def with_base_fields(data: bytes | bytearray, **fields: int) -> bytearray:
    """A copy of ``data`` with base block fields (seq1, seq2, file_type, hbins_size, flags) set, checksum redone."""
    out = bytearray(data)
    offsets = {"seq1": 4, "seq2": 8, "file_type": 28, "hbins_size": 40, "flags": 144}
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
    flags: int
    pages: tuple[tuple[int, bytes], ...]  # (offset from the start of the hive bins data, data)


@dataclass
class LogFile:
    kind: str  # "new", "old", "empty" (no or zeroed file), "invalid"
    base_seq: int | None = None  # the log's base block sequence number (its first entry's number)
    entries: list[LogEntry] = field(default_factory=list)
    stopped: str | None = None  # why reading stopped before the end of the entries, if not at their end
    hash_mismatches: int = 0  # HvLE entries (valid or left over) whose Hash-1/Hash-2 do not match


def _entry_problem(head: bytes, entry: bytes, expected_seq: int) -> str | None:
    """Why an HvLE entry is not a valid next entry (None when it is)."""
    size, _flags, seq, hbins_size, count = struct.unpack_from("<IIIII", head, 4)
    if hbins_size < HBIN_ALIGN or hbins_size % HBIN_ALIGN:
        return f"hive bins size {hbins_size} is not a multiple of 4096"
    if count == 0 or 40 + 8 * count > size:
        return f"bad dirty page count {count}"
    h1, h2 = struct.unpack_from("<QQ", head, 24)
    if marvin32(entry[40:]) != h1 or marvin32(entry[:32]) != h2:
        return "hash mismatch"
    if seq != expected_seq:
        return f"sequence number {seq}, expected {expected_seq}"
    return None


def parse_log(data: bytes) -> LogFile:
    """Entries of a new-format log, up to the first one that is not valid; old-format logs are only recognised."""
    if not data or not data[:4].strip(b"\0"):
        return LogFile("empty")
    base = read_base_block(data)
    if base is None:
        return LogFile("invalid", stopped="no regf base block")
    if base.file_type in FILE_TYPE_LOG_OLD:
        return LogFile("old")
    if base.file_type != FILE_TYPE_LOG_NEW:
        return LogFile("invalid", stopped=f"file type {base.file_type} is not a transaction log")
    if not base.checksum_ok or base.seq1 != base.seq2:
        return LogFile("invalid", stopped="its base block is not valid (checksum or sequence numbers)")
    log = LogFile("new", base_seq=base.seq1)
    pos, expected = LOG_HEADER, base.seq1
    while pos + 40 <= len(data) and data[pos : pos + 4] == b"HvLE":
        size = struct.unpack_from("<I", data, pos + 4)[0]
        if size < 512 or size % 512 or pos + size > len(data):
            log.stopped = log.stopped or f"entry at {pos}: bad size {size}"
            break
        entry = data[pos : pos + size]
        problem = _entry_problem(entry[:40], entry, expected)
        if problem == "hash mismatch":
            log.hash_mismatches += 1
        if problem is None and log.stopped is None:
            pages = _pages(entry)
            if isinstance(pages, str):
                log.stopped = f"entry at {pos}: {pages}"
            else:
                _, flags, seq, hbins_size = struct.unpack_from("<IIII", entry, 4)
                log.entries.append(LogEntry(pos, seq, hbins_size, flags, pages))
                expected = (expected + 1) & 0xFFFFFFFF
        elif problem is not None and log.stopped is None:
            log.stopped = f"entry at {pos}: {problem}"
        # Past the stop, keep walking only to count entries that fail their hashes.
        pos += size
    return log


def _pages(entry: bytes) -> tuple[tuple[int, bytes], ...] | str:
    size, _flags, _seq, hbins_size, count = struct.unpack_from("<IIIII", entry, 4)
    pages = []
    at = 40 + 8 * count
    for i in range(count):
        off, length = struct.unpack_from("<II", entry, 40 + 8 * i)
        if at + length > size or off + length > hbins_size:
            return f"page {i} out of bounds"
        pages.append((off, bytes(entry[at : at + length])))
        at += length
    return tuple(pages)


@dataclass
class Replay:
    """The result of replaying logs into a primary file."""

    data: bytes  # the recovered hive (clean: seq1 == seq2, checksum right)
    applied: list[int]  # sequence numbers of the applied entries
    logs_used: list[str]
    notes: list[str] = field(default_factory=list)  # what was left out and why (bogus entries after the applied ones)


class ReplayError(Exception):
    """The hive is dirty and cannot be recovered from what is there (one-line cause)."""


def replay(primary: bytes, logs: dict[str, bytes]) -> Replay:
    """Apply the subsequent entries of ``logs`` (file name -> bytes) to a dirty ``primary``."""
    base = read_base_block(primary)
    if base is None:
        raise ReplayError("not a regf file")
    if not base.checksum_ok:
        # Windows would take the base block from the newest log; not done here.
        raise ReplayError("its base block checksum is wrong (recovering the base block from a log is not done)")
    parsed = {name: parse_log(data) for name, data in logs.items()}
    new = {n: p for n, p in parsed.items() if p.kind == "new"}
    if not new and any(p.kind == "old" for p in parsed.values()):
        raise ReplayError("its transaction log is in the old Windows Vista/7 format (a 'DIRT' dirty vector), "
                          "which h2k does not replay")
    # Logs in the order Windows wrote them: by the sequence number in their base blocks.
    order = sorted(new, key=lambda n: (new[n].base_seq, _log_order(n)))
    candidates = [(n, e) for n in order for e in new[n].entries if e.seq >= base.seq2]
    candidates.sort(key=lambda ne: ne[1].seq)
    if not candidates:
        raise ReplayError(_nothing_to_apply(base, parsed))
    hbins = bytearray(primary[BASE_BLOCK : BASE_BLOCK + base.hbins_size])
    applied: list[int] = []
    used: list[str] = []
    flags = base.flags
    for name, e in candidates:
        if applied and e.seq != applied[-1] + 1:
            if e.seq == applied[-1]:
                continue  # the same entry in both logs
            break  # a gap: later entries cannot be applied safely
        # The hive bins data takes the entry's size (grown with zeros, or cut).
        hbins[e.hbins_size :] = b""
        hbins.extend(b"\0" * (e.hbins_size - len(hbins)))
        for off, page in e.pages:
            hbins[off : off + len(page)] = page
        flags = (flags & ~1) | (e.flags & 1)
        applied.append(e.seq)
        if name not in used:
            used.append(name)
    last = applied[-1]
    head = with_base_fields(primary[:BASE_BLOCK], seq1=last, seq2=last, hbins_size=len(hbins), flags=flags)
    notes = [f"{n}: {p.stopped}" for n, p in parsed.items() if p.stopped and "hash mismatch" in p.stopped]
    return Replay(bytes(head) + bytes(hbins), applied, used, notes)


def _nothing_to_apply(base: BaseBlock, parsed: dict[str, LogFile]) -> str:
    rejected = [f"{p.hash_mismatches} in {n}" for n, p in sorted(parsed.items()) if p.hash_mismatches]
    if rejected:
        return f"its transaction log entries were rejected: hash mismatch ({', '.join(rejected)})"
    problems = [f"{n}: {p.stopped}" for n, p in sorted(parsed.items()) if p.stopped]
    if not any(p.kind == "new" and p.entries for p in parsed.values()):
        found = ", ".join(sorted(parsed)) or "none"
        return "no transaction log holds a valid entry (logs: " + found + ("; " + "; ".join(problems) if problems else "") + ")"
    return f"no transaction log entry is numbered at or above the primary file's sequence number {base.seq2}"


def _log_order(name: str) -> tuple[int, str]:
    up = name.upper()
    return (0 if up.endswith(".LOG1") else 1 if up.endswith(".LOG2") else 2, up)
