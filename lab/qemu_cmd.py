"""MachineProfile -> QEMU command line (the direct backend).

Everything the scorer needs is wired here: QMP, COM1 (socket + log file), the
firmware debug port (SeaBIOS prints "No bootable device." there), the guest
agent channel, pvpanic, Hyper-V enlightenments with hv-crash, and the actions
that keep evidence: a panic pauses the guest, a guest reset becomes a SHUTDOWN
event (reason guest-reset) and a guest shutdown pauses too, so the lab can take
a screendump before it stops QEMU.

Sockets are opened by the lab and passed to QEMU as listening fds, so the lab
can connect at once, and QEMU starts paused (-S) so nothing is printed before
the watchers are attached.

Paths never go into QEMU's option syntax unescaped: block devices are
``-blockdev`` JSON (the disk's whole chain, each layer with its ``driver``, so
QEMU never reads a backing name or guesses a format), and every other path in a
``key=value,...`` option has its commas doubled (:func:`qemu_opt`). Which string
stands for a file is decided by ``files`` (the direct backend hands QEMU file
descriptors, see :mod:`lab.confine`); the default is the path itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from h2k.accel import AccelDecision
from h2k.image import DiskImage
from h2k.profile import MachineProfile
from lab import confine, firmware

# files(path, mode) -> what QEMU is told to open: mode r (read-only), rw, a (append, create), w (create, truncate).
FileRef = Callable[[str, str], str]
COW_FORMATS = ("qcow2", "vmdk")  # formats with a backing file


def by_path(path: str, mode: str) -> str:
    """QEMU opens the path itself."""
    return str(path)


def qemu_opt(value: str | Path) -> str:
    """A value for QEMU's key=value,... syntax: a comma is doubled, so it can neither end the value nor add an option."""
    return str(value).replace(",", ",,")

# Hyper-V enlightenments Windows uses on KVM; hv-crash makes a bugcheck a QMP
# GUEST_PANICKED event carrying the stop code, with no guest driver.
HYPERV_FLAGS = ("hv-relaxed", "hv-vapic", "hv-spinlocks=0x1fff", "hv-vpindex", "hv-runtime",
                "hv-time", "hv-synic", "hv-stimer", "hv-frequencies", "hv-crash")
# Under TCG QEMU 7.2 refuses hv-vpindex ("kernel doesn't allow setting HyperV VP_INDEX"),
# and synic/stimer depend on it: keep the rest (measured: QEMU starts with each of these).
HYPERV_FLAGS_TCG = tuple(f for f in HYPERV_FLAGS if f not in ("hv-vpindex", "hv-synic", "hv-stimer"))

NIC_DEVICES = {
    "virtio-net": "virtio-net-pci",
    "e1000e": "e1000e",
    "e1000": "e1000",
    "rtl8139": "rtl8139",
    "vmxnet3": "vmxnet3",
}

AGENT_PORT_ID = "qga0port"
AGENT_PORT_NAME = "org.qemu.guest_agent.0"


@dataclass
class SocketFds:
    """Listening socket fds (inherited by QEMU) keyed by role."""

    qmp: int
    console: int | None = None
    debugcon: int | None = None
    agent: int | None = None


@dataclass
class QemuCommand:
    argv: list[str]
    pass_fds: list[int] = field(default_factory=list)


def cpu_arg(accel: AccelDecision, profile: MachineProfile) -> tuple[list[str], str]:
    """Split the accelerator's args into (-accel ...) and the CPU model, adding Hyper-V flags."""
    args = accel.qemu_args()
    cpu = "max"
    rest: list[str] = []
    i = 0
    while i < len(args):
        if args[i] == "-cpu" and i + 1 < len(args):
            cpu = args[i + 1]
            i += 2
            continue
        rest.append(args[i])
        i += 1
    if profile.hyperv:
        cpu = ",".join([cpu, *(HYPERV_FLAGS if accel.is_kvm else HYPERV_FLAGS_TCG)])
    return rest, cpu


