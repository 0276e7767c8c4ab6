"""Firmware files (SeaBIOS, OVMF, OVMF Secure Boot), per-boot NVRAM copies, and swtpm.

A UEFI machine gets one VARS (NVRAM) file made from the template; a two-phase
boot passes the same file to both phases, as a real VM keeps its boot entries.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from h2k.errors import H2KError

OVMF_DIRS = ("/usr/share/OVMF", "/usr/share/ovmf", "/usr/share/edk2/ovmf", "/usr/share/qemu")

# (code, vars template) candidates per firmware, best first (Debian names first).
_CANDIDATES = {
    "uefi": [("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"), ("OVMF_CODE.fd", "OVMF_VARS.fd")],
    # The .ms VARS template has Microsoft's keys enrolled, so Secure Boot is on.
    "uefi-secureboot": [("OVMF_CODE_4M.secboot.fd", "OVMF_VARS_4M.ms.fd"), ("OVMF_CODE.secboot.fd", "OVMF_VARS.ms.fd")],
}


@dataclass(frozen=True)
class FirmwareFiles:
    firmware: str
    code: Path | None  # None for SeaBIOS (QEMU's default)
    vars_template: Path | None

    @property
    def secure_boot(self) -> bool:
        return self.firmware == "uefi-secureboot"


def find(firmware: str) -> FirmwareFiles:
    if firmware == "bios":
        return FirmwareFiles("bios", None, None)
    if firmware not in _CANDIDATES:
        raise H2KError(f"unknown firmware {firmware!r}")
    for d in OVMF_DIRS:
        for code, tmpl in _CANDIDATES[firmware]:
            c, t = Path(d) / code, Path(d) / tmpl
            if c.exists() and t.exists():
                return FirmwareFiles(firmware, c, t)
    raise H2KError(f"no OVMF firmware for {firmware} found in {', '.join(OVMF_DIRS)} (install the 'ovmf' package)")


def prepare_vars(fw: FirmwareFiles, workdir: Path, keep: Path | None = None) -> Path | None:
    """The VARS file for this boot: ``keep`` if it exists (reused), else a fresh copy of
    the template (at ``keep`` if given, so the caller can reuse it later)."""
    if fw.code is None:
        return None
    if keep is not None and Path(keep).exists() and Path(keep).stat().st_size > 0:
        return Path(keep)
    dest = Path(keep) if keep is not None else workdir / "OVMF_VARS.fd"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(fw.vars_template, dest)
    os.chmod(dest, 0o600)
    return dest


PFLASH_MACHINE_PROPS = ",pflash0=fw-code,pflash1=fw-vars"  # appended to -machine for UEFI


def qemu_args(fw: FirmwareFiles, vars_path: Path | None, files=None) -> list[str]:
    """The two pflash block nodes (-blockdev JSON; the machine takes them with PFLASH_MACHINE_PROPS).
    ``files(path, mode)`` says what QEMU is to open (default: the path)."""
    if fw.code is None:
        return []
    from lab.qemu_cmd import blockdev_arg, by_path  # late: qemu_cmd imports this module

    files = files or by_path

    def node(name: str, path: Path, ro: bool) -> list[str]:
        return blockdev_arg({"driver": "raw", "node-name": name, "read-only": ro,
                             "file": {"driver": "file", "filename": files(str(path), "r" if ro else "rw"),
                                      "read-only": ro}})

    args = node("fw-code", fw.code, True) + node("fw-vars", vars_path, False)
    if fw.secure_boot:
        # The secure-boot build keeps its variables in SMM-protected flash.
        args += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    return args


def ovmf_no_network_boot_args() -> list[str]:
    """Switch OVMF's PXE/HTTP boot off: with no bootable disk it would try the NIC for minutes."""
    return [
        "-fw_cfg", "name=opt/org.tianocore/IPv4PXESupport,string=n",
        "-fw_cfg", "name=opt/org.tianocore/IPv6PXESupport,string=n",
    ]


class Swtpm:
    """A swtpm TPM 2.0 for one boot. The control socket is made by the lab and handed
    to swtpm as a listening fd, so it is ready before QEMU starts (no wait)."""

    def __init__(self, workdir: Path, log: Path | None = None, sock_path: Path | None = None) -> None:
        self.workdir = Path(workdir)
        self.state = self.workdir / "tpm"
        self.sock_path = Path(sock_path) if sock_path else self.workdir / "tpm.sock"
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: socket.socket | None = None  # the lab's connection, handed to QEMU as its chardev

    def start(self) -> Path:
        exe = shutil.which("swtpm")
        if not exe:
            raise H2KError("swtpm not found (install the 'swtpm' package) but the profile asks for a TPM")
        self.state.mkdir(parents=True, exist_ok=True)
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(str(self.sock_path))
        lsock.listen(1)
        fd = lsock.fileno()
        cmd = [exe, "socket", "--tpm2", "--tpmstate", f"dir={self.state}",
               "--ctrl", f"type=unixio,fd={fd}", "--flags", "not-need-init,startup-clear",
               "--terminate"]
        if self.log:
            cmd += ["--log", f"file={self.log},level=1"]
        from lab import backend_qemu as procs  # late: backend_qemu imports this module
        self.proc = procs.spawn(cmd, pass_fds=[fd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lsock.close()
        return self.sock_path

    def qemu_args(self, machine_type: str) -> tuple[list[str], int]:
        """QEMU's TPM arguments and the fd to pass: a socket the lab connected to swtpm (QEMU needs
        no access to the socket's path)."""
        model = "tpm-crb" if machine_type == "q35" else "tpm-tis"
        from lab.unixsock import connect_unix

        self.client = connect_unix(str(self.sock_path), 10.0)
        fd = self.client.fileno()
        return (["-chardev", f"socket,id=chrtpm,fd={fd}",
                 "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", f"{model},tpmdev=tpm0"], fd)

    def stop(self) -> None:
        from lab import backend_qemu as procs
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.proc is not None:
            procs.terminate(self.proc, grace=2.0)
            self.proc = None
        try:
            self.sock_path.unlink()
        except FileNotFoundError:
            pass
