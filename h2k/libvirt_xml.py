"""MachineProfile -> libvirt domain XML (ElementTree; never string templates).

Every field of the profile is honoured, the same way the lab's direct QEMU
backend honours it:

- ``<domain type>`` comes from :mod:`h2k.accel` (``kvm`` where KVM really works,
  ``qemu`` = TCG otherwise), and the CPU model matches (host-passthrough / maximum).
- Firmware: SeaBIOS by default; OVMF as a read-only pflash ``<loader>`` with an
  NVRAM file made from the VARS template (or a kept VARS file, as in a
  two-phase boot); Secure Boot with the secure-boot OVMF build, the enrolled
  (Microsoft) VARS template, ``<loader secure='yes'>`` and the ``smm`` feature.
- Hyper-V enlightenments (``<hyperv>``) with ``hv-crash`` as ``<panic model='hyperv'/>``
  (libvirt's spelling), which puts the Windows stop code into QMP ``GUEST_PANICKED``;
  pvpanic as ``<panic model='isa'>`` at I/O 0x505.
- The disk on its bus (sata / ide / virtio / virtio-scsi / LSI / PVSCSI), CD-ROMs,
  a user-mode (slirp) NIC, COM1 to a UNIX socket and a log file, the guest-agent
  channel, a TPM 2.0 emulator (swtpm), lifecycle actions and ``<pm>``.

No QMP socket can be declared in domain XML: the libvirt backend gets the same
QMP events through libvirt-qemu's monitor-event API (see ``lab.backend_libvirt``).

For a host that shares no files with the caller (the lab's libvirt backend), the disk
can be a storage-pool volume (``DomainFiles.disk_pool``), the console a pty (no socket
path), and the firmware left to the host (``XmlOptions.firmware_autoselect``:
``<os firmware='efi'>`` with the Secure Boot feature wanted, so the daemon picks its own
OVMF build and VARS template from its firmware descriptors). Nothing forces QEMU to run
as root: the host's own QEMU user runs it.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from h2k.profile import MachineProfile

OVMF_DIRS = ("/usr/share/OVMF", "/usr/share/edk2/ovmf", "/usr/share/edk2/x64", "/usr/share/qemu")

# (code, vars template) candidates, best first. Secure Boot wants the SMM build
# and a VARS template with the Microsoft keys enrolled (Windows' loader is signed by them).
_OVMF_PLAIN = (("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"), ("OVMF_CODE.fd", "OVMF_VARS.fd"))
_OVMF_SECURE = (
    ("OVMF_CODE_4M.secboot.fd", "OVMF_VARS_4M.ms.fd"),
    ("OVMF_CODE.secboot.fd", "OVMF_VARS.ms.fd"),
    ("OVMF_CODE.secboot.fd", "OVMF_VARS.secboot.fd"),
)

_DISK_TARGET = {
    # profile bus -> (libvirt target bus, device-name prefix, controller model or None)
    "sata": ("sata", "sd", None),
    "ide": ("ide", "hd", None),
    "virtio-blk": ("virtio", "vd", None),
    "virtio-scsi": ("scsi", "sd", "virtio-scsi"),
    "scsi-lsi": ("scsi", "sd", "lsilogic"),  # QEMU lsi53c895a, as the direct backend
    "pvscsi": ("scsi", "sd", "vmpvscsi"),
}

_NIC_MODEL = {
    "virtio-net": "virtio",
    "e1000e": "e1000e",
    "e1000": "e1000",
    "rtl8139": "rtl8139",
    "vmxnet3": "vmxnet3",
}

AGENT_CHANNEL = "org.qemu.guest_agent.0"


@dataclass(frozen=True)
class Ovmf:
    code: str
    vars_template: str


def find_ovmf(secure: bool) -> Ovmf:
    """The OVMF code and VARS template on this host (Debian paths when none is found)."""
    for code, vars_ in _OVMF_SECURE if secure else _OVMF_PLAIN:
        for d in OVMF_DIRS:
            if os.path.exists(os.path.join(d, code)) and os.path.exists(os.path.join(d, vars_)):
                return Ovmf(os.path.join(d, code), os.path.join(d, vars_))
    code, vars_ = (_OVMF_SECURE if secure else _OVMF_PLAIN)[0]
    return Ovmf(os.path.join(OVMF_DIRS[0], code), os.path.join(OVMF_DIRS[0], vars_))


@dataclass(frozen=True)
class DomainFiles:
    """Where the running VM's files and sockets are: host paths, not part of the machine.

    ``nvram`` is the VM's own VARS file; libvirt creates it from the template when
    it does not exist yet, and keeps it when it does (bootstrap -> final).
    """

    disk: str | None  # None: no disk (a direct-kernel-boot test guest); a volume name with disk_pool
    disk_format: str = "qcow2"
    disk_pool: str | None = None  # the disk is volume ``disk`` of this storage pool
    serial_socket: str | None = None
    serial_log: str | None = None
    agent_socket: str | None = None
    nvram: str | None = None


@dataclass(frozen=True)
class XmlOptions:
    domain_type: str | None = None  # kvm | qemu; None: ask h2k.accel
    lab: bool = False  # lab boots: reboot/crash stop the VM for evidence instead of restarting
    disable_netboot: bool = True  # no PXE/HTTP boot fall-back (OVMF spends minutes on it)
    # UEFI: let the host pick its OVMF code and VARS template (it may keep them elsewhere).
    firmware_autoselect: bool = False


def disk_format_of(path: str) -> str:
    """qcow2 or raw, from the file's first bytes (libvirt needs the format spelled out)."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(8)
    except OSError:  # not there yet: go by the name
        return "qcow2" if path.endswith(".qcow2") else "raw"
    if magic[:4] == b"QFI\xfb":
        return "qcow2"
    if magic[:4] == b"KDMV":
        return "vmdk"
    if magic == b"vhdxfile":
        return "vhdx"
    return "raw"