def blockdev(disk: DiskImage, node: str, files: FileRef = by_path, *, read_only: bool = False) -> dict:
    """The -blockdev tree for ``disk``: every layer with its format pinned, backing given explicitly
    (the base gets ``backing: null``), the top writable unless ``read_only``, cache=unsafe."""
    def layer(i: int) -> dict:
        d = disk.layers[i]
        ro = read_only or i > 0
        # A multi-file VMDK finds its extents by name next to its descriptor: that one is passed by path.
        name = files(d.path, "r" if ro else "rw") if len(d.files) <= 1 else d.path
        fmt: dict = {"driver": d.format, "read-only": ro, "cache": {"no-flush": True},
                     "file": {"driver": "file", "filename": name, "read-only": ro, "cache": {"no-flush": True}}}
        if d.format in COW_FORMATS:
            fmt["backing"] = layer(i + 1) if i + 1 < len(disk.layers) else None
        return fmt

    top = layer(0)
    top["node-name"] = node
    if not read_only:
        top["discard"] = top["file"]["discard"] = "unmap"
    return top


def blockdev_arg(tree: dict) -> list[str]:
    return ["-blockdev", json.dumps(tree, separators=(",", ":"))]


def disk_args(profile: MachineProfile, disk: DiskImage, files: FileRef = by_path) -> list[str]:
    """The boot disk on the profile's bus, bootindex 1."""
    drive = blockdev_arg(blockdev(disk, "disk0", files))
    bus = profile.disk_bus
    q35 = profile.machine_type == "q35"
    if bus == "sata":
        if q35:  # q35's built-in ICH9 AHCI controller
            dev = ["-device", "ide-hd,drive=disk0,bus=ide.0,bootindex=1"]
        else:
            dev = ["-device", "ahci,id=ahci0", "-device", "ide-hd,drive=disk0,bus=ahci0.0,bootindex=1"]
    elif bus == "ide":
        dev = ["-device", "ide-hd,drive=disk0,bus=ide.0,unit=0,bootindex=1"]
    elif bus == "virtio-blk":
        dev = ["-device", "virtio-blk-pci,drive=disk0,bootindex=1"]
    elif bus == "virtio-scsi":
        dev = ["-device", "virtio-scsi-pci,id=scsi0", "-device", "scsi-hd,drive=disk0,bus=scsi0.0,bootindex=1"]
    elif bus == "scsi-lsi":  # libvirt's model='lsilogic'
        dev = ["-device", "lsi53c895a,id=scsi0", "-device", "scsi-hd,drive=disk0,bus=scsi0.0,bootindex=1"]
    elif bus == "pvscsi":
        dev = ["-device", "pvscsi,id=scsi0", "-device", "scsi-hd,drive=disk0,bus=scsi0.0,bootindex=1"]
    else:  # MachineProfile validates buses; this is a programming error
        raise ValueError(f"unsupported disk bus {bus}")
    return drive + dev


def cdrom_args(profile: MachineProfile, files: FileRef = by_path) -> list[str]:
    out: list[str] = []
    q35 = profile.machine_type == "q35"
    for i, iso in enumerate(profile.cdroms):
        out += blockdev_arg({"driver": "raw", "node-name": f"cd{i}", "read-only": True,
                             "file": {"driver": "file", "filename": files(iso, "r"), "read-only": True}})
        if q35:  # ICH9 AHCI ports 1..5 (port 0 may hold the disk)
            out += ["-device", f"ide-cd,drive=cd{i},bus=ide.{i + 1}"]
        else:  # i440fx IDE: secondary channel, then primary slave
            bus, unit = [("ide.1", 0), ("ide.1", 1), ("ide.0", 1)][i] if i < 3 else (None, None)
            if bus is None:
                raise ValueError("at most three CD-ROMs on an i440fx machine")
            out += ["-device", f"ide-cd,drive=cd{i},bus={bus},unit={unit}"]
    return out


