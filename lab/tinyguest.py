"""Tiny real test guests for the lab's own tests: the host's Debian kernel and a
busybox initramfs that behaves as the kernel command line says.

``h2k.mode=`` on the kernel command line selects the behaviour:

- ``pass``      print H2K-BOOT-OK on COM1, with DHCP (udhcpc on slirp) and the
                guest agent (Debian's qemu-ga and its libraries) running; the ACPI
                power button powers it off. Booted from its disk it first counts
                the boot on that disk (see below)
- ``panic``     load pvpanic, then ``echo c > /proc/sysrq-trigger`` (GUEST_PANICKED)
- ``reboot``    ``reboot -f`` (a reboot loop: SHUTDOWN reason guest-reset)
- ``poweroff``  ``poweroff -f`` before success
- ``hang``      print a line, then sleep forever (a timeout)
- ``silent``    use without ``console=ttyS0``: nothing ever reaches the serial port
- ``quiet``     ``pass`` (DHCP, agent) with nothing on any console: only the agent shows it is up

Boot it directly (``kernel_profile``: -kernel/-initrd/-append, which OVMF also
supports through fw_cfg) or from a disk (``disk_image``): an MBR disk with one
FAT partition holding the kernel, the initramfs and SYSLINUX for both SeaBIOS
(mbr.bin + ldlinux.sys) and OVMF (\\EFI\\BOOT\\BOOTX64.EFI = syslinux.efi).
The disk is made with sfdisk, mkfs.fat and mtools: no mount, no root, no
libguestfs. Everything is cached with ``cached_build``.

The disk carries a boot counter, so a test can see whether a boot's writes reached
the next boot (a two-phase run must keep them; a plain boot must not touch the
image): sector ``COUNTER_SECTOR`` (in the gap between the MBR and the partition,
which SYSLINUX does not use) holds the text line ``H2K-BOOT-COUNT <n>``, 0 when
built. A disk boot (``h2k.bootcount`` on its command line) loads the storage
drivers, finds the disk holding that line, writes n+1 back, flushes it, and prints
``H2K-BOOT-COUNT=<n+1>`` on COM1 before the marker.
"""

from __future__ import annotations

import glob
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from h2k import cpio
from h2k.errors import H2KError
from h2k.profile import MachineProfile
from lab.testbed.cache import cached_build
from lab.verdict import BOOT_OK_MARKER

MODES = ("pass", "panic", "reboot", "poweroff", "hang", "silent", "quiet")

# Loaded in this order (dependencies first are resolved from modules.dep).
MODULES = ["virtio_pci", "virtio_console", "virtio_net", "e1000e", "e1000", "8139cp", "8139too", "vmxnet3",
           "pvpanic_pci", "pvpanic_mmio", "button", "evdev"]

# For the boot counter: the disk on SATA (AHCI), IDE, virtio-blk or virtio-scsi.
STORAGE_MODULES = ["ahci", "ata_piix", "virtio_blk", "virtio_scsi", "sd_mod"]

COUNTER_SECTOR = 1024
COUNTER_MAGIC = "H2K-BOOT-COUNT"

AGENT_LIBS_EXTRA = ["/lib/x86_64-linux-gnu/libgcc_s.so.1"]

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mkdir -p /proc /sys /dev /run /tmp /var/run
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mode=pass
bootcount=
for arg in $(cat /proc/cmdline); do
  case "$arg" in h2k.mode=*) mode="${arg#h2k.mode=}";; h2k.bootcount) bootcount=1;; esac
