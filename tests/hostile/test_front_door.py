"""Hostile disk images: crafted with qemu-img, each one names a host file, device or protocol.

Every attack of issue 14 (and its class, OpenStack CVE-2022-47951 / CVE-2024-32498) is built here
with the real qemu-img, shown to be real (plain ``qemu-img convert`` copies the host file's bytes
into its output), and then refused by h2k's front door with one line naming the image and the
reason, exit 3, before any qemu-img, libguestfs or QEMU process opens it. Every command that takes
an image is walked with such an image, with tripwires on the libguestfs launch and the QEMU spawn.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from h2k import cli
from h2k.errors import InputError
from h2k.image import open_image

SECRET = b"HOST-SECRET-" * 4096  # 48 KiB, a whole number of sectors
MIB = 1 << 20


def qimg(*args: str, cwd: Path | None = None) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, cwd=cwd)


def flat_vmdk(d: Path, extent: str, extra: str = "", sectors: int = len(SECRET) // 512) -> Path:
    desc = d / "disk.vmdk"
    desc.write_text("# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
                    f'createType="monolithicFlat"\n{extra}\n# Extent description\n'
                    f'RW {sectors} FLAT "{extent}" 0\n\nddb.adapterType = "lsilogic"\n')
    return desc


def unrecord_backing_format(path: Path) -> None:
    """Rename the qcow2 backing-format header extension to an unknown (ignored) type."""
    data = bytearray(path.read_bytes())
    at = data.index(bytes.fromhex("e2792aca"), 0, 4096)
    data[at:at + 4] = bytes.fromhex("4a4b4c4d")
    path.write_bytes(bytes(data))


def build_attacks(root: Path) -> dict[str, tuple[Path, str]]:
    """{attack: (image, what the refusal must say)}; each image sits in root/<attack>/a/b/."""
    (root / "secret.raw").write_bytes(SECRET)
    secret = root / "secret.raw"
    out: dict[str, tuple[Path, str]] = {}

    def case(name: str) -> Path:
        d = root / name / "a" / "b"
        d.mkdir(parents=True)
        return d

    d = case("vmdk-extent-dotdot")
    out["vmdk-extent-dotdot"] = (flat_vmdk(d, "../../../secret.raw"), "outside the image's folder")
    d = case("vmdk-extent-symlink")
    (d / "disk-flat.vmdk").symlink_to(secret)
    out["vmdk-extent-symlink"] = (flat_vmdk(d, "disk-flat.vmdk"), "outside the image's folder")
    d = case("vmdk-parent-dotdot")
    (d / "disk-flat.vmdk").write_bytes(bytes(len(SECRET)))
    out["vmdk-parent-dotdot"] = (flat_vmdk(d, "disk-flat.vmdk", 'parentFileNameHint="../../../secret.raw"'),
                                 "outside the image's folder")
    d = case("vmdk-parent-in-a-comment")  # QEMU finds the hint anywhere in the text, comments included
    (d / "disk-flat.vmdk").write_bytes(bytes(len(SECRET)))
    out["vmdk-parent-in-a-comment"] = (flat_vmdk(d, "disk-flat.vmdk", '# parentFileNameHint="/etc/passwd"'),
                                       "outside the image's folder")

    d = case("qcow2-data-file")
    # (qemu-img create makes the data file relative to its working directory)
    qimg("create", "-f", "qcow2", "-o", "data_file=../../../secret-data.raw,data_file_raw=on,preallocation=metadata",
         "disk.qcow2", "48K", cwd=d)
    (root / "secret-data.raw").write_bytes(SECRET)  # the "host file" the data file names
    out["qcow2-data-file"] = (d / "disk.qcow2", "external data file")
    d = case("qcow2-data-file-beside")  # an external data file is refused wherever it is
    qimg("create", "-f", "qcow2", "-o", "data_file=data.raw", "disk.qcow2", "1M", cwd=d)
    out["qcow2-data-file-beside"] = (d / "disk.qcow2", "external data file")

    def backed(name: str, backing: str, fmt: str = "raw", expect: str = "outside the image's folder") -> Path:
        dd = case(name)
        qimg("create", "-f", "qcow2", "-u", "-F", fmt, "-b", backing, str(dd / "disk.qcow2"), "48K")
        out[name] = (dd / "disk.qcow2", expect)
        return dd

    backed("qcow2-backing-json", "json:" + json.dumps({"driver": "raw", "file": {"driver": "file",
                                                                                   "filename": str(secret)}}),
           expect="json: specification")
    backed("qcow2-backing-host-device", 'json:{"driver":"host_device","filename":"/dev/sda"}',
           expect="json: specification")
    backed("qcow2-backing-dotdot", "../../../secret.raw")
    backed("qcow2-backing-absolute", str(secret))
    backed("qcow2-backing-nbd", "nbd://127.0.0.1:10809/export", expect="names a QEMU protocol (nbd:)")
    backed("qcow2-backing-file-protocol", "file:../../../secret.raw", expect="names a QEMU protocol (file:)")
    dd = backed("qcow2-backing-symlink", "base.raw")
    (dd / "base.raw").symlink_to(secret)
    dd = backed("qcow2-backing-device-link", "dev.raw")
    (dd / "dev.raw").symlink_to("/dev/zero")
    dd = backed("qcow2-backing-fifo", "pipe.raw", expect="not a regular file")  # qemu-img would block on it
    os.mkfifo(dd / "pipe.raw")
    dd = backed("qcow2-backing-format-guessed", "base.raw", expect="no recorded format and looks like raw")
    (dd / "base.raw").write_bytes(SECRET)
    unrecord_backing_format(dd / "disk.qcow2")
    dd = case("qcow2-chain-loop")
    qimg("create", "-f", "qcow2", "-u", "-F", "qcow2", "-b", "b.qcow2", str(dd / "a.qcow2"), "1M")
    qimg("create", "-f", "qcow2", "-u", "-F", "qcow2", "-b", "a.qcow2", str(dd / "b.qcow2"), "1M")
    out["qcow2-chain-loop"] = (dd / "a.qcow2", "loops back")

    d = case("raw-that-qemu-probes-as-vmdk")
    (d / "disk.img").write_bytes(b"version=1\n" + bytes(1014))
    out["raw-that-qemu-probes-as-vmdk"] = (d / "disk.img", "not a VMDK descriptor")
    for fmt, expect in (("qed", "unsupported image format (qed)"), ("vdi", "unsupported image format (vdi)"),
                        ("qcow", "qcow version 1")):
        d = case(f"format-{fmt}")
        qimg("create", "-f", fmt, str(d / f"disk.{fmt}"), "1M")
        out[f"format-{fmt}"] = (d / f"disk.{fmt}", expect)
    d = case("top-is-a-device-link")
    (d / "disk.raw").symlink_to("/dev/zero")
    out["top-is-a-device-link"] = (d / "disk.raw", "not a regular file")
    return out


@pytest.fixture(scope="module")
def attacks(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    return build_attacks(tmp_path_factory.mktemp("hostile"))


ATTACKS = ["vmdk-extent-dotdot", "vmdk-extent-symlink", "vmdk-parent-dotdot", "vmdk-parent-in-a-comment",
           "qcow2-data-file", "qcow2-data-file-beside", "qcow2-backing-json", "qcow2-backing-host-device",
           "qcow2-backing-dotdot", "qcow2-backing-absolute", "qcow2-backing-nbd", "qcow2-backing-file-protocol",
           "qcow2-backing-symlink", "qcow2-backing-device-link", "qcow2-backing-fifo", "qcow2-backing-format-guessed",
           "qcow2-chain-loop", "raw-that-qemu-probes-as-vmdk", "format-qed", "format-vdi", "format-qcow",
           "top-is-a-device-link"]


def test_the_attacks_are_real(attacks, tmp_path):
    # Oracle: qemu-img itself, as h2k used to call it, copies the host file into its output.
    for name, fmt in (("vmdk-extent-dotdot", "vmdk"), ("vmdk-extent-symlink", "vmdk"), ("qcow2-data-file", "qcow2"),
                      ("qcow2-backing-json", "qcow2"), ("qcow2-backing-dotdot", "qcow2")):
        image, _ = attacks[name]
        out = tmp_path / f"{name}.raw"
        qimg("convert", "-f", fmt, "-O", "raw", str(image), str(out), cwd=image.parent)  # (data files: relative to it)
        assert SECRET[:4096] in out.read_bytes(), name
    assert sorted(attacks) == sorted(ATTACKS)


@pytest.mark.parametrize("attack", ATTACKS)
def test_the_front_door_refuses(attacks, attack):
    image, reason = attacks[attack]
    with pytest.raises(InputError) as err:
        open_image(image)
    msg = str(err.value)
    assert msg.startswith(str(image)) and reason in msg and "\n" not in msg, msg


@pytest.mark.parametrize("attack", ATTACKS)
def test_convert_refuses_and_writes_nothing(attacks, attack, tmp_path, capsys):
    image, reason = attacks[attack]
    out = tmp_path / "out"
    out.mkdir()
    rc = cli.main(["convert", str(image), "-o", str(out / "x.qcow2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3 and len(err) == 1 and err[0].startswith(f"h2k: error: {image}") and reason in err[0], err
    assert os.listdir(out) == []


@pytest.fixture
def tripwires(monkeypatch):
    """Nothing may launch an appliance or a VM for a refused image."""
    import guestfs

    from lab import backend_qemu

    def tripped(*a, **k):
        raise AssertionError("a libguestfs appliance or a QEMU was started for a refused image")

    monkeypatch.setattr(guestfs.GuestFS, "launch", tripped)
    monkeypatch.setattr(backend_qemu, "spawn", tripped)


def _commands(image: Path, tmp: Path) -> dict[str, list[str]]:
    matrix = tmp / "m.yaml"
    matrix.write_text(f"name: hostile\nimages:\n  - {{name: evil, kind: linux, path: '{image}'}}\n"
                      "firmware: [bios]\nbus: [virtio-blk]\nnic: [virtio-net]\nboot_mode: [direct]\n")
    return {
        "inspect": ["inspect", str(image)],
        "plan": ["plan", str(image), "--drivers", str(tmp / "pack"), "--bus", "virtio-blk"],
        "fix": ["fix", str(image), "--bus", "virtio-blk", "-o", str(tmp / "out.qcow2")],
        "fix-in-place": ["fix", str(image), "--bus", "virtio-blk", "--in-place"],
        "verify": ["verify", str(image), "--bus", "virtio-blk"],
        "rollback": ["rollback", str(image)],
        "domain": ["domain", str(image), "--os", "linux", "--firmware", "bios", "--no-validate"],
        "convert": ["convert", str(image), "-o", str(tmp / "out.qcow2")],
        "boot": ["boot", str(image), "--os", "linux", "--timeout", "60", "--outdir", str(tmp / "boot")],
        "linux-inspect": ["linux", "inspect", str(image)],
        "linux-fix": ["linux", "fix", str(image), "-o", str(tmp / "out.qcow2")],
        "linux-verify": ["linux", "verify", str(image)],
        "linux-rollback": ["linux", "rollback", str(image)],
        "matrix-run": ["matrix", "run", str(matrix), "-o", str(tmp / "results")],
    }


COMMANDS = ["inspect", "plan", "fix", "fix-in-place", "verify", "rollback", "domain", "convert", "boot",
            "linux-inspect", "linux-fix", "linux-verify", "linux-rollback", "matrix-run"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("attack", ["qcow2-backing-host-device", "vmdk-extent-dotdot"])
def test_every_command_refuses_before_any_launch(attacks, attack, command, tmp_path, capsys, tripwires):
    image, reason = attacks[attack]
    commands = _commands(image, tmp_path)
    assert sorted(commands) == sorted(COMMANDS)
    argv = commands[command]
    rc = cli.main(argv)
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("h2k: ")]
    errors = [ln for ln in err if ln.startswith("h2k: error:")]
    assert rc == 3 and len(errors) == 1 and str(image) in errors[0] and reason in errors[0], err
    for name in ("out.qcow2", "boot", "results"):
        assert not (tmp_path / name).exists(), name


def test_the_lab_and_the_plugin_refuse(attacks, tmp_path, tripwires):
    from lab import tinyguest
    from lab.boot import boot, boot_two_phase

    image, reason = attacks["qcow2-backing-json"]
    prof = tinyguest.disk_profile("bios")
    for call in (lambda: boot(image, prof, timeout=60, outdir=tmp_path / "a"),
                 lambda: boot_two_phase(image, prof, prof, timeout=60, outdir=tmp_path / "b")):
        with pytest.raises(InputError, match=reason):
            call()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    image, reason = attacks["vmdk-extent-symlink"]
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q",
                        "--image", str(image)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 4 and f"--image {image}: {image}: extent file" in p.stderr and reason in p.stderr, p.stderr


def test_metadata_may_not_name_a_disk_elsewhere(tmp_path, capsys):
    # A VMX or a cloud sidecar is metadata too: the disks it names must live beside it.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "evil-flat.vmdk").write_bytes(SECRET)
    flat_vmdk(outside, "evil-flat.vmdk").rename(outside / "evil.vmdk")
    vm = tmp_path / "vm"
    vm.mkdir()
    (vm / "web.vmx").write_text('scsi0.present = "TRUE"\nscsi0:0.present = "TRUE"\n'
                                'scsi0:0.fileName = "../outside/evil.vmdk"\n')
    (vm / "web.json").write_text(json.dumps({"disks": [str(outside / "evil.vmdk")]}))
    for meta in ("web.vmx", "web.json"):
        assert cli.main(["convert", str(vm / meta), "-o", str(tmp_path / "x.qcow2")]) == 3
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "outside" in err[0] and "metadata may only name disks beside it" in err[0], err
    assert not (tmp_path / "x.qcow2").exists()


def test_a_chain_inside_its_folder_still_opens(tmp_path):
    # The refusals do not cost the legitimate cases: a relative chain with recorded formats, and an
    # old overlay without a recorded format whose base is unambiguous (qcow2 by its magic).
    qimg("create", "-f", "qcow2", str(tmp_path / "base.qcow2"), "1M")
    qimg("create", "-f", "qcow2", "-F", "qcow2", "-b", "base.qcow2", str(tmp_path / "mid.qcow2"))
    qimg("create", "-f", "qcow2", "-F", "qcow2", "-b", "mid.qcow2", str(tmp_path / "top.qcow2"))
    unrecord_backing_format(tmp_path / "top.qcow2")
    disk = open_image(tmp_path / "top.qcow2")
    assert [Path(layer.path).name for layer in disk.layers] == ["top.qcow2", "mid.qcow2", "base.qcow2"]
    assert [layer.format for layer in disk.layers] == ["qcow2"] * 3 and disk.virtual_size == MIB
    # The typed result round-trips to a child process and stands in for its path.
    assert type(disk).from_dict(json.loads(json.dumps(disk.to_dict()))) == disk
    assert os.fspath(disk) == str(tmp_path / "top.qcow2")