def nic_args(profile: MachineProfile) -> list[str]:
    if profile.nic_model == "none":
        return []
    dev = NIC_DEVICES[profile.nic_model]
    out: list[str] = []
    macs: list[str | None] = list(profile.macs) or [None]
    for i, mac in enumerate(macs):
        # slirp only, one per NIC; restrict=on keeps the guest off every network outside the
        # lab (DHCP, the gateway and DNS at 10.0.2.x still answer).
        out += ["-netdev", f"user,id=net{i},restrict=on"]
        opts = f"{dev},netdev=net{i},romfile="  # no option ROM: no iPXE in the boot order
        if mac:
            opts += f",mac={mac}"
        out += ["-device", opts]
    return out


def build(
    profile: MachineProfile,
    *,
    accel: AccelDecision,
    name: str,
    fds: SocketFds,
    serial_log: Path,
    firmware_log: Path,
    disk: DiskImage | None = None,
    files: FileRef = by_path,
    fw: firmware.FirmwareFiles | None = None,
    vars_path: Path | None = None,
    tpm_args: list[str] | None = None,
    qemu_binary: str = "qemu-system-x86_64",
    paused: bool = True,
) -> QemuCommand:
    fw = fw or firmware.find(profile.firmware)
    accel_args, cpu = cpu_arg(accel, profile)
    machine = profile.machine_type
    if fw.secure_boot:
        machine += ",smm=on"
    if fw.code is not None:
        machine += firmware.PFLASH_MACHINE_PROPS
    argv = [qemu_binary, "-name", name, "-nodefaults", "-no-user-config",
            "-sandbox", confine.SANDBOX,
            "-machine", machine, *accel_args, "-cpu", cpu,
            "-m", str(profile.memory_mb), "-smp", str(profile.cpus),
            "-display", "none", "-vga", "std",
            # Evidence first: pause on panic, turn a guest reset into SHUTDOWN(guest-reset)
            # and pause on shutdown, so the lab can screendump and then stop QEMU.
            "-action", "panic=pause", "-action", "reboot=shutdown", "-action", "shutdown=pause",
            "-chardev", f"socket,id=qmp,fd={fds.qmp},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control"]
    pass_fds = [fds.qmp]
    if paused:
        argv.append("-S")
    argv += firmware.qemu_args(fw, vars_path, files)
    if fw.code is not None:
        argv += firmware.ovmf_no_network_boot_args()
    # The firmware debug port (0x402): SeaBIOS' "No bootable device.", OVMF's debug log.
    if fds.debugcon is not None:
        argv += ["-chardev", f"socket,id=fwdbg,fd={fds.debugcon},server=on,wait=off,"
                 f"logfile={qemu_opt(files(str(firmware_log), 'a'))},logappend=on",
                 "-device", "isa-debugcon,iobase=0x402,chardev=fwdbg"]
        pass_fds.append(fds.debugcon)
    else:
        argv += ["-chardev", f"file,id=fwdbg,path={qemu_opt(files(str(firmware_log), 'a'))},append=on",
                 "-device", "isa-debugcon,iobase=0x402,chardev=fwdbg"]
    if profile.serial_console and fds.console is not None:
        argv += ["-chardev", f"socket,id=com1,fd={fds.console},server=on,wait=off,"
                 f"logfile={qemu_opt(files(str(serial_log), 'a'))},logappend=on",
                 "-serial", "chardev:com1"]
        pass_fds.append(fds.console)
    if profile.pvpanic:
        argv += ["-device", "pvpanic-pci" if profile.machine_type == "q35" else "pvpanic"]
    if profile.guest_agent and fds.agent is not None:
        argv += ["-chardev", f"socket,id=qga0,fd={fds.agent},server=on,wait=off",
                 "-device", "virtio-serial-pci,id=vser0",
                 "-device", f"virtserialport,bus=vser0.0,chardev=qga0,name={AGENT_PORT_NAME},id={AGENT_PORT_ID}"]
        pass_fds.append(fds.agent)
    if disk is not None:
        argv += disk_args(profile, disk, files)
    argv += cdrom_args(profile, files)
    argv += nic_args(profile)
    if tpm_args:
        argv += tpm_args
    if profile.kernel:
        argv += ["-kernel", profile.kernel]
        if profile.initrd:
            argv += ["-initrd", profile.initrd]
        if profile.append:
            argv += ["-append", profile.append]
    return QemuCommand(argv, pass_fds)