def domain_element(profile: MachineProfile, files: DomainFiles, opts: XmlOptions = XmlOptions()) -> ET.Element:
    dtype = opts.domain_type
    if dtype is None:
        from h2k import accel

        dtype = accel.decide(announce=False).libvirt_domain_type()
    if dtype not in ("kvm", "qemu"):
        raise ValueError(f"domain type must be kvm or qemu, not {dtype!r}")

    dom = ET.Element("domain", type=dtype)
    _text(dom, "name", profile.name)
    _text(dom, "memory", str(profile.memory_mb), unit="MiB")
    _text(dom, "vcpu", str(profile.cpus))
    if opts.disable_netboot and profile.uefi:
        # OVMF reads these fw_cfg knobs: no PXE/HTTP boot, so "no bootable device" is fast.
        sysinfo = ET.SubElement(dom, "sysinfo", type="fwcfg")
        for key in ("IPv4PXESupport", "IPv6PXESupport"):
            _text(sysinfo, "entry", "n", name=f"opt/org.tianocore/{key}")
    _os(dom, profile, files, opts.firmware_autoselect)
    _features(dom, profile, dtype)
    if dtype == "kvm":
        ET.SubElement(dom, "cpu", mode="host-passthrough", check="none", migratable="on")
    else:
        ET.SubElement(dom, "cpu", mode="maximum", check="none")
    _clock(dom, profile)
    _text(dom, "on_poweroff", "destroy")
    _text(dom, "on_reboot", "destroy" if opts.lab else "restart")
    # preserve keeps a panicked guest paused so the lab can take a screendump.
    _text(dom, "on_crash", "preserve" if opts.lab else "restart")
    pm = ET.SubElement(dom, "pm")
    ET.SubElement(pm, "suspend-to-mem", enabled="no")
    ET.SubElement(pm, "suspend-to-disk", enabled="no")
    _devices(dom, profile, files, opts)
    return dom


