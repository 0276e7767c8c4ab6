"""Pure logic of the Linux pipeline (no disk): the initramfs reader, table parsing, plan and rules.

The same code is exercised on real Debian guests in test_linux_pipeline.py; these
tests pin the edge cases (concatenated archives, compressions, odd fstab lines).
"""

from __future__ import annotations

import lzma
import shutil
import subprocess

import pytest

from h2k import cpio
from h2k.errors import InputError
from h2k.linux import initrd
from h2k.linux.facts import Kernel, LinuxFacts, PinnedMac
from h2k.linux.fix import keep_modules, needs_grub, needs_initramfs, plan
from h2k.linux.inspect import grub_default_disables_uuid, grub_roots, installed_deb_packages, parse_table
from h2k.linux.verify import rules

MODS = "usr/lib/modules/6.1.0-50-amd64/kernel"


def _main_archive(compress: bool) -> bytes:
    return cpio.archive(
        [
            cpio.directory("usr"),
            cpio.file(f"{MODS}/drivers/ata/ahci.ko", b"\x7fELF"),
            cpio.file(f"{MODS}/drivers/block/virtio_blk.ko.zst", b"x"),
            cpio.file(f"{MODS}/drivers/misc/pvpanic/pvpanic-pci.ko", b"x"),
            cpio.file("init", b"#!/bin/sh\n"),
        ],
        compress=compress,
    )


def test_reads_gzip_archive_behind_an_uncompressed_early_archive():
    early = cpio.archive([cpio.file("kernel/x86/microcode/GenuineIntel.bin", b"ucode")], compress=False)
    mods = initrd.modules(early + b"\0" * 512 + _main_archive(compress=True))
    assert mods.keys() == {"ahci", "virtio_blk", "pvpanic_pci"}
    assert "init" in initrd.list_files(early + _main_archive(compress=True))


def test_reads_xz_and_zstd():
    plain = _main_archive(compress=False)
    assert "ahci" in initrd.modules(lzma.compress(plain, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32))
    if shutil.which("zstd") is None:
        pytest.skip("zstd not installed")
    z = subprocess.run(["zstd", "-q", "-c"], input=plain, capture_output=True, check=True).stdout
    assert set(initrd.modules(z)) == {"ahci", "virtio_blk", "pvpanic_pci"}


def test_garbage_is_a_one_line_error():
    with pytest.raises(Exception, match="unknown compression|bad cpio"):
        initrd.modules(b"this is not an initramfs at all")


def test_fstab_and_crypttab_parsing():
    fstab = "# c\n/dev/sda1 / ext4 errors=remount-ro 0 1\nUUID=abc /home ext4 defaults 0 2\n/dev/vdb2 none swap sw 0 0\n\n"
    entries = parse_table(fstab, "/etc/fstab")
    assert [(e.spec, e.target, e.by_device_name) for e in entries] == [
        ("/dev/sda1", "/", True), ("UUID=abc", "/home", False), ("/dev/vdb2", "none", True)]
    assert entries[2].line_no == 4
    crypt = parse_table("cryptroot /dev/hda3 none luks\n", "/etc/crypttab")
    assert (crypt[0].spec, crypt[0].target, crypt[0].by_device_name) == ("/dev/hda3", "cryptroot", True)
    assert not parse_table("/dev/mapper/vg-root / ext4 defaults 0 1\n", "/etc/fstab")[0].by_device_name


def test_grub_cfg_roots_and_default():
    cfg = "menuentry 'Debian' {\n\tlinux\t/boot/vmlinuz-6.1 root=/dev/sda1 ro console=ttyS0\n}\n" \
          "menuentry 'x' {\n  linuxefi /vmlinuz root=UUID=1234 ro\n}\n"
    assert grub_roots(cfg) == ["/dev/sda1", "UUID=1234"]
    assert grub_default_disables_uuid("GRUB_DISABLE_LINUX_UUID=true\n")
    assert not grub_default_disables_uuid("#GRUB_DISABLE_LINUX_UUID=true\n")
    assert not grub_default_disables_uuid("GRUB_DISABLE_LINUX_UUID=true\nGRUB_DISABLE_LINUX_UUID=false\n")


def test_dpkg_status_parsing():
    status = ("Package: open-vm-tools\nStatus: install ok installed\n\n"
              "Package: foo\nStatus: deinstall ok config-files\n\nPackage: bar\nStatus: install ok installed\n")
    assert installed_deb_packages(status) == {"open-vm-tools", "bar"}


def _facts(**kw) -> LinuxFacts:
    base = dict(image="x", root_device="/dev/sda1", distro="debian", product="Debian 12", version="12.0",
                arch="x86_64", package_format="deb", firmware="bios")
    base.update(kw)
    return LinuxFacts(**base)


def test_plan_and_rules_on_a_vmware_guest_and_a_fixed_one():
    bad_kernel = Kernel("6.1", "/boot/vmlinuz-6.1", "/boot/initrd.img-6.1", ["ahci", "sd_mod", "ext4"])
    facts = _facts(kernels=[bad_kernel], fstab=parse_table("/dev/sda1 / ext4 defaults 0 1\n", "/etc/fstab"),
                   grub_cfg="/boot/grub/grub.cfg", grub_roots=["/dev/sda1"], grub_disable_linux_uuid=True,
                   pinned_macs=[PinnedMac("/etc/udev/rules.d/70-persistent-net.rules", "udev-rule", "00:50:56:00:00:01")],
                   vmware_tools=["package:open-vm-tools"])
    steps = plan(facts)
    assert len(steps) == 5 and needs_initramfs(facts) == ["6.1"] and needs_grub(facts)
    failed = {r.rule for r in rules(facts, "virtio-blk") if r.status == "FAIL"}
    assert failed == {"initramfs-virtio", "fstab-uuid", "grub-root-uuid", "nic-not-pinned"}

    good_kernel = Kernel("6.1", "/boot/vmlinuz-6.1", "/boot/initrd.img-6.1",
                         ["ahci", "sd_mod", "ext4", "virtio_pci", "virtio_blk", "virtio_scsi", "virtio_net"])
    fixed = _facts(kernels=[good_kernel], fstab=parse_table("UUID=1 / ext4 defaults 0 1\n", "/etc/fstab"),
                   grub_cfg="/boot/grub/grub.cfg", grub_roots=["UUID=1"])
    assert plan(fixed) == []
    assert all(r.passed for r in rules(fixed, "virtio-scsi"))


def test_builtin_virtio_counts_and_unknown_bus_is_input_error():
    k = Kernel("6.1", "/v", "/i", ["ahci"], builtin=["virtio_pci", "virtio_blk", "virtio_scsi", "virtio_net"])
    assert needs_initramfs(_facts(kernels=[k])) == []
    with pytest.raises(InputError, match="unknown bus"):
        rules(_facts(kernels=[k]), "ide")


def test_keep_modules_takes_storage_and_fs_drivers_only():
    old = {"6.1": {"ahci": f"{MODS}/drivers/ata/ahci.ko", "sd_mod": f"{MODS}/drivers/scsi/sd_mod.ko",
                   "ext4": f"{MODS}/fs/ext4/ext4.ko", "psmouse": f"{MODS}/drivers/input/mouse/psmouse.ko",
                   "mptspi": f"{MODS}/drivers/message/fusion/mptspi.ko"}}
    assert keep_modules(_facts(), old) == ["ahci", "ext4", "mptspi", "sd_mod"]
