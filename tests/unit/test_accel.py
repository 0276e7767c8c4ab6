"""The KVM/TCG decision: overrides, caching, and the probe guest itself."""

from __future__ import annotations

import os
import select
import subprocess
import time

import pytest

from h2k import accel, cpio
from h2k.errors import InputError


def test_env_override_wins(monkeypatch):
    monkeypatch.setattr(accel, "_decided", None)  # restored after the test
    monkeypatch.setenv("H2K_ACCEL", "tcg")
    d = accel.decide(refresh=True, announce=False)
    assert (d.accel, d.source) == ("tcg", "env")
    assert d.libguestfs_env()["LIBGUESTFS_BACKEND_SETTINGS"] == "force_tcg"
    assert "tcg" in " ".join(d.qemu_args())
    monkeypatch.setenv("H2K_ACCEL", "kvm")
    d = accel.decide(refresh=True, announce=False)
    assert d.is_kvm and "LIBGUESTFS_BACKEND_SETTINGS" not in d.libguestfs_env()
    assert d.libvirt_domain_type() == "kvm"
    monkeypatch.setenv("H2K_ACCEL", "fast")
    with pytest.raises(InputError, match="H2K_ACCEL"):
        accel.decide(refresh=True, announce=False)


def test_decision_is_cached_per_host(tmp_path, monkeypatch):
    monkeypatch.setattr(accel, "_decided", None)
    monkeypatch.delenv("H2K_ACCEL", raising=False)
    # The fake probe's answer must land in this private cache only, never the host's.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(accel, "run_probe", lambda timeout: calls.append(timeout) or (False, "no kvm here"))
    first = accel.decide(refresh=True, announce=False)
    monkeypatch.setattr(accel, "_decided", None)  # a new process: memo gone, disk cache kept
    second = accel.decide(announce=False)
    if first.source == "probe":  # a host key could be computed: second must come from the cache
        assert len(calls) == 1 and second.source == "cache"
        assert second.accel == first.accel == "tcg" and "falling back to TCG" in first.reason


def test_cpio_newc_layout():
    raw = cpio.archive([cpio.directory("bin"), cpio.file("init", b"abc", 0o755)], compress=False)
    assert raw.startswith(b"070701")
    assert b"TRAILER!!!\0" in raw
    assert len(raw) % 4 == 0
    assert b"init\0" in raw and b"abc" in raw


@pytest.mark.boot
def test_probe_guest_reaches_marker_under_tcg(tmp_path):
    """The probe guest is a real boot: under TCG (always available) it must print its marker."""
    kernel, busybox = accel._probe_kernel(), accel._busybox()
    if not kernel or not busybox:
        pytest.fail("host kernel or busybox-static missing: the Makefile installs both")
    initrd = tmp_path / "probe.cpio.gz"
    initrd.write_bytes(accel.probe_initramfs(busybox))
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-nodefaults", "-display", "none",
         "-no-reboot", "-kernel", kernel, "-initrd", str(initrd),
         "-append", "console=ttyS0 quiet panic=-1", "-serial", "stdio"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    seen, start = b"", time.monotonic()
    try:
        while time.monotonic() - start < 120 and accel.PROBE_MARKER not in seen:
            if select.select([proc.stdout], [], [], 1)[0]:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                seen += chunk
    finally:
        proc.kill()
        proc.wait()
    assert accel.PROBE_MARKER in seen
