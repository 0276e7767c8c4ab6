"""h2k.hivelog on real hives (written by the test bed, read back with hivex): dirty detection and log replay."""

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
from lab.testbed import regtext
from lab.testbed.hive import make_hive

ROOT = "HKEY_LOCAL_MACHINE\\SYSTEM"
BASE_REG = ("Windows Registry Editor Version 5.00\r\n\r\n[HKEY_LOCAL_MACHINE\\SYSTEM\\ControlSet001\\Services\\pvscsi]\r\n"
            '"Start"=dword:00000000\r\n"Group"="SCSI miniport"\r\n\r\n'
            "[HKEY_LOCAL_MACHINE\\SYSTEM\\Select]\r\n\"Current\"=dword:00000001\r\n")


def _value(path: Path, key: str, name: str):
    h = hivex.Hivex(str(path))
    node = find_key(h, key)
    got = None if node is None else find_value(h, node, name)
    return None if got is None else decode(*got)


@pytest.fixture()
def pair(tmp_path) -> tuple[bytes, bytes]:
    """(stale primary, newest hive): the newest has Start=0 and an extra key that grows the hive."""
    new = make_hive(tmp_path / "new", BASE_REG + "".join(
        f"\r\n[HKEY_LOCAL_MACHINE\\SYSTEM\\ControlSet001\\Enum\\PCI\\DEV_{i:04d}]\r\n\"Service\"=\"svc{i}\"\r\n"
        for i in range(60)), ROOT)
    old = make_hive(tmp_path / "old", BASE_REG.replace("dword:00000000", "dword:00000003"), ROOT)
    return old.read_bytes(), new.read_bytes()


def test_marvin32_known_vectors() -> None:
    seed = 0x004FB61A001BDBCC  # the .NET runtime's Marvin test vectors
    for data, want in [(b"", 0x30ED35C100CD3C7D), (b"\xaf", 0x48E73FC77D75DDC1), (b"\xe7\x0f", 0xB5F6E1FC485DBFF8),
                       (b"\x37\xf4\x95", 0xF0B07C789B8CF7E8), (b"\x15\x3f\xb7\x98\x26", 0xE6C08C6DA2AFA997),
                       (b"\xab\x42\x7e\xa8\xd1\x0f\xc7", 0xE11847E4F0678C41)]:
        assert hivelog.marvin32(data, seed) == want


def test_clean_hive_is_not_dirty(pair) -> None:
    old, new = pair
    for data in (old, new):
        base = hivelog.read_base_block(data)
        assert base is not None and base.checksum_ok and not base.dirty and base.file_type == 0


def test_replay_gives_the_newest_hive_and_hivex_reads_it(pair, tmp_path) -> None:
    old, new = pair
    primary, log1 = hivelog.dirty_pair(old, new)
    base = hivelog.read_base_block(primary)
    assert base.dirty and base.seq1 == base.seq2 + 1 and base.checksum_ok
    (tmp_path / "stale").write_bytes(primary)
    assert _value(tmp_path / "stale", "ControlSet001\\Services\\pvscsi", "Start") == 3  # hivex ignores logs
    parsed = hivelog.parse_log(log1)
    assert parsed.kind == "new" and len(parsed.entries) == 1 and parsed.stopped is None
    rec = hivelog.replay(primary, {"SYSTEM.LOG1": log1, "SYSTEM.LOG2": b""})
    assert rec.applied == [base.seq1] and rec.logs_used == ["SYSTEM.LOG1"]
    out = hivelog.read_base_block(rec.data)
    assert not out.dirty and out.seq1 == base.seq1
    nb = hivelog.read_base_block(new)
    assert rec.data[4096:] == new[4096 : 4096 + nb.hbins_size]
    (tmp_path / "replayed").write_bytes(rec.data)
    assert _value(tmp_path / "replayed", "ControlSet001\\Services\\pvscsi", "Start") == 0
    assert _value(tmp_path / "replayed", "ControlSet001\\Enum\\PCI\\DEV_0059", "Service") == "svc59"


def test_bogus_entry_is_not_applied(pair) -> None:
    old, new = pair
    primary, log1 = hivelog.dirty_pair(old, new)
    broken = bytearray(log1)
    broken[512 + 40 + 100] ^= 0xFF  # inside the page references/pages: Hash-1 no longer matches
    parsed = hivelog.parse_log(bytes(broken))
    assert parsed.entries == [] and "hash" in parsed.stopped
    with pytest.raises(hivelog.ReplayError, match="no transaction log entry"):
        hivelog.replay(primary, {"SYSTEM.LOG1": bytes(broken)})


