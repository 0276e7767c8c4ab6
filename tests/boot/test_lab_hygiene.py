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


def test_two_phase_interrupted_between_phases_leaves_no_phase_overlay(tmp_path, monkeypatch):
    """The run's shared overlay (a real qcow2 on the image, qemu-img's word) is what both phases
    get, and it is removed when the run is interrupted after the bootstrap phase. The phases
    themselves are stand-ins: the real two-phase boots are in test_lab_boot.py."""
    import tempfile

    from lab import boot as lab_boot
    from lab.verdict import BootResult

    image = tinyguest.disk_image("pass")
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    disks = []

    def phase(image_arg, profile, *, phase_disk, **kw):
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-U", str(phase_disk.path)],
                                         capture_output=True, text=True, check=True).stdout)
        assert info["format"] == "qcow2" and Path(info["backing-filename"]) == image.resolve()
        disks.append(phase_disk.path)
        if profile.stage == "bootstrap":
            return BootResult("passed", "stand-in bootstrap phase", profile=profile.to_dict())
        raise KeyboardInterrupt  # Ctrl-C (or SIGTERM, through interrupt_guard) in the final phase

    monkeypatch.setattr(lab_boot, "_boot", phase)
    first = tinyguest.disk_profile("bios", disk_bus="sata", stage="bootstrap")
    with pytest.raises(KeyboardInterrupt):
        lab_boot.boot_two_phase(image, first, tinyguest.disk_profile("bios"), timeout=60, outdir=tmp_path / "out")
    assert len(disks) == 2 and disks[0] == disks[1] and disks[0].parent.parent == private_tmp
    assert list(private_tmp.iterdir()) == []  # the overlay and its temp dir are gone
