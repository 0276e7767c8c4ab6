"""h2k.hivelog against outside numbers: published Marvin32 vectors, the format specification's layout and worked
sequence numbers; logs written the way Windows writes them (lab.testbed.hivelog_writer), replayed hives read by hivex.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import hivex
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from h2k import hivelog
from h2k.facts import WindowsFacts
from h2k.registry import decode, find_key, find_value
from lab.testbed import hivelog_writer as writer
from lab.testbed import regtext
from lab.testbed.hive import make_hive

ROOT = "HKEY_LOCAL_MACHINE\\SYSTEM"
PVSCSI = "ControlSet001\\Services\\pvscsi"
BASE_REG = ("Windows Registry Editor Version 5.00\r\n\r\n[HKEY_LOCAL_MACHINE\\SYSTEM\\ControlSet001\\Services\\pvscsi]\r\n"
            '"Start"=dword:00000000\r\n"Group"="SCSI miniport"\r\n\r\n'
            "[HKEY_LOCAL_MACHINE\\SYSTEM\\Select]\r\n\"Current\"=dword:00000001\r\n")


def _value(path: Path, key: str, name: str):
    h = hivex.Hivex(str(path))
    node = find_key(h, key)
    got = None if node is None else find_value(h, node, name)
    return None if got is None else decode(*got)


def _start(data: bytes, tmp: Path) -> int:
    (tmp / "read").write_bytes(data)
    return _value(tmp / "read", PVSCSI, "Start")


def _with_start(data: bytes, start: int, tmp: Path) -> bytes:
    path = tmp / f"start{start}"
    path.write_bytes(data)
    regtext.apply_reg(path, "Windows Registry Editor Version 5.00\r\n\r\n"
                      f"[HKEY_LOCAL_MACHINE\\SYSTEM\\{PVSCSI}]\r\n\"Start\"=dword:{start:08x}\r\n", ROOT)
    return path.read_bytes()


def _reconciled(data: bytes, seq: int) -> bytes:
    return bytes(hivelog.with_base_fields(data[:4096], seq1=seq, seq2=seq)) + data[4096:]


@pytest.fixture()
def states(tmp_path) -> tuple[bytes, bytes, bytes]:
    """(reconciled primary Start=3 at sequence 2107, Start=1, newest Start=0 with 60 more keys that grow the hive)."""
    new = make_hive(tmp_path / "new", BASE_REG + "".join(
        f"\r\n[HKEY_LOCAL_MACHINE\\SYSTEM\\ControlSet001\\Enum\\PCI\\DEV_{i:04d}]\r\n\"Service\"=\"svc{i}\"\r\n"
        for i in range(60)), ROOT).read_bytes()
    old = make_hive(tmp_path / "old", BASE_REG.replace("dword:00000000", "dword:00000003"), ROOT).read_bytes()
    return _reconciled(old, 2107), _with_start(old, 1, tmp_path), new


# ---------------------------------------------------------------- Marvin32: published vectors

DOTNET_SEEDS = {1: 0x004FB61A001BDBCC, 2: 0x804FB61A001BDBCC, 3: 0x804FB61A801BDBCC}
# The .NET runtime's MarvinTests.cs (ComputeHash_Success): seed, input (hex), 64-bit result (s1 << 32 | s0).
DOTNET_VECTORS = [
    (1, "", 0x30ED35C100CD3C7D), (1, "af", 0x48E73FC77D75DDC1), (1, "e70f", 0xB5F6E1FC485DBFF8),
    (1, "37f495", 0xF0B07C789B8CF7E8), (1, "8642dc59", 0x7008F2E87E9CF556), (1, "153fb79826", 0xE6C08C6DA2AFA997),
    (1, "0932e6246c47", 0x6F04BF1A5EA24060), (1, "ab427ea8d10fc7", 0xE11847E4F0678C41),
    (2, "", 0x10A9D5D3996FD65D), (2, "af", 0x68201F91960EBF91), (2, "e70f", 0x64B581631F6AB378),
    (2, "37f495", 0xE1F2DFA6E5131408), (2, "8642dc59", 0x36289D9654FB49F6), (2, "153fb79826", 0x0A06114B13464DBD),
    (2, "0932e6246c47", 0xD6DD5E40AD1BC2ED), (2, "ab427ea8d10fc7", 0xE203987DBA252FB3),
    (3, "00", 0xA37FB0DA2ECAE06C), (3, "ff", 0xFECEF370701AE054), (3, "00ff", 0xA638E75700048880),
    (3, "ff00", 0xBDFB46D969730E2A), (3, "ff00ff", 0x9D8577C0FE0D30BF), (3, "00ff00", 0x4F9FBDDE15099497),
    (3, "00ff00ff", 0x24EAA279D9A529CA), (3, "ff00ff00", 0xD3BEC7726B057943), (3, "ff00ff00ff", 0x920B62BBCA3E0B72),
    (3, "00ff00ff00", 0x1D7DDF9DFDF3C1BF), (3, "00ff00ff00ff", 0xEC21276A17E821A5),
    (3, "ff00ff00ff00", 0x6911A53CA8C12254), (3, "ff00ff00ff00ff", 0xFDFD187B1D3CE784),
    (3, "00ff00ff00ff00", 0x71876F2EFB1B0EE8),
]


@pytest.mark.parametrize("seed,data,want", DOTNET_VECTORS)
def test_marvin32_dotnet_vectors(seed, data, want) -> None:
    assert hivelog.marvin32(bytes.fromhex(data), DOTNET_SEEDS[seed]) == want


def test_marvin32_symcrypt_known_answer() -> None:
    """SymCrypt's Marvin32 self-test: the default seed (s0=0xcd0893b7, s1=0xd53cd9ce) over "abc" gives these 8 bytes."""
    got = hivelog.marvin32(b"abc", 0xD53CD9CE_CD0893B7)
    assert struct.pack("<Q", got) == bytes([0xBF, 0x69, 0x27, 0x49, 0x39, 0x43, 0xC7, 0x22])


