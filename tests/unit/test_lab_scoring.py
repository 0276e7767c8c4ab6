"""The scorer's decisions from recorded signal shapes (pure logic; real boots are in tests/boot)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from lab.console import ConsoleScanner
from lab.scoring import Scorer, Signal, SignalBus, score
from lab.verdict import BootResult, Expect, Pattern

REC = Path(__file__).resolve().parents[1] / "data" / "recorded"


def qmp_events(name):
    out = []
    for line in (REC / name).read_text().splitlines():
        rec = json.loads(line)
        out.append(rec.get("msg", rec))
    return out


def console_signals(data: bytes, expect: Expect, source="console"):
    sc = ConsoleScanner(expect, source)
    return [Signal(source, ev.kind, {"event": ev}) for ev in sc.feed(data)]


def qsig(ev):
    return Signal("qmp", ev["event"], ev.get("data", {}))


@pytest.mark.parametrize("index,code,name", [
    (0, 0x7B, "INACCESSIBLE_BOOT_DEVICE"), (1, 0xD1, "DRIVER_IRQL_NOT_LESS_OR_EQUAL"),
    (2, 0xC000021A, "WINLOGON_FATAL_ERROR"), (3, 0x1000007E, "SYSTEM_THREAD_EXCEPTION_NOT_HANDLED_M"),
    (4, 0xEF, "CRITICAL_PROCESS_DIED"), (5, 0x1234, None),
])
def test_hyperv_panic_gives_stop_code(index, code, name):
    ev = qmp_events("qmp_hyperv_panics.jsonl")[index]
    d = Scorer(Expect()).handle(qsig(ev))
    assert d.verdict == "failed" and d.signal == "qmp-panic-hyperv"
    assert d.stop_code == code and d.stop_name == name
    assert f"0x{code:08X}" in d.reason
    assert len(d.data["params"]) == 4


def test_7b_reason_has_hint():
    d = Scorer(Expect()).handle(qsig(qmp_events("qmp_hyperv_panics.jsonl")[0]))
    assert "INACCESSIBLE_BOOT_DEVICE" in d.reason and "boot-start driver" in d.reason


def test_pvpanic_without_info():
    ev = qmp_events("qmp_pvpanic_linux.jsonl")[0]
    d = Scorer(Expect()).handle(qsig(ev))
    assert (d.verdict, d.signal, d.stop_code) == ("failed", "qmp-panic", None)


def test_guest_reset_before_success_is_reboot_loop_and_host_events_ignored():
    s = Scorer(Expect())
    assert s.handle(Signal("qmp", "STOP")) is None
    assert s.handle(Signal("qmp", "SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})) is None
    d = s.handle(qsig(qmp_events("qmp_reboot_guest_reset.jsonl")[0]))
    assert d.verdict == "failed" and "reboot loop" in d.reason


def test_power_off_before_success_fails_but_after_success_is_ignored():
    d = Scorer(Expect()).handle(Signal("qmp", "SHUTDOWN", {"guest": True, "reason": "guest-shutdown"}))
    assert d.verdict == "failed" and "powered off before" in d.reason
    exp = Expect(require_agent=True)
    s = Scorer(exp)
    [ok] = console_signals(b"H2K-BOOT-OK\n", exp)
    assert s.handle(ok) is None
    assert s.handle(Signal("qmp", "SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})) is None


def test_success_needs_agent_when_required():
    exp = Expect(require_agent=True)
    s = Scorer(exp)
    [ok] = console_signals(b"H2K-BOOT-OK\n", exp)
    assert s.handle(ok) is None  # console alone is not enough
    d = s.handle(Signal("agent", "ok", {"summary": "agent up (x)"}))
    assert d.verdict == "passed" and "agent up" in d.reason and "H2K-BOOT-OK" in d.reason


def test_agent_failure_fails():
    d = Scorer(Expect(require_network=True)).handle(Signal("agent", "failed", {"reason": "no IPv4 address on any NIC"}))
    assert d.verdict == "failed" and "IPv4" in d.reason


def test_known_issue_turns_pass_into_softfail():
    exp = Expect(known_issues=[Pattern("old-driver", r"viostor: version 0\.1")])
    s = Scorer(exp)
    sigs = console_signals(b"viostor: version 0.1 loaded\nH2K-BOOT-OK\n", exp)
    decisions = [s.handle(x) for x in sigs]
    assert decisions[0] is None
    assert decisions[1].verdict == "softfailed" and "old-driver" in decisions[1].reason


def test_ems_machine_info_passes_and_bluescreen_fails_with_code():
    exp = Expect.for_os("windows")
    [sig] = console_signals((REC / "ems_boot.txt").read_bytes(), exp)
    d = Scorer(exp).handle(sig)
    assert d.verdict == "passed" and "EMS machine-info" in d.reason and d.evidence == ["ems"]
    assert d.data["machine_info"]["os-build-number"] == "17763"
    d = Scorer(exp).handle(console_signals((REC / "ems_bluescreen.txt").read_bytes(), exp)[0])
    assert (d.verdict, d.stop_code, d.stop_name) == ("failed", 0x7B, "INACCESSIBLE_BOOT_DEVICE")


def test_no_bootable_device_from_firmware_port():
    exp = Expect()
    [sig] = console_signals(b"No bootable device.\n", exp, source="firmware")
    d = Scorer(exp).handle(sig)
    assert d.verdict == "failed" and d.reason.startswith("no bootable device")


def test_process_exit_is_incomplete():
    d = Scorer(Expect()).handle(Signal("process", "exited", {"returncode": 1, "log_tail": "qemu: could not open disk\n"}))
    assert d.verdict == "incomplete" and "could not open disk" in d.reason


def test_score_deadline_is_timeout_without_sleeping():
    bus = SignalBus()
    t0 = time.monotonic()
    d = score(bus, Scorer(Expect()), time.monotonic() + 0.3)
    assert d.verdict == "timeout"
    assert 0.25 < time.monotonic() - t0 < 2


def test_first_conclusive_signal_wins_and_console_crash_waits_for_qmp():
    exp = Expect()
    bus = SignalBus()
    for sig in console_signals(b"Kernel panic - not syncing: sysrq triggered crash\n", exp):
        bus.put(sig)
    later = qmp_events("qmp_pvpanic_linux.jsonl")[0]
    threading.Timer(0.1, lambda: bus.put(qsig(later))).start()
    d = score(bus, Scorer(exp), time.monotonic() + 10)
    # The stronger QMP signal names the crash; the console line is kept in the reason.
    assert d.signal == "qmp-panic" and "sysrq triggered crash" in d.reason


def test_qmp_panic_first_waits_for_the_console_line():
    # The other order (seen in a loaded CI run): GUEST_PANICKED is read before the console's panic line.
    exp = Expect()
    bus = SignalBus()
    bus.put(qsig(qmp_events("qmp_pvpanic_linux.jsonl")[0]))
    line = console_signals(b"Kernel panic - not syncing: sysrq triggered crash\n", exp)
    threading.Timer(0.1, lambda: [bus.put(s) for s in line]).start()
    d = score(bus, Scorer(exp), time.monotonic() + 10)
    assert d.signal == "qmp-panic" and "pvpanic" in d.reason and "sysrq triggered crash" in d.reason


def test_qmp_panic_alone_decides_after_the_short_wait():
    bus = SignalBus()
    bus.put(qsig(qmp_events("qmp_pvpanic_linux.jsonl")[0]))
    t0 = time.monotonic()
    d = score(bus, Scorer(Expect()), time.monotonic() + 10)
    assert d.signal == "qmp-panic" and "console:" not in d.reason
    assert time.monotonic() - t0 < 1.0


def test_console_crash_without_qmp_still_decides_quickly():
    exp = Expect()
    bus = SignalBus()
    for sig in console_signals(b"Kernel panic - not syncing: Attempted to kill init!\n", exp):
        bus.put(sig)
    t0 = time.monotonic()
    d = score(bus, Scorer(exp), time.monotonic() + 10)
    assert d.signal == "console-failure" and "kill init" in d.reason
    assert time.monotonic() - t0 < 1.0


def test_boot_result_json_roundtrip(tmp_path):
    r = BootResult("failed", "bugcheck", stop_code=0x7B, stop_name="INACCESSIBLE_BOOT_DEVICE", seconds=1.5)
    path = r.write(tmp_path)
    data = json.loads(path.read_text())
    assert data["stop_code_hex"] == "0x0000007B" and data["verdict"] == "failed"
    assert BootResult.from_dict(data).stop_name == "INACCESSIBLE_BOOT_DEVICE"
    with pytest.raises(ValueError):
        BootResult("maybe", "x")


# --- success as evidence, alternatives -------------------------------------------------------


def test_linux_default_passes_on_the_first_complete_alternative():
    exp = Expect.for_os("linux")
    assert exp.alternatives() == [["login"], ["systemd-target"], ["agent"]]
    [sig] = console_signals(b"\r\nDebian GNU/Linux 12 vmw-deb12 ttyS0\r\n\r\nvmw-deb12 login: ", exp)
    d = Scorer(exp).handle(sig)
    assert (d.verdict, d.evidence) == ("passed", ["login"])
    assert d.reason == "login prompt 'vmw-deb12 login:'"


def test_all_evidence_of_an_alternative_is_needed_and_named_in_order():
    exp = Expect.for_os("linux", success=[["agent", "login"]])
    s = Scorer(exp)
    [login] = console_signals(b"vmw-deb12 login: ", exp)
    assert s.handle(login) is None
    d = s.handle(Signal("agent", "ok", {"summary": "agent up (Debian GNU/Linux 12 (bookworm))"}))
    assert (d.verdict, d.evidence) == ("passed", ["agent", "login"])
    assert d.reason == "agent up (Debian GNU/Linux 12 (bookworm)) + login prompt 'vmw-deb12 login:'"


def test_require_network_adds_network_and_the_agent_to_every_alternative():
    exp = Expect.for_os("windows", require_network=True)
    assert exp.alternatives() == [["ems", "agent", "network"], ["agent", "network"]]
    s = Scorer(exp)
    assert s.handle(Signal("agent", "ok", {"summary": "agent up (w)"})) is None
    d = s.handle(Signal("agent", "network-ok", {"summary": "IPv4 eth0=10.0.2.15, gateway 10.0.2.2 answers ping"}))
    assert d.evidence == ["agent", "network"] and "answers ping" in d.reason


def test_an_agent_failure_only_ends_the_boot_when_no_alternative_is_left():
    exp = Expect.for_os("linux")
    s = Scorer(exp)
    assert s.handle(Signal("agent", "failed", {"reason": "guest agent: channel closed", "evidence": "agent"})) is None
    [sig] = console_signals(b"host login: ", exp)
    assert s.handle(sig).evidence == ["login"]
    s = Scorer(Expect.for_os("linux", success=[["agent", "login"], ["network"]]))
    d = s.handle(Signal("agent", "failed", {"reason": "guest agent: channel closed", "evidence": "agent"}))
    assert d.verdict == "failed" and d.reason == "guest agent: channel closed"


def test_a_network_failure_leaves_the_alternatives_without_network():
    s = Scorer(Expect.for_os("linux", success=[["network"], ["login"]]))
    assert s.handle(Signal("agent", "ok", {"summary": "agent up (x)"})) is None
    assert s.handle(Signal("agent", "failed", {"reason": "no IPv4 address on any NIC", "evidence": "network"})) is None
    assert s.dead == {"network": "no IPv4 address on any NIC"}


def test_evidence_the_machine_cannot_show_drops_its_alternatives():
    s = Scorer(Expect.for_os("linux"), console_expected=False)
    assert s.alternatives == [["agent"]] and s.agent_expected and s.impossible is None
    s = Scorer(Expect.for_os("linux"), agent_expected=False)
    assert s.alternatives == [["login"], ["systemd-target"]] and not s.agent_expected
    s = Scorer(Expect.for_os("testbed"), console_expected=False)
    assert s.impossible and "marker" in s.impossible


def test_timeout_says_what_was_seen_and_what_is_missing():
    exp = Expect.for_os("linux", success=[["agent", "login"], ["systemd-target", "network"]])
    bus, s = SignalBus(), Scorer(exp)
    for sig in console_signals(b"h login: ", exp):
        bus.put(sig)
    d = score(bus, s, time.monotonic() + 0.2)
    assert d.verdict == "timeout"
    assert "seen: login; missing: agent | systemd-target + agent + network" in d.reason


def test_a_failure_read_together_with_a_success_wins():
    exp = Expect.for_os("linux")
    sigs = console_signals(b"host login: \r\n[   9.1] Kernel panic - not syncing: Attempted to kill init!\r\n", exp)
    assert [x.data["event"].kind for x in sigs] == ["failure", "evidence"]
    assert Scorer(exp).handle(sigs[0]).verdict == "failed"


def test_softfail_reason_keeps_the_evidence():
    exp = Expect.for_os("linux", known_issues=[Pattern("slow", r"link is slow")])
    s = Scorer(exp)
    decisions = [s.handle(x) for x in console_signals(b"ata1: link is slow\nbox login: ", exp)]
    assert decisions[-1].verdict == "softfailed" and decisions[-1].evidence == ["login"]
    assert decisions[-1].reason.startswith("booted (login prompt 'box login:') with known issues: slow")
