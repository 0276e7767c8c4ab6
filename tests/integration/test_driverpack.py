"""h2k.driverpack on the fake virtio-win tree, its ISO (real xorriso) and manifests."""

from __future__ import annotations

import json

import pytest

from h2k import driverpack
from h2k.errors import InputError
from lab.testbed import virtio_win

CANDIDATE = "100.96.104.26500"


@pytest.fixture(scope="module")
def tree():
    return virtio_win.build_tree()


@pytest.fixture(scope="module")
def iso():
    return virtio_win.build_iso()


def _first_line(path) -> str:
    return path.read_bytes().split(b"\n", 1)[0].decode()


def test_tree_layout_find(tree):
    pack = driverpack.open_pack(tree)
    assert pack.kind == "directory" and pack.label == "virtio-win-0.1.266"
    f = pack.find("viostor", "2k19", "amd64")
    assert f.inf.name == "viostor.inf" and f.sys.name == "viostor.sys" and f.cat.name == "viostor.cat"
    assert _first_line(f.sys) == f"H2K-FAKE-DRIVER viostor 2k19 amd64 {virtio_win.DEFAULT_VERSION}"
    assert f.version == virtio_win.DEFAULT_VERSION
    assert f.parsed.class_name == "SCSIAdapter"
    assert f.service_name == "viostor"
    assert {p.name for p in f.files} == {"viostor.inf", "viostor.sys", "viostor.cat", "viostor.pdb"}
    # Folder names are matched case-insensitively; file names come from the INF.
    net = pack.find("netkvm", "W11", "arm64")
    assert net.driver == "NetKVM" and net.arch == "ARM64" and net.sys.name == "netkvm.sys"
    assert net.service_name == "netkvm"
    ser = pack.find("vioserial", "w7", "x86")
    assert ser.sys.name == "vioser.sys" and ser.service_name == "VirtioSerial"
    assert pack.guest_agent("amd64").name == "qemu-ga-x86_64.msi"
    assert pack.guest_agent("x86").name == "qemu-ga-i386.msi"
    assert pack.guest_agent("ARM64") is None
    assert len(f.package_hash()) == 16 and f.package_hash() == pack.find("viostor", "2k19", "amd64").package_hash()
    assert f.package_hash() != pack.find("viostor", "2k22", "amd64").package_hash()


def test_tree_missing_driver_is_clear_error(tree):
    pack = driverpack.open_pack(tree)
    assert not pack.has("viorng", "2k25", "amd64")
    with pytest.raises(InputError, match=r"no viorng for 2k25/amd64; it has viorng for: .*2k22/amd64"):
        pack.find("viorng", "2k25", "amd64")
    with pytest.raises(InputError, match="no viostor for 2k19/x86"):
        pack.find("viostor", "2k19", "x86")
    with pytest.raises(InputError, match="no vioinput at all"):
        pack.find("vioinput", "w10", "amd64")


def test_iso_extracts_only_what_is_asked(iso, tmp_path, monkeypatch):
    monkeypatch.setenv("H2K_CACHE_DIR", str(tmp_path))
    pack = driverpack.open_pack(iso)
    assert pack.kind == "iso" and pack.label == "virtio-win-0.1.266"
    assert ("vioscsi", "2k22", "amd64") in pack.available("vioscsi")
    f = pack.find("vioscsi", "2k22", "amd64")
    assert str(f.sys).startswith(str(tmp_path))
    assert _first_line(f.sys) == f"H2K-FAKE-DRIVER vioscsi 2k22 amd64 {virtio_win.DEFAULT_VERSION}"
    assert f.parsed.associated_service.start_type == 0
    extracted = sorted(p.relative_to(tmp_path / "driverpacks").parts[1:] for p in (tmp_path / "driverpacks").rglob("*.sys"))
    assert extracted == [("vioscsi", "2k22", "amd64", "vioscsi.sys")]
    msi = pack.guest_agent("amd64")
    assert msi.read_bytes()[:8] == bytes.fromhex("d0cf11e0a1b11ae1")
    # A second open reuses the extraction (same host paths: plans stay deterministic).
    again = driverpack.open_pack(iso).find("vioscsi", "2k22", "amd64")
    assert again.sys == f.sys
    with pytest.raises(InputError, match="no pvpanic for w7/amd64"):
        pack.find("pvpanic", "w7", "amd64")


def test_manifest_overrides_layout(tree, tmp_path):
    # A "candidate" build of viostor for 2k19 only, everything else from the base tree.
    cand = virtio_win.build_tree(version=CANDIDATE, release="0.1.271")
    manifest = tmp_path / "pack.json"
    manifest.write_text(json.dumps({
        "base": str(tree), "label": "hotfix",
        "drivers": {"viostor": {"2k19": {"amd64": str(cand / "viostor" / "2k19" / "amd64")}}},
    }))
    pack = driverpack.open_pack(manifest)
    assert pack.kind == "manifest" and pack.label == "hotfix"
    assert pack.find("viostor", "2k19", "amd64").version == CANDIDATE
    assert pack.find("viostor", "2k22", "amd64").version == virtio_win.DEFAULT_VERSION
    assert pack.guest_agent("amd64") is not None


