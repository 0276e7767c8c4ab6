"""Transaction logs as Windows 8.1+ writes them, for the test bed's dirty hives and the unit tests.

Written from the format specification (M. Suhanov) and the observations in
its companion notes, not from h2k's reader: only the Marvin32 function is
shared, and that is pinned by published test vectors (tests/unit/test_hivelog.py).

How Windows logs a hive (what this module reproduces):

* the primary file stays as it was at the last reconcile (sequence numbers
  both ``S``); the first flush after it invalidates the base block (primary
  sequence number ``S + 1``), so the hive reads as dirty until the next
  reconcile;
* each flush appends one ``HvLE`` entry to the current log, numbered on from
  ``S`` (the first entry after a reconcile is ``S``, as observed on Windows 10:
  "the first log entry ... has a sequence number equal to a secondary sequence
  number of the base block in a primary file");
* the dirty data is tracked in 4 KiB blocks: an entry carries the 4096-byte
  pages that changed, at 4096-aligned offsets, and the hive bins data size of
  that moment (a multiple of 4096), and copies the base block's flags;
* a log starts with the first 512 bytes of the base block, file type 6, both
  sequence numbers set to the number of its first entry; when Windows switches
  logs the numbering goes on in the other file, whose header gets its own
  first number; bytes of an older round may follow the current entries.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from h2k.hivelog import BASE_BLOCK, FILE_TYPE_LOG_NEW, LOG_HEADER, marvin32, read_base_block, with_base_fields

# The seed as the Windows kernel's HvInitializeHashLibrary passes it to
# SymCryptMarvin32ExpandSeed: a 64-bit little-endian value (low word = first state word).
HVLE_SEED = 0x82EF4D887A4E55C5
PAGE = 4096


def log_entry(seq: int, hbins_size: int, pages: list[tuple[int, bytes]], flags: int = 0) -> bytes:
    """One HvLE entry, padded with zeros to a multiple of 512 bytes, with both Marvin32 hashes."""
    refs = b"".join(struct.pack("<II", off, len(data)) for off, data in pages)
    body = refs + b"".join(data for _, data in pages)
    size = -(-(40 + len(body)) // 512) * 512
    body = body.ljust(size - 40, b"\0")
    hash1 = marvin32(body, HVLE_SEED)
    head = b"HvLE" + struct.pack("<IIIII", size, flags, seq, hbins_size, len(pages)) + struct.pack("<Q", hash1)
    return head + struct.pack("<Q", marvin32(head, HVLE_SEED)) + body


def log_header(base_block: bytes, first_seq: int) -> bytes:
    """The 512-byte base block copy that starts a log: file type 6, both sequence numbers = its first entry."""
    return bytes(with_base_fields(base_block[:BASE_BLOCK], seq1=first_seq, seq2=first_seq,
                                  file_type=FILE_TYPE_LOG_NEW)[:LOG_HEADER])


def changed_pages(before: bytes, after: bytes) -> list[tuple[int, bytes]]:
    """The 4 KiB pages of ``after``'s hive bins data that differ from ``before``'s (offsets from the bins)."""
    bb, ab = read_base_block(before), read_base_block(after)
    if bb is None or ab is None:
        raise ValueError("both hives must be regf files")
    old = before[BASE_BLOCK : BASE_BLOCK + bb.hbins_size]
    new = after[BASE_BLOCK : BASE_BLOCK + ab.hbins_size]
    return [(off, new[off : off + PAGE]) for off in range(0, len(new), PAGE) if new[off : off + PAGE] != old[off : off + PAGE]]


@dataclass
class Flush:
    """One flush: the hive as it was after it, and the log file it went to."""

    hive: bytes
    log: str  # "LOG1" or "LOG2"


def dirty_hive(reconciled: bytes, flushes: list[Flush], leftovers: dict[str, bytes] | None = None) -> tuple[bytes, dict[str, bytes]]:
    """(primary, {"LOG1": bytes, "LOG2": bytes}): a crash after ``flushes``, none of them reconciled.

    ``reconciled`` is the primary as the last reconcile wrote it. Each flush
    becomes one entry, numbered on from the primary's sequence number, in the
    log it names; a log's entries must be contiguous in numbering (a switch to
    the other log and back is a rotation: the earlier entries are gone).
    ``leftovers`` are bytes of an older round that stay after a log's entries.
    """
    base = read_base_block(reconciled)
    if base is None or base.dirty:
        raise ValueError("the reconciled primary must be a clean regf file")
    seq = base.seq2
    entries: dict[str, list[tuple[int, bytes]]] = {"LOG1": [], "LOG2": []}
    started: dict[str, bytes] = {}  # the hive when each log got its first (current) entry
    before = reconciled
    for i, flush in enumerate(flushes):
        fb = read_base_block(flush.hive)
        if fb is None:
            raise ValueError(f"flush {i} is not a regf file")
        if entries[flush.log] and entries[flush.log][-1][0] != seq + i - 1:
            entries[flush.log] = []  # rotated back to this log: it starts over
        if not entries[flush.log]:
            started[flush.log] = flush.hive
        entries[flush.log].append((seq + i, log_entry(seq + i, fb.hbins_size, changed_pages(before, flush.hive),
                                                      fb.flags & 1)))
        before = flush.hive
    primary = bytes(with_base_fields(reconciled[:BASE_BLOCK], seq1=seq + 1, seq2=seq)) + reconciled[BASE_BLOCK:]
    logs = {}
    for name, items in entries.items():
        tail = (leftovers or {}).get(name, b"")
        logs[name] = (log_header(started[name], items[0][0]) + b"".join(e for _, e in items) + tail) if items else tail
    return primary, logs
