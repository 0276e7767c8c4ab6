"""Stock Debian 12 guests in a "came from VMware" state (the Linux test bed).

Two disks are built from ONE debootstrap root file system (cached as a tar):

- ``linux-bios``: MBR, ext4 root on /dev/sda1, GRUB for BIOS in the MBR gap.
- ``linux-uefi``: GPT, ESP (vfat) on /dev/sda1 + ext4 root on /dev/sda2, GRUB EFI
  installed as the removable \\EFI\\BOOT\\BOOTX64.EFI, so OVMF boots it without NVRAM entries.

They are stock guests: Debian packages and Debian's own configuration, NO file of this project
inside (no marker, no custom init, no initramfs hook, no ``panic=``). systemd is PID 1
(systemd-sysv), udev and systemd-fstab-generator really run, ``serial-getty@ttyS0`` comes from
systemd's getty generator for ``console=ttyS0``, qemu-guest-agent starts from its udev rule when
the ``org.qemu.guest_agent.0`` port appears, ifupdown + isc-dhcp-client bring eth0 up by DHCP.
A boot passes on what any Debian guest shows: the agent answers and ``vmw-deb12 login:`` is
printed on the serial console.

Their "came from VMware" state is the Linux twin of a Windows 0x7B:

- the initramfs holds the SATA/SCSI drivers of the old machine (ahci, sd_mod, ...) and
  NO VirtIO drivers (virtio_pci, virtio_blk, virtio_scsi, virtio_net are modules in
  Debian's kernel), with ``MODULES=dep`` in initramfs.conf, as a VMware install leaves it;
- /etc/fstab and the kernel's ``root=`` name devices (/dev/sda1), GRUB_DISABLE_LINUX_UUID=true;
- VMware remnants: the open-vm-tools package, a udev rule and an ifupdown stanza pinning
  the VMware MAC address.

A root that never appears ends as Debian ends it: initramfs-tools waits its default 30 s,
prints ``Gave up waiting for root file system device`` and ``ALERT! /dev/sda1 does not exist``
and drops to the ``(initramfs)`` shell (lab.verdict's built-in failure patterns).

The kernel command line (``GRUB_CMDLINE_LINUX``) carries what an admin of such a VM sets in
/etc/default/grub (see KERNEL_CMDLINE). The initramfs is built with the guest's own
update-initramfs in a host chroot (seconds natively, minutes in the TCG appliance) with an
explicit module list: ``MODULES=dep`` has no VMware disk to size for there. The list stands in
for what ``dep`` picks on a VMware VM with a SATA disk; the guest's own config keeps
``MODULES=dep`` and an empty modules file. Partitioning, GRUB installation and update-grub run
in one libguestfs launch.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from h2k import accel
from h2k.progress import Progress
from lab.testbed.cache import cached_build

HOSTNAME = "vmw-deb12"
# What a passing boot prints on the serial console (agetty's prompt, from serial-getty@ttyS0).
LOGIN_PROMPT = f"{HOSTNAME} login:"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
PACKAGES = [
    "linux-image-amd64",
    "initramfs-tools",
    "busybox",
    "systemd-sysv",  # systemd as PID 1 (minbase alone boots nothing)
    "dbus",  # systemd-logind needs it; every Debian install has it
    "qemu-guest-agent",
    "grub-pc-bin",
    "grub-efi-amd64-bin",
    "grub2-common",
    "kmod",
    "e2fsprogs",
    "udev",
    "zstd",
    "ifupdown",
    "isc-dhcp-client",  # ifupdown's DHCP client
    "iputils-ping",  # the lab's network check runs 'ping' through the agent
    "open-vm-tools",  # the VMware remnant the pipeline removes
]
# Kernel module trees a headless test VM never loads; trimmed to keep the disk small
# (depmod runs afterwards, so modules.dep stays true).
TRIM_MODULE_DIRS = [
    "sound",
    "drivers/gpu",
    "drivers/media",
    "drivers/net/wireless",
    "drivers/infiniband",
    "drivers/staging",
    "drivers/iio",
    "drivers/bluetooth",
    # hardware udev would load a driver for on QEMU's q35, useless to a test VM and a signed module
    # load each under TCG: nested KVM, cpufreq, the ICH9 watchdog and SMBus, the PC speaker
    "arch/x86/kvm",
    "drivers/cpufreq",
    "drivers/watchdog",
    "drivers/i2c/busses",
    "drivers/input/misc",
    "net/wireless",
    "net/mac80211",
    "net/bluetooth",
]
TRIM_PATHS = ["usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/info", "var/cache/apt/archives"]

# What MODULES=dep picks on a VMware VM whose disk is on SATA (AHCI) — plus the VMware SCSI
# HBAs, as a VMware template carries — and the root file system. No VirtIO.
VMWARE_INITRAMFS_MODULES = ["ahci", "ata_piix", "sd_mod", "mptspi", "vmw_pvscsi", "ext4"]
VIRTIO_MODULES = ["virtio_pci", "virtio_blk", "virtio_scsi", "virtio_net"]
VMWARE_MAC = "00:50:56:8a:3c:01"
# What the admin of this VM put in GRUB_CMDLINE_LINUX:
# - ``console=ttyS0,115200``: the serial console (systemd's getty generator then starts
#   serial-getty@ttyS0, whose prompt is one of the lab's success evidences);
# - ``net.ifnames=0``: the classic template setting that keeps the NIC named eth0 (the name the
#   VMware-era udev rule and ifupdown stanza use) whatever bus and slot the hypervisor gives it;
# - ``no_timer_check``, as Fedora/RHEL cloud images carry it: a TCG vCPU starved by the host can
#   fail the IO-APIC timer check and panic ("IO-APIC + timer doesn't work!", seen under load 15+);
KERNEL_CMDLINE = "console=ttyS0,115200 net.ifnames=0 no_timer_check"
# The admin's one edit of Debian's /etc/systemd/system.conf (its commented default is 90 s): under
# TCG udev's coldplug (a module load per device) reached /dev/ttyS0 ~50 s after systemd asked for
# it on an idle host and more than 90 s later at load 11-14; then "Timed out waiting for device
# dev-ttyS0.device" failed serial-getty@ttyS0 and the console never printed a login prompt.
# (systemd 252 has no kernel command line switch for it.)
DEVICE_TIMEOUT = "DefaultDeviceTimeoutSec=300s"

ROOTFS_RECIPE_VERSION = 3
DISK_BUILD_VERSION = 5
DISK_SIZE = 2 * 1024**3


# --------------------------------------------------------------------------- rootfs


def debian_mirror() -> str:
    """The Debian mirror apt uses on this host (H2K_DEBIAN_MIRROR overrides)."""
    env = os.environ.get("H2K_DEBIAN_MIRROR")
    if env:
        return env
    texts = []
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            texts.append(path.read_text(errors="replace"))
        except OSError:
            continue
    for text in texts:
        for url in re.findall(r"(?:^URIs:|^deb)\s+(?:\[[^\]]*\]\s+)?(https?://\S+)", text, re.M):
            if url.rstrip("/").endswith("/debian"):
                return url.rstrip("/")
    return DEFAULT_MIRROR


def rootfs_recipe() -> dict:
    return {
        "version": ROOTFS_RECIPE_VERSION,
        "suite": SUITE,
        "variant": "minbase",
        "mirror": debian_mirror(),
        "packages": PACKAGES,
        "trim": TRIM_MODULE_DIRS + TRIM_PATHS,
    }


def _build_rootfs(tmp: Path) -> None:
    recipe = rootfs_recipe()
    with Progress("build linux-rootfs", 4) as progress, tempfile.TemporaryDirectory(
        prefix="h2k-rootfs-", dir=tmp.parent
    ) as work:
        root = Path(work) / "root"
        progress.step(f"debootstrap {SUITE} minbase from {recipe['mirror']} (a few minutes)")
        cmd = [
            "debootstrap",
            "--variant=minbase",
            "--include=" + ",".join(PACKAGES),
            SUITE,
            str(root),
            recipe["mirror"],
        ]
        log = Path(work) / "debootstrap.log"
        with open(log, "w") as out:
            rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"debootstrap failed ({rc}):\n" + "\n".join(tail))
        progress.step("trim documentation and unused kernel modules, depmod")
        for rel in TRIM_PATHS:
            for child in (root / rel).glob("*"):
                _rm(child)
        for kdir in (root / "lib/modules").iterdir():
            for rel in TRIM_MODULE_DIRS:
                _rm(kdir / "kernel" / rel)
            subprocess.run(["chroot", str(root), "depmod", "-a", kdir.name], check=True)
        # The initramfs debootstrap made (MODULES=most) is rebuilt per disk.
        for initrd in (root / "boot").glob("initrd.img-*"):
            initrd.unlink()
        progress.step("tar the root file system")
        subprocess.run(
            ["tar", "--numeric-owner", "--xattrs", "-C", str(root), "-cf", str(tmp), "."],
            check=True,
        )
        progress.step(f"rootfs tar {tmp.stat().st_size // 2**20} MiB")


def _rm(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def rootfs_tar() -> Path:
    """The debootstrap root file system as a tar (built once; edit ROOTFS_RECIPE_VERSION to rebuild)."""
    return cached_build("linux-rootfs", rootfs_recipe(), _build_rootfs, suffix=".tar")


# --------------------------------------------------------------------------- disks


def disk_recipe(firmware: str) -> dict:
    return {
        "firmware": firmware,
        "rootfs": rootfs_recipe(),
        "hostname": HOSTNAME,
        "cmdline": KERNEL_CMDLINE,
        "device_timeout": DEVICE_TIMEOUT,
        "modules": VMWARE_INITRAMFS_MODULES,
        "size": DISK_SIZE,
        # Bump when the disk build code changes (the module's source is not hashed, so that
        # editing the fixed-disk helpers below does not rebuild the disks).
        "build_version": DISK_BUILD_VERSION,
    }


def _grub_default() -> str:
    return f"""# /etc/default/grub of a Debian VM installed on VMware (hyper2kvm test bed)
