"""SIGTERM and Ctrl-C leave no temporary file and no child process: real commands, real signals.

* ``h2k convert`` of a disk and of an OVA, stopped while the real ``qemu-img
  convert`` writes the ``.h2k-part`` file (qemu-img is slowed down with its own
  ``-r`` rate limit by a wrapper on the PATH, so the window is seconds wide;
  the test waits for the part file and the child to exist, no fixed sleep):
  no part file, no unpacked OVA, no qemu-img left, and exit 143 / 130.
* ``h2k fix -o`` on a test-bed Windows disk, Ctrl-C (SIGINT to h2k's process
  group, as a terminal sends it) while the libguestfs appliance runs: the
  appliance is in its own process group (the signal does not reach it), h2k
  stops between two calls, closes the handle and removes its temporary overlay;
  no output, no appliance left, exit 130.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from lab.testbed import virtio_win, windisk

ROOT = Path(__file__).resolve().parents[2]
OVF = (ROOT / "tests" / "data" / "inputs" / "win2019.ovf").read_text()
H2K = [sys.executable, "-m", "h2k"]


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every descendant of ``pid``."""
    parents: dict[int, int] = {}
    cmds: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmds[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for child, parent in parents.items():
            if parent == p:
                out.append((child, cmds.get(child, "")))
                todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
    return " Z " not in stat  # a zombie is dead


def _wait_for(what: str, cond, proc: subprocess.Popen, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert proc.poll() is None, f"h2k ended (exit {proc.returncode}) before {what}: {proc.stderr.read()}"
        assert time.monotonic() < deadline, f"no {what} within {timeout}s"
        time.sleep(0.02)


@pytest.fixture()
def slow_qemu_img(tmp_path) -> dict[str, str]:
    """The environment for h2k with a qemu-img whose 'convert' is rate-limited to 2 MiB/s (real qemu-img)."""
    real = subprocess.run(["sh", "-c", "command -v qemu-img"], capture_output=True, text=True, check=True).stdout.strip()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "qemu-img"
    wrapper.write_text(f'#!/bin/sh\nif [ "$1" = convert ]; then shift; exec {real} convert -r 2M "$@"; fi\n'
                       f'exec {real} "$@"\n')
    wrapper.chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", H2K_QUIET="0")


def _disk_with_data(path: Path, fmt: str = "qcow2") -> Path:
    """A 64 MiB disk with 24 MiB of data: 12 s of conversion at 2 MiB/s."""
    raw = path.with_suffix(".src.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(raw), "64M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 24M", str(raw)], check=True, capture_output=True)
    if fmt == "qcow2":
        raw.rename(path)
    else:
        subprocess.run(["qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", str(raw), str(path)],
                       check=True)
        raw.unlink()
    return path


def _ova(tmp: Path) -> Path:
    _disk_with_data(tmp / "vm-disk1.vmdk", "vmdk")
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized",
                    str(tmp / "vm-disk2.vmdk"), "16M"], check=True)
    ova = tmp / "vm.ova"
    with tarfile.open(ova, "w", format=tarfile.USTAR_FORMAT) as tar:
        (tmp / "vm.ovf").write_text(OVF)
        for name in ("vm.ovf", "vm-disk1.vmdk", "vm-disk2.vmdk"):
            tar.add(tmp / name, arcname=name)
    for name in ("vm.ovf", "vm-disk1.vmdk", "vm-disk2.vmdk"):
        (tmp / name).unlink()
    return ova


def interrupt(argv: list[str], ready, send, env: dict[str, str] | None = None,
              timeout: float = 600) -> tuple[int, str, list[int]]:
    """Start ``h2k argv`` in its own session, wait until ``ready(proc)`` names its children, ``send(proc)``.

    Returns (exit code, stderr, the children ``ready`` named); h2k is killed if it outlives the test.
    """
    proc = subprocess.Popen(H2K + argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        children = _wait_for("the moment to interrupt", lambda: ready(proc), proc, timeout)
        send(proc)
        err = proc.stderr.read()
        return proc.wait(timeout), err, children
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("kind,sig,to_group", [("disk", signal.SIGTERM, False), ("ova", signal.SIGINT, True)],
                         ids=["disk-SIGTERM", "ova-Ctrl-C"])
def test_convert_stopped_mid_copy_leaves_nothing(tmp_path, slow_qemu_img, kind, sig, to_group) -> None:
    src = _disk_with_data(tmp_path / "big.qcow2") if kind == "disk" else _ova(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def copying(proc):  # the part file exists and qemu-img is writing it (the OVA unpacked beside it)
        if not list(out_dir.glob(".x.qcow2.h2k-part-*")):
            return []
        assert kind == "disk" or list(out_dir.glob(".h2k-input-*")), "the OVA is unpacked next to the output"
        return [p for p, cmd in _children(proc.pid) if "convert" in cmd]

    rc, err, qemu = interrupt(["convert", str(src), "-o", str(out_dir / "x.qcow2")], copying,
                              lambda proc: os.killpg(proc.pid, sig) if to_group else proc.send_signal(sig),
                              env=slow_qemu_img, timeout=120)
    assert rc == 128 + sig, err
    assert "Traceback" not in err and f"h2k: interrupted ({sig.name})" in err, err
    assert list(out_dir.iterdir()) == []  # no part file, no output, no unpacked OVA
    assert not any(_alive(p) for p in qemu), "qemu-img outlived h2k"


@pytest.mark.guestfs
@pytest.mark.xdist_group("win2019-bios")
def test_ctrl_c_during_fix_stops_cleanly_between_steps(tmp_path) -> None:
    src = windisk.build("win2019-bios")
    pack = virtio_win.build_tree()
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def appliance(proc):
        qemu = [p for p, cmd in _children(proc.pid) if "qemu-system" in cmd and ".x.qcow2.h2k-tmp-" in cmd]
        assert all(os.getpgid(p) != proc.pid for p in qemu), "the appliance shares h2k's process group"
        return qemu

    rc, err, qemu = interrupt(["fix", str(src), "-o", str(out_dir / "x.qcow2"), "--drivers", str(pack),
                               "--bus", "virtio-blk"], appliance,
                              lambda proc: os.killpg(proc.pid, signal.SIGINT))  # what a terminal does on Ctrl-C
    assert rc == 130, err
    assert "Traceback" not in err and "h2k: interrupted (SIGINT)" in err, err
    assert list(out_dir.iterdir()) == []  # no temporary overlay, no output
    assert not any(_alive(p) for p in qemu), "the appliance outlived h2k"
