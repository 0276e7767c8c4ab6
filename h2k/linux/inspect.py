"""Inspect a Linux guest: distribution, kernels and their initramfs, boot loader, fstab, NIC pinning, VMware tools.

One libguestfs launch per operation: ``open_linux`` launches and mounts, the
``inspect_handle`` reads everything through that handle, and ``fix``/``verify``
reuse it.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from h2k import accel
from h2k.image import DiskImage, as_image
from h2k.errors import InputError
from h2k.inspect import launch_error
from h2k.linux import initrd as initrdlib
from h2k.linux.facts import Kernel, LinuxFacts, MountEntry, PinnedMac

VIRTIO_MODULES = ["virtio_pci", "virtio_blk", "virtio_scsi", "virtio_net"]
ESP_GUID = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
DEVICE_NAME = re.compile(r"^/dev/(sd|hd|vd|xvd)[a-z]+[0-9]*$")
MAC = r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}"
VMWARE_PACKAGES = ["open-vm-tools", "open-vm-tools-desktop", "open-vm-tools-sdmp", "vmware-tools"]
VMWARE_FILES = ["/etc/vmware-tools", "/usr/lib/vmware-tools", "/usr/bin/vmware-uninstall-tools.pl"]


def is_linux_guest(g) -> bool:
    """True if libguestfs inspection of the launched handle ``g`` finds a Linux root."""
    return any(g.inspect_get_type(r) == "linux" for r in g.inspect_os())


def open_linux(image: DiskImage | str | Path, *, readonly: bool):
    """Launch libguestfs on ``image``, find the Linux root and mount its file systems.

    Returns ``(g, root)``. Bad input (unreadable image, no OS, not Linux) -> InputError.
    """
    import guestfs

    disk = as_image(image)  # the front door: InputError for a missing, unreadable or hostile image
    accel.apply_libguestfs_env()
    g = guestfs.GuestFS(python_return_dict=True)
    g.set_pgroup(True)  # as h2k.inspect.open_guest: Ctrl-C stops h2k between steps, not the appliance mid-write
    try:
        g.add_drive_opts(disk.path, format=disk.format, readonly=readonly)
        try:
            g.launch()
        except RuntimeError as exc:
            raise launch_error(disk.given, exc) from None
        roots = g.inspect_os()
        linux = [r for r in roots if g.inspect_get_type(r) == "linux"]
        if not linux:
            kinds = ", ".join(g.inspect_get_type(r) for r in roots) or "no operating system"
            raise InputError(f"{image}: not a Linux disk (libguestfs found {kinds})")
        if len(linux) > 1:
            raise InputError(f"{image}: {len(linux)} Linux roots found ({', '.join(linux)}); multi-boot is not supported")
        root = linux[0]
        mps = g.inspect_get_mountpoints(root)
        for mp in sorted(mps, key=len):
            try:
                (g.mount_ro if readonly else g.mount)(mps[mp], mp)
            except RuntimeError as exc:  # e.g. a swap "mount point"; a missing /boot shows up below
                if mp == "/":
                    raise InputError(f"{image}: cannot mount the root file system {mps[mp]}: {exc}") from None
        return g, root
    except BaseException:
        g.close()
        raise


def _read(g, path: str) -> str | None:
    try:
        if g.is_file(path, followsymlinks=True):
            return g.cat(path)
    except RuntimeError:
        pass
    return None


def _first(g, paths: list[str]) -> str | None:
    for p in paths:
        if g.exists(p):
            return p
    return None


def _firmware(g, root_device: str) -> str:
    try:
        disk = g.part_to_dev(root_device)
        if g.part_get_parttype(disk) == "gpt":
            for part in g.part_list(disk):
                num = part["part_num"]
                if g.part_get_gpt_type(disk, num).upper() == ESP_GUID:
                    return "uefi"
    except RuntimeError:
        pass
    return "bios"


def _kernels(g, workdir: Path) -> list[Kernel]:
    moddir = "/lib/modules" if g.is_dir("/lib/modules") else "/usr/lib/modules"
    kernels = []
    for ver in sorted(g.ls(moddir)):
        if not g.is_dir(f"{moddir}/{ver}/kernel"):
            continue
        vmlinuz = _first(g, [f"/boot/vmlinuz-{ver}", f"{moddir}/{ver}/vmlinuz"])
        rd = _first(g, [f"/boot/initrd.img-{ver}", f"/boot/initramfs-{ver}.img", f"/boot/initrd-{ver}"])
        if rd is None and g.exists("/boot/vmlinuz-linux"):  # Arch names images after the package
            rd = _first(g, ["/boot/initramfs-linux.img"])
        mods: list[str] = []
        if rd is not None:
            mods = sorted(initrdlib.modules(initrdlib.read_from_guest(g, rd, workdir)))
        builtin_txt = _read(g, f"{moddir}/{ver}/modules.builtin") or ""
        builtin = sorted(
            m for m in VIRTIO_MODULES if re.search(rf"/{m.replace('_', '[_-]')}\.ko\b", builtin_txt)
        )
        kernels.append(Kernel(version=ver, vmlinuz=vmlinuz, initrd=rd, initrd_modules=mods, builtin=builtin))
    return kernels


def _initramfs_tool(g) -> str:
    def has(*names: str) -> bool:
        return any(g.exists(f"{d}/{n}") for n in names for d in ("/usr/sbin", "/sbin", "/usr/bin", "/bin"))

    if has("update-initramfs"):
        return "initramfs-tools"
    if has("dracut"):
        return "dracut"
    if has("mkinitcpio"):
        return "mkinitcpio"
    return "unknown"


def initramfs_tools_modules_setting(g) -> str | None:
    """The effective MODULES= of initramfs-tools (initramfs.conf, then conf.d in order)."""
    value = None
    files = ["/etc/initramfs-tools/initramfs.conf"]
    if g.is_dir("/etc/initramfs-tools/conf.d"):
        files += [f"/etc/initramfs-tools/conf.d/{n}" for n in sorted(g.ls("/etc/initramfs-tools/conf.d"))]
    for path in files:
        for m in re.finditer(r"(?m)^\s*MODULES=\"?(\w+)\"?", _read(g, path) or ""):
            value = m.group(1)
    return value


def parse_table(text: str, file: str) -> list[MountEntry]:
    """fstab (spec, target, type) or crypttab (name, source) lines."""
    entries = []
    for no, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        if file.endswith("crypttab"):
            spec, target, fstype = fields[1], fields[0], "crypt"
        else:
            spec, target = fields[0], fields[1]
            fstype = fields[2] if len(fields) > 2 else ""
        entries.append(MountEntry(file, no, spec, target, fstype, bool(DEVICE_NAME.match(spec))))
    return entries


def grub_roots(cfg: str) -> list[str]:
    """root= of every kernel line (linux/linuxefi/linux16) in a grub.cfg."""
    roots = []
    for line in cfg.splitlines():
        if re.match(r"\s*linux(efi|16)?\s", line):
            m = re.search(r"\broot=(\S+)", line)
            roots.append(m.group(1) if m else "(none)")
    return roots


def grub_default_disables_uuid(text: str) -> bool:
    value = None
    for m in re.finditer(r"(?m)^\s*GRUB_DISABLE_LINUX_UUID=[\"']?(\w+)", text):
        value = m.group(1)
    return value == "true"


def _grub(g, facts: LinuxFacts) -> None:
    cfg = _first(g, ["/boot/grub/grub.cfg", "/boot/grub2/grub.cfg"])
    facts.grub_cfg = cfg
    if cfg is None:
        facts.notes.append("no GRUB 2 configuration found; boot loader root= not checked")
        return
    facts.bootloader = "grub2-efi" if facts.firmware == "uefi" else "grub2-bios"
    if any(g.exists(f"{d}/update-grub") for d in ("/usr/sbin", "/sbin")):
        facts.grub_mkconfig = "update-grub"
    else:
        tool = "grub2-mkconfig" if any(g.exists(f"{d}/grub2-mkconfig") for d in ("/usr/sbin", "/sbin", "/usr/bin")) else "grub-mkconfig"
        facts.grub_mkconfig = f"{tool} -o {cfg}"
    facts.grub_disable_linux_uuid = grub_default_disables_uuid(_read(g, "/etc/default/grub") or "")
    facts.grub_roots = grub_roots(g.cat(cfg))


def _files(g, directory: str, pattern: str) -> list[str]:
    if not g.is_dir(directory):
        return []
    return [f"{directory}/{n}" for n in sorted(g.ls(directory)) if re.fullmatch(pattern, n)]


def pinned_macs(g) -> list[PinnedMac]:
    found: list[PinnedMac] = []
    for path in _files(g, "/etc/udev/rules.d", r".*\.rules"):
        for m in re.finditer(rf"ATTRS?\{{address\}}==\"({MAC})\"", _read(g, path) or ""):
            found.append(PinnedMac(path, "udev-rule", m.group(1).lower()))
    for path in ["/etc/network/interfaces"] + _files(g, "/etc/network/interfaces.d", r"[^.].*"):
        for m in re.finditer(rf"(?m)^\s*hwaddress\s+(?:ether\s+)?({MAC})", _read(g, path) or ""):
            found.append(PinnedMac(path, "ifupdown-hwaddress", m.group(1).lower()))
    for path in _files(g, "/etc/sysconfig/network-scripts", r"ifcfg-.*") + _files(g, "/etc/sysconfig/network", r"ifcfg-.*"):
        for m in re.finditer(rf"(?m)^\s*(?:HWADDR|MACADDR)=[\"']?({MAC})", _read(g, path) or ""):
            found.append(PinnedMac(path, "ifcfg-hwaddr", m.group(1).lower()))
    for path in _files(g, "/etc/systemd/network", r".*\.(network|link)"):
        text = _read(g, path) or ""
        match = re.search(r"(?ms)^\[Match\](.*?)(^\[|\Z)", text)
        if match:
            for m in re.finditer(rf"(?m)^\s*(?:MACAddress|PermanentMACAddress)=\s*({MAC})", match.group(1)):
                found.append(PinnedMac(path, "networkd-match", m.group(1).lower(), fixable=False))
    for path in _files(g, "/etc/netplan", r".*\.ya?ml"):
        for m in re.finditer(rf"(?m)^\s*macaddress:\s*[\"']?({MAC})", _read(g, path) or ""):
            found.append(PinnedMac(path, "netplan-macaddress", m.group(1).lower(), fixable=False))
    return found


def installed_deb_packages(status: str) -> set[str]:
    installed = set()
    for block in status.split("\n\n"):
        name = re.search(r"(?m)^Package:\s*(\S+)", block)
        state = re.search(r"(?m)^Status:\s*(.+)$", block)
        if name and state and state.group(1).strip().endswith(" installed") and "not-installed" not in state.group(1):
            installed.add(name.group(1))
    return installed


def vmware_tools(g) -> list[str]:
    found = []
    status = _read(g, "/var/lib/dpkg/status")
    if status is not None:
        found += [f"package:{p}" for p in VMWARE_PACKAGES if p in installed_deb_packages(status)]
    elif any(g.exists(p) for p in ["/usr/bin/vmtoolsd"]):
        found.append("file:/usr/bin/vmtoolsd")
    found += [f"file:{p}" for p in VMWARE_FILES if g.exists(p)]
    return found


def inspect_handle(g, root: str, image: str, workdir: Path) -> LinuxFacts:
    mounts = g.inspect_get_mountpoints(root)
    facts = LinuxFacts(
        image=str(image),
        root_device=root,
        distro=g.inspect_get_distro(root),
        product=g.inspect_get_product_name(root),
        version=f"{g.inspect_get_major_version(root)}.{g.inspect_get_minor_version(root)}",
        arch=g.inspect_get_arch(root),
        package_format=g.inspect_get_package_format(root),
        firmware=_firmware(g, root),
        mounts=dict(mounts),
    )
    facts.kernels = _kernels(g, workdir)
    if not facts.kernels:
        facts.notes.append("no kernel found under /lib/modules")
    facts.initramfs_tool = _initramfs_tool(g)
    if facts.initramfs_tool == "initramfs-tools":
        facts.initramfs_modules_setting = initramfs_tools_modules_setting(g)
    _grub(g, facts)
    fstab = _read(g, "/etc/fstab")
    if fstab is not None:
        facts.fstab = parse_table(fstab, "/etc/fstab")
    crypttab = _read(g, "/etc/crypttab")
    if crypttab is not None:
        facts.crypttab = parse_table(crypttab, "/etc/crypttab")
    facts.pinned_macs = pinned_macs(g)
    facts.vmware_tools = vmware_tools(g)
    return facts


def inspect_image(image: str | Path, *_ignored) -> LinuxFacts:
    """Inspect a Linux disk read-only (one libguestfs launch)."""
    g, root = open_linux(image, readonly=True)
    try:
        with tempfile.TemporaryDirectory(prefix="h2k-linux-") as tmp:
            return inspect_handle(g, root, str(image), Path(tmp))
    finally:
        g.close()