def _marvin32_32(data: bytes, seed: int) -> int:
    full = hivelog.marvin32(data, seed)
    return (full >> 32) ^ (full & 0xFFFFFFFF)


def test_marvin32_with_the_registry_seed() -> None:
    """The Rust marvin32 crate's vectors with the HvLE seed 0x82EF4D887A4E55C5 (32-bit results, s0 ^ s1)."""
    seed = 0x82EF4D887A4E55C5
    for data, want in [(b"", 0xB00892AC), (b"h", 0xF41A608E), (b"he", 0x11107C6B), (b"hel", 0x24056A46),
                       (b"hell", 0x7F91E021), (b"hello, world!", 0x00C18515)]:
        assert _marvin32_32(data, seed) == want
    assert _marvin32_32("Abcdefg".encode("utf-16-le"), 0x5D70D359C498B3F8) == 0xBA627C81
    # The reader's and the writer's seed: the specification's bytes "82 EF 4D 88 7A 4E 55 C5" as one 64-bit number,
    # laid out little-endian in memory for SymCryptMarvin32ExpandSeed (first state word 0x7A4E55C5).
    spec = int.from_bytes(bytes.fromhex("82EF4D887A4E55C5"), "big")
    assert hivelog.MARVIN_SEED == writer.HVLE_SEED == spec
    assert struct.unpack("<II", struct.pack("<Q", spec)) == (0x7A4E55C5, 0x82EF4D88)


# ---------------------------------------------------------------- the writer follows the specification


def test_written_log_has_the_specified_layout(states) -> None:
    """Field by field, from the specification's tables (read here with struct, not with the reader)."""
    reconciled, mid, new = states
    primary, logs = writer.dirty_hive(reconciled, [writer.Flush(mid, "LOG1"), writer.Flush(new, "LOG1")])
    seq1, seq2 = struct.unpack_from("<II", primary, 4)
    assert (seq1, seq2) == (2108, 2107) and primary[4096:] == reconciled[4096:]
    log = logs["LOG1"]
    assert logs["LOG2"] == b"" and log[:4] == b"regf"
    h_seq1, h_seq2, ftype = struct.unpack_from("<II", log, 4) + struct.unpack_from("<I", log, 28)
    assert (h_seq1, h_seq2, ftype) == (2107, 2107, 6)  # a log's header: its first entry's number, type 6
    assert struct.unpack_from("<I", log, 508)[0] == hivelog.checksum(log[:512])
    pos, seqs = 512, []
    while log[pos : pos + 4] == b"HvLE":
        size, flags, seq, hbins, count = struct.unpack_from("<IIIII", log, pos + 4)
        hash1, hash2 = struct.unpack_from("<QQ", log, pos + 24)
        entry = log[pos : pos + size]
        assert size % 512 == 0 and hbins % 4096 == 0 and count >= 1 and flags == 0
        assert hash1 == hivelog.marvin32(entry[40:size], 0x82EF4D887A4E55C5)  # Hash-1: from the first page reference
        assert hash2 == hivelog.marvin32(entry[:32], 0x82EF4D887A4E55C5)  # Hash-2: the first 32 bytes, Hash-1 included
        refs = [struct.unpack_from("<II", entry, 40 + 8 * i) for i in range(count)]
        assert all(off % 4096 == 0 and length == 4096 and off + length <= hbins for off, length in refs)
        seqs.append(seq)
        pos += size
    assert seqs == [2107, 2108]  # the first entry after a reconcile carries the primary's secondary number
    assert not log[pos:].strip(b"\0")