done
say() { echo "$@" > /dev/ttyS0 2>/dev/null; echo "$@" > /dev/console 2>/dev/null; }
# quiet: pass with nothing on any console (a guest only its agent can vouch for).
[ "$mode" = quiet ] && { say() { :; }; mode=pass; }
# The boot counter on the boot disk: read the line in its reserved sector, write n+1 back, flush.
count_boot() {
  for m in $(cat /etc/storage-modules.order); do insmod "/lib/modules/$m" 2>/dev/null; done
  for i in $(seq 1 120); do  # disks appear asynchronously after their driver loads
    for b in /sys/block/sd* /sys/block/vd* /sys/block/hd*; do
      [ -e "$b" ] || continue
      d="/dev/${b##*/}"
      set -- $(dd if="$d" bs=512 skip=SECTOR count=1 2>/dev/null | head -n 1)
      [ "$1" = MAGIC ] || continue
      case "$2" in ''|*[!0-9]*) say "h2k-tinyguest: bad boot counter on $d: $2"; return ;; esac
      n=$(($2 + 1))
      if printf 'MAGIC %d\n' "$n" | dd of="$d" bs=512 seek=SECTOR count=1 conv=sync,notrunc,fsync 2>/dev/null; then
        sync
        say "MAGIC=$n"
      else
        say "h2k-tinyguest: cannot write the boot counter on $d"
      fi
      return
    done
    sleep 0.5
  done
  say "h2k-tinyguest: no disk with a boot counter"
}
# Load modules in dependency order; missing hardware just means an unused module.
for m in $(cat /etc/modules.order); do insmod "/lib/modules/$m" 2>/dev/null; done
case "$mode" in
  silent)
    exec sleep 2147483647 ;;
  hang)
    say "h2k-tinyguest: hanging on purpose"
    exec sleep 2147483647 ;;
  reboot)
    say "h2k-tinyguest: rebooting"
    reboot -f ;;
  poweroff)
    say "h2k-tinyguest: powering off"
    poweroff -f ;;
  panic)
    # Panic only once the pvpanic driver is bound (its notifier is what QEMU reports).
    for i in $(seq 1 100); do
      ls -d /sys/bus/pci/drivers/pvpanic-pci/0000:* /sys/bus/platform/drivers/pvpanic-mmio/* >/dev/null 2>&1 && break
      sleep 0.1
    done
    say "h2k-tinyguest: panicking"
    echo 1 > /proc/sys/kernel/sysrq
    echo c > /proc/sysrq-trigger ;;
  pass)
    [ -n "$bootcount" ] && count_boot
    ifconfig lo 127.0.0.1 up
    for itf in /sys/class/net/*; do
      n="${itf##*/}"; [ "$n" = lo ] && continue
      udhcpc -i "$n" -s /etc/udhcpc.script -q -n -t 10 -T 1 >/dev/null 2>&1 && break
    done
    if [ -x /usr/sbin/qemu-ga ]; then
      for p in /sys/class/virtio-ports/*; do
        [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] || continue
        mkdir -p /run/qga
        setsid /usr/sbin/qemu-ga -m virtio-serial -p "/dev/${p##*/}" -t /run/qga -f /run/qga.pid \
          </dev/null >/tmp/qga.log 2>&1 &
      done
    fi
    # ACPI power button (QMP system_powerdown) -> power off: any event on its input node.
    for e in /sys/class/input/event*; do
      [ "$(cat "$e/device/name" 2>/dev/null)" = "Power Button" ] || continue
      (head -c 1 "/dev/input/${e##*/}" >/dev/null 2>&1 && poweroff -f) &
    done
    say "MARKER"
    exec sleep 2147483647 ;;
esac
say "h2k-tinyguest: unknown mode $mode"
exec sleep 2147483647
""".replace("MARKER", BOOT_OK_MARKER).replace("MAGIC", COUNTER_MAGIC).replace("SECTOR", str(COUNTER_SECTOR))

UDHCPC_SCRIPT = r"""#!/bin/sh
case "$1" in
  deconfig) ifconfig "$interface" 0.0.0.0 up ;;
  bound|renew)
    ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}" up
    for r in $router; do route add default gw "$r" dev "$interface"; break; done ;;
