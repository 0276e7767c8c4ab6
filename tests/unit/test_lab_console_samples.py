"""Console recordings of real boots (tests/data/console/, each file's header says how it was
recorded) fed through the real scanner and scorer in chunks of many sizes: the verdict, the
evidence, and that it is decided at the line that names it, not later in the stream."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lab.console import ConsoleScanner
from lab.scoring import Scorer, Signal
from lab.verdict import Expect

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "console"
SIZES = [5, 61, 4096]  # odd splits of every line; 1-byte reads are covered by test_lab_parsers.py


def sample(name: str) -> bytes:
    """The recording without its header (lines starting with '#', up to '# ---')."""
    raw = (SAMPLES / name).read_bytes()
    head, sep, body = raw.partition(b"# ---\n")
    assert sep and all(line.startswith(b"#") for line in head.splitlines()), f"{name}: no header"
    return body


def run(data: bytes, expect: Expect, size: int):
    """(decision, stream offset where it was decided, every console event) for ``data`` fed in ``size`` chunks."""
    scanner, scorer = ConsoleScanner(expect), Scorer(expect)
    decision, at, events = None, None, []
    for i in range(0, len(data), size):
        for ev in scanner.feed(data[i:i + size]):
            events.append(ev)
            d = scorer.handle(Signal("console", ev.kind, {"event": ev}))
            if d is not None and at is None:
                decision, at = d, min(i + size, len(data))
    for ev in scanner.finish():
        events.append(ev)
        if decision is None:
            decision = scorer.handle(Signal("console", ev.kind, {"event": ev}))
            at = len(data)
    return decision, at, events


def decided_at_its_line(data: bytes, at: int, line: bytes, size: int) -> None:
    """The verdict came with the chunk that completed ``line`` (its first occurrence)."""
    start = data.index(line)
    end = data.find(b"\n", start)
    end = len(data) if end < 0 else end + 1
    assert start < at <= end + size, (start, end, at)


FAILURES = [
    # sample, first failure (the verdict), the line it is named at, every failure the stream names
    ("dracut_systemd_root_missing.txt", "dracut-timeout", b"Warning: dracut-initqueue: timeout",
     {"dracut-timeout", "dracut-could-not-boot", "root-missing", "dracut-emergency"}),
    ("dracut_root_missing.txt", "dracut-could-not-boot", b"dracut Warning: Could not boot.",
     {"dracut-could-not-boot", "root-missing", "dracut-shell"}),
    ("kernel_vfs_no_root.txt", "kernel-panic", b"Kernel panic - not syncing: VFS",
     {"kernel-panic", "vfs-no-root"}),
    ("initramfs_tools_root_missing.txt", "root-wait-gave-up", b"Gave up waiting for root file system device",
     {"root-wait-gave-up", "root-missing", "initramfs-shell"}),
    ("systemd_emergency_fstab.txt", "systemd-emergency", b"Reached target emergency.target - Emergency Mode",
     {"systemd-emergency"}),
]


@pytest.mark.parametrize("name,verdict_name,line,names", FAILURES, ids=[f[0] for f in FAILURES])
@pytest.mark.parametrize("size", SIZES)
def test_failure_samples_are_named_at_their_line(name, verdict_name, line, names, size):
    data = sample(name)
    d, at, events = run(data, Expect.for_os("linux"), size)
    assert d is not None and d.verdict == "failed", d
    assert d.reason.startswith(f"{verdict_name}: "), d.reason
    decided_at_its_line(data, at, line, size)
    assert {e.name for e in events if e.kind == "failure"} == names
    assert not [e for e in events if e.kind == "evidence"]  # nothing in a failed boot looks like success


@pytest.mark.parametrize("name", ["dracut_systemd_root_missing.txt", "dracut_root_missing.txt"])
def test_dracut_names_the_missing_root(name):
    _, _, events = run(sample(name), Expect.for_os("linux"), 512)
    roots = {e.data["detail"] for e in events if e.name == "root-missing"}
    assert roots == {"/dev/disk/by-uuid/0b5c2d47-6b1a-4d3e-9f00-000000000001"}


@pytest.mark.parametrize("size", SIZES)
def test_a_stock_debian_passes_on_its_serial_login_prompt(size):
    data = sample("systemd_login.txt")
    d, at, events = run(data, Expect.for_os("linux"), size)
    assert (d.verdict, d.evidence, d.reason) == ("passed", ["login"], "login prompt 'h2k-stock login:'")
    decided_at_its_line(data, at, b"h2k-stock login:", size)
    # The initramfs' and the root's own "Reached target ..." lines are not the default target,
    # and nothing in a good boot looks like a failure.
    assert [e.name for e in events] == ["login"]


def test_the_marker_is_no_success_for_a_stock_guest():
    d, _, _ = run(sample("systemd_login.txt"), Expect.for_os("testbed"), 4096)
    assert d is None  # the scorer would wait for the deadline: a timeout


def test_systemd_emergency_mode_is_named_by_its_target_and_by_sulogin():
    _, _, events = run(sample("systemd_emergency_fstab.txt"), Expect.for_os("linux"), 4096)
    lines = [e.text for e in events if e.name == "systemd-emergency"]
    # The kmsg copy and the status line of the target, then sulogin's banner.
    assert lines[-1] == "You are in emergency mode."
    assert len([x for x in lines if "Emergency Mode" in x]) == 2


def test_the_verdict_names_the_root_initramfs_tools_gave_up_on():
    """initramfs-tools says "Gave up waiting for root file system device" (the verdict's line) and names
    the root four lines later, in the same burst: the scorer waits for that line (at most
    CORROBORATE_SECONDS) so the reason says which root never appeared."""
    from lab.scoring import SignalBus, score

    expect = Expect.for_os("linux")
    bus, scanner = SignalBus(), ConsoleScanner(expect)
    for ev in [*scanner.feed(sample("initramfs_tools_root_missing.txt")), *scanner.finish()]:
        bus.put(Signal("console", ev.kind, {"event": ev}))
    d = score(bus, Scorer(expect), deadline=time.monotonic() + 5)
    assert d.verdict == "failed" and d.signal == "console-failure", d
    assert d.reason == "root-wait-gave-up: Gave up waiting for root file system device; root-missing: /dev/sda2"
