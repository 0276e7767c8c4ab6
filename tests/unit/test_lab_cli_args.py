"""`h2k boot` argument handling (offline: every case fails before QEMU starts)."""

from __future__ import annotations

import pytest

from h2k.cli import main


@pytest.mark.parametrize("argv,msg", [
    (["boot"], "give a disk IMAGE or --kernel"),
    (["boot", "/nonexistent/disk.qcow2"], "no such disk image"),
    (["boot", "--kernel", "/boot/vmlinuz", "--timeout", "0"], "--timeout must be positive"),
    (["boot", "--kernel", "/boot/vmlinuz", "--connect", "qemu:///system"], "--connect needs --backend libvirt"),
    (["boot", "--kernel", "/boot/vmlinuz", "--fail-pattern", "no-equals-sign"], "expected NAME=REGEX"),
    (["boot", "--kernel", "/boot/vmlinuz", "--known-issue", "x=("], "x=("),
    (["boot", "--kernel", "/boot/vmlinuz", "--two-phase"], "--two-phase needs a disk IMAGE"),
    (["boot", "--kernel", "/boot/vmlinuz", "--success", "agent+logon"], "unknown evidence 'logon'"),
    (["boot", "--kernel", "/boot/vmlinuz", "--success", "agent+"], "unknown evidence ''"),
    (["boot", "--kernel", "/boot/vmlinuz", "--expect-pattern", "login:("], "'login:(': not a valid regex"),
    (["boot", "--kernel", "/boot/vmlinuz", "--success", "pattern"], "'pattern' needs at least one"),
    (["boot", "--kernel", "/boot/vmlinuz", "--success", "login", "--expect-pattern", "x"], "no success alternative"),
    # Checked before the image is inspected: bad input never waits for an appliance.
    (["boot", "/etc/hostname", "--success", "bogus"], "unknown evidence 'bogus'"),
])
def test_bad_input_is_one_line_exit_3(argv, msg, capsys):
    assert main(argv) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("h2k: error: ") and msg in err and "\n" not in err


def test_help_explains(capsys):
    with pytest.raises(SystemExit) as e:
        main(["boot", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("--two-phase", "--backend", "--require-network", "--expect-pattern", "Exits 0 only", "--success",
                 "systemd-target", "login | systemd-target | agent"):
        assert word in out