GRUB_DEFAULT=0
GRUB_TIMEOUT=0
GRUB_TIMEOUT_STYLE=hidden
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="{KERNEL_CMDLINE}"
GRUB_TERMINAL="serial console"
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
GRUB_DISABLE_RECOVERY=true
GRUB_DISABLE_OS_PROBER=true
# The installer wrote root=/dev/sda1 on the kernel command line:
GRUB_DISABLE_LINUX_UUID=true
"""


PERSISTENT_NET_RULES = f"""# This file was automatically generated by the /lib/udev/write_net_rules
# program, run by the persistent-net-generator.rules rules file.
# PCI device 0x15ad:0x07b0 (vmxnet3)
SUBSYSTEM=="net", ACTION=="add", DRIVERS=="?*", ATTR{{address}}=="{VMWARE_MAC}", ATTR{{dev_id}}=="0x0", ATTR{{type}}=="1", KERNEL=="eth*", NAME="eth0"
"""

INTERFACES = f"""# This file describes the network interfaces available on your system
# and how to activate them. For more information, see interfaces(5).

source /etc/network/interfaces.d/*

# The loopback network interface
auto lo
iface lo inet loopback

# The primary network interface (VMware vmxnet3)
allow-hotplug eth0
iface eth0 inet dhcp
    hwaddress ether {VMWARE_MAC}
"""


def _prepare_root(root: Path, firmware: str) -> None:
    """Configure the unpacked root file system on the host and build its initramfs there.

    The initramfs is built in a chroot with the guest's own update-initramfs: natively this
    takes seconds, in the TCG appliance minutes. ``MODULES=list`` for the build stands in for
    ``dep`` on the VMware machine (see the module docstring).
    """

    def put(rel: str, data: str | bytes, mode: int = 0o644) -> None:
        path = root / rel.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.exists():
            path.unlink()
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        path.chmod(mode)

    put("/etc/hostname", f"{HOSTNAME}\n")
    put("/etc/hosts", f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n")
    root_dev = "/dev/sda1" if firmware == "bios" else "/dev/sda2"
    fstab = "# <file system> <mount point> <type> <options> <dump> <pass>\n"
    fstab += f"{root_dev}\t/\text4\terrors=remount-ro\t0\t1\n"
    if firmware == "uefi":
        fstab += "/dev/sda1\t/boot/efi\tvfat\tumask=0077\t0\t1\n"
    put("/etc/fstab", fstab)
    put("/etc/default/grub", _grub_default())
    system_conf = root / "etc/systemd/system.conf"
    put("/etc/systemd/system.conf", re.sub(r"(?m)^#DefaultDeviceTimeoutSec=.*$", DEVICE_TIMEOUT, system_conf.read_text()))
    if DEVICE_TIMEOUT not in system_conf.read_text():
        raise RuntimeError("the test bed's systemd.conf has no '#DefaultDeviceTimeoutSec=' line to set")
    conf_path = root / "etc/initramfs-tools/initramfs.conf"
    put("/etc/initramfs-tools/initramfs.conf", re.sub(r"(?m)^MODULES=.*$", "MODULES=dep", conf_path.read_text()))
    put("/etc/udev/rules.d/70-persistent-net.rules", PERSISTENT_NET_RULES)
    put("/etc/network/interfaces", INTERFACES)
    (root / "boot/efi").mkdir(parents=True, exist_ok=True)

    modules_path = root / "etc/initramfs-tools/modules"
    default_modules = modules_path.read_text()
    build_conf = root / "etc/initramfs-tools/conf.d/zz-h2k-testbed-build"
    put(str(build_conf.relative_to(root)), "MODULES=list\n")
    modules_path.write_text(default_modules + "\n".join(VMWARE_INITRAMFS_MODULES) + "\n")
    proc = root / "proc"
    subprocess.run(["mount", "-t", "proc", "proc", str(proc)], check=True)
    try:
        run = subprocess.run(
            ["chroot", str(root), "update-initramfs", "-c", "-k", "all"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if run.returncode != 0:
            raise RuntimeError(f"update-initramfs in the test-bed chroot failed: {run.stdout[-2000:]}")
    finally:
        subprocess.run(["umount", str(proc)], check=False)
        build_conf.unlink()
        modules_path.write_text(default_modules)
    _check_initramfs(root)


SECTOR = 512
ESP_SECTORS = (2048, 2048 + 100 * 2048 - 1)  # 100 MiB ESP from 1 MiB


def root_partition_sectors(firmware: str) -> tuple[int, int]:
    """First and last sector of the root partition."""
    total = DISK_SIZE // SECTOR
    if firmware == "bios":
        return 2048, total - 1
    return ESP_SECTORS[1] + 1, total - 2048 - 1  # room for the backup GPT


def _build_disk(firmware: str, out: Path) -> None:
    """Root file system made natively (mke2fs -d, seconds) at the partition's offset of a raw
    disk; partition table, ESP, GRUB and grub.cfg in one libguestfs launch with the guest's tools.
    (Copying ~500 MiB through the TCG appliance took minutes.)"""
    import guestfs

    accel.apply_libguestfs_env()
    tar = rootfs_tar()
    name = f"linux-{firmware}"
    first, last = root_partition_sectors(firmware)
    with Progress(f"build {name}", 6) as progress, tempfile.TemporaryDirectory(
        prefix=f"h2k-{name}-", dir=out.parent
    ) as work:
        root = Path(work) / "root"
        root.mkdir()
        progress.step("unpack the root file system, configure the came-from-VMware state, build its initramfs")
        subprocess.run(["tar", "--numeric-owner", "--xattrs", "-C", str(root), "-xf", str(tar)], check=True)
        _prepare_root(root, firmware)
        progress.step("make the ext4 root file system from the tree (mke2fs -d)")
        raw = Path(work) / "disk.raw"
        with open(raw, "wb") as fh:
            fh.truncate(DISK_SIZE)
        blocks = (last - first + 1) * SECTOR // 4096
        subprocess.run(
            ["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-d", str(root),
             "-E", f"offset={first * SECTOR}", str(raw), str(blocks)],
            check=True,
        )
        shutil.rmtree(root)
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(out)], check=True)
        raw.unlink()
        g = guestfs.GuestFS(python_return_dict=True)
        g.add_drive_opts(str(out), format="qcow2", readonly=False)
        progress.step("launch libguestfs; partition table")
        g.launch()
        try:
            dev = "/dev/sda"
            if firmware == "bios":
                g.part_init(dev, "mbr")
                g.part_add(dev, "p", first, last)
                g.part_set_bootable(dev, 1, True)
                root_dev, esp_dev = "/dev/sda1", None
            else:
                g.part_init(dev, "gpt")
                g.part_add(dev, "p", *ESP_SECTORS)
                g.part_add(dev, "p", first, last)
                g.part_set_gpt_type(dev, 1, "C12A7328-F81F-11D2-BA4B-00A0C93EC93B")
                g.part_set_gpt_type(dev, 2, "0FC63DAF-8483-4772-8E79-3D69D8477DE4")
                g.part_set_name(dev, 1, "EFI System Partition")
                root_dev, esp_dev = "/dev/sda2", "/dev/sda1"
                g.mkfs("vfat", esp_dev)
            if g.vfs_type(root_dev) != "ext4":
                raise RuntimeError(f"{root_dev}: the ext4 made at sector {first} is not where the partition is")
            g.mount(root_dev, "/")
            if esp_dev:
                g.mount(esp_dev, "/boot/efi")
            progress.step("install GRUB and generate grub.cfg with the guest's tools")
            _install_grub(g, firmware)
            progress.step("check the came-from-VMware state")
            try:
                _check_grub(g)
            except RuntimeError as first:
                # Seen twice in one loaded run, cause not yet known (the message carries the
                # evidence): say so, and give update-grub one more try before failing the build.
                print(f"[build {name}] {first}; running update-grub once more", file=sys.stderr, flush=True)
                _sh_checked(g, "update-grub")
                _check_grub(g)
            g.umount_all()
            g.shutdown()
        finally:
            g.close()
        progress.step(f"{name} ready")


def _install_grub(g, firmware: str) -> None:
    if firmware == "bios":
        _sh_checked(g, "grub-install --target=i386-pc /dev/sda")
    else:
        _sh_checked(
            g,
            "grub-install --target=x86_64-efi --efi-directory=/boot/efi --removable "
            "--no-nvram --no-uefi-secure-boot",
        )
    _sh_checked(g, "update-grub")


def _sh_checked(g, cmd: str) -> str:
    """Run a guest command; on failure raise with its output (g.sh loses stdout on errors)."""
    out = g.sh(f"{cmd} 2>&1; echo \"h2k-rc=$?\"")
    body, _, rc = out.rstrip().rpartition("h2k-rc=")
    if rc.strip() != "0":
        raise RuntimeError(f"in the test-bed guest, '{cmd}' failed ({rc.strip()}): {body.strip()[-1500:]}")
    return body


def initramfs_modules(initrd: Path) -> set[str]:
    """Module names (dashes as underscores) in an initramfs image, read with lsinitramfs."""
    listing = subprocess.run(["lsinitramfs", str(initrd)], check=True, capture_output=True, text=True).stdout
    return {
        Path(line).name.split(".ko")[0].replace("-", "_") for line in listing.splitlines() if ".ko" in line
    }


def _check_initramfs(root: Path) -> None:
    """Refuse to cache a disk whose initramfs is not in the came-from-VMware state."""
    for kdir in (root / "lib/modules").iterdir():
        names = initramfs_modules(root / "boot" / f"initrd.img-{kdir.name}")
        leaked = sorted(set(VIRTIO_MODULES) & names)
        if leaked:
            raise RuntimeError(f"test-bed initramfs for {kdir.name} has VirtIO modules {leaked}")
        for need in ["ahci", "sd_mod", "ext4"]:
            if need not in names:
                raise RuntimeError(f"test-bed initramfs for {kdir.name} lacks {need}")


def _check_grub(g) -> None:
    cfg = g.cat("/boot/grub/grub.cfg")
    if "root=/dev/sda" not in cfg:
        kernel_lines = [ln.strip() for ln in cfg.splitlines() if ln.strip().startswith("linux")]
        probe = g.sh("grub-probe --target=device / 2>&1; echo; cat /proc/self/mounts 2>&1 | head -5")
        raise RuntimeError(f"test-bed grub.cfg does not name root=/dev/sdX: kernel lines {kernel_lines}; "
                           f"grub-probe / says {probe.strip()!r}")


def build_disk(firmware: str) -> Path:
    """The cached qcow2 of ``linux-bios`` or ``linux-uefi`` (never modify it: use an overlay)."""
    if firmware not in ("bios", "uefi"):
        raise ValueError(f"firmware must be bios or uefi, not {firmware!r}")
    return cached_build(
        f"linux-{firmware}",
        disk_recipe(firmware),
        lambda tmp: _build_disk(firmware, tmp),
        suffix=".qcow2",
    )


# For ``h2k testbed build``: the root file system first, the disks made from it after;
# the fixed disks are h2k's own output, built by the tests that check them.
BUILD_STAGES = {"linux-rootfs": 0, "linux-bios": 2, "linux-uefi": 2, "linux-bios-fixed": 3, "linux-uefi-fixed": 3}
DERIVED = ("linux-bios-fixed", "linux-uefi-fixed")


def builders() -> dict:
    return {
        "linux-rootfs": rootfs_tar,
        "linux-bios": lambda: build_disk("bios"),
        "linux-uefi": lambda: build_disk("uefi"),
        "linux-bios-fixed": lambda: fixed_disk("bios")[0],
        "linux-uefi-fixed": lambda: fixed_disk("uefi")[0],
    }


# --------------------------------------------------------------------------- fixed disks


def fixed_disk(firmware: str) -> tuple[Path, dict]:
    """``linux-<firmware>`` after ``h2k.linux.fix_image``: a standalone qcow2, cached by the source
    disk and the engine's code, and the fix report (kept next to it as JSON)."""
    import json

    from h2k.linux import fix as fixmod
    from h2k.linux import initrd as initrdmod
    from h2k.linux import inspect as inspectmod
    from lab.testbed.cache import cache_root, recipe_hash

    source = build_disk(firmware)
    recipe = {"source": source.name}
    modules = [fixmod, inspectmod, initrdmod]
    report_path = cache_root() / f"linux-{firmware}-fixed-{recipe_hash(recipe, modules)}.report.json"

    def build(tmp: Path) -> None:
        report = fixmod.fix_image(source, output=tmp)
        if report.nothing_to_do:
            raise RuntimeError(f"fix found nothing to do on the test-bed disk {source}")
        if report.journal:
            Path(report.journal).unlink(missing_ok=True)  # the journal also lives inside the guest
        report_path.write_text(json.dumps(report.to_dict(), indent=2))

    path = cached_build(f"linux-{firmware}-fixed", recipe, build, suffix=".qcow2", modules=modules)
    return path, json.loads(report_path.read_text())
