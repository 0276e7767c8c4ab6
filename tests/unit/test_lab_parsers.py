"""Console, EMS and stop-code parsing on recorded shapes (tests/data/recorded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lab import stopcodes
from lab.console import ConsoleScanner, clean
from lab.verdict import Expect, Pattern

REC = Path(__file__).resolve().parents[1] / "data" / "recorded"


def feed_in_pieces(scanner: ConsoleScanner, data: bytes, size: int):
    events = []
    for i in range(0, len(data), size):
        events += scanner.feed(data[i:i + size])
    return events


@pytest.mark.parametrize("code,name", [
    (0x7B, "INACCESSIBLE_BOOT_DEVICE"), (0x7E, "SYSTEM_THREAD_EXCEPTION_NOT_HANDLED"),
    (0xD1, "DRIVER_IRQL_NOT_LESS_OR_EQUAL"), (0x50, "PAGE_FAULT_IN_NONPAGED_AREA"),
    (0x3B, "SYSTEM_SERVICE_EXCEPTION"), (0xEF, "CRITICAL_PROCESS_DIED"), (0x133, "DPC_WATCHDOG_VIOLATION"),
    (0x139, "KERNEL_SECURITY_CHECK_FAILURE"), (0x1E, "KMODE_EXCEPTION_NOT_HANDLED"),
    (0xC000021A, "WINLOGON_FATAL_ERROR"), (0x9F, "DRIVER_POWER_STATE_FAILURE"), (0xA, "IRQL_NOT_LESS_OR_EQUAL"),
    (0x124, "WHEA_UNCORRECTABLE_ERROR"), (0x101, "CLOCK_WATCHDOG_TIMEOUT"), (0x116, "VIDEO_TDR_FAILURE"),
    (0x19, "BAD_POOL_HEADER"), (0xBE, "ATTEMPTED_WRITE_TO_READONLY_MEMORY"), (0xC2, "BAD_POOL_CALLER"),
    (0xF4, "CRITICAL_OBJECT_TERMINATION"), (0x7F, "UNEXPECTED_KERNEL_MODE_TRAP"),
    (0x1000007E, "SYSTEM_THREAD_EXCEPTION_NOT_HANDLED_M"), (0x1000008E, "KERNEL_MODE_EXCEPTION_NOT_HANDLED_M"),
])
def test_stop_code_names(code, name):
    assert stopcodes.name_of(code) == name


def test_stop_code_unknown_and_64bit():
    assert stopcodes.name_of(0x1234) is None
    assert stopcodes.describe(0x1234) == "0x00001234"
    # QMP carries unsigned 64-bit values; only the low 32 bits are the code.
    assert stopcodes.name_of(0xFFFFFFFF0000007B) == "INACCESSIBLE_BOOT_DEVICE"
    assert stopcodes.describe(0x7B) == "0x0000007B INACCESSIBLE_BOOT_DEVICE"


def test_clean_strips_ansi_and_control():
    raw = "\x1b[2J\x1b[1;37;44mHello\x1b[0m\r\n\x00\x07W\x08orld\x1b]0;title\x07!\x1b(B"
    assert clean(raw) == "Hello\nWorld!"


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 4096])
def test_ems_machine_info_split_across_reads(size):
    data = (REC / "ems_boot.txt").read_bytes()
    events = feed_in_pieces(ConsoleScanner(Expect()), data, size)
    ems = [e for e in events if e.kind == "evidence"]
    assert {e.name for e in events} == {"ems"}
    # The <machine-info> is reported once; a SAC> prompt read apart from it is the same evidence.
    info = [e.data["machine_info"] for e in ems if "machine_info" in e.data]
    assert len(info) == 1 and all(e.text == "SAC>" for e in ems if "machine_info" not in e.data)
    info = info[0]
    assert info["os-product"] == "Windows Server 2019 Datacenter"
    assert info["os-build-number"] == "17763"
    assert info["processor-architecture"] == "AMD64"


@pytest.mark.parametrize("size", [1, 5, 13, 100, 4096])
def test_ems_bluescreen_split_and_not_success(size):
    data = (REC / "ems_boot.txt").read_bytes().replace(b"<machine-info>", b"<machine-inf0>")  # no boot success
    data += b"\x1b[5;1H garbage \xff\xfe\x00 " + (REC / "ems_bluescreen.txt").read_bytes()
    events = feed_in_pieces(ConsoleScanner(Expect()), data, size)
    # The <machine-info> inside a <BP> is part of the crash report, not "kernel up".
    assert not any("machine_info" in e.data for e in events if e.kind == "evidence")
    [ev] = [e for e in events if e.kind == "ems-bluescreen"]
    assert ev.verdict == "failed"
    assert ev.data["stop_code"] == 0x7B
    assert ev.data["stop_name"] == "INACCESSIBLE_BOOT_DEVICE"
    assert ev.data["params"][0] == "0xFFFFF880009A9928"
    assert ev.data["machine_info"]["os-build-number"] == "17763"


def test_machine_info_then_bluescreen_reports_both_once():
    data = (REC / "ems_boot.txt").read_bytes() + (REC / "ems_bluescreen.txt").read_bytes()
    sc = ConsoleScanner(Expect())
    events = feed_in_pieces(sc, data, 9)
    assert [e.kind for e in events if "machine_info" in e.data] == ["evidence", "ems-bluescreen"]
    assert [(e.kind, e.text) for e in sc.feed(b"\r\nSAC>")] == [("evidence", "SAC>")]  # nothing else twice


@pytest.mark.parametrize("size", [1, 4, 50])
def test_linux_root_missing(size):
    data = (REC / "linux_root_missing.txt").read_bytes()
    events = feed_in_pieces(ConsoleScanner(Expect()), data, size)
    names = [e.name for e in events if e.kind == "failure"]
    assert names[:2] == ["root-wait-gave-up", "root-missing"]
    missing = [e for e in events if e.name == "root-missing"][0]
    assert missing.data["detail"] == "/dev/sda1"


def test_kernel_panic_detail_and_marker_split_by_escapes():
    sc = ConsoleScanner(Expect())
    evs = sc.feed(b"[    1.0] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\r\n")
    assert evs[0].name == "kernel-panic"
    assert evs[0].data["detail"] == "VFS: Unable to mount root fs on unknown-block(0,0)"
    sc = ConsoleScanner(Expect())
    # The marker arrives with a colour escape cut in half between two reads:
    # escapes are stripped before matching, so the marker is still seen, once.
    assert sc.feed(b"H2K-BO\x1b[1") == []
    evs = sc.feed(b";32mOT-OK\r\n")
    assert [(e.kind, e.name) for e in evs] == [("evidence", "marker")]
    assert "\x1b" not in sc.text and "[1;32m" not in sc.text
    assert sc.feed(b"\x1b[0m more\r\n") == []


def test_panic_line_cut_between_reads_waits_for_its_end():
    # A loaded CI run scored "kernel-panic: sysrq trigge": the detail must be the whole line.
    sc = ConsoleScanner(Expect())
    assert sc.feed(b"[   14.2] Kernel panic - not syncing: sysrq trigge") == []
    evs = sc.feed(b"red crash\r\nCPU: 0 PID: 1\r\n")
    assert [(e.name, e.data["detail"]) for e in evs] == [("kernel-panic", "sysrq triggered crash")]
    # Reported once, and a stream that ends mid-line still reports what it has.
    assert sc.feed(b"more\n") == []
    sc = ConsoleScanner(Expect())
    assert sc.feed(b"Kernel panic - not syncing: Attempted to kill in") == []
    assert [e.data["detail"] for e in sc.finish()] == ["Attempted to kill in"]
    assert sc.finish() == []


def test_firmware_patterns_apply_only_to_their_source():
    exp = Expect()
    fw = ConsoleScanner(exp, source="firmware")
    evs = fw.feed(b"enter handle_18:\n  NULL\nNo bootable device.\n")
    assert [(e.kind, e.name) for e in evs] == [("failure", "no-bootable-device")]
    # Success markers and Linux patterns are console-only.
    assert fw.feed(b"H2K-BOOT-OK\nKernel panic - not syncing: x\n") == []


def test_known_issue_is_softfail_and_custom_patterns():
    exp = Expect(success_patterns=[r"login:"], known_issues=[Pattern("slow-disk", r"ata\d: link is slow")])
    sc = ConsoleScanner(exp)
    evs = sc.feed(b"ata1: link is slow to respond\nhost login: ")
    assert [(e.kind, e.name, e.verdict) for e in evs] == [
        ("failure", "slow-disk", "softfailed"), ("evidence", "login", None), ("evidence", "pattern", None)]
    assert evs[1].data["host"] == "host" and evs[2].data["regex"] == "login:"


def test_long_noise_does_not_lose_late_match():
    sc = ConsoleScanner(Expect())
    for _ in range(200):
        assert sc.feed(b"x" * 1000 + b"\r\n") == []
    assert [e.name for e in sc.feed(b"H2K-BOOT-OK\n")] == ["marker"]


def test_recorded_qmp_shapes_parse():
    for name in ("qmp_hyperv_panics.jsonl", "qmp_pvpanic_linux.jsonl", "qmp_reboot_guest_reset.jsonl"):
        for line in (REC / name).read_text().splitlines():
            rec = json.loads(line)
            msg = rec.get("msg", rec)
            assert "event" in msg