# ---------------------------------------------------------------- replay


def test_replay_across_a_log_switch_and_hivex_reads_it(states, tmp_path) -> None:
    """LOG1 holds entry n and a left-over entry of an older round, LOG2 (after the switch) n+1."""
    reconciled, mid, new = states
    old_round = writer.log_entry(2067, hivelog.read_base_block(reconciled).hbins_size,
                                 writer.changed_pages(reconciled, _with_start(reconciled, 4, tmp_path)))
    primary, logs = writer.dirty_hive(reconciled, [writer.Flush(mid, "LOG1"), writer.Flush(new, "LOG2")],
                                      {"LOG1": old_round})
    assert _start(primary, tmp_path) == 3  # hivex ignores logs
    parsed = hivelog.parse_log(logs["LOG1"])
    assert [e.seq for e in parsed.entries] == [2107] and "expected 2108" in parsed.stopped
    rec = hivelog.replay(primary, {"SYSTEM.LOG2": logs["LOG2"], "SYSTEM.LOG1": logs["LOG1"]})
    assert rec.applied == [2107, 2108] and rec.logs_used == ["SYSTEM.LOG1", "SYSTEM.LOG2"] and not rec.notes
    out = hivelog.read_base_block(rec.data)
    assert not out.dirty and (out.seq1, out.seq2) == (2108, 2108)
    assert rec.data[4096:] == new[4096 : 4096 + hivelog.read_base_block(new).hbins_size]
    (tmp_path / "replayed").write_bytes(rec.data)
    assert _value(tmp_path / "replayed", PVSCSI, "Start") == 0
    assert _value(tmp_path / "replayed", "ControlSet001\\Enum\\PCI\\DEV_0059", "Service") == "svc59"


def test_partial_reconcile_scenario_from_the_specification_notes(states, tmp_path) -> None:
    """Suhanov's Windows 10 experiment ("Missing log entries for a dirty primary file"): the primary's secondary
    sequence number is 1083 though it holds data up to entry 1964, .LOG2 starts at 1554, .LOG1 (rotated back) at 1965;
    replaying .LOG2 then .LOG1 gives a consistent hive whose last sequence number is 1982."""
    reconciled, mid, new = states
    bins = hivelog.read_base_block(mid).hbins_size
    primary = bytes(hivelog.with_base_fields(mid[:4096], seq1=1084, seq2=1083)) + mid[4096:]
    same = writer.changed_pages(reconciled, mid)[:1]  # a page already in the primary: re-applying it changes nothing
    log2 = writer.log_header(mid, 1554) + b"".join(writer.log_entry(s, bins, same) for s in range(1554, 1965))
    news = writer.changed_pages(mid, new)
    nb = hivelog.read_base_block(new).hbins_size
    log1 = writer.log_header(new, 1965) + b"".join(writer.log_entry(s, nb, news if s == 1982 else same)
                                                   for s in range(1965, 1983))
    rec = hivelog.replay(primary, {"SOFTWARE.LOG1": log1, "SOFTWARE.LOG2": log2})
    assert rec.applied == list(range(1554, 1983)) and rec.logs_used == ["SOFTWARE.LOG2", "SOFTWARE.LOG1"]
    assert hivelog.read_base_block(rec.data).seq1 == 1982
    assert _start(rec.data, tmp_path) == 0


def test_logs_hashed_with_the_byte_swapped_seed_are_refused_as_hash_mismatch(states) -> None:
    """What h2k used to write and accept: every entry fails its hash against Windows' seed, and the cause says so."""
    reconciled, mid, new = states
    swapped = int.from_bytes(struct.pack(">Q", writer.HVLE_SEED), "little")
    primary, logs = writer.dirty_hive(reconciled, [writer.Flush(mid, "LOG1"), writer.Flush(new, "LOG1")])
    log = bytearray(logs["LOG1"])
    pos = 512
    while log[pos : pos + 4] == b"HvLE":
        size = struct.unpack_from("<I", log, pos + 4)[0]
        struct.pack_into("<Q", log, pos + 24, hivelog.marvin32(bytes(log[pos + 40 : pos + size]), swapped))
        struct.pack_into("<Q", log, pos + 32, hivelog.marvin32(bytes(log[pos : pos + 32]), swapped))
        pos += size
    with pytest.raises(hivelog.ReplayError, match=r"hash mismatch \(2 in SYSTEM.LOG1\)"):
        hivelog.replay(primary, {"SYSTEM.LOG1": bytes(log), "SYSTEM.LOG2": b""})