def domain_xml(profile: MachineProfile, files: DomainFiles, opts: XmlOptions = XmlOptions()) -> str:
    root = domain_element(profile, files, opts)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def _text(parent: ET.Element, tag: str, text: str, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    el.text = text
    return el


def _os(dom: ET.Element, p: MachineProfile, files: DomainFiles, autoselect: bool) -> None:
    os_el = ET.SubElement(dom, "os")
    _text(os_el, "type", "hvm", arch="x86_64", machine=p.machine_type)
    if p.uefi and autoselect:
        os_el.set("firmware", "efi")
        fw = ET.SubElement(os_el, "firmware")
        secure = "yes" if p.firmware == "uefi-secureboot" else "no"
        ET.SubElement(fw, "feature", enabled=secure, name="secure-boot")
        if secure == "yes":  # Windows' boot loader is signed with the Microsoft keys
            ET.SubElement(fw, "feature", enabled="yes", name="enrolled-keys")
        if files.nvram:  # made by the host from its template when missing
            _text(os_el, "nvram", files.nvram)
    elif p.uefi:
        ovmf = find_ovmf(secure=p.firmware == "uefi-secureboot")
        attrs = {"readonly": "yes", "type": "pflash"}
        if p.firmware == "uefi-secureboot":
            attrs["secure"] = "yes"
        _text(os_el, "loader", ovmf.code, **attrs)
        nv = ET.SubElement(os_el, "nvram", template=ovmf.vars_template)
        if files.nvram:
            nv.text = files.nvram
    if p.kernel:
        _text(os_el, "kernel", p.kernel)
        if p.initrd:
            _text(os_el, "initrd", p.initrd)
        if p.append:
            _text(os_el, "cmdline", p.append)
    # Boot order is per device (<boot order>) so firmware tries the disk, not the CD-ROM.
    if p.serial_console and not p.uefi:
        # SeaBIOS mirrors its messages (and "No bootable device") on the serial port.
        ET.SubElement(os_el, "bios", useserial="yes")


def _features(dom: ET.Element, p: MachineProfile, dtype: str) -> None:
    feats = ET.SubElement(dom, "features")
    ET.SubElement(feats, "acpi")
    ET.SubElement(feats, "apic")
    if p.hyperv:
        hv = ET.SubElement(feats, "hyperv", mode="custom")
        for name in ("relaxed", "vapic"):
            ET.SubElement(hv, name, state="on")
        ET.SubElement(hv, "spinlocks", state="on", retries="8191")
        # TCG refuses hv-vpindex ("kernel doesn't allow setting HyperV VP_INDEX"), and
        # synic/stimer need it: those three only under KVM.
        names = ("vpindex", "runtime", "synic", "stimer", "reset", "frequencies") if dtype == "kvm" else ("runtime", "reset", "frequencies")
        for name in names:
            ET.SubElement(hv, name, state="on")
    if p.firmware == "uefi-secureboot":
        ET.SubElement(feats, "smm", state="on")


def _clock(dom: ET.Element, p: MachineProfile) -> None:
    # Windows keeps the RTC in local time (unless RealTimeIsUniversal); Linux in UTC.
    clock = ET.SubElement(dom, "clock", offset="localtime" if p.hyperv else "utc")
    ET.SubElement(clock, "timer", name="rtc", tickpolicy="catchup")
    ET.SubElement(clock, "timer", name="pit", tickpolicy="delay")
    ET.SubElement(clock, "timer", name="hpet", present="no")
    if p.hyperv:
        ET.SubElement(clock, "timer", name="hypervclock", present="yes")


def _devices(dom: ET.Element, p: MachineProfile, files: DomainFiles, opts: XmlOptions) -> None:
    dev = ET.SubElement(dom, "devices")
    tbus, prefix, controller = _DISK_TARGET[p.disk_bus]
    if controller:
        ET.SubElement(dev, "controller", type="scsi", index="0", model=controller)

    if files.disk:
        disk = ET.SubElement(dev, "disk", type="volume" if files.disk_pool else "file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type=files.disk_format, discard="unmap")
        if files.disk_pool:
            ET.SubElement(disk, "source", pool=files.disk_pool, volume=files.disk)
        else:
            ET.SubElement(disk, "source", file=files.disk)
        ET.SubElement(disk, "target", dev=f"{prefix}a", bus=tbus)
        if not p.kernel:
            ET.SubElement(disk, "boot", order="1")

    # CD-ROMs go on the machine's own ATA bus: AHCI on q35, IDE on i440fx.
    cd_bus, cd_prefix = ("ide", "hd") if p.machine_type == "pc" else ("sata", "sd")
    used = {f"{prefix}a"} if prefix == cd_prefix and files.disk else set()
    letters = (chr(c) for c in range(ord("a"), ord("z") + 1))
    for iso in p.cdroms:
        name = next(f"{cd_prefix}{x}" for x in letters if f"{cd_prefix}{x}" not in used and not (cd_bus == "ide" and x == "b"))
        used.add(name)
        cd = ET.SubElement(dev, "disk", type="file", device="cdrom")
        ET.SubElement(cd, "driver", name="qemu", type="raw")
        ET.SubElement(cd, "source", file=iso)
        ET.SubElement(cd, "target", dev=name, bus=cd_bus)
        ET.SubElement(cd, "readonly")

    for i in range(p.nic_count):  # one per MAC kept from the source, in its order
        nic = ET.SubElement(dev, "interface", type="user")  # slirp: 10.0.2.x, nothing leaves the host
        if i < len(p.macs):
            ET.SubElement(nic, "mac", address=p.macs[i])
        ET.SubElement(nic, "model", type=_NIC_MODEL[p.nic_model])
        if opts.disable_netboot:
            ET.SubElement(nic, "rom", enabled="no")  # no iPXE option ROM: no network boot

    if p.serial_console:
        if files.serial_socket:
            serial = ET.SubElement(dev, "serial", type="unix")
            ET.SubElement(serial, "source", mode="bind", path=files.serial_socket)
        else:
            serial = ET.SubElement(dev, "serial", type="pty")
        if files.serial_log:
            ET.SubElement(serial, "log", file=files.serial_log, append="off")
        target = ET.SubElement(serial, "target", type="isa-serial", port="0")
        ET.SubElement(target, "model", name="isa-serial")

    if p.guest_agent:
        chan = ET.SubElement(dev, "channel", type="unix")
        src = {"mode": "bind"}
        if files.agent_socket:
            src["path"] = files.agent_socket
        ET.SubElement(chan, "source", src)
        ET.SubElement(chan, "target", type="virtio", name=AGENT_CHANNEL)

    if p.tpm:
        tpm = ET.SubElement(dev, "tpm", model="tpm-crb")
        ET.SubElement(tpm, "backend", type="emulator", version="2.0")

    # A VGA so screendumps show what a person would see; no graphics listener is opened.
    video = ET.SubElement(dev, "video")
    ET.SubElement(video, "model", type="vga")
    ET.SubElement(dev, "memballoon", model="virtio" if p.stage == "final" else "none")

    if p.pvpanic:
        panic = ET.SubElement(dev, "panic", model="isa")
        ET.SubElement(panic, "address", type="isa", iobase="0x505")
    if p.hyperv:
        ET.SubElement(dev, "panic", model="hyperv")  # = hv-crash: the stop code in GUEST_PANICKED


def write_domain_xml(path: str | Path, profile: MachineProfile, files: DomainFiles, opts: XmlOptions = XmlOptions()) -> None:
    Path(path).write_text(domain_xml(profile, files, opts))