def test_yaml_manifest_without_base(tree, tmp_path):
    import shutil

    local = tmp_path / "mine"
    shutil.copytree(tree / "vioscsi" / "2k16" / "amd64", local)
    (tmp_path / "pack.yaml").write_text("drivers:\n  vioscsi:\n    2k16:\n      amd64: mine\n")
    pack = driverpack.open_pack(tmp_path / "pack.yaml")
    assert pack.find("vioscsi", "2k16", "amd64").directory == local.resolve()
    assert pack.guest_agent("amd64") is None
    with pytest.raises(InputError, match="no vioscsi for 2k19/amd64"):
        pack.find("vioscsi", "2k19", "amd64")


@pytest.mark.parametrize("content,match", [
    ("{not json", "not valid JSON"),
    ('{"drivers": {"viostor": {"2k19": {"amd64": "nowhere"}}}}', "is not a directory"),
    ('{"colour": "blue"}', "unknown keys colour"),
    ('{"label": "x"}', "neither a base pack nor any driver"),
])
def test_bad_manifests(tmp_path, content, match):
    m = tmp_path / "bad.json"
    m.write_text(content)
    with pytest.raises(InputError, match=match):
        driverpack.open_pack(m)


def test_bad_pack_paths(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        driverpack.open_pack(tmp_path / "nope")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello")
    with pytest.raises(InputError, match="not a directory, an ISO"):
        driverpack.open_pack(junk)
    fake_iso = tmp_path / "broken.iso"
    fake_iso.write_bytes(b"\0" * 65536)
    with pytest.raises(InputError, match="broken.iso"):
        driverpack.open_pack(fake_iso)


def test_folder_without_sys(tree, tmp_path):
    import shutil

    d = tmp_path / "viostor" / "2k19" / "amd64"
    shutil.copytree(tree / "viostor" / "2k19" / "amd64", d)
    (d / "viostor.sys").unlink()
    with pytest.raises(InputError, match="installs viostor.sys but the file is missing"):
        driverpack.open_pack(tmp_path).find("viostor", "2k19", "amd64")


def test_fake_tree_layout_is_realistic(tree):
    # The real layout: <driver>/<os>/<arch>, storage and network for every release.
    for drv in ("viostor", "vioscsi", "NetKVM"):
        for osf in virtio_win.ALL_OS:
            assert (tree / drv / osf / "amd64").is_dir(), (drv, osf)
    # 32-bit only where Windows had 32-bit editions; ARM64 only for Windows 10/11.
    assert (tree / "viostor/w7/x86").is_dir() and (tree / "viostor/2k8/x86").is_dir()
    assert not (tree / "viostor/2k19/x86").exists() and not (tree / "viostor/w11/x86").exists()
    assert (tree / "viostor/w11/ARM64").is_dir() and not (tree / "viostor/2k22/ARM64").exists()
    # Not every driver exists for every release.
    assert not (tree / "pvpanic/w7").exists() and not (tree / "viorng/2k25").exists()
    assert (tree / "guest-agent/qemu-ga-x86_64.msi").is_file() and (tree / "guest-agent/qemu-ga-i386.msi").is_file()
    # INF text is CRLF ASCII, like the real media.
    raw = (tree / "NetKVM/2k22/amd64/netkvm.inf").read_bytes()
    raw.decode("ascii")
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")


def test_candidate_pack_differs(tree):
    cand = virtio_win.build_iso(virtio_win.CANDIDATE_VERSION, virtio_win.CANDIDATE_RELEASE, virtio_win.CANDIDATE_DATE)
    pack = driverpack.open_pack(cand)
    assert pack.label == f"virtio-win-{virtio_win.CANDIDATE_RELEASE}"
    f = pack.find("viostor", "2k19", "amd64")
    assert f.version == virtio_win.CANDIDATE_VERSION and f.parsed.driver_date == virtio_win.CANDIDATE_DATE
    old = driverpack.open_pack(tree).find("viostor", "2k19", "amd64")
    assert f.sys.read_bytes() != old.sys.read_bytes() and f.package_hash() != old.package_hash()


def test_joliet_only_iso(tree, tmp_path, monkeypatch):
    # Some driver ISOs carry only ISO 9660 + Joliet names (no Rock Ridge).
    import subprocess

    iso = tmp_path / "joliet.iso"
    subprocess.run(["xorriso", "-report_about", "SORRY", "-outdev", str(iso), "-volid", "VIRTIO_JOLIET",
                    "-rockridge", "off", "-joliet", "on",
                    "-map", str(tree / "vioscsi" / "w10"), "/vioscsi/w10"], check=True, capture_output=True)
    monkeypatch.setenv("H2K_CACHE_DIR", str(tmp_path / "cache"))
    pack = driverpack.open_pack(iso)
    assert pack.label == "VIRTIO_JOLIET"
    f = pack.find("vioscsi", "w10", "x86")
    assert f.sys.name == "vioscsi.sys" and f.parsed.class_name == "SCSIAdapter"
    assert _first_line(f.sys).startswith("H2K-FAKE-DRIVER vioscsi w10 x86")