esac
exit 0
"""

# qemu-ga's guest-shutdown runs /sbin/shutdown; busybox has none, so give it one.
SHUTDOWN_SCRIPT = r"""#!/bin/sh
case " $* " in *" -r "*) exec reboot -f ;; *) exec poweroff -f ;; esac
"""

OS_RELEASE = 'PRETTY_NAME="h2k tiny guest (busybox)"\nNAME="h2k-tinyguest"\nID=h2k-tinyguest\nVERSION_ID="1"\n'


def host_kernel() -> tuple[Path, Path]:
    """A readable /boot/vmlinuz-* with its /lib/modules tree (the running kernel's if possible)."""
    candidates = [f"/boot/vmlinuz-{platform.release()}"] + sorted(glob.glob("/boot/vmlinuz-*"), reverse=True)
    for k in candidates:
        ver = k.rsplit("vmlinuz-", 1)[-1]
        mods = Path("/lib/modules") / ver
        if os.access(k, os.R_OK) and (mods / "modules.dep").exists():
            return Path(k), mods
    raise H2KError("no readable /boot/vmlinuz-* with matching /lib/modules (install linux-image-amd64)")


def _busybox() -> Path:
    for cand in ("/bin/busybox", "/usr/bin/busybox"):
        if os.access(cand, os.X_OK):
            return Path(cand)
    raise H2KError("busybox not found (install busybox-static)")


def _module_order(moddir: Path, wanted: list[str]) -> list[str]:
    """Relative .ko paths for ``wanted`` and their dependencies, dependencies first."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        mod, rest = line.split(":", 1)
        deps[mod] = rest.split()
        by_name[Path(mod).name.split(".ko")[0].replace("-", "_")] = mod
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod in order:
            return
        for d in reversed(deps.get(mod, [])):
            visit(d)
        order.append(mod)

    for name in wanted:
        mod = by_name.get(name.replace("-", "_"))
        if mod:  # built in, or not built for this kernel: nothing to load
            visit(mod)
    return order


def _agent_files() -> list[tuple[str, Path]]:
    """(path in guest, host path) for qemu-ga and its shared libraries."""
    ga = Path("/usr/sbin/qemu-ga")
    if not ga.exists():
        return []
    out = subprocess.run(["ldd", str(ga)], capture_output=True, text=True, check=True).stdout
    files = [("usr/sbin/qemu-ga", ga)]
    for line in out.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) >= 3 else parts[0] if parts and parts[0].startswith("/") else None
        if path and path.startswith("/"):
            files.append((path.lstrip("/"), Path(path)))
    for extra in AGENT_LIBS_EXTRA:
        if Path(extra).exists():
            files.append((extra.lstrip("/"), Path(extra)))
    return files


def _dirs_for(paths: list[str]) -> list[str]:
    dirs: set[str] = set()
    for p in paths:
        parts = p.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    return sorted(dirs, key=lambda d: (d.count("/"), d))


def build_initramfs(dest: Path, with_agent: bool = True) -> None:
    kernel, moddir = host_kernel()
    mods = _module_order(moddir, MODULES)
    storage = [m for m in _module_order(moddir, STORAGE_MODULES) if m not in mods]
    files: list[tuple[str, bytes, int]] = [
        ("bin/busybox", _busybox().read_bytes(), 0o755),
        ("init", INIT.encode(), 0o755),
        ("etc/udhcpc.script", UDHCPC_SCRIPT.encode(), 0o755),
        ("sbin/shutdown", SHUTDOWN_SCRIPT.encode(), 0o755),
        ("etc/os-release", OS_RELEASE.encode(), 0o644),
        ("etc/modules.order", ("\n".join(mods) + "\n").encode(), 0o644),
        ("etc/storage-modules.order", ("\n".join(storage) + "\n").encode(), 0o644),
    ]
    for m in mods + storage:
        files.append((f"lib/modules/{m}", (moddir / m).read_bytes(), 0o644))
    if with_agent:
        for gpath, host in _agent_files():
            files.append((gpath, host.resolve().read_bytes(), 0o755))
    dirs = list(dict.fromkeys(_dirs_for([f[0] for f in files]) + ["proc", "sys", "dev", "run", "tmp"]))
    entries = [cpio.directory(d) for d in dirs] + [cpio.file(name, data, perm) for name, data, perm in files]
    dest.write_bytes(cpio.archive(entries))


def initramfs(with_agent: bool = True) -> Path:
    kernel, moddir = host_kernel()
    recipe = {"kind": "tinyguest-initramfs", "kernel": str(kernel), "agent": with_agent,
              "busybox": _busybox().stat().st_size,
              "qemu_ga": Path("/usr/sbin/qemu-ga").stat().st_mtime if Path("/usr/sbin/qemu-ga").exists() else None}
    return cached_build("tinyguest-initrd", recipe, lambda p: build_initramfs(p, with_agent), suffix=".cpio.gz",
                        modules=[sys.modules[__name__]])


def append_for(mode: str, serial: bool | None = None) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    serial = (mode not in ("silent", "quiet")) if serial is None else serial
    console = "console=ttyS0,115200" if serial else "console=tty0 quiet loglevel=0"
    # no_timer_check: on a starved host a TCG vCPU can miss the kernel's IO-APIC timer check,
    # which then panics ("IO-APIC + timer doesn't work!"); the check proves nothing here.
    return f"{console} panic=-1 no_timer_check h2k.mode={mode}"


def kernel_profile(mode: str, **kw: object) -> MachineProfile:
    """A profile that boots the tiny guest directly (-kernel/-initrd/-append)."""
    kernel, _ = host_kernel()
    params: dict[str, object] = {"name": f"tiny-{mode}", "stage": "direct", "memory_mb": 512,
                                 "hyperv": False, "nic_model": "virtio-net"}
    params.update(kw)
    return MachineProfile(kernel=str(kernel), initrd=str(initramfs()), append=append_for(mode), **params)


# --------------------------------------------------------------------------------------
# A bootable disk for SeaBIOS and OVMF

DISK_MB = 64
PART_START = 2048  # sectors


def _run(cmd: list[str], **kw: object) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise H2KError(f"{' '.join(cmd[:2])} failed: {(r.stderr or r.stdout).strip()[:300]}")


def _syslinux_cfg(append: str, serial: bool) -> str:
    lines = []
    if serial:
        lines.append("SERIAL 0 115200")
    lines += ["DEFAULT h2k", "PROMPT 0", "TIMEOUT 0", "LABEL h2k", "  LINUX /vmlinuz",
              "  INITRD /initrd.img", f"  APPEND {append}", ""]
    return "\n".join(lines)


def build_disk(dest: Path, mode: str) -> None:
    kernel, _ = host_kernel()
    initrd = initramfs()
    for tool in ("sfdisk", "mkfs.fat", "syslinux", "mcopy", "mmd"):
        if not shutil.which(tool):
            raise H2KError(f"{tool} not found (packages: fdisk, dosfstools, syslinux, mtools)")
    mbr = Path("/usr/lib/SYSLINUX/mbr.bin")
    efi = Path("/usr/lib/SYSLINUX.EFI/efi64/syslinux.efi")
    ldl = Path("/usr/lib/syslinux/modules/efi64/ldlinux.e64")
    for f in (mbr, efi, ldl):
        if not f.exists():
            raise H2KError(f"{f} missing (packages: syslinux, syslinux-efi, syslinux-common)")
    serial = mode != "silent"
    cfg = _syslinux_cfg(f"{append_for(mode)} h2k.bootcount", serial)
    with tempfile.TemporaryDirectory(prefix="h2k-tinydisk-") as tmp:
        raw = Path(tmp) / "disk.raw"
        with open(raw, "wb") as fh:
            fh.truncate(DISK_MB * 1024 * 1024)
        # One active FAT partition; OVMF finds \EFI\BOOT\BOOTX64.EFI on it, SeaBIOS runs mbr.bin -> ldlinux.sys.
        _run(["sfdisk", "-q", str(raw)], input=f"label: dos\nstart={PART_START}, type=ef, bootable\n")
        part_kib = (DISK_MB * 1024 * 1024 - PART_START * 512) // 1024
        _run(["mkfs.fat", "-F", "16", "-n", "H2KTINY", "--offset", str(PART_START), str(raw), str(part_kib)])
        _run(["syslinux", "--offset", str(PART_START * 512), "--install", str(raw)])
        with open(raw, "r+b") as fh:
            fh.write(mbr.read_bytes()[:440])
            fh.seek(COUNTER_SECTOR * 512)
            fh.write(f"{COUNTER_MAGIC} 0\n".encode())
        img = f"{raw}@@{PART_START * 512}"
        env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
        cfgf = Path(tmp) / "syslinux.cfg"
        cfgf.write_text(cfg)
        _run(["mmd", "-i", img, "::/EFI", "::/EFI/BOOT"], env=env)
        for src, dst in [(kernel, "::/vmlinuz"), (initrd, "::/initrd.img"), (cfgf, "::/syslinux.cfg"),
                         (efi, "::/EFI/BOOT/BOOTX64.EFI"), (ldl, "::/EFI/BOOT/ldlinux.e64"),
                         (cfgf, "::/EFI/BOOT/syslinux.cfg")]:
            _run(["mcopy", "-i", img, str(src), dst], env=env)
        _run(["qemu-img", "convert", "-q", "-O", "qcow2", str(raw), str(dest)])


def disk_image(mode: str = "pass") -> Path:
    """A cached bootable qcow2 running the tiny guest in ``mode`` (BIOS and UEFI)."""
    kernel, _ = host_kernel()
    recipe = {"kind": "tinyguest-disk", "mode": mode, "kernel": str(kernel), "initrd": initramfs().name}
    return cached_build(f"tinyguest-disk-{mode}", recipe, lambda p: build_disk(p, mode), suffix=".qcow2",
                        modules=[sys.modules[__name__]])


def empty_disk() -> Path:
    """A blank 64 MiB disk: firmware must say "no bootable device"."""
    return cached_build("tinyguest-empty", {"kind": "empty", "mb": DISK_MB},
                        lambda p: _run(["qemu-img", "create", "-q", "-f", "qcow2", str(p), f"{DISK_MB}M"]),
                        suffix=".qcow2")


def disk_profile(firmware: str = "bios", **kw: object) -> MachineProfile:
    params: dict[str, object] = {"name": f"tinydisk-{firmware}", "stage": "final", "firmware": firmware,
                                 "memory_mb": 512, "hyperv": False}
    params.update(kw)
    return MachineProfile(**params)


def builders() -> dict[str, object]:
    """For ``h2k testbed build``."""
    return {"tinyguest-initrd": lambda: initramfs(), "tinyguest-disk": lambda: disk_image("pass")}
