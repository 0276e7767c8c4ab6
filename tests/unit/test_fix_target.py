"""Where a fix writes (``overlay.fix_target``), shared by the Windows engine and the Linux pipeline:
real qemu-img overlays and copies, no guest needed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from h2k import overlay
from h2k.errors import InputError


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    return path


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if "h2k-tmp" in p.name)


def test_default_is_an_overlay_renamed_into_place(image):
    before = overlay.sha256_file(image)
    with overlay.fix_target(image, None, False) as t:
        assert t.work != t.final and t.work.exists() and not t.final.exists()
    assert t.final == image.with_name("disk.qcow2.h2k.qcow2") and t.final.exists()
    info = subprocess.run(["qemu-img", "info", "--output=json", str(t.final)], capture_output=True, text=True).stdout
    assert str(image.resolve()) in info  # an overlay over the source
    assert overlay.sha256_file(image) == before and not _leftovers(image.parent)


def test_output_is_a_standalone_copy(image, tmp_path):
    out = tmp_path / "fixed.qcow2"
    with overlay.fix_target(image, out, False) as t:
        pass
    assert t.final == out and out.exists()
    info = subprocess.run(["qemu-img", "info", "--output=json", str(out)], capture_output=True, text=True).stdout
    assert "backing-filename" not in info and not _leftovers(tmp_path)


def test_failure_leaves_nothing(image, tmp_path):
    out = tmp_path / "fixed.qcow2"
    with pytest.raises(RuntimeError):
        with overlay.fix_target(image, out, False):
            raise RuntimeError("refused")
    assert not out.exists() and not _leftovers(tmp_path)


def test_in_place_and_refusals(image, tmp_path):
    with overlay.fix_target(image, None, True) as t:
        assert t.work == t.final == image
    with pytest.raises(InputError, match="exclude each other"):
        with overlay.fix_target(image, tmp_path / "x.qcow2", True):
            pass
    with pytest.raises(InputError, match="already exists"):  # -o onto the source itself
        with overlay.fix_target(image, image, False):
            pass
    (tmp_path / "taken.qcow2").write_bytes(b"")
    with pytest.raises(InputError, match="already exists"):
        with overlay.fix_target(image, tmp_path / "taken.qcow2", False):
            pass
    with pytest.raises(InputError):
        with overlay.fix_target(tmp_path / "missing.qcow2", None, False):
            pass
