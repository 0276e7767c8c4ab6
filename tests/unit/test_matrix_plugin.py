"""The pytest plugin: inert without --image; with it, one item per cell (collection only here).

Real boots through the plugin are in tests/integration/test_matrix_run_pytest.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from matrix.pytest_plugin import disk_firmware


def disk(tmp_path: Path, label: str) -> Path:
    raw = tmp_path / f"{label}.raw"
    with open(raw, "wb") as fh:
        fh.truncate(8 * 1024 * 1024)
    subprocess.run(["sfdisk", "--quiet", str(raw)], input=f"label: {label}\n,,L\n", text=True, check=True,
                   capture_output=True)
    out = tmp_path / f"{label}.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(out)], check=True)
    return out


def pytest_in(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def test_firmware_from_the_partition_table(tmp_path):
    assert disk_firmware(disk(tmp_path, "gpt")) == "uefi"
    assert disk_firmware(disk(tmp_path, "dos")) == "bios"


def test_inert_without_image(tmp_path):
    (tmp_path / "test_x.py").write_text("def test_one():\n    assert 1 + 1 == 2\n")
    p = pytest_in(tmp_path, "-q")
    assert p.returncode == 0 and "1 passed" in p.stdout, p.stdout + p.stderr
    h = pytest_in(tmp_path, "--help")
    assert "--image=DISK" in h.stdout and "--drivers=PACK" in h.stdout


def test_collects_one_item_per_cell_and_only_those(tmp_path):
    (tmp_path / "test_x.py").write_text("def test_one():\n    pass\n")
    img = disk(tmp_path, "gpt")
    p = pytest_in(tmp_path, "--collect-only", "-q", "--image", str(img), "--bus", "virtio-blk", "--bus",
                  "virtio-scsi", "--nic", "e1000e")
    assert p.returncode == 0, p.stdout + p.stderr
    lines = [line for line in p.stdout.splitlines() if "::" in line]
    assert lines == ["h2k-matrix::gpt.uefi.virtio-blk.e1000e", "h2k-matrix::gpt.uefi.virtio-scsi.e1000e"]
    assert "1 deselected" in p.stdout
    bad = pytest_in(tmp_path, "--collect-only", "-q", "--image", str(tmp_path / "missing.qcow2"))
    assert bad.returncode != 0 and "--image" in bad.stderr and "no such disk image" in bad.stderr
    win = pytest_in(tmp_path, "--collect-only", "-q", "--image", str(img), "--image-kind", "windows")
    assert win.returncode != 0 and "Windows images need --drivers" in win.stderr


def test_bad_choices_are_usage_errors(tmp_path):
    p = pytest_in(tmp_path, "--collect-only", "--image", "x.qcow2", "--bus", "nvme")
    assert p.returncode == 4 and "invalid choice" in p.stderr


def test_success_and_patterns_reach_the_cells_and_bad_ones_are_usage_errors(tmp_path):
    img = disk(tmp_path, "dos")
    conftest = ("def pytest_collection_finish(session):\n"
                "    for item in session.items:\n"
                "        print('CELL', item.cell.id, item.cell.success, item.cell.patterns)\n")
    (tmp_path / "conftest.py").write_text(conftest)
    p = pytest_in(tmp_path, "--collect-only", "-q", "-s", "--image", str(img), "--success", "agent+login",
                  "--success", "pattern", "--expect-pattern", "Welcome")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "CELL dos.bios.virtio-blk.virtio-net (('agent', 'login'), ('pattern',)) ('Welcome',)" in p.stdout
    for args, words in ((["--success", "agent+bogus"], "unknown evidence 'bogus'"),
                        (["--expect-pattern", "(x"], "not a valid regex"),
                        (["--success", "login", "--expect-pattern", "x"], "no success alternative uses 'pattern'")):
        bad = pytest_in(tmp_path, "--collect-only", "-q", "--image", str(img), *args)
        assert bad.returncode == 4 and words in bad.stderr, bad.stdout + bad.stderr
        assert "Traceback" not in bad.stderr