def test_a_damaged_entry_stops_the_replay_before_it(states, tmp_path) -> None:
    reconciled, mid, new = states
    primary, logs = writer.dirty_hive(reconciled, [writer.Flush(mid, "LOG1"), writer.Flush(new, "LOG1")])
    log = bytearray(logs["LOG1"])
    second = 512 + struct.unpack_from("<I", log, 516)[0]
    log[second + 200] ^= 0xFF  # inside the second entry's pages: its Hash-1 no longer matches
    rec = hivelog.replay(primary, {"SYSTEM.LOG1": bytes(log)})
    assert rec.applied == [2107] and rec.notes and "hash mismatch" in rec.notes[0]
    assert _start(rec.data, tmp_path) == 1


def test_no_usable_log_and_old_format_logs_are_refused(states) -> None:
    reconciled, mid, new = states
    primary, logs = writer.dirty_hive(reconciled, [writer.Flush(new, "LOG1")])
    old_log = bytearray(logs["LOG1"][:512])
    struct.pack_into("<I", old_log, 28, 1)
    struct.pack_into("<I", old_log, 508, hivelog.checksum(old_log))
    old_log += b"DIRT" + b"\xff" * 508
    with pytest.raises(hivelog.ReplayError, match="old Windows Vista/7 format"):
        hivelog.replay(primary, {"SYSTEM.LOG": bytes(old_log)})
    with pytest.raises(hivelog.ReplayError, match="no transaction log holds a valid entry"):
        hivelog.replay(primary, {})
    # Entries that all precede the primary's sequence number (already reconciled) are not applied.
    stale = bytes(hivelog.with_base_fields(primary[:4096], seq1=3000, seq2=2999)) + primary[4096:]
    with pytest.raises(hivelog.ReplayError, match="at or above the primary file's sequence number 2999"):
        hivelog.replay(stale, {"SYSTEM.LOG1": logs["LOG1"]})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pages=st.lists(st.tuples(st.integers(0, 7), st.binary(min_size=1, max_size=600)), min_size=1, max_size=6))
def test_any_written_entry_parses_back(pages) -> None:
    """Any entry the writer makes parses back to the same pages (hashes, sizes, 512-byte alignment)."""
    pages = [(i * 4096, data) for i, data in pages]
    header = bytearray(512)
    header[:4] = b"regf"
    struct.pack_into("<IIIII", header, 4, 7, 7, 0, 0, 0)
    struct.pack_into("<I", header, 28, 6)
    struct.pack_into("<I", header, 508, hivelog.checksum(header))
    first, second = writer.log_entry(7, 8 * 4096, pages), writer.log_entry(8, 8 * 4096, pages, flags=1)
    assert len(first) % 512 == 0
    parsed = hivelog.parse_log(bytes(header) + first + second)
    assert parsed.kind == "new" and [e.seq for e in parsed.entries] == [7, 8] and parsed.stopped is None
    assert list(parsed.entries[0].pages) == pages and parsed.entries[1].flags == 1


def test_facts_carry_the_replay_summary() -> None:
    from h2k.inspect import summary

    facts = WindowsFacts(root="/dev/sda2", product_name="p", edition=None, major=10, minor=0, build=17763,
                         arch="x86_64", system_root="/Windows", current_control_set=1, firmware="bios",
                         firmware_source="partition-table", bcd_device=None, bcd_path=None,
                         replayed_hives=["SYSTEM: primary sequence 4 != secondary 3; replayed SYSTEM.LOG1 entries 3..3"],
                         ghost_interfaces=["{x} 10.0.0.1: no network adapter has this interface"])
    assert "hive log       SYSTEM: primary sequence 4" in summary(facts)
    assert "ghost nic      {x} 10.0.0.1" in summary(facts)
    assert WindowsFacts.from_dict(json.loads(json.dumps(facts.to_dict()))) == facts


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 20000), flips=st.lists(st.tuples(st.integers(0, 20000), st.integers(1, 255)), max_size=8))
def test_damaged_logs_never_crash_the_reader(states, cut, flips) -> None:
    """Untrusted input: any truncation or bit damage of real logs gives a replay or a ReplayError, nothing else."""
    reconciled, mid, new = states
    primary, logs = writer.dirty_hive(reconciled, [writer.Flush(mid, "LOG1"), writer.Flush(new, "LOG2")])
    damaged = {}
    for name, data in logs.items():
        buf = bytearray(data[:cut] if cut < len(data) else data)
        for at, x in flips:
            if at < len(buf):
                buf[at] ^= x
        damaged[f"SYSTEM.{name}"] = bytes(buf)
    try:
        rec = hivelog.replay(primary, damaged)
    except hivelog.ReplayError:
        return
    assert rec.applied and rec.applied[0] >= 2107 and not hivelog.read_base_block(rec.data).dirty