def test_old_format_log_and_no_log_are_refused(pair) -> None:
    old, new = pair
    primary, log1 = hivelog.dirty_pair(old, new)
    old_log = bytearray(log1[:512])
    struct.pack_into("<I", old_log, 28, 1)
    struct.pack_into("<I", old_log, 508, hivelog.checksum(old_log))
    old_log += b"DIRT" + b"\xff" * 508
    with pytest.raises(hivelog.ReplayError, match="old"):
        hivelog.replay(primary, {"SYSTEM.LOG": bytes(old_log)})
    with pytest.raises(hivelog.ReplayError):
        hivelog.replay(primary, {})


def test_entries_across_both_logs_apply_in_sequence(pair, tmp_path) -> None:
    """LOG1 holds entry n, LOG2 entry n+1: both apply, in order; a gap stops the replay."""
    old, new = pair
    mid_path = tmp_path / "mid"
    mid_path.write_bytes(old)
    regtext.apply_reg(mid_path, "Windows Registry Editor Version 5.00\r\n\r\n"
                      "[HKEY_LOCAL_MACHINE\\SYSTEM\\ControlSet001\\Services\\pvscsi]\r\n\"Start\"=dword:00000001\r\n", ROOT)
    mid = mid_path.read_bytes()
    primary, log1 = hivelog.dirty_pair(old, mid)
    seq = hivelog.read_base_block(primary).seq1
    nb = hivelog.read_base_block(new)
    new_bins = new[4096 : 4096 + nb.hbins_size]
    log2 = log1[:512] + hivelog.log_entry(seq + 1, len(new_bins), [(o, new_bins[o : o + 4096])
                                                                  for o in range(0, len(new_bins), 4096)])
    rec = hivelog.replay(primary, {"SYSTEM.LOG2": log2, "SYSTEM.LOG1": log1})
    assert rec.applied == [seq, seq + 1] and rec.logs_used == ["SYSTEM.LOG1", "SYSTEM.LOG2"]
    (tmp_path / "r").write_bytes(rec.data)
    assert _value(tmp_path / "r", "ControlSet001\\Services\\pvscsi", "Start") == 0
    gap = log1[:512] + hivelog.log_entry(seq + 2, len(new_bins), [(0, new_bins[:4096])])
    rec = hivelog.replay(primary, {"SYSTEM.LOG1": log1, "SYSTEM.LOG2": gap})
    assert rec.applied == [seq]
    (tmp_path / "g").write_bytes(rec.data)
    assert _value(tmp_path / "g", "ControlSet001\\Services\\pvscsi", "Start") == 1


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pages=st.lists(st.tuples(st.integers(0, 7), st.binary(min_size=1, max_size=600)), min_size=1, max_size=6))
def test_log_entry_roundtrip(pages) -> None:
    """Any entry the writer makes parses back to the same pages (hashes, sizes, 512-byte alignment)."""
    pages = [(i * 4096, data) for i, data in pages]
    log = b"\0" * 512
    header = bytearray(512)
    header[:4] = b"regf"
    struct.pack_into("<I", header, 28, 6)
    struct.pack_into("<I", header, 508, hivelog.checksum(header))
    entry = hivelog.log_entry(7, 8 * 4096, pages)
    assert len(entry) % 512 == 0
    parsed = hivelog.parse_log(bytes(header) + entry + entry)
    assert log and parsed.kind == "new" and len(parsed.entries) == 2
    assert list(parsed.entries[0].pages) == pages and parsed.entries[0].seq == 7


def test_facts_carry_the_replay_summary() -> None:
    from h2k.inspect import summary

    facts = WindowsFacts(root="/dev/sda2", product_name="p", edition=None, major=10, minor=0, build=17763,
                         arch="x86_64", system_root="/Windows", current_control_set=1, firmware="bios",
                         firmware_source="partition-table", bcd_device=None, bcd_path=None,
                         replayed_hives=["SYSTEM: primary sequence 4 != secondary 3; replayed SYSTEM.LOG1 entries 4..4"])
    assert "hive log       SYSTEM: primary sequence 4" in summary(facts)
    assert WindowsFacts.from_dict(json.loads(json.dumps(facts.to_dict()))) == facts
