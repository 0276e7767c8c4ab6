"""`pytest --image <test-bed guest>`: the plugin fixes the image once and boots each cell for real.

Runs pytest in a subprocess in an empty directory, with two xdist workers and
--junitxml, on the Linux test bed's BIOS guest:

- with ``--no-fix``, an image that fails to boot (the lab's tiny guest in panic mode: 20 s,
  where the unfixed Debian guest needs 90 s to give up on its root; that boot is in tests/e2e),
  so the run fails with the lab's reason;
- the same guest after ``h2k.linux.fix_image`` (the test bed's cached fixed disk, shared
  with tests/e2e): the plugin's own fix step runs on it (a real launch that finds nothing
  left to do; the fix itself is proven in tests/integration/test_linux_pipeline.py) and
  every cell boots and passes. Fixing the raw guest a second time here would cost minutes
  of TCG for no extra proof.
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
XSD = ROOT / "tests" / "data" / "junit.xsd"

pytestmark = [pytest.mark.guestfs, pytest.mark.boot, pytest.mark.slow, pytest.mark.linux,
              pytest.mark.xdist_group("linux-bios")]  # the fixed BIOS guest of tests/e2e


@pytest.fixture(scope="module")
def panicking_guest():
    from lab import tinyguest

    return tinyguest.disk_image("panic")


@pytest.fixture(scope="module")
def fixed_guest():
    from lab.testbed import linux_guest

    return linux_guest.fixed_disk("bios")[0]


def run_pytest(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=1800)


def props(case: ET.Element) -> dict[str, str]:
    return {p.get("name"): p.get("value") for p in case.iter("property")}


def test_pytest_image_boots_each_cell(fixed_guest, tmp_path):
    guest = fixed_guest
    junit = tmp_path / "junit.xml"
    p = run_pytest(tmp_path, "--image", str(guest), "--bus", "virtio-blk", "--bus", "virtio-scsi",
                   "--boot-timeout", "400", "-n", "2", f"--junitxml={junit}", "--matrix-out", str(tmp_path / "mo"))
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert "2 passed" in p.stdout
    lint = subprocess.run(["xmllint", "--noout", "--schema", str(XSD), str(junit)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stderr
    cases = {c.get("name"): c for c in ET.parse(junit).getroot().iter("testcase")}
    assert sorted(cases) == [f"{guest.name.split('.')[0]}.bios.virtio-blk.virtio-net",
                             f"{guest.name.split('.')[0]}.bios.virtio-scsi.virtio-net"]
    for case in cases.values():
        pr = props(case)
        assert pr["verdict"] == "passed" and pr["proof"] == "real boot"
        assert "H2K-BOOT-OK" in Path(pr["artifact:serial.log"]).read_text(errors="replace")
        # No flags: a Linux image passes on what any Linux shows (here its agent), never on the marker.
        assert pr["evidence"] in ("login", "systemd-target", "agent"), pr
    # prepared (fixed) once for both workers (a file-locked cache), and the fix found the guest ready
    prepared = list((tmp_path / "mo" / "prepared").glob("*/prepared.json"))
    assert len(prepared) == 1
    assert "nothing to do" in prepared[0].read_text()


def test_pytest_image_fails_with_the_verdict(panicking_guest, tmp_path):
    junit = tmp_path / "junit.xml"
    p = run_pytest(tmp_path, "--image", str(panicking_guest), "--no-fix", "--bus", "virtio-blk",
                   "--boot-timeout", "400", f"--junitxml={junit}", "--matrix-out", str(tmp_path / "mo"))
    assert p.returncode == 1, p.stdout[-4000:]
    assert "1 failed" in p.stdout
    # the failure is the lab's verdict, one line, not a traceback
    assert "failed: guest panicked" in p.stdout and "Traceback" not in p.stdout
    [case] = ET.parse(junit).getroot().iter("testcase")
    assert props(case)["verdict"] == "failed" and props(case)["proof"] == "real boot"
    assert "guest panicked" in case.find("failure").get("message", "") + (case.find("failure").text or "")
