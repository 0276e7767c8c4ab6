"""Ctrl-C on a real ``h2k matrix run``: every QEMU stops and the partial report is valid.

Two images of the lab's tiny guest that hangs after boot (so cells are really running
QEMU when the signal comes), two cells at a time, ``--no-fix``. The runner's scheduling
under interruption is also checked in seconds with stand-in executors in
tests/unit/test_matrix_runner.py; this is the same with real guests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from matrix.reports import load_results

ROOT = Path(__file__).resolve().parents[2]
XSD = ROOT / "tests" / "data" / "junit.xsd"

pytestmark = [pytest.mark.boot, pytest.mark.slow]


def _qemus_under(path: Path) -> list[int]:
    """PIDs of QEMU processes whose command line names a file under ``path``."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and b"qemu-system" in cmd[0] and any(str(path).encode() in arg for arg in cmd):
            out.append(int(proc.name))
    return out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_real_matrix_leaves_no_qemu_and_a_valid_report(tmp_path, sig):
    from lab import tinyguest

    disk = tinyguest.disk_image("hang")
    m = tmp_path / "m.yaml"
    m.write_text(textwrap.dedent(f"""
        name: interrupt
        images:
          - {{name: a, kind: linux, path: "{disk}"}}
          - {{name: b, kind: linux, path: "{disk}"}}
        firmware: [bios]
        bus: [virtio-blk, virtio-scsi]
        timeouts: {{default: 600}}
        """))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "h2k", "matrix", "run", str(m), "-o", str(out), "-j", "2",
                             "--no-fix"], cwd=ROOT, env=dict(os.environ, H2K_QUIET="0"),
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while len(_qemus_under(out)) < 2:  # the event: two guests really running
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "two cells never started QEMU"
            time.sleep(0.5)
        proc.send_signal(sig)
        rc = proc.wait(120)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 130, err[-3000:]
    assert f"{sig.name}: stopping" in err
    assert _qemus_under(out) == []
    results = load_results(out / "results.json")
    assert results.interrupted
    assert sorted(r.verdict for r in results.cells) == ["incomplete", "incomplete", "skipped", "skipped"]
    lint = subprocess.run(["xmllint", "--noout", "--schema", str(XSD), str(out / "junit.xml")],
                          capture_output=True, text=True)
    assert lint.returncode == 0, lint.stderr
    assert "Run interrupted" in (out / "summary.md").read_text()
