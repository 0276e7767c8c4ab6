"""OVA extraction refuses malicious archives before writing anything, and checks the manifest."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from h2k.errors import InputError
from h2k.inputs import ovf

OVF = (Path(__file__).parents[1] / "data" / "inputs" / "win2019.ovf").read_text()

DISK1, DISK2 = b"disk-one" * 64, b"disk-two" * 64


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", **kw) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in kw.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if data else None)


def make_ova(path: Path, extra=(), manifest: bool = True, bad_digest: bool = False, ovf_text: str = OVF) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        _add(tar, "vm.ovf", ovf_text.encode())
        if manifest:
            d1 = hashlib.sha256(b"tampered" if bad_digest else DISK1).hexdigest()
            mf = f"SHA256(vm-disk1.vmdk)= {d1}\nSHA256(vm-disk2.vmdk)= {hashlib.sha256(DISK2).hexdigest()}\n"
            _add(tar, "vm.mf", mf.encode())
        _add(tar, "vm-disk1.vmdk", DISK1)
        _add(tar, "vm-disk2.vmdk", DISK2)
        for name, data, kw in extra:
            _add(tar, name, data, **kw)
    return path


def test_good_ova(tmp_path: Path) -> None:
    ova = make_ova(tmp_path / "vm.ova")
    dest = tmp_path / "out" / "x"
    pkg = ovf.extract_ova(ova, dest)
    assert [Path(d).name for d in pkg.disks] == ["vm-disk1.vmdk", "vm-disk2.vmdk"]
    assert Path(pkg.disks[0]).read_bytes() == DISK1 and pkg.manifest == "vm.mf"
    assert sorted(os.listdir(dest)) == ["vm-disk1.vmdk", "vm-disk2.vmdk"]
    assert pkg.machine.firmware == "uefi" and pkg.machine.macs == ["00:50:56:aa:bb:cc", "00:50:56:aa:bb:cd"]
    assert ovf.read_ova_descriptor(ova).disk_files == ["vm-disk1.vmdk", "vm-disk2.vmdk"]


MALICIOUS = {
    "absolute": ([("/tmp/h2k-evil", b"x", {})], "absolute path"),
    "traversal": ([("../../h2k-evil", b"x", {})], "path traversal"),
    "nested-traversal": ([("a/../../h2k-evil", b"x", {})], "path traversal"),
    "symlink": ([("link.vmdk", b"", {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"})], "is a link"),
    "hardlink": ([("hard.vmdk", b"", {"type": tarfile.LNKTYPE, "linkname": "vm.ovf"})], "is a link"),
    "device": ([("dev", b"", {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3})], "not a regular file"),
    "fifo": ([("fifo", b"", {"type": tarfile.FIFOTYPE})], "not a regular file"),
    "duplicate": ([("vm-disk1.vmdk", b"other", {})], "twice"),
    "backslash": ([("..\\..\\evil", b"x", {})], "backslash"),
    "two-ovf": ([("other.ovf", b"<x/>", {})], "exactly one .ovf"),
}


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_malicious_ova_refused(tmp_path: Path, case: str) -> None:
    extra, msg = MALICIOUS[case]
    ova = make_ova(tmp_path / "vm.ova", extra)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(InputError, match=msg):
        ovf.extract_ova(ova, work / "x")
    assert os.listdir(work) == []  # nothing written, not even the directory
    assert not Path("/tmp/h2k-evil").exists()


def test_ova_disk_missing_and_manifest_mismatch(tmp_path: Path) -> None:
    ova = make_ova(tmp_path / "a.ova", ovf_text=OVF.replace("vm-disk2.vmdk", "ghost.vmdk"), manifest=False)
    with pytest.raises(InputError, match="not in the archive"):
        ovf.extract_ova(ova, tmp_path / "a")
    ova = make_ova(tmp_path / "b.ova", bad_digest=True)
    with pytest.raises(InputError, match="does not match the manifest"):
        ovf.extract_ova(ova, tmp_path / "b")
    assert not (tmp_path / "b").exists()  # the half-extracted directory is gone


def test_ova_href_traversal_in_descriptor(tmp_path: Path) -> None:
    ova = make_ova(tmp_path / "c.ova", ovf_text=OVF.replace('ovf:href="vm-disk1.vmdk"', 'ovf:href="../vm-disk1.vmdk"'))
    with pytest.raises(InputError, match="path traversal"):
        ovf.extract_ova(ova, tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_not_a_tar(tmp_path: Path) -> None:
    bad = tmp_path / "x.ova"
    bad.write_bytes(b"\x1f\x8b" + b"\0" * 600)
    with pytest.raises(InputError, match="not a readable OVA"):
        ovf.extract_ova(bad, tmp_path / "x")
