"""Killing the lab mid-boot leaves no QEMU and no temporary file behind (real QEMU, real signals)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab import tinyguest

pytestmark = [pytest.mark.boot]


def _processes_mentioning(text: str) -> list[str]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = (Path("/proc") / pid / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd and "qemu-system" in cmd:
            out.append(f"{pid}: {cmd[:120]}")
    return out


def _wait_for(cond, timeout: float, what: str) -> None:
    # Polls a file the child writes: there is no event to await across processes here.
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _start_lab(tmp_path: Path, name: str):
    kernel, _ = tinyguest.host_kernel()
    initrd = tinyguest.initramfs()
    private_tmp = tmp_path / f"tmp-{name}"
    private_tmp.mkdir()
    outdir = tmp_path / f"out-{name}"
    env = {**os.environ, "TMPDIR": str(private_tmp)}
    cmd = [sys.executable, "-m", "h2k", "boot", "--kernel", str(kernel), "--initrd", str(initrd),
           "--append", "console=ttyS0 panic=-1 h2k.mode=hang", "--os", "linux", "--timeout", "300",
           "--outdir", str(outdir), "--memory", "256"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # QEMU is running (its serial.log exists and the QMP log shows it was resumed).
    _wait_for(lambda: (outdir / "qmp.jsonl").exists() and '"cont"' in (outdir / "qmp.jsonl").read_text(),
              120, "QEMU to start")
    assert _processes_mentioning(str(outdir)), "the lab's QEMU is not running"
    assert any(private_tmp.iterdir()), "the boot's private temp dir was not made"
    return proc, private_tmp, outdir


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_boot_leaves_nothing(tmp_path, signum):
    proc, private_tmp, outdir = _start_lab(tmp_path, signum.name)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "interrupted" in err
    assert _processes_mentioning(str(outdir)) == []
    assert list(private_tmp.iterdir()) == [], "temporary files left behind"
    verdict = json.loads((outdir / "verdict.json").read_text())
    assert verdict["verdict"] == "incomplete" and "interrupted" in verdict["reason"]


def test_sigkill_of_the_lab_still_kills_qemu(tmp_path):
    # No cleanup code can run after SIGKILL: PR_SET_PDEATHSIG takes QEMU down with the lab.
    proc, _, outdir = _start_lab(tmp_path, "SIGKILL")
    proc.kill()
    proc.communicate(timeout=30)
    _wait_for(lambda: _processes_mentioning(str(outdir)) == [], 15, "QEMU to die with the lab")


def test_qemu_that_cannot_start_is_incomplete_quickly(tmp_path, monkeypatch):
    import tempfile

    from lab.boot import boot

    private = tmp_path / "tmp"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    profile = tinyguest.kernel_profile("pass", cdroms=[str(tmp_path / "missing.iso")])
    t0 = time.monotonic()
    r = boot(None, profile, timeout=120, outdir=tmp_path / "out")
    assert r.verdict == "incomplete", r.reason
    assert "missing.iso" in r.reason  # the cause from qemu.log, in one line
    assert time.monotonic() - t0 < 30  # QEMU itself takes seconds to start under load
    assert list(private.iterdir()) == []  # the boot's temp dir is gone
